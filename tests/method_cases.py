"""One row per method configuration exercised by the shared test matrix and the CLI tests.

Each row: (case id, finetuning_type, config kwargs for the PEFT config class, extra LLaMA-Factory yaml keys).
Method authors add their rows here; tests read capabilities from the config class flags, never from names.
Keep kwargs tiny (hidden size 64 models): small ranks, few experts.
"""

METHOD_CASES = [
    # id, method, peft config kwargs, llamafactory yaml keys
    ("moelora-top2", "moelora", dict(num_experts=4, top_k=2, expert_rank=4), dict(moe_num_experts=4, moe_top_k=2, lora_rank=4)),
    ("moelora-soft", "moelora", dict(num_experts=3, top_k=None, expert_rank=4), dict(moe_num_experts=3, moe_top_k=3, lora_rank=4)),
    # -- add rows above this line --
]
