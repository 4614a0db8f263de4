"""SMoRA (llamafactory_moe/methods/smora.py) against the paper's equations written as per-token loops, plus the
loss-free balancing schedule (once per optimizer step, padding-free, checkpoint-safe, identical on every rank)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.core.step_hooks import apply_optimizer_step_updates
from llamafactory_moe.methods.smora import SMoRAConfig, SMoRALayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 24, 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def make_layer(seed=0, **kwargs) -> tuple[nn.Module, SMoRALayer]:
    torch.manual_seed(seed)
    kwargs = {"expert_rank": 8, "top_k": 3, "lora_alpha": 6.0, **kwargs}
    model = get_peft_model(Tiny(), SMoRAConfig(target_modules=["proj"], **kwargs))
    return model, model.base_model.model.proj


def randomise_bias(layer: SMoRALayer, seed=3, scale=0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = layer.rank_bias("default")
        bias.copy_(torch.randn(bias.shape, generator=g) * scale)


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def reference(layer: SMoRALayer, config: SMoRAConfig, x_dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's SMoRA update token by token, rank by rank. Returns (delta (N, out), selected (N, r) bool)."""
    A, B = layer.smora_A["default"], layer.smora_B["default"]
    W_g, bias = layer.smora_router["default"], layer.rank_bias("default")
    r, p = config.expert_rank, config.rank_partition
    k = config.top_k or r
    rows, chosen = [], torch.zeros(x_dropped.shape[0], r, dtype=torch.bool)
    for n, x in enumerate(x_dropped):
        scores = [torch.sigmoid(W_g[j // p] @ x) for j in range(r)]  # rank j reads block score j // p
        biased = [scores[j] + bias[j] for j in range(r)]
        order_of = [b.detach() for b in biased]
        top = sorted(range(r), key=lambda j: (-order_of[j].item(), j))[:k]
        values = {j: (biased[j] if config.gate_uses_bias else scores[j]) for j in top}
        total = sum(values.values())
        delta = torch.zeros(OUT)
        for j in top:
            gate = k * values[j] / total
            delta = delta + gate * B[:, j] * (A[j] @ x)
        rows.append(config.alpha / k * delta)
        chosen[n, top] = True
    return torch.stack(rows), chosen


VARIANTS = [
    dict(),
    dict(gate_uses_bias=True),
    dict(gate_uses_bias=True, bias_trainable=True),
    dict(rank_partition=2, top_k=4),
    dict(top_k=None),
    dict(top_k=8, rank_partition=4),
    dict(expert_dropout=0.3),
]


@pytest.mark.filterwarnings("ignore:`bias_trainable=True`")
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_output_and_gradients_match_reference(kwargs):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    randomise_bias(layer)
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    model.train()
    torch.manual_seed(7)
    with loss_window.collect(token_mask=mask) as window:
        out = model(x)
    assert window.weighted_total() is None and not window.terms  # loss-free: no auxiliary term at all
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    ours = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}

    model.zero_grad()
    x.grad = None
    torch.manual_seed(7)  # the same dropout mask: the SAME dropped x~ feeds router and A
    flat = x.reshape(-1, IN)
    x_dropped = F.dropout(flat, config.expert_dropout, training=True) if config.expert_dropout else flat
    delta, _ = reference(layer, config, x_dropped)
    expected = layer.base_layer(flat) + delta
    torch.testing.assert_close(out.reshape(-1, OUT), expected, atol=1e-5, rtol=1e-5)
    (expected.reshape(out.shape) * weights).sum().backward()
    theirs = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)
    if kwargs.get("bias_trainable"):
        assert ours["base_model.model.proj.smora_trainable_bias.default"].abs().sum() > 0


def test_bias_is_a_frozen_fp32_buffer_by_default():
    model, layer = make_layer()
    assert "smora_bias" in dict(layer.named_children()) and not layer.smora_trainable_bias
    assert not any("bias" in n and "base_layer" not in n for n, _ in model.named_parameters())
    model.base_model.set_adapter("default")  # peft's set_adapter must not make the buffer trainable
    assert not layer.rank_bias("default").requires_grad
    bf16_model = get_peft_model(tiny_llama(torch.bfloat16), SMoRAConfig(target_modules=TARGETS, expert_rank=8,
                                                                         top_k=2))
    assert {b.dtype for n, b in bf16_model.named_buffers() if "smora_bias" in n} == {torch.float32}
    bf16_model = bf16_model.to(torch.float32).to(torch.bfloat16)
    assert {b.dtype for n, b in bf16_model.named_buffers() if "smora_bias" in n} == {torch.float32}


def test_uniform_gates_equal_a_rank_k_lora_with_scaling_alpha_over_k():
    model, layer = make_layer(init_weights=False, expert_rank=8, top_k=3, lora_alpha=6.0)
    chosen = [1, 4, 6]
    with torch.no_grad():
        layer.smora_router["default"].zero_()  # every score is sigmoid(0) = 1/2: uniform gates g_j = 1
        layer.smora_bias["default"][chosen] = 1e-3  # the bias decides WHICH ranks; gates stay uniform
    x, _ = batch_with_padding()
    torch.manual_seed(0)
    lora = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], r=3, lora_alpha=6.0))
    with torch.no_grad():
        lora.base_model.model.proj.base_layer.load_state_dict(layer.base_layer.state_dict())
        lora.base_model.model.proj.lora_A["default"].weight.copy_(layer.smora_A["default"][chosen])
        lora.base_model.model.proj.lora_B["default"].weight.copy_(layer.smora_B["default"][:, chosen])
        assert lora.base_model.model.proj.scaling["default"] == model.peft_config["default"].scaling == 2.0
        torch.testing.assert_close(model(x), lora(x), atol=1e-6, rtol=1e-6)


def _counts_reference(layer, x, mask):
    config = layer.moe_config["default"]
    _, selected = reference(layer, config, x.reshape(-1, IN))
    return (selected & mask.reshape(-1, 1).bool()).sum(0).float()


def _train_forward(model, x, mask):
    with loss_window.collect(token_mask=mask):
        return model(x)


def test_bias_moves_once_per_optimizer_step_from_summed_counts():
    model, layer = make_layer(init_weights=False, bias_update_rate=1e-5)
    randomise_bias(layer, scale=0.05)
    model.train()
    (x1, m1), (x2, m2) = batch_with_padding(1), batch_with_padding(2)
    start = layer.rank_bias("default").clone()
    expected_counts = _counts_reference(layer, x1, m1) + _counts_reference(layer, x2, m2)
    _train_forward(model, x1, m1)  # gradient accumulation: two micro-batches in one optimizer step
    _train_forward(model, x2, m2)
    assert torch.equal(layer.rank_bias("default"), start)  # nothing moves during the step
    assert torch.equal(layer.step_statistics()[0], expected_counts)
    assert apply_optimizer_step_updates(model) == 1
    # The sign rule, exactly: +u below the mean count, -u above it, 0 at it.
    expected = start + 1e-5 * torch.sign(expected_counts.mean() - expected_counts)
    assert torch.equal(layer.rank_bias("default"), expected)
    assert (expected_counts != expected_counts.mean()).any()
    apply_optimizer_step_updates(model)  # a step without training forwards counts nothing and moves nothing
    assert torch.equal(layer.rank_bias("default"), expected)


def test_padding_eval_and_forwards_outside_the_window_do_not_count():
    model, layer = make_layer(init_weights=False)
    randomise_bias(layer, scale=0.05)
    x, mask = batch_with_padding()
    model.train()
    model(x)  # outside the window (e.g. a gradient-checkpointing recompute)
    assert torch.equal(layer.step_statistics()[0], torch.zeros(8))
    model.eval()
    _train_forward(model, x, mask)  # evaluation forward inside a window
    assert torch.equal(layer.step_statistics()[0], torch.zeros(8))
    model.train()
    _train_forward(model, x, mask)
    real_only = torch.cat([x[0, :3], x[1], x[2, :1]])  # the same real tokens without padding
    assert torch.equal(layer.step_statistics()[0], _counts_reference(layer, real_only, torch.ones(len(real_only))))
    assert layer.step_statistics()[0].sum() == mask.sum() * 3  # top_k = 3 ranks per real token


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recompute_is_not_counted(use_reentrant):
    model, layer = make_layer(init_weights=False)
    x, mask = batch_with_padding()
    model.train()
    with loss_window.collect(token_mask=mask):
        out = torch.utils.checkpoint.checkpoint(model, x.requires_grad_(True), use_reentrant=use_reentrant)
    once = layer.step_statistics()[0].clone()
    out.sum().backward()  # re-runs the forward after the window closed
    assert torch.equal(layer.step_statistics()[0], once)
    assert once.sum() == mask.sum() * 3


def test_bf16_forward_is_finite_and_bias_steps_stay_exact():
    model = get_peft_model(tiny_llama(torch.bfloat16), SMoRAConfig(target_modules=TARGETS, expert_rank=8, top_k=2,
                                                                   init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    model.train()
    with loss_window.collect(token_mask=torch.ones_like(ids)):
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    apply_optimizer_step_updates(model)
    steps = torch.cat([b for n, b in model.named_buffers() if "smora_bias" in n])
    assert steps.dtype == torch.float32 and set(steps.abs().unique().tolist()) <= {0.0, torch.tensor(1e-5).item()}
    assert (steps != 0).any()


INVALID = [
    (dict(expert_rank=4, top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(expert_rank=6, top_k=2, rank_partition=4), "rank_partition"),
    (dict(rank_partition=0), "rank_partition"),
    (dict(expert_rank=0), "expert_rank"),
    (dict(bias_update_rate=-1e-5), "bias_update_rate"),
    (dict(gate_uses_bias="yes"), "gate_uses_bias"),
    (dict(bias_trainable=1), "bias_trainable"),
    (dict(num_experts=4, expert_rank=8), "num_experts"),
    (dict(expert_dropout=1.5), "expert_dropout"),
]


@pytest.mark.parametrize("kwargs, field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError) as info:
        SMoRAConfig(target_modules=["proj"], **kwargs)
    assert info.value.field == field and f"`{field}`" in str(info.value)


def test_rank_partition_error_names_the_divisors():
    with pytest.raises(MoeConfigError, match=r"must divide `expert_rank` \(6\) for `smora`; use one of \[1, 2, 3, 6\]"):
        SMoRAConfig(expert_rank=6, top_k=2, rank_partition=4)


def test_num_experts_mirrors_expert_rank_and_is_not_a_yaml_key():
    config = SMoRAConfig(expert_rank=16, top_k=4)
    assert config.num_experts == 16 and config.scaling == 2 * 16 / 4
    assert "num_experts" not in SMoRAConfig.shared_fields
    assert set(SMoRAConfig.own_field_names()) == {"rank_partition", "bias_update_rate", "bias_trainable",
                                                   "gate_uses_bias"}


def test_disable_adapter_equals_base_model():
    model = get_peft_model(tiny_llama(), SMoRAConfig(target_modules=TARGETS, expert_rank=8, top_k=2,
                                                     init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(ids).logits
        base = tiny_llama()(ids).logits
        assert not torch.allclose(model(ids).logits, base)
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=1e-6)


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    model = get_peft_model(tiny_llama(), SMoRAConfig(target_modules=TARGETS, expert_rank=8, top_k=2,
                                                     rank_partition=2, gate_uses_bias=True))
    with torch.no_grad():  # stand-in for training: move everything, the balancing biases included
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "smora_" in name:
                tensor.add_(0.05 * torch.randn_like(tensor))
    ids = torch.randint(0, 128, (2, 7))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"smora_A", "smora_B", "smora_router", "smora_bias"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SMORA"
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(num_rank_experts: int) -> int:
    return count_train_ops(SMoRAConfig(target_modules=["0"], expert_rank=num_rank_experts, top_k=2,
                                       init_weights=False))


def test_op_count_does_not_depend_on_the_number_of_rank_experts():
    assert count_ops(4) == count_ops(16)


def _distributed_worker(rank: int, init_file: str, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world_size)
    model, layer = make_layer(init_weights=False)  # same seed: identical replicas
    model.train()
    for step in range(3):
        for micro in range(2):  # different data on every rank
            x, mask = batch_with_padding(seed=100 * rank + 10 * step + micro)
            _train_forward(model, x, mask)
        local = layer.step_statistics()[0].clone()
        apply_optimizer_step_updates(model)
    bias = layer.rank_bias("default")
    biases, counts = [torch.empty_like(bias) for _ in range(world_size)], [torch.empty_like(local) for _ in
                                                                          range(world_size)]
    dist.all_gather(biases, bias)
    dist.all_gather(counts, local)
    assert not torch.equal(counts[0], counts[1]), "ranks must see different data"
    assert torch.equal(biases[0], biases[1]) and bias.abs().sum() > 0
    dist.destroy_process_group()


@pytest.mark.distributed
def test_biases_are_identical_on_every_data_parallel_rank(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(str(tmp_path / "init"), 2), nprocs=2, join=True)
