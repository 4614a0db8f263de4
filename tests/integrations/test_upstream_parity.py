"""Our adapter path (`integrations/llamafactory/adapter.py`) does what LLaMA-Factory 0.9.5's `_setup_lora_tuning` does
for plain LoRA: resized embeddings are trained and saved, adapters load with upstream's `PeftModel.from_pretrained`
keys (`adapter_folder` -> `subfolder`, ...), and multimodal bases get upstream's `patch_target_modules` targets.

Training and loading go through LLaMA-Factory's own functions in-process (`get_train_args` / `get_infer_args` ->
`load_tokenizer` -> `load_model` -> our `init_adapter`) so the test can step the optimizer itself and compare the
trained model's logits with the reloaded one's. Negative controls: on the code before this test was added the new
embedding rows were not trainable (`test_resized_embeddings_are_trained_and_saved` fails at `moved`), and an adapter in
`adapter_folder` went to upstream's LoRA path and was merged (`test_adapter_folder_is_loaded_with_upstreams_key` fails
at the isinstance check).
"""

from __future__ import annotations

import pytest
import torch

NEW_TOKENS = "<moe_new_a>,<moe_new_b>"


def _train_model(tiny_model: str, tiny_data: str, output_dir: str, **overrides):
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    from tests.conftest import train_args

    model_args, _, _, finetuning_args, _ = get_train_args(train_args(tiny_model, tiny_data, output_dir, **overrides))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    return tokenizer, load_model(tokenizer, model_args, finetuning_args, is_trainable=True)


def _load(tiny_model: str, adapter: str, **overrides):
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, _, finetuning_args, _ = get_infer_args(dict(model_name_or_path=tiny_model, adapter_name_or_path=adapter,
                                                            template="llama3", infer_dtype="float32", **overrides))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    return tokenizer, load_model(tokenizer, model_args, finetuning_args, is_trainable=False)


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory):
    """A moelora adapter trained for a few steps with two added tokens (LLaMA-Factory turns `resize_vocab` on), saved in
    `<root>/sub`."""
    root = tmp_path_factory.mktemp("parity")
    tokenizer, model = _train_model(tiny_model, tiny_data, str(root / "out"), add_tokens=NEW_TOKENS, resize_vocab=True)
    new_ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS.split(","))
    ids = torch.tensor([tokenizer.encode("add 3 and 4 <moe_new_a> 7 <moe_new_b>")])
    assert all(i in ids[0].tolist() for i in new_ids)
    before = model.get_input_embeddings().weight[new_ids].detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    after = model.get_input_embeddings().weight[new_ids].detach().clone()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(str(root / "sub"))
    return dict(root=root, model=model, ids=ids, before=before, after=after, logits=logits,
                vocab=model.get_input_embeddings().weight.shape[0])


def test_resized_embeddings_are_trained_and_saved(trained, tiny_model):
    from safetensors import safe_open

    moved = (trained["after"] - trained["before"]).abs().amax().item()
    assert moved > 0, "the new token rows of the resized embedding did not move in training"
    config = trained["model"].peft_config["default"]
    assert set(config.modules_to_save) == {"embed_tokens", "lm_head"}
    with safe_open(str(trained["root"] / "sub" / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for module in ("embed_tokens", "lm_head"):
        shapes = [shape for name, shape in saved.items() if f"{module}.modules_to_save.weight" in name]
        assert shapes and shapes[0][0] == trained["vocab"], (module, sorted(saved))
    _, reloaded = _load(tiny_model, str(trained["root"] / "sub"), add_tokens=NEW_TOKENS)
    with torch.no_grad():
        logits = reloaded(input_ids=trained["ids"]).logits
    torch.testing.assert_close(logits, trained["logits"])


def test_adapter_folder_is_loaded_with_upstreams_key(trained, tiny_model):
    from peft import PeftModel

    _, reloaded = _load(tiny_model, str(trained["root"]), adapter_folder="sub", add_tokens=NEW_TOKENS)
    assert isinstance(reloaded, PeftModel) and reloaded.peft_config["default"].peft_type == "MOELORA"
    with torch.no_grad():
        logits = reloaded(input_ids=trained["ids"]).logits
    torch.testing.assert_close(logits, trained["logits"])


class _StandInVisionLanguageModel(torch.nn.Module):
    """Not a real multimodal model (a tiny one is impractical here): a module tree with a Qwen2-VL config's
    `model_type` and its module names, vision tower and language model both holding `qkv` / `q_proj` Linears. That is
    all `patch_target_modules` reads."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(model_type="qwen2_vl")
        self.visual = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([torch.nn.ModuleDict(
            {"attn": torch.nn.ModuleDict({"qkv": torch.nn.Linear(4, 4), "q_proj": torch.nn.Linear(4, 4)})})])})
        self.language_model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict(
            {"self_attn": torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4), "qkv": torch.nn.Linear(4, 4)})})])})


def test_multimodal_targets_come_from_patch_target_modules(tiny_model, tiny_data, tmp_path):
    from llamafactory.extras import logging
    from llamafactory.hparams import get_train_args
    from llamafactory.model.model_utils.visual import patch_target_modules

    from llamafactory_moe.integrations.llamafactory.adapter import _with_upstream_targets
    from tests.conftest import train_args

    model_args, _, _, finetuning_args, _ = get_train_args(
        train_args(tiny_model, tiny_data, str(tmp_path), lora_target="q_proj,qkv"))
    model = _StandInVisionLanguageModel()
    expected = patch_target_modules(model, finetuning_args, list(finetuning_args.lora_target))
    config = _with_upstream_targets(finetuning_args.moe_peft_config, model, model_args, finetuning_args,
                                    logging.get_logger("test"))
    assert sorted(config.target_modules) == sorted(expected)  # the config keeps them as a set
    assert expected and not any("visual" in name for name in expected)  # the vision tower is not wrapped
    assert sorted(expected) == ["language_model.layers.0.self_attn.q_proj", "language_model.layers.0.self_attn.qkv"]


@pytest.mark.slow
def test_cli_train_with_added_tokens_saves_the_trained_embeddings(tiny_model, tiny_data, tmp_path):
    """`llamafactory-cli train` with `add_special_tokens` (LLaMA-Factory turns `resize_vocab` on): the checkpoint holds
    the resized embeddings, and their trained rows differ from the base model's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli, train_args

    out = tmp_path / "out"
    proc = run_cli(["llamafactory-cli", "train"],
                   train_args(tiny_model, tiny_data, str(out), add_special_tokens="<moe_new_a>", max_steps=2), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = load_file(str(out / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for module, weight in (("embed_tokens", base.get_input_embeddings().weight),
                           ("lm_head", base.get_output_embeddings().weight)):
        key = next(k for k in saved if f"{module}.modules_to_save.weight" in k)
        rows = weight.shape[0]
        assert saved[key].shape[0] > rows  # resized
        assert not torch.equal(saved[key][:rows].float(), weight.detach()), module  # and trained
