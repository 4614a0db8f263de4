"""What every method's test file shares: the tiny Llama, the fresh-process reload check and an aten-op counter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype)


# Runs in a new interpreter: only the startup hook can make peft know our adapter type there.
_RELOAD_SCRIPT = """
import sys, torch
from peft import PeftModel
from tests.methods.common import tiny_llama
{prelude}
model = PeftModel.from_pretrained(tiny_llama(), sys.argv[1]).eval()
saved = torch.load(sys.argv[1] + "/expected.pt")
with torch.no_grad():
    logits = model(saved["ids"]).logits
assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
print("BIT-EXACT")
"""


def assert_reloads_bit_exact_in_fresh_process(adapter_dir: Path, ids: torch.Tensor, logits: torch.Tensor,
                                              prelude: str = "") -> None:
    """``adapter_dir`` holds a saved adapter on ``tiny_llama()``; a fresh process must reproduce ``logits`` exactly.
    ``prelude`` runs before loading (e.g. to forbid an SVD)."""
    torch.save({"ids": ids, "logits": logits}, Path(adapter_dir) / "expected.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = _RELOAD_SCRIPT.format(prelude=textwrap.dedent(prelude))
    result = subprocess.run([sys.executable, "-c", script, str(adapter_dir)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BIT-EXACT" in result.stdout


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block, and separately the ops that run a kernel (views
    and aliases excluded): a device-independent proxy for kernel launches."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.kernel_count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from llamafactory_moe.bench.measure import is_view_op

        self.count += 1
        self.kernel_count += not is_view_op(func)
        return func(*args, **(kwargs or {}))


def count_train_ops(config, batch: tuple[int, int] = (3, 5), features: int = 64) -> tuple[int, int]:
    """``(all aten ops, kernel ops)`` of one training step of a single wrapped ``Linear(features, features)``: forward
    with a right-padded batch, aux loss, backward and the per-optimizer-step update. Tests compare counts across
    expert counts: a Python loop over experts would make them grow."""
    from peft import get_peft_model

    from llamafactory_moe.core import loss_window
    from llamafactory_moe.core.step_hooks import apply_optimizer_step_updates

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(features, features)), config)
    x = torch.randn(*batch, features, requires_grad=True)
    mask = torch.ones(batch, dtype=torch.long)
    mask[-1, batch[1] // 2:] = 0
    model.train()
    with OpCounter() as counter:
        with loss_window.collect(token_mask=mask) as window:
            out = model(x)
        aux = window.weighted_total()
        (out.sum() + (aux if aux is not None else 0)).backward()
        apply_optimizer_step_updates(model)
    return counter.count, counter.kernel_count
