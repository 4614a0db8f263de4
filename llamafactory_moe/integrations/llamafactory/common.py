"""What every module of the LLaMA-Factory integration shares: the upstream version the patch targets were verified
against and the refusal to run one of our methods when a patch failed to apply.

Mirrors no LLaMA-Factory module.
"""

from __future__ import annotations

from ...core.errors import MoeConfigError
from ..patching import FAILED_PATCHES

VERIFIED = "llamafactory 0.9.5"


def _require_patches() -> None:
    if FAILED_PATCHES:
        names = ", ".join(sorted(FAILED_PATCHES))
        raise MoeConfigError("finetuning_type", "<llamafactory-moe method>",
                             f"cannot run because these LLaMA-Factory patches failed: {names}",
                             "see the warning printed at start-up; use a supported LLaMA-Factory version (0.9.5)")
