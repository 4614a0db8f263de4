"""One row per method configuration exercised by the shared test matrix and the CLI tests, built from the registry.

Each row: (case id, finetuning_type, config kwargs for the PEFT config class, extra LLaMA-Factory yaml keys): one per
``Example`` in the ``examples`` of every registered method's config class (``llamafactory_moe/methods/<name>.py``), in
the registry's listing order. Method authors add examples to their config class, not rows here; a registered method
without an example fails ``tests/test_new_method_drop_in.py``. Tests read capabilities from the config class flags,
never from names. Keep kwargs tiny (hidden size 64 models): small ranks, few experts.
"""

from __future__ import annotations

import copy

import pytest


def build_cases() -> list[tuple[str, str, dict, dict]]:
    """``METHODS x examples`` as (case id, method, config kwargs, yaml keys); copies, so a test may change them."""
    from llamafactory_moe.core.peft_types import METHODS, register_all_methods

    register_all_methods()
    cases = [(example.id, name, copy.deepcopy(example.kwargs), copy.deepcopy(example.lf_keys))
             for name, spec in METHODS.items() for example in spec.config_cls.examples]
    ids = [case[0] for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"example ids must be unique across methods: {', '.join(duplicates)}")
    return cases


METHOD_CASES = build_cases()

# The same cases as pytest parameters, one id each (the example id).
METHOD_PARAMS = [pytest.param(*case, id=case[0]) for case in METHOD_CASES]
# One example of each routed method with a top-k router, the cases the compile tests also run under inductor.
INDUCTOR_CASES = ["moelora-top2", "smora", "smore-switch", "goat-top2"]


@pytest.fixture
def fresh_dynamo():
    """A test of compiled code starts and ends with dynamo's caches empty, on one torch thread (tiny tensors: a second
    thread only adds synchronisation on a shared 2-core machine). Use with ``pytestmark = usefixtures(...)``."""
    import torch
    import torch._dynamo

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(previous)
