"""What every method shares: config/layer/tuner bases, routers and balance losses, batched expert kernels, PeftType
registration and the loss window. Nothing here imports ``methods/`` or ``integrations/``."""

from .config import SHARED_FIELD_TO_LF_KEY, Example, MoeLoraConfig
from .errors import MoeConfigError
from .layer import MoeLoraLayer
from .peft_types import METHODS, finish_deferred_registration, register_method
from .tuner import MoeLoraTuner

__all__ = ["METHODS", "SHARED_FIELD_TO_LF_KEY", "Example", "MoeConfigError", "MoeLoraConfig", "MoeLoraLayer",
           "MoeLoraTuner", "register_method"]

# Last: if `import peft` happened inside this package's import, register the methods now that core is complete.
finish_deferred_registration()
