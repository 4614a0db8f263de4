"""Aux losses in the loss, metrics in the logs. Mirrors the trainers of
``llamafactory.train.{sft,pt,dpo,kto,rm}.trainer`` (patched on each: ``compute_loss``, ``log``, ``create_optimizer``).

``compute_loss`` opens the aux-loss window (``core/loss_window.py``) and adds the recorded terms with HF's
gradient-accumulation scaling; ``log`` adds ``moe_*`` metrics (averaged over steps and ranks exactly as HF averages
``loss``) and ``lm_loss`` (``loss`` without the aux terms) next to ``loss``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ...analysis.statistics import accumulate, expert_similarity, model_expert_vectors, routing_metrics
from ..patching import Patch
from .common import VERIFIED

ROUTING_METRICS = ("moe_load_cv", "moe_router_entropy", "moe_dropped_expert_frac", "moe_inactive_expert_frac",
                   "moe_expert_similarity")
ROUTING_LOG = "moe_routing_log.jsonl"


class _MoeLogAccumulator:
    """Detached aux-loss and routing statistics since the last log, per rank.

    The aux terms are averaged the way transformers' Trainer averages ``loss`` (see ``_wrap_log``): each micro-batch
    counts ``weight = 1 / current_gradient_accumulation_steps``, so ``sums / steps`` is the mean over optimizer steps
    of the mean over each step's micro-batches, also when an epoch's last step has fewer micro-batches.
    """

    def __init__(self):
        self.sums: dict[str, Any] = {}  # detached scalar tensors, read back to the host only when logging
        self.steps = 0.0  # optimizer steps covered: the sum of the micro-batch weights
        self.routing: dict[str, Any] = {}

    def add(self, window, weight: float = 1.0, replaced=None, restart: int = 0) -> None:
        """Add one training micro-batch with ``weight = 1 / current_gradient_accumulation_steps``.

        ``replaced``: a bool tensor (not a bool: no host sync), True when the Trainer's ``logging_nan_inf_filter``
        replaces this micro-batch's loss by ``tr_loss / (1 + restart)`` (``restart``: optimizer steps since the last
        log); the aux sums then take the same replacement, so they stay the aux share of what the Trainer logs."""
        import torch

        # Coefficient-weighted sums over layers, as `window.detached_terms()` but kept as tensors: a float() here would
        # wait for the device on every micro-batch.
        terms = window.term_totals()
        terms = {"aux_loss": sum(terms.values()), **terms}
        for name, value in terms.items():
            key = f"moe_{name}"
            previous = self.sums.get(key, 0.0)
            added = previous + weight * value
            if replaced is not None:
                condition = replaced.to(added.device) if isinstance(added, torch.Tensor) else replaced
                added = torch.where(condition, previous + previous / (1 + restart), added)
            self.sums[key] = added
        self.steps += weight
        for layer_name, records in window.routing.items():
            for record in records:
                accumulate(self.routing.setdefault(layer_name, {}), record)


def _is_moe_model(model) -> bool:
    from ...core.layer import MoeLoraLayer

    cached = getattr(model, "_llamafactory_moe_is_moe", None)
    if cached is None:
        cached = any(isinstance(m, MoeLoraLayer) for m in model.modules())
        try:
            object.__setattr__(model, "_llamafactory_moe_is_moe", cached)
        except Exception:
            pass
    return cached


def _wrap_compute_loss(original, module):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if not model.training or not _is_moe_model(model):
            return original(self, model, inputs, *args, **kwargs)
        from ...core import loss_window

        logging_steps = max(int(getattr(self.args, "logging_steps", 1) or 1), 1)
        collect_routing = (self.state.global_step + 1) % logging_steps == 0
        # The Trainer's inputs are the collator's BatchEncoding: a Mapping (UserDict), not a dict.
        from collections.abc import Mapping

        token_mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        with loss_window.collect(token_mask=token_mask, collect_routing=collect_routing) as window:
            result = original(self, model, inputs, *args, **kwargs)
        aux_total = window.weighted_total()
        # Mirror transformers' Trainer.training_step: it divides the returned loss by the accumulation steps only when
        # the model does not normalise by `num_items_in_batch` itself; aux terms are per-micro-batch means, so they
        # must be divided either way.
        accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        hf_divides = ((not getattr(self, "model_accepts_loss_kwargs", False) or num_items is None)
                      and getattr(self, "compute_loss_func", None) is None)
        scale = 1.0 if hf_divides else 1.0 / accumulation
        if aux_total is not None:
            if isinstance(result, tuple):
                loss, *rest = result
                result = (loss + scale * aux_total.to(loss.dtype), *rest)
            else:
                result = result + scale * aux_total.to(result.dtype)
        # Either way each aux term enters the Trainer's `tr_loss` as `aux / accumulation`: the accumulator weights it
        # so, and replaces it where the Trainer replaces a non-finite micro-batch loss (`logging_nan_inf_filter`).
        replaced = None
        if getattr(self.args, "logging_nan_inf_filter", False) and hasattr(self, "_globalstep_last_logged"):
            import torch
            from transformers.utils import is_torch_xla_available

            if not is_torch_xla_available():
                total = result[0] if isinstance(result, tuple) else result
                replaced = ~torch.isfinite(total.detach()).all()
        accumulator = self.__dict__.setdefault("_moe_log_accumulator", _MoeLogAccumulator())
        accumulator.add(window, weight=1.0 / accumulation, replaced=replaced,
                        restart=self.state.global_step - getattr(self, "_globalstep_last_logged", 0))
        return result

    return compute_loss


def _routing_metrics(trainer, routing: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict]]:
    """Overall ``moe_*`` routing scalars and per-layer statistics (definitions: ``analysis.statistics``); expert
    similarity is read from the weights here, on logging steps only."""
    if not routing:
        return {}, {}
    model = getattr(trainer, "model", None)
    vectors = model_expert_vectors(model) if model is not None else {}
    similarities = {name: expert_similarity(v) for name, v in vectors.items()}
    return routing_metrics(routing, {k: v for k, v in similarities.items() if v is not None})


def _write_routing_log(trainer, per_layer: dict[str, dict]) -> None:
    """One row per logging step in ``<output_dir>/moe_routing_log.jsonl`` (main process only; its own batches)."""
    is_main = getattr(trainer, "is_world_process_zero", lambda: True)()
    output_dir = getattr(trainer.args, "output_dir", None)
    if not per_layer or not is_main or not output_dir:
        return
    os.makedirs(output_dir, exist_ok=True)
    row = {"step": int(getattr(getattr(trainer, "state", None), "global_step", 0)), "layers": per_layer}
    with open(os.path.join(output_dir, ROUTING_LOG), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _wrap_log(original, module):
    def log(self, logs, *args, **kwargs):
        accumulator = self.__dict__.get("_moe_log_accumulator")
        if accumulator is not None and "loss" in logs and accumulator.steps:
            import torch

            metrics = {k: v / accumulator.steps for k, v in sorted(accumulator.sums.items())}
            routing, per_layer = _routing_metrics(self, accumulator.routing)
            metrics.update(routing)
            _write_routing_log(self, per_layer)
            keys = sorted(metrics)
            values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float32,
                                  device=getattr(self.args, "device", "cpu"))
            # Every rank logs at the same steps (transformers gathers the loss here too), so this collective is safe.
            if getattr(self.args, "world_size", 1) > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            logs.update({k: round(float(v), 6) for k, v in zip(keys, values.tolist())})
            _insert_lm_loss(logs)
            self.__dict__["_moe_log_accumulator"] = _MoeLogAccumulator()
        return original(self, logs, *args, **kwargs)

    return log


def _insert_lm_loss(logs: dict) -> None:
    """Put ``lm_loss = loss - moe_aux_loss`` right after ``loss`` (in place, keeping ``logs`` the same dict).

    Why the difference is exact (transformers 4.57 ``Trainer``). With ``G`` = ``current_gradient_accumulation_steps``
    (the micro-batches of this optimizer step), ``training_step`` returns per micro-batch either ``(lm + aux) / G`` (the
    Trainer divides: the model ignores ``num_items_in_batch``, as in dpo/kto/rm and multimodal sft) or
    ``lm_part + aux / G`` (the model or ``compute_loss_func`` normalises by the tokens of the whole accumulation window;
    ``compute_loss`` above divides the aux terms itself). ``tr_loss`` sums these over the micro-batches since the last
    log; ``_maybe_log_save_evaluate`` takes the mean over ranks, divides by the optimizer steps since the last log and
    rounds to 4 decimals. That is linear in the aux share ``sum(aux / G)``, which ``_MoeLogAccumulator`` sums the same
    way (weight ``1 / G``, the NaN/inf filter's replacement mirrored), divides by the same step count (the sum of the
    weights, also when an epoch's last step has fewer micro-batches) and ``log`` averages over ranks the same way. So
    ``moe_aux_loss`` is exactly the aux share of ``loss`` and ``loss - moe_aux_loss`` is the logged objective without
    the aux terms, in the same units: the LM loss for pt/sft; for dpo/kto/rm the stage's own objective (preference or
    pairwise ranking loss, with its ftx term if any), under the same key. It inherits ``loss``'s 4-decimal rounding
    (<= 5e-5); the aux keys carry 6 decimals, so ``lm_loss + moe_aux_loss == loss`` to float precision. Eval losses
    never contain aux terms (``compute_loss`` adds them in training only), so no ``eval_lm_loss`` is needed.
    """
    loss, aux = logs.get("loss"), logs.get("moe_aux_loss")
    if not isinstance(loss, (int, float)) or not isinstance(aux, (int, float)):
        return
    items = list(logs.items())
    at = next(i for i, (key, _) in enumerate(items) if key == "loss") + 1
    items.insert(at, ("lm_loss", round(loss - aux, 6)))
    logs.clear()
    logs.update(items)


def _wrap_create_optimizer(original, module):
    def create_optimizer(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        # Upstream cause: under DeepSpeed, transformers' `deepspeed_optim_sched` builds the LR scheduler on this
        # optimizer, then `DeepSpeedEngine._configure_optimizer` (deepspeed 0.19.8 runtime/engine.py:2348) deletes its
        # empty param groups in place. HF's weight-decay grouping leaves the no-decay group empty for adapters (no
        # trainable bias / norm), so the scheduler holds one lr more than the optimizer has groups and torch's
        # `zip(..., strict=True)` fails at the first `lr_scheduler.step()` (stock LoRA too). Dropping the empty groups
        # here, before the scheduler exists, is exactly what DeepSpeed does a moment later.
        if getattr(self, "is_deepspeed_enabled", False) and hasattr(optimizer, "param_groups"):
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if len(group["params"]) > 0]
        return optimizer

    return create_optimizer


_TRAINERS = (
    ("llamafactory.train.sft.trainer", "CustomSeq2SeqTrainer"),
    ("llamafactory.train.pt.trainer", "CustomTrainer"),
    ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
    ("llamafactory.train.kto.trainer", "CustomKTOTrainer"),
    ("llamafactory.train.rm.trainer", "PairwiseTrainer"),
)


PATCHES: list[Patch] = [
    row
    for module_name, cls in _TRAINERS
    for row in (
        Patch(f"{cls}.compute_loss", module_name, f"{cls}.compute_loss", _wrap_compute_loss,
              "add in-layer aux losses with HF's gradient-accumulation scaling", VERIFIED, ("self", "model", "inputs")),
        Patch(f"{cls}.log", module_name, f"{cls}.log", _wrap_log,
              "log moe_* metrics (averaged over steps and ranks as HF averages the loss) and lm_loss (the loss "
              "without the aux terms) next to the loss", VERIFIED, ("self", "logs")),
        Patch(f"{cls}.create_optimizer", module_name, f"{cls}.create_optimizer", _wrap_create_optimizer,
              "DeepSpeed: drop empty param groups before HF builds the LR scheduler (DeepSpeed drops them after, "
              "so the first lr_scheduler.step() fails: zip() argument 2 is longer than argument 1)", VERIFIED,
              ("self",)),
    )
]
