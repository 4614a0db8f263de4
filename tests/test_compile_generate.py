"""Compiled generation with our adapters unmerged: a static KV cache and a compiled forward, as transformers documents
it (``generate(..., cache_implementation="static", compile_config=CompileConfig(...))``: the prompt runs eagerly, every
decode step after it calls the model's ``torch.compile``'d ``__call__``).

For every case of ``tests/method_cases.py`` (every method, every example) on a tiny random ``LlamaForCausalLM`` with all
7 linear layers wrapped (peft-wrapped, adapters randomised so nothing is zero, ``eval()``), greedy ``generate`` on a
batch of 2 prompts, 6 new tokens:

* the compiled path ran: the backend compiled exactly one graph, and that graph ran once per decode step (5 calls), so
  every decode step after the prefill went through the compiled forward;
* no graph break anywhere in the forward (``fullgraph=True``: a break raises; dynamo's graph-break counter stays empty)
  and no recompilation across decode steps, nor in a second ``generate`` call with new prompts of the same length
  (``torch._dynamo.config.error_on_recompile``: a recompilation raises);
* the compiled generation gives the same tokens as eager ``generate`` (default DynamicCache, no compile) and the same
  logits at every step to 1e-5 (fp32); the adapter changes the logits (so the comparison covers it).

The matrix uses backend ``aot_eager`` (dynamo + AOTAutograd, the graph inductor receives, without the C++ code
generation that costs 5-25 s per model on the 2-core CI machine); inductor itself runs one case per routed method family
(MoELoRA, SMoRA, S'MoRE, GOAT), marked slow, as is the ``--compile-generate`` benchmark smoke run (which uses
transformers' default ``mode="reduce-overhead"``).

Runtime on the 2-core CI machine, quiet: the whole file 105 s with a cold inductor cache (63 s warm), the non-slow
part about 35 s of it. With a SmolLM2 benchmark running beside it the non-slow part took 99 s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from llamafactory_moe.core.peft_types import METHODS, register_all_methods
from tests.conftest import BASE_ENV, REPO_ROOT
from tests.method_cases import INDUCTOR_CASES, METHOD_PARAMS, fresh_dynamo  # noqa: F401 (fixture, used by name)

register_all_methods()
CASES = METHOD_PARAMS
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, PROMPT, NEW_TOKENS = 2, 5, 6
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _tiny_peft_llama(method: str, kwargs: dict) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(config),
                           METHODS[method].config_cls(target_modules=TARGETS, init_weights=False, **kwargs))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


class _CountingBackend:
    """A dynamo backend (a plain function: ``CompileConfig.to_dict`` deep-copies its fields, and a function survives a
    deep copy as itself) that counts the graphs it compiles and how often the compiled graphs run."""

    def __init__(self, backend: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs = 0
        self.runs = 0
        inner = lookup_backend(backend)

        def backend_fn(gm, example_inputs):
            self.graphs += 1
            compiled = inner(gm, example_inputs)

            def run(*args):
                self.runs += 1
                return compiled(*args)

            return run

        self.fn = backend_fn


def _generate(model, ids, **extra):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True, **extra)


def _prompts(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))


def _compiled_generate_matches_eager(method: str, kwargs: dict, backend: str) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = _tiny_peft_llama(method, kwargs)
    counter = _CountingBackend(backend)
    config = CompileConfig(fullgraph=True, backend=counter.fn, mode=None)
    config._compile_all_devices = True  # transformers compiles generate's forward on CUDA only unless told so
    counters.clear()
    for call, seed in enumerate((0, 1)):  # the second call: new prompts of the same length, no new graph
        ids = _prompts(seed)
        eager = _generate(model, ids)
        if call == 0:
            with torch.no_grad(), model.disable_adapter():
                base_logits = model(input_ids=ids).logits[:, -1]
            assert not torch.allclose(eager.logits[0], base_logits, **TOL), "the adapter does not change the logits"
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _generate(model, ids, cache_implementation="static", compile_config=config)
        assert counter.graphs == 1, f"call {call}: {counter.graphs} graphs compiled"
        # The prefill runs eagerly; each of the NEW_TOKENS - 1 decode steps runs the one compiled graph.
        assert counter.runs == (call + 1) * (NEW_TOKENS - 1), f"call {call}: compiled graph ran {counter.runs} times"
        assert not any(counters["graph_break"].values()), dict(counters["graph_break"])
        assert torch.equal(compiled.sequences, eager.sequences), (compiled.sequences, eager.sequences)
        assert len(compiled.logits) == len(eager.logits) == NEW_TOKENS
        for step, (c, e) in enumerate(zip(compiled.logits, eager.logits)):
            torch.testing.assert_close(c, e, **TOL, msg=lambda m: f"call {call} step {step}: {m}")


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_compiled_static_cache_generate_matches_eager(case_id, method, kwargs, lf_keys):
    _compiled_generate_matches_eager(method, kwargs, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", [c for c in CASES if c.values[0] in INDUCTOR_CASES])
def test_inductor_generate_matches_eager(case_id, method, kwargs, lf_keys):
    # Backend inductor in its default mode: a counting backend takes no `mode`, and transformers' default
    # "reduce-overhead" only adds CUDA graphs, which inductor skips on CPU (the benchmark runs that mode).
    _compiled_generate_matches_eager(method, kwargs, "inductor")


@pytest.mark.slow
def test_bench_compile_generate_mode(tmp_path):
    """``python -m llamafactory_moe.bench --tiny --compile-generate``: each variant compiles one decode graph without
    a break, never recompiles while timed, generates eager's tokens, and gets tokens/s ratios with their spread."""
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "llamafactory_moe.bench", "--tiny", "--compile-generate", "--methods",
                           "moelora", "--gen-reps", "1", "--compile-rounds", "2", "--out", str(out)],
                          cwd=REPO_ROOT, env=BASE_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["errors"] == {} and result["graphs_during_timing"] == 0
    for label in ("moelora", "lora-r32"):
        entry = result["variants"][label]
        assert entry["graphs_compiled"] == 1 and entry["graph_breaks"] == 0 and entry["graphs_second_call"] == 0, entry
        assert entry["same_tokens_as_eager"] and entry["first_call_s"] > 0, entry
        assert len(entry["compiled_s"]) == len(entry["eager_s"]) == 2
    markdown = out.with_suffix(".md").read_text()
    assert "| moelora | lora-r32 |" in markdown and "[" in markdown
