"""The spine, end to end: stock `llamafactory-cli` (real subprocesses) trains, logs, saves, chats with and refuses to
export a MoE-LoRA adapter; the startup hook can be disabled or fail without breaking stock LoRA. Resume and
fresh-process reload, for every method, are in `test_resume.py`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import BASE_ENV, SHARED_DATA, read_jsonl, run_cli, train_args

pytestmark = pytest.mark.slow


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory):
    """One 4-step moelora run with a checkpoint at step 2, shared by several tests."""
    work = tmp_path_factory.mktemp("trained")
    out = work / "out"
    cfg = train_args(tiny_model, tiny_data, str(out), save_steps=2, plot_loss=True, report_to="tensorboard",
                     logging_dir=str(work / "tb"))
    proc = run_cli(["llamafactory-cli", "train"], cfg, work, env={"LLAMAFACTORY_VERBOSITY": "INFO"})
    _assert_ok(proc)
    (work / "train_stdout.txt").write_text(proc.stdout + proc.stderr)
    return out, cfg, work


def test_train_writes_peft_checkpoint_and_aux_logs(trained):
    out, _, work = trained
    assert "Created a moelora adapter on" in (work / "train_stdout.txt").read_text()  # our INFO logs are printed
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MOELORA"
    assert adapter_config["num_experts"] == 4 and adapter_config["top_k"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    step_logs = [row for row in read_jsonl(out / "trainer_log.jsonl") if "loss" in row]
    assert len(step_logs) == 4 and all(row.get("moe_aux_loss", 0) > 0 for row in step_logs)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("moe_balance_loss" in e for e in state["log_history"])
    state_logs = [e for e in state["log_history"] if "loss" in e]
    # `loss` is what was minimised, LM loss + aux terms; `lm_loss` is the LM loss alone (in both files, every step).
    for row in step_logs + state_logs:
        assert abs(row["lm_loss"] + row["moe_aux_loss"] - row["loss"]) < 1e-4, row
        assert row["lm_loss"] < row["loss"], row
    assert [r["lm_loss"] for r in step_logs] == [e["lm_loss"] for e in state_logs]
    assert (out / "training_moe_aux_loss.png").stat().st_size > 1000
    assert (out / "training_lm_loss.png").stat().st_size > 1000
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_tensorboard_receives_the_moe_scalars(trained):
    """`report_to: tensorboard` gets `lm_loss` and the `moe_*` terms every step, with the values of
    trainer_log.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, work = trained
    events = EventAccumulator(str(work / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    step_logs = [row for row in read_jsonl(out / "trainer_log.jsonl") if "loss" in row]
    for key in ("lm_loss", "moe_aux_loss", "moe_balance_loss", "moe_load_cv", "moe_router_entropy"):
        assert f"train/{key}" in tags, (key, sorted(tags))
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [step for step, _ in logged] == [1, 2, 3, 4], logged
        if key in step_logs[0]:
            assert all(abs(v - row[key]) < 1e-4 for (_, v), row in zip(logged, step_logs)), (key, logged)


@pytest.mark.skipif(not (SHARED_DATA / "llamafactory" / "dataset_info.json").is_file(),
                    reason="../shared/data/llamafactory (LLaMA-Factory demo data) is not beside the repo")
def test_train_on_llamafactory_demo_datasets(tiny_model, tmp_path):
    cfg = train_args(tiny_model, str(SHARED_DATA / "llamafactory"), str(tmp_path / "out"),
                     dataset="alpaca_en_demo,identity", max_samples=16, max_steps=2)
    proc = run_cli(["llamafactory-cli", "train"], cfg, tmp_path)
    _assert_ok(proc)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "MOELORA"


@pytest.mark.distributed
def test_torchrun_two_processes_matches_single_process(tiny_model, tiny_data, tmp_path):
    common = dict(disable_shuffling=True, max_steps=3, moe_aux_loss_coef=0.0)
    single = train_args(tiny_model, tiny_data, str(tmp_path / "single"), per_device_train_batch_size=4, **common)
    double = train_args(tiny_model, tiny_data, str(tmp_path / "double"), per_device_train_batch_size=2, **common)
    _assert_ok(run_cli(["llamafactory-cli", "train"], single, tmp_path))
    proc = run_cli(["llamafactory-cli", "train"], double, tmp_path,
                   env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29533"})
    _assert_ok(proc)
    assert "unused parameters" not in proc.stderr.lower()
    losses_1 = [e["loss"] for e in read_jsonl(tmp_path / "single" / "trainer_log.jsonl") if "loss" in e]
    losses_2 = [e["loss"] for e in read_jsonl(tmp_path / "double" / "trainer_log.jsonl") if "loss" in e]
    assert len(losses_1) == len(losses_2) == 3
    for a, b in zip(losses_1, losses_2):
        assert abs(a - b) < 1e-4, (losses_1, losses_2)


def test_chat_model_with_only_adapter_path_answers(trained, tiny_model):
    from llamafactory.chat import ChatModel

    out, _, _ = trained
    chat = ChatModel(dict(model_name_or_path=tiny_model, adapter_name_or_path=str(out), template="llama3",
                          max_new_tokens=4, do_sample=False))
    from peft import PeftModel

    assert isinstance(chat.engine.model, PeftModel)
    assert chat.engine.model.peft_config["default"].method_name == "moelora"
    responses = chat.chat([{"role": "user", "content": "add 1 and 2"}])
    assert len(responses) == 1

    # Independent reference: the llama3 prompt written out by hand, base + adapter loaded by stock peft, greedy
    # decoding.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nadd 1 and 2<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=stop)[0, ids.shape[1]:]
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        expected = adapted.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                    eos_token_id=stop)[0, ids.shape[1]:]
    assert responses[0].response_length == len(expected)
    assert responses[0].response_text == tokenizer.decode(expected, skip_special_tokens=True) != ""
    assert not torch.equal(plain, expected)  # the trained adapter changes the reply: the chat really used it


def test_export_of_routed_adapter_refuses_before_loading(trained, tiny_model, tmp_path):
    out, _, _ = trained
    cfg = dict(model_name_or_path=tiny_model, adapter_name_or_path=str(out), template="llama3",
               export_dir=str(tmp_path / "exported"))
    proc = run_cli(["llamafactory-cli", "export"], cfg, tmp_path)
    assert proc.returncode != 0
    assert "`export_dir`" in proc.stderr and "cannot be merged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "exported").exists()


def _as_hub_cache(adapter_dir, cache_dir, repo_id: str, peft_type: str | None = None) -> None:
    """Lay `adapter_dir` out the way huggingface_hub caches a downloaded repo (refs/main -> snapshots/<commit>/...), so
    the hub id resolves offline from `cache_dir` exactly as after a real download (optionally with another
    peft_type)."""
    import shutil

    owner, name = repo_id.split("/")
    repo, commit = cache_dir / f"models--{owner}--{name}", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(adapter_dir / "adapter_model.safetensors", snapshot / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if peft_type is not None:
        config["peft_type"] = peft_type
    (snapshot / "adapter_config.json").write_text(json.dumps(config))


_CHAT_SCRIPT = """
import json, sys
from llamafactory.chat import ChatModel
replies = {}
for name, source in (("hub", sys.argv[2]), ("local", sys.argv[3])):
    chat = ChatModel(dict(model_name_or_path=sys.argv[1], adapter_name_or_path=source, cache_dir=sys.argv[4],
                          template="llama3", max_new_tokens=4, do_sample=False))
    config = chat.engine.model.peft_config["default"]
    reply = chat.chat([{"role": "user", "content": "add 1 and 2"}])[0].response_text
    replies[name] = [getattr(config, "method_name", None), reply]
print("REPLIES=" + json.dumps(replies))
"""


def test_an_adapter_named_by_its_hub_id_is_recognised_as_ours(trained, tiny_model, tmp_path):
    """`adapter_name_or_path: owner/name` with LLaMA-Factory's default `finetuning_type` (lora): the adapter's own
    config, read the way peft reads it (here from the hub cache, offline), makes it ours. Export refuses before
    loading, naming `export_dir`; chat loads it unmerged through our path and answers like the same adapter on disk."""
    out, _, _ = trained
    cache = tmp_path / "hub"
    _as_hub_cache(out, cache, "someone/moelora-adapter")
    _as_hub_cache(out, cache, "someone/labelled-lora", peft_type="LORA")  # negative control: a stock LoRA config
    export = dict(model_name_or_path=tiny_model, cache_dir=str(cache), template="llama3",
                  export_dir=str(tmp_path / "exported"))
    proc = run_cli(["llamafactory-cli", "export"], {**export, "adapter_name_or_path": "someone/moelora-adapter"},
                   tmp_path)
    assert proc.returncode != 0
    assert "`export_dir`" in proc.stderr and "cannot be merged" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "exported").exists()
    # Not ours by its config: our refusal stays silent (LLaMA-Factory's own LoRA path then handles it, and fails on
    # weights that are not LoRA's — what matters here is that the decision came from the adapter's config).
    proc = run_cli(["llamafactory-cli", "export"], {**export, "adapter_name_or_path": "someone/labelled-lora"},
                   tmp_path)
    assert "`export_dir`" not in proc.stderr, proc.stderr[-3000:]

    proc = subprocess.run([sys.executable, "-c", _CHAT_SCRIPT, tiny_model, "someone/moelora-adapter", str(out),
                           str(cache)], cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, timeout=300)
    _assert_ok(proc)
    replies = json.loads(proc.stdout.split("REPLIES=")[-1])
    assert replies["hub"][0] == replies["local"][0] == "moelora", replies
    assert replies["hub"][1] == replies["local"][1], replies


def test_export_merges_moslora_and_matches_the_unmerged_adapter(tiny_model, tiny_data, tmp_path):
    """MoSLoRA has no router, so `llamafactory-cli export` folds B·W_mix·A into the base weights: the exported plain
    model gives the logits of base + adapter run unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moslora"
    _assert_ok(run_cli(["llamafactory-cli", "train"],
                       train_args(tiny_model, tiny_data, str(out), finetuning_type="moslora", moe_num_experts=None,
                                  moe_top_k=None, max_steps=3, learning_rate=1e-2), tmp_path))
    exported = tmp_path / "exported"
    _assert_ok(run_cli(["llamafactory-cli", "export"],
                       dict(model_name_or_path=tiny_model, adapter_name_or_path=str(out), template="llama3",
                            finetuning_type="moslora", export_dir=str(exported), infer_dtype="float32"), tmp_path))
    assert not (exported / "adapter_config.json").exists()

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        unmerged = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-4  # the trained adapter changes the output
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_vllm_backend_refused(trained, tiny_model):
    from llamafactory.hparams import get_infer_args

    from llamafactory_moe.core.errors import MoeConfigError

    out, _, _ = trained
    with pytest.raises(MoeConfigError, match="infer_backend"):
        get_infer_args(dict(model_name_or_path=tiny_model, adapter_name_or_path=str(out), template="llama3",
                            infer_backend="vllm"))


@pytest.mark.parametrize("env, expect_warning", [
    ({"LLAMAFACTORY_MOE_DISABLE": "1"}, False),
    ({"LLAMAFACTORY_MOE_BREAK_PATCH": "init_adapter"}, True),
])
def test_stock_lora_survives_disabled_or_broken_hook(env, expect_warning, tiny_model, tiny_data, tmp_path):
    lora = train_args(tiny_model, tiny_data, str(tmp_path / "lora"), finetuning_type="lora", moe_num_experts=None,
                      moe_top_k=None, max_steps=2)
    proc = run_cli(["llamafactory-cli", "train"], lora, tmp_path, env=env)
    _assert_ok(proc)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert ("patch `init_adapter`" in proc.stderr and "was not applied" in proc.stderr) == expect_warning
    moe = train_args(tiny_model, tiny_data, str(tmp_path / "moe"), max_steps=2)
    proc = run_cli(["llamafactory-cli", "train"], moe, tmp_path, env=env)
    assert proc.returncode != 0
    if expect_warning:  # patched parser, broken loader patch: refused with a clear message, before loading
        assert "patches failed: init_adapter" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "moe" / "adapter_config.json").exists()
