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

from llamafactory_moe.core import aux_loss
from llamafactory_moe.core.layer import MoeLoraLayer
from llamafactory_moe.core.peft_types import METHODS, register_all_methods
from tests.method_cases import METHOD_CASES

register_all_methods()
CASES = [pytest.param(*case, id=case[0], marks=pytest.mark.skipif(case[1] not in METHODS,
                                                                   reason=f"{case[1]} not implemented"))
         for case in METHOD_CASES]
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
        with aux_loss.collect(token_mask=mask) as window:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        total = window.weighted_total()
        (loss if total is None else loss + total).backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def _aux_only_router_grads(model, ids, mask) -> dict[str, torch.Tensor]:
    model.zero_grad()
    with aux_loss.collect(token_mask=mask) as window:
        model(input_ids=ids, attention_mask=mask)
    total = window.weighted_total()
    if total is None:
        pytest.skip("this configuration records no auxiliary loss (e.g. soft routing)")
    assert total.requires_grad
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_aux_loss_reaches_routers_identically_with_gradient_checkpointing(case_id, method, kwargs, lf_keys):
    if not METHODS[method].config_cls.aux_loss_terms:
        pytest.skip(f"{method} has no auxiliary loss")
    ids, mask = batch()
    plain = make_peft(method, kwargs, init_weights=False)
    plain.train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    for module in plain.modules():  # no dropout noise: the two passes must see the same computation
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for module in checkpointed.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    grads_plain = _aux_only_router_grads(plain, ids, mask)
    torch.manual_seed(0)
    grads_ckpt = _aux_only_router_grads(checkpointed, ids, mask)
    assert any(g.abs().sum() > 0 for g in grads_plain.values())
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5)


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
