"""Loss plots. Mirrors ``llamafactory.extras.ploting`` (LLaMA-Factory's spelling; patched there: ``plot_loss``):
with ``plot_loss: true`` also plot ``lm_loss`` and the ``moe_*`` curves.
"""

from __future__ import annotations

import json
import os

from ..patching import Patch
from .common import VERIFIED


def _wrap_plot_loss(original, module):
    def plot_loss(save_dictionary, keys=None):
        keys = list(keys or ["loss"])
        state_path = os.path.join(save_dictionary, "trainer_state.json")
        if os.path.isfile(state_path):
            with open(state_path, encoding="utf-8") as f:
                history = json.load(f).get("log_history", [])
            logged = {k for entry in history for k in entry}
            if "lm_loss" in logged and "lm_loss" not in keys:  # training_lm_loss.png, beside training_loss.png
                keys.insert(keys.index("loss") + 1 if "loss" in keys else len(keys), "lm_loss")
            keys += sorted(k for k in logged if k.startswith("moe_") and k not in keys)
        return original(save_dictionary, keys=keys)

    return plot_loss


PATCHES: list[Patch] = [
    Patch("plot_loss", "llamafactory.extras.ploting", "plot_loss", _wrap_plot_loss,
          "plot lm_loss and moe_* curves (training_lm_loss.png, training_moe_aux_loss.png) beside the loss plot",
          VERIFIED, ("save_dictionary", "keys")),
]
