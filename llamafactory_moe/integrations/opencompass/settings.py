"""Settings of our eval configs: the ``MOE_*`` environment variables, the task tables, the model entry.

Mirrors the config-building side of OpenCompass: what ``opencompass.utils.run`` (``get_config_from_arg``,
``fill_infer_cfg``) assembles from command-line options, here read from the environment while a config in
``eval_configs/`` is parsed, and the model entries of ``opencompass/configs/models/`` (``model_config``). Everything
returned is a plain dict or string, which mmengine can dump and reload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ...errors import warn

# dotted prefix for `type=` strings, e.g. 'llamafactory_moe.integrations.opencompass.X': the package, which
# re-exports every class and function a config names
_HERE = __name__.rpartition(".")[0]
_OC = "opencompass.openicl"

FLAN_FILE = "flan/combined_test.json"
FLAN_SOURCE = ("the 48-task FLAN-v2 test mix `datasets/combined_test.json` from the SMoRA repository "
               "(https://github.com/StyxXuan/smora)")
COMMONSENSE_SOURCE = ("the LLM-Adapters test sets `dataset/<task>/test.json` "
                      "(https://github.com/AGI-Edgerunners/LLM-Adapters)")

# LLaMA-Factory's `alpaca` template and the LLM-Adapters evaluation prompt render the same text (minus the 16-space
# indentation artefact of LLM-Adapters), so one prompt serves adapters
# trained with either.
ALPACA_PREFIX = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n")
ALPACA_SUFFIX = "\n\n### Response:\n"

# Commonsense tasks in the LLM-Adapters layout. `labels` is the regex vocabulary of the first-match extraction;
# `ppl_labels` the candidates scored in PPL mode, which must be one
# fixed list per task: ARC rows with 3 or 5 choices (7 of 1172 in ARC-c, 11 of 2376 in ARC-e) are scored against
# answer1..answer4.
COMMONSENSE_TASKS: dict[str, dict] = {
    "boolq": dict(dir="boolq", labels=["true", "false"], ppl_labels=["true", "false"]),
    "piqa": dict(dir="piqa", labels=["solution1", "solution2"], ppl_labels=["solution1", "solution2"]),
    "siqa": dict(dir="social_i_qa", labels=[f"answer{i}" for i in range(1, 6)],
                 ppl_labels=["answer1", "answer2", "answer3"]),
    "hellaswag": dict(dir="hellaswag", labels=[f"ending{i}" for i in range(1, 5)],
                      ppl_labels=[f"ending{i}" for i in range(1, 5)]),
    "winogrande": dict(dir="winogrande", labels=["option1", "option2"], ppl_labels=["option1", "option2"]),
    "arc-c": dict(dir="ARC-Challenge", labels=[f"answer{i}" for i in range(1, 6)],
                  ppl_labels=[f"answer{i}" for i in range(1, 5)]),
    "arc-e": dict(dir="ARC-Easy", labels=[f"answer{i}" for i in range(1, 6)],
                  ppl_labels=[f"answer{i}" for i in range(1, 5)]),
    "obqa": dict(dir="openbookqa", labels=[f"answer{i}" for i in range(1, 6)],
                 ppl_labels=[f"answer{i}" for i in range(1, 5)]),
}
# The directory names of LLM-Adapters and a few common spellings, all accepted by MOE_EVAL_TASKS.
_COMMONSENSE_ALIASES = {
    **{spec["dir"].lower(): name for name, spec in COMMONSENSE_TASKS.items()},
    "social_iqa": "siqa", "arc_c": "arc-c", "arc_e": "arc-e", "arc-challenge": "arc-c", "arc-easy": "arc-e",
    "openbookqa": "obqa",
}
# LLM-Adapters' training target is "the correct answer is <label>", so PPL mode scores exactly that continuation.
ANSWER_PREFIX = "the correct answer is "
# Choice mode: the word that numbers the options in each task's LLM-Adapters instruction ("Solution1: ...",
# "Answer2: ...", "Ending3: ...", "Option1: ..."); the label of option k is this word in lower case plus k, which is
# exactly the task's `answer` field. BoolQ lists no options: its two answers are the labels themselves.
CHOICE_OPTION_WORDS = {"piqa": "Solution", "siqa": "Answer", "hellaswag": "Ending", "winogrande": "Option",
                       "arc-c": "Answer", "arc-e": "Answer", "obqa": "Answer"}
# Choice mode's headline metric: `acc_norm` (log-likelihood per byte of the option) where options are free texts of
# different lengths, so a long option is not penalised for its length. BoolQ's two options are the fixed words
# " true" / " false": dividing by their byte counts (5 vs 6) only adds a constant bias towards "false" (SmolLM2-135M:
# acc_norm 31% vs acc 52% on the first 100), so BoolQ's headline is `acc`, as lm-eval-harness reports it. WinoGrande
# scores the same continuation for both options, where the two metrics coincide.
CHOICE_HEADLINE = {"boolq": "acc"}


# --------------------------------------------------------------------------------------------------------------------
# Settings from the environment
# --------------------------------------------------------------------------------------------------------------------

def _env(name: str) -> Optional[str]:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`{name}` must be an integer; got {value!r}.") from None


def _env_bool(name: str) -> bool:
    value = (_env(name) or "0").lower()
    if value not in {"0", "1", "true", "false", "yes", "no", "on", "off"}:
        raise ValueError(f"`{name}` must be 0 or 1; got {value!r}.")
    return value in {"1", "true", "yes", "on"}


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def _default_base_model() -> Optional[str]:
    # The project's offline demo model (`python -m llamafactory_moe.models`), if it has been prepared.
    from llamafactory_moe._cache import cache_root

    entry = cache_root() / "smollm2-135m-instruct"
    return str(entry) if (entry / "config.json").is_file() else None


def _default_data_root(config_dir: str) -> Optional[str]:
    # Configs live in <repo>/eval_configs; the shared data sits next to the repository as ../shared/data.
    candidate = Path(config_dir).resolve().parent.parent / "shared" / "data"
    return str(candidate) if candidate.is_dir() else None


def settings_from_env(config_dir: str, *, default_max_out_len: int, needs_data: bool = True) -> dict:
    """Read the ``MOE_*`` environment variables (documented at the top of each config) into a plain dict.

    Raises ``ValueError`` / ``FileNotFoundError`` with the variable name and the fix, so a bad setting fails while the
    config is parsed, before any model is loaded.
    """
    base_model = _env("MOE_BASE_MODEL") or _default_base_model()
    if base_model is None:
        raise ValueError("`MOE_BASE_MODEL` is not set: point it at the base model directory the adapter was trained "
                         "on (e.g. MOE_BASE_MODEL=/models/Llama-3-8B-Instruct), or run "
                         "`python -m llamafactory_moe.models` once to use the offline SmolLM2-135M-Instruct demo.")
    base_model = str(Path(base_model).expanduser())
    if not (Path(base_model) / "config.json").is_file():
        raise FileNotFoundError(f"`MOE_BASE_MODEL` ({base_model}) has no config.json; point it at a Hugging Face "
                                "model directory (nothing is downloaded).")

    adapter = _env("MOE_ADAPTER")
    if adapter is not None:
        adapter = str(Path(adapter).expanduser().resolve())
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"`MOE_ADAPTER` ({adapter}) has no adapter_config.json; point it at the "
                                    "`output_dir` of `llamafactory-cli train`, or unset it to evaluate the base model.")

    data_root = _env("MOE_EVAL_DATA") or _default_data_root(config_dir)
    if data_root is None and needs_data:
        raise FileNotFoundError("`MOE_EVAL_DATA` is not set and no ../shared/data directory was found next to the "
                                "repository; set MOE_EVAL_DATA to the folder holding flan/ and commonsense/.")

    num_gpus = _env_int("MOE_NUM_GPUS", None)
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() else 0
    limit = _env_int("MOE_EVAL_LIMIT", None)
    if limit is not None and limit < 1:
        raise ValueError(f"`MOE_EVAL_LIMIT` must be >= 1 (or unset for all examples); got {limit}.")
    mode = (_env("MOE_EVAL_MODE") or "gen").lower()
    # Choice mode scores option text as a plain continuation (lm-eval-harness style), so it defaults to no wrapper.
    prompt = (_env("MOE_PROMPT") or ("plain" if mode == "choice" else "alpaca")).lower()
    if prompt not in {"alpaca", "plain"}:
        raise ValueError(f"`MOE_PROMPT` must be `alpaca` or `plain`; got {prompt!r}.")
    tasks = _env("MOE_EVAL_TASKS")

    source = adapter or base_model
    return dict(
        base_model=base_model,
        adapter=adapter,
        abbr=_env("MOE_MODEL_ABBR") or Path(source).name,
        data_root=str(Path(data_root).expanduser().resolve()) if data_root else None,
        batch_size=_env_int("MOE_EVAL_BATCH_SIZE", 8),
        max_out_len=_env_int("MOE_MAX_OUT_LEN", default_max_out_len),
        max_seq_len=_env_int("MOE_MAX_SEQ_LEN", None),
        num_gpus=num_gpus,
        limit=limit,
        chat_template=_env_bool("MOE_CHAT_TEMPLATE"),
        prompt=prompt,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        mode=mode,
    )


def model_config(settings: dict, *, needs_ppl: bool = False) -> dict:
    """The OpenCompass model entry for ``settings``: our chat wrapper for generation with the tokenizer's chat
    template, our base wrapper otherwise (PPL scoring exists only on the base wrapper, which then renders the chat
    template itself)."""
    use_chat_class = settings["chat_template"] and not needs_ppl
    entry = dict(
        type=f"{_HERE}.{'MoeHFChatModel' if use_chat_class else 'MoeHFBaseModel'}",
        abbr=settings["abbr"],
        path=settings["base_model"],
        peft_path=settings["adapter"],
        max_out_len=settings["max_out_len"],
        max_seq_len=settings["max_seq_len"],
        batch_size=settings["batch_size"],
        run_cfg=dict(num_gpus=settings["num_gpus"]),
    )
    if not use_chat_class:
        entry["chat_template"] = settings["chat_template"]
        if not settings["chat_template"] and settings["prompt"] == "alpaca":
            # A base model keeps writing the next "### Instruction:" block; stopping there saves most of the
            # generation time on CPU.
            entry["stop_words"] = ["### "]
    return entry


def _prompt_round(settings: dict, column: str) -> dict:
    """The HUMAN turn for one instruction column. With the chat template the model wrapper adds the turn markup."""
    if settings["chat_template"] or settings["prompt"] == "plain":
        text = "{" + column + "}" if settings["chat_template"] else "{" + column + "}\n"
    else:
        text = ALPACA_PREFIX + "{" + column + "}" + ALPACA_SUFFIX
    return dict(role="HUMAN", prompt=text)


def _reader_cfg(settings: dict, input_columns: list[str], output_column: str) -> dict:
    cfg = dict(input_columns=input_columns, output_column=output_column)
    if settings["limit"] is not None:
        cfg["test_range"] = f"[0:{settings['limit']}]"
    return cfg


def _warn(message: str) -> None:
    warn(message)

