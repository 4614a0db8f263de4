"""The loss window: what the layers of one loss computation record, and the project's only module-level mutable state.

A window spans one training micro-batch's loss (or one analysed inference pass). While it is open the wrapped layers
record into it, and it hands them the batch's token mask:

* **auxiliary terms** (balance, diversity ... losses), which keep their graph and are added to the loss;
* **routing summaries** (per-expert load, mass, entropy), detached, for logs and ``analyze``;
* the **token mask** of the batch (padding excluded from balance statistics) and its cached per-token weights.

Lifecycle (driven by the trainer patch in ``integrations/llamafactory/trainer.py``)::

    with loss_window.collect(token_mask=inputs["attention_mask"]) as window:   # reset
        loss = trainer.compute_loss(...)       # layers record inside forward
    loss = loss + window.weighted_total()      # drain: tensors keep their graph, so routers get gradients
    window.detached_terms()                    # floats for logging / analysis

Who calls what: the trainer, ``analyze`` and the benchmark open windows (``collect``) and read them; only
``core.layer.MoeLoraLayer`` calls the recording side (``pause_unless_counted`` / ``resume``, ``recording``,
``record_term``, ``wants_routing``, ``record_routing_summary``, ``batch_token_mask``, ``token_weights``). Method
files reach the window only through the layer's helpers, and ``core.routing`` is pure math that never sees it.

Why a window rather than per-module attributes: gradient checkpointing re-runs layer forwards during ``backward()``,
after the window closed, so recomputation records nothing and nothing is counted twice; DPO/KTO reference passes run
with adapters disabled, which record nothing either. The window must be used with non-reentrant checkpointing
(forced by the argument patch): reentrant checkpointing runs the first forward under ``no_grad``, so the recorded terms
would have no graph.

Only forwards that are part of the loss record. ``MoeLoraLayer.forward``, which every method goes through, asks
``pause_unless_counted()`` on entry: a window opened with gradients enabled (a training step) is paused for the layer
forwards that run under ``torch.no_grad()`` / ``inference_mode`` inside it, e.g. the policy pass of LLaMA-Factory's KTO
trainer on the KL batch, which would otherwise add its aux terms to the loss and the logs, its routing to the routing
statistics and its tokens to SMoRA's balancing counts. The exception is the first pass of reentrant checkpointing,
which PyTorch runs inside an ``autograd.Function.forward`` and is the only training pass of those layers (their
recomputation comes after the window closed). A window opened under ``no_grad`` (routing analysis of an inference pass)
records every forward. Deciding once per layer forward, from its grad mode on entry, keeps a method's own ``no_grad``
blocks (routing summaries) from changing the decision. The rule reads thread-local autograd flags only: no host sync,
and it decides nothing about what a layer computes.

The mask outlives the window until the next one opens: non-reentrant checkpointing requires the recomputation (which
runs during ``backward()``, after the window closed) to perform exactly the ops of the original forward, so a layer's
computation may depend on the mask but never on whether the window is open — only what is recorded does.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


class LossWindow:
    def __init__(self, token_mask: Optional[torch.Tensor] = None, collect_routing: bool = False):
        self._token_mask = token_mask
        self._flat_mask: Optional[torch.Tensor] = None
        self._flat_weights: Optional[torch.Tensor] = None
        self.collect_routing = collect_routing
        # A training window (opened with gradients) counts only the forwards that are part of the loss
        # (`pause_unless_counted`); `paused` is True during a layer forward that is not.
        self.grad_enabled = torch.is_grad_enabled()
        self.paused = False
        # What layers record, in order: flat lists, appended to and never keyed inside a forward. Under torch.compile
        # a layer forward may run inside non-reentrant checkpointing, which dynamo traces as a higher-order op; torch
        # 2.14's dynamo mis-tracks a defaultdict filled from two such ops ("Argument ... does not belong to this
        # Graph"), while a plain list works (tests/test_compile.py). `terms` / `routing` group them on reading.
        self._term_records: list[tuple[str, float, torch.Tensor]] = []  # (term, coef, scalar tensor with its graph)
        self._routing_records: list[tuple[str, dict[str, torch.Tensor]]] = []  # (layer name, detached summaries)

    @property
    def terms(self) -> dict[str, list[tuple[float, torch.Tensor]]]:
        """term -> list of (coef, value), value a scalar tensor that keeps its graph, in recording order."""
        grouped: dict[str, list[tuple[float, torch.Tensor]]] = defaultdict(list)
        for term, coef, value in self._term_records:
            grouped[term].append((coef, value))
        return grouped

    @property
    def routing(self) -> dict[str, list[dict[str, torch.Tensor]]]:
        """layer name -> list of detached routing summaries (``core.routing.routing_summary``), in recording order."""
        grouped: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        for layer_name, summaries in self._routing_records:
            grouped[layer_name].append(summaries)
        return grouped

    def token_mask(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Flattened bool mask of real (non-padding) tokens, or None when it does not describe these tokens."""
        if self._token_mask is None:
            return None
        if self._flat_mask is None:
            self._flat_mask = self._token_mask.reshape(-1) != 0
        if self._flat_mask.numel() != num_tokens:
            return None  # e.g. DPO's concatenated batch, or a layer that sees a different token layout
        return self._flat_mask

    def term_totals(self) -> dict[str, torch.Tensor]:
        """Per term, the coefficient-weighted sum over layers as a detached float32 scalar tensor (for logs: no host
        sync until it is read)."""
        return {name: _weighted_sum(values, detach=True, skip_zero=False) for name, values in self.terms.items()}

    def weighted_total(self) -> Optional[torch.Tensor]:
        """The sum of every term's coefficient-weighted total (what is added to the loss), or None without terms.
        Terms with coefficient 0 add nothing, not even a zero node to the graph."""
        total = None
        for values in self.terms.values():
            term = _weighted_sum(values, detach=False, skip_zero=True)
            if term is not None:
                total = term if total is None else total + term
        return total

    def detached_terms(self) -> dict[str, float]:
        """Per term: the coefficient-weighted sum over layers (what was added to the loss)."""
        return {name: float(value) for name, value in self.term_totals().items()}


def _weighted_sum(values: list[tuple[float, torch.Tensor]], detach: bool, skip_zero: bool) -> Optional[torch.Tensor]:
    """``sum_i coef_i * value_i`` with the values of one coefficient stacked and summed: three kernels per coefficient
    whatever the number of layers, and one multiply in the backward (a per-layer ``total + coef * value`` chain costs
    two kernels per layer forward and one backward)."""
    groups: dict[float, list[torch.Tensor]] = defaultdict(list)
    for coef, value in values:
        if not (skip_zero and coef == 0.0):
            groups[coef].append(value.detach() if detach else value)
    total = None
    for coef, group in groups.items():
        device = group[0].device  # layers of a model split over devices (device_map) meet on the first one's
        part = torch.stack([v.to(device=device, dtype=torch.float32) for v in group]).sum() * coef
        total = part if total is None else total + part
    return total


_window: Optional[LossWindow] = None
_batch_window: Optional[LossWindow] = None  # the last window opened: its token mask serves recomputation too


@contextmanager
def collect(token_mask: Optional[torch.Tensor] = None, collect_routing: bool = False) -> Iterator[LossWindow]:
    """Open a window for one loss computation. Nested windows are not allowed."""
    global _window, _batch_window
    if _window is not None:
        raise RuntimeError("an aux-loss window is already open; compute_loss must not be re-entered")
    window = LossWindow(token_mask=token_mask, collect_routing=collect_routing)
    _window = _batch_window = window
    try:
        yield window
    finally:
        _window = None


def current() -> Optional[LossWindow]:
    """The open window, or None."""
    return _window


def _in_autograd_function_forward() -> bool:
    """Inside a custom ``torch.autograd.Function.forward`` (reentrant checkpointing's first pass): PyTorch turns off
    both backward and forward-mode AD there, whereas ``torch.no_grad()`` leaves forward-mode AD on."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace `_is_fwd_grad_enabled` (a graph break) nor guard on it. Compiled, the answer is False:
        # dynamo traces checkpointing as a higher-order op that keeps gradients on (this rule is then not reached),
        # so a compiled no-grad forward is a plain no_grad / inference_mode pass (KTO's KL batch). Reentrant
        # checkpointing run eagerly around separately compiled layers is the one case answered wrong (its first pass
        # would record nothing); LLaMA-Factory forces non-reentrant checkpointing, under which the terms it would
        # have recorded had no graph anyway.
        return False
    fwd_grad_enabled = getattr(torch._C, "_is_fwd_grad_enabled", None)
    return fwd_grad_enabled is not None and not fwd_grad_enabled() and not torch.is_inference_mode_enabled()


def pause_unless_counted() -> Optional[LossWindow]:
    """The rule, asked by ``MoeLoraLayer.forward`` on entry: is this layer forward part of the open window's loss?

    Yes when no window is open (nothing to decide), when the window was opened without gradients (analysis), when
    gradients flow (a training forward, also non-reentrant checkpointing's first pass) or inside reentrant
    checkpointing's ``autograd.Function.forward``. Otherwise (a ``no_grad`` / ``inference_mode`` pass inside a training
    step, e.g. KTO's KL batch) the window is paused and returned: the caller hands it to ``resume`` when the forward
    ends. Host-side flags only (no device sync)."""
    window = _window
    if (window is None or window.paused or not window.grad_enabled or torch.is_grad_enabled()
            or _in_autograd_function_forward()):
        return None
    window.paused = True
    return window


def resume(window: Optional[LossWindow]) -> None:
    if window is not None:
        window.paused = False


def recording() -> bool:
    """Whether a forward running now contributes to the open window (aux terms, routing statistics, step statistics
    such as SMoRA's counts): a window is open and not paused by ``pause_unless_counted``. False for inference, eval and
    checkpoint recomputation (no window) and for a no-grad pass of the policy inside a training step (KTO's KL
    batch)."""
    window = _window
    return window is not None and not window.paused


def record_term(term: str, value: torch.Tensor, coef: float) -> None:
    """Record one layer's auxiliary term. A no-op unless ``recording()``."""
    if recording():
        _window._term_records.append((term, coef, value))


def batch_token_mask(num_tokens: int) -> Optional[torch.Tensor]:
    """The current training batch's non-padding mask (also during checkpoint recomputation), or None."""
    return None if _batch_window is None else _batch_window.token_mask(num_tokens)


def token_weights(mask: Optional[torch.Tensor], num_tokens: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``(N,)`` weights whose dot product with per-token values is their mean over real tokens: ``1/n_real`` for a
    real token, 0 for padding (``mask`` None: ``1/N`` everywhere).

    The weights of the current batch's own mask are computed once and reused by every layer (also during checkpoint
    recomputation, which reads the same mask); a mask is data, never differentiated, so sharing the tensor is safe.
    """
    window = _batch_window
    shared = window is not None and mask is not None and mask is window._flat_mask
    if shared and window._flat_weights is not None and window._flat_weights.dtype == dtype:
        return window._flat_weights
    if mask is None:
        weights = torch.full((num_tokens,), 1.0 / max(num_tokens, 1), dtype=dtype, device=device)
    else:
        weights = mask.to(dtype)
        weights = weights / weights.sum().clamp_min(1.0)
    if shared:
        window._flat_weights = weights
    return weights


def wants_routing() -> bool:
    """Whether a forward running now should hand routing summaries to the window (logging steps, ``analyze``)."""
    return recording() and _window.collect_routing


def record_routing_summary(layer_name: str, summaries: dict[str, torch.Tensor]) -> None:
    """Keep one layer's detached routing summaries (expert load, entropy ...) for logging and analysis."""
    if wants_routing():
        _window._routing_records.append((layer_name, {k: v.detach() for k, v in summaries.items()}))
