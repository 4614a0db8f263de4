"""One matrix over every method configuration in `tests/method_cases.py` (peft's `test_custom_models` style).

Capabilities come from the config class flags (`identity_at_init`, `supports_merge`, `aux_loss_terms`), never from
method names.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llamafactory_moe.core import loss_window
from llamafactory_moe.core.layer import MoeLoraLayer
from llamafactory_moe.core.peft_types import METHODS, register_all_methods
from tests.method_cases import METHOD_CASES, METHOD_PARAMS

register_all_methods()
CASES = METHOD_PARAMS
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def make_peft(method: str, kwargs: dict, seed: int = 0, **extra) -> PeftModel:
    config = METHODS[method].config_cls(target_modules=TARGETS, **{**kwargs, **extra})
    torch.manual_seed(seed + 1)
    return get_peft_model(tiny_llama(seed), config)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def randomise_adapters(model: PeftModel, seed: int = 0) -> None:
    """Give every adapter parameter a non-trivial value so the update is not zero (B=0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_forward_is_finite_fp32_and_bf16(case_id, method, kwargs, lf_keys):
    model = make_peft(method, kwargs, init_weights=False)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
        model = model.to(torch.bfloat16)
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits.float()).all()


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_identity_at_init_when_flagged(case_id, method, kwargs, lf_keys):
    config_cls = METHODS[method].config_cls
    if not config_cls.identity_at_init:
        pytest.skip(f"{method} does not start as the identity (identity_at_init=False)")
    model = make_peft(method, kwargs)
    ids, mask = batch()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_save_load_round_trip_is_bit_exact(case_id, method, kwargs, lf_keys, tmp_path):
    model = make_peft(method, kwargs).eval()  # rows with expert dropout would otherwise draw masks
    randomise_adapters(model)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    config_json = (tmp_path / "adapter_config.json").read_text()
    assert f'"peft_type": "{method.upper()}"' in config_json
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_disable_adapter_equals_base_model(case_id, method, kwargs, lf_keys):
    model = make_peft(method, kwargs)
    randomise_adapters(model)
    ids, mask = batch()
    reference = tiny_llama()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
        base = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_train_step_updates_only_adapter_parameters(case_id, method, kwargs, lf_keys):
    model = make_peft(method, kwargs)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(METHODS[method].model_cls.prefix in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, mask = batch()
    for _ in range(2):  # B=0 at init: the first step moves B, the second moves everything upstream of it
        with loss_window.collect(token_mask=mask) as window:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        total = window.weighted_total()
        (loss if total is None else loss + total).backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


# Gradient checkpointing. Non-reentrant checkpointing recomputes each decoder layer in backward() with the same RNG
# state, after the aux-loss window closed: nothing is recorded twice, and the first pass's aux terms keep their graph.
# The full training loss (LM + aux) must then give every trainable parameter the gradient it gets without
# checkpointing. CPU float32 recomputation repeats the same kernels, so only the accumulation order of a few gradient
# sums could differ: GC_TOL is 1e-6 absolute + 1e-5 relative (measured: bit-identical in all 16 cases, 1 thread).
GC_TOL = {"atol": 1e-6, "rtol": 1e-5}


@pytest.fixture
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a loaded 2-core machine
    costs seconds per backward pass."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _training_gradients(model, ids, mask, with_aux: bool = True):
    """Gradients of every trainable parameter for LM + aux (the trainer's objective), the aux total, and the number
    of MoE layer forwards (a checkpointed layer runs twice: forward and recomputation)."""
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # noisy gates draw the same noise in every model compared
    try:
        with loss_window.collect(token_mask=mask) as window:
            lm = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss
        aux = window.weighted_total()
        (lm + aux if with_aux and aux is not None else lm).backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {n: p.grad.detach().clone() if p.grad is not None else None
             for n, p in model.named_parameters() if p.requires_grad}
    return grads, aux, len(calls), len(layers)


def _assert_zero_gradients_are_structural(model, grads, ids, mask) -> None:
    """A parameter whose gradient is exactly 0 must really not change the objective (e.g. a router over a single
    expert, whose softmax is the constant 1); moving all of them at once leaves the loss unchanged."""
    zero = [n for n, g in grads.items() if g.abs().max() == 0]
    assert len(zero) < len(grads) / 2, zero
    if not zero:
        return

    def objective():
        torch.manual_seed(0)
        with torch.no_grad(), loss_window.collect(token_mask=mask) as window:
            lm = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss
        aux = window.weighted_total()
        return lm if aux is None else lm + aux

    before = objective()
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in zero}
    with torch.no_grad():
        for n in zero:
            params[n].add_(torch.randn_like(params[n]))
    try:
        torch.testing.assert_close(objective(), before, atol=1e-6, rtol=1e-6)
    finally:
        with torch.no_grad():
            for n in zero:
                params[n].copy_(saved[n])


def _checkpointed(model, use_reentrant: bool):
    clone = copy.deepcopy(model)
    clone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # what LLaMA-Factory / peft do for reentrant checkpointing, so the adapters get gradients at all
        clone.enable_input_require_grads()
    clone.train()
    return clone


def _grad_mismatches(expected: dict, actual: dict) -> list[str]:
    assert expected.keys() == actual.keys()
    return [n for n in expected if actual[n] is None
            or not torch.allclose(actual[n], expected[n], atol=GC_TOL["atol"], rtol=GC_TOL["rtol"])]


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_training_gradients_are_identical_with_gradient_checkpointing(case_id, method, kwargs, lf_keys, one_thread):
    ids, mask = batch()
    plain = make_peft(method, kwargs, init_weights=False)
    randomise_adapters(plain)  # no zero block: every parameter gets a gradient
    plain.train()
    checkpointed = _checkpointed(plain, use_reentrant=False)
    grads, aux, calls, num_layers = _training_gradients(plain, ids, mask)
    grads_ckpt, aux_ckpt, calls_ckpt, _ = _training_gradients(checkpointed, ids, mask)
    assert calls == num_layers == len(TARGETS) * 2 and calls_ckpt == 2 * calls  # checkpointing really recomputed
    assert all(grad is not None for grad in grads.values())  # every trainable parameter is in the graph
    _assert_zero_gradients_are_structural(plain, grads, ids, mask)
    if METHODS[method].config_cls.aux_loss_terms and aux is not None:
        assert aux.requires_grad and aux_ckpt.requires_grad
        torch.testing.assert_close(aux_ckpt, aux, **GC_TOL)
    assert _grad_mismatches(grads, grads_ckpt) == []


def test_reentrant_checkpointing_would_drop_the_aux_gradient(one_thread):
    """Negative control for the test above, over every case: with reentrant checkpointing the layers' first pass runs
    under no_grad, so the aux terms recorded there have no graph, and the recomputation runs after the window closed.
    The routers then get exactly the LM-only gradient. The comparison above catches this for every case that records
    an aux loss, and only for those (for the rest reentrant checkpointing is harmless)."""
    caught, harmless = [], []
    for case_id, method, kwargs, _ in METHOD_CASES:
        ids, mask = batch()
        plain = make_peft(method, kwargs, init_weights=False)
        randomise_adapters(plain)
        plain.train()
        reentrant = _checkpointed(plain, use_reentrant=True)
        grads, aux, _, _ = _training_gradients(plain, ids, mask)
        lm_only, _, _, _ = _training_gradients(plain, ids, mask, with_aux=False)
        grads_reentrant, aux_reentrant, calls, num_layers = _training_gradients(reentrant, ids, mask)
        assert calls == 2 * num_layers, case_id  # it did checkpoint
        # Reentrant checkpointing = the LM-only gradient, for every case.
        assert _grad_mismatches(lm_only, grads_reentrant) == [], case_id
        mismatches = _grad_mismatches(grads, grads_reentrant)
        if aux is None:
            harmless.append(case_id)
            assert mismatches == [], case_id
        else:
            caught.append(case_id)
            assert not aux_reentrant.requires_grad, case_id  # recorded without a graph
            routers = [n for n in mismatches if "router" in n or "gate" in n]
            assert routers, (case_id, mismatches)
    print(f"\nreentrant checkpointing loses the aux gradient in {caught}; harmless (no aux term) in {harmless}")
    expected = [case_id for case_id, method, kwargs, _ in METHOD_CASES
                if METHODS[method].config_cls.aux_loss_terms
                and METHODS[method].config_cls(target_modules=TARGETS, **kwargs).effective_aux_loss_coef > 0]
    assert caught and sorted(caught) == sorted(c for c in expected if c not in harmless)


def test_llamafactory_parsing_forces_non_reentrant_checkpointing(tiny_model, tiny_data, tmp_path):
    """`_force_non_reentrant_checkpointing`, through LLaMA-Factory's own `get_train_args` (our parser patch applied by
    the startup hook): for every case, an unset `use_reentrant_gc` becomes False (LLaMA-Factory's default is True and
    gradient checkpointing is on by default), `false` stays False, and `true` is refused with a message naming the key
    and the method. The same holds for stock `finetuning_type: lora` loading one of our adapters."""
    import json

    from llamafactory.hparams import get_train_args

    from llamafactory_moe.core.errors import MoeConfigError
    from tests.conftest import train_args

    def parse(**overrides):
        args = train_args(tiny_model, tiny_data, str(tmp_path / "out"), **overrides)
        model_args = get_train_args(args)[0]
        assert not model_args.disable_gradient_checkpointing  # checkpointing stays on: only its mode is ours
        return model_args.use_reentrant_gc

    stock = {"finetuning_type": "lora", "moe_num_experts": None, "moe_top_k": None}
    # Negative control: stock LoRA keeps LLaMA-Factory's reentrant default, so the False below is our doing.
    assert parse(**stock) is True
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        ours = {"finetuning_type": method, "moe_num_experts": None, "moe_top_k": None, "lora_rank": None, **lf_keys}
        assert parse(**ours) is False, case_id
        assert parse(**ours, use_reentrant_gc=False) is False, case_id
        with pytest.raises(MoeConfigError) as error:
            parse(**ours, use_reentrant_gc=True)
        assert error.value.field == "use_reentrant_gc" and error.value.value is True, case_id
        assert "is not supported: reentrant" in str(error.value) and f"for `{method}`" in str(error.value), case_id

    adapter = tmp_path / "moelora_adapter"  # what `our_method_of` reads to tell our adapters from LoRA's
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "MOELORA"}))
    assert parse(**stock, adapter_name_or_path=str(adapter)) is False
    with pytest.raises(MoeConfigError, match="use_reentrant_gc"):
        parse(**stock, adapter_name_or_path=str(adapter), use_reentrant_gc=True)


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_merge_round_trips_or_refuses_clearly(case_id, method, kwargs, lf_keys):
    model = make_peft(method, kwargs)
    randomise_adapters(model)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    if not METHODS[method].config_cls.supports_merge:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            model.merge_and_unload()
        return
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MoeLoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
