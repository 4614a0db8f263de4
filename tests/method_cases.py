"""One row per method configuration exercised by the shared test matrix and the CLI tests.

Each row: (case id, finetuning_type, config kwargs for the PEFT config class, extra LLaMA-Factory yaml keys).
Method authors add their rows here; tests read capabilities from the config class flags, never from names.
Keep kwargs tiny (hidden size 64 models): small ranks, few experts.
"""

METHOD_CASES = [
    # id, method, peft config kwargs, llamafactory yaml keys
    ("moelora-top2", "moelora", dict(num_experts=4, top_k=2, expert_rank=4), dict(moe_num_experts=4, moe_top_k=2, lora_rank=4)),
    ("moelora-soft", "moelora", dict(num_experts=3, top_k=None, expert_rank=4), dict(moe_num_experts=3, moe_top_k=3, lora_rank=4)),
    ("goat-top2", "goat", dict(num_experts=4, top_k=2, expert_rank=2), dict(moe_num_experts=4, moe_top_k=2, lora_rank=2)),
    ("goat-gradient-alignment", "goat", dict(num_experts=4, top_k=2, expert_rank=1, scaling_mode="gradient_alignment"), dict(moe_num_experts=4, moe_top_k=2, lora_rank=1, moe_scaling_mode="gradient_alignment")),
    ("adamole", "adamole", dict(num_experts=4, expert_rank=2), dict(moe_num_experts=4, lora_rank=2)),
    ("adamole-high-threshold", "adamole", dict(num_experts=4, expert_rank=2, max_threshold=0.5), dict(moe_num_experts=4, lora_rank=2, moe_max_threshold=0.5)),
    ("d2mora", "d2mora", dict(num_down_experts=3, num_experts=2, expert_rank=2), dict(moe_num_down_experts=3, moe_num_experts=2, lora_rank=2)),
    ("d2mora-one-down-expert", "d2mora", dict(num_down_experts=1, num_experts=3, expert_rank=2, aux_loss_coef=1e-2), dict(moe_num_down_experts=1, moe_num_experts=3, lora_rank=2, moe_aux_loss_coef=1e-2)),
    ("hydralora", "hydralora", dict(num_experts=3, expert_rank=2), dict(moe_num_experts=3, lora_rank=2)),
    ("hydralora-balance", "hydralora", dict(num_experts=3, expert_rank=2, head_balance_loss=True), dict(moe_num_experts=3, lora_rank=2, moe_head_balance_loss=True)),
    ("moslora", "moslora", dict(expert_rank=4), dict(lora_rank=4)),
    ("smora", "smora", dict(expert_rank=8, top_k=2, lora_alpha=4.0), dict(lora_rank=8, moe_top_k=2, lora_alpha=4)),
    ("smora-as-shipped-gate", "smora", dict(expert_rank=8, top_k=3, rank_partition=2, gate_uses_bias=True, bias_update_rate=1e-3), dict(lora_rank=8, moe_top_k=3, moe_rank_partition=2, moe_gate_uses_bias=True, moe_bias_update_rate=1e-3)),
    ("smore-switch", "smore", dict(layer_num_experts=[3, 2], layer_top_k=[2, 1], layer_ranks=[2, 3], gate_dims=[8], router_down_dim=8), dict(moe_layer_num_experts=[3, 2], moe_layer_top_k=[2, 1], moe_layer_ranks=[2, 3], moe_gate_dims=[8], moe_router_down_dim=8)),
    ("smore-noisy-shared-pool", "smore", dict(layer_num_experts=[3, 3], layer_top_k=[2, 2], layer_ranks=[2, 2], gate_type="noisy_topk", shared_expert_pool=True, activation_position="child_v2", gate_dims=[8], router_down_dim=8), dict(moe_layer_num_experts=[3, 3], moe_layer_top_k=[2, 2], moe_layer_ranks=[2, 2], moe_gate_type="noisy_topk", moe_shared_expert_pool=True, moe_activation_position="child_v2", moe_gate_dims=[8], moe_router_down_dim=8)),
    ("smore-dense-eq-1-layer", "smore", dict(layer_num_experts=[2, 2], layer_top_k=[2, 2], layer_ranks=[2, 2], gate_type="dense", init_method="eq_1_layer", gate_dims=[8], router_down_dim=8), dict(moe_layer_num_experts=[2, 2], moe_layer_top_k=[2, 2], moe_layer_ranks=[2, 2], moe_gate_type="dense", moe_init_method="eq_1_layer", moe_gate_dims=[8], moe_router_down_dim=8)),
    # -- add rows above this line --
]
