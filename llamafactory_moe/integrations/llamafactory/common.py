"""What every module of the LLaMA-Factory integration shares: the upstream version the patch targets were verified
against and the refusal to run one of our methods when a patch failed to apply.

Mirrors no LLaMA-Factory module.
"""

from __future__ import annotations

from typing import Optional

from ...core.errors import MoeConfigError
from ..patching import FAILED_PATCHES

VERIFIED = "llamafactory 0.9.5"


def _require_patches() -> None:
    if FAILED_PATCHES:
        names = ", ".join(sorted(FAILED_PATCHES))
        raise MoeConfigError("finetuning_type", "<llamafactory-moe method>",
                             f"cannot run because these LLaMA-Factory patches failed: {names}",
                             "see the warning printed at start-up; use a supported LLaMA-Factory version (0.9.5)")


def check_quantized_base(method: Optional[str], quantization: object) -> None:
    """A method that corrects the frozen base weights (``modifies_base_weights``, e.g. GOAT) cannot train on a quantized
    base. One rule and one message, asked at parse time (``quantization_bit``) and when the model loads (a checkpoint
    that is quantized already)."""
    if method is None or quantization is None:
        return
    from ...core.peft_types import METHODS

    if METHODS[method].config_cls.modifies_base_weights:
        raise MoeConfigError("quantization_bit", quantization,
                             f"cannot be used with `{method}`, which corrects the frozen base weights",
                             "train on an unquantized base model")
