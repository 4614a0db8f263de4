"""OpenCompass config: the 48-task FLAN-v2 test mix (SMoRA's combined_test.json), one dataset per task.

    MOE_BASE_MODEL=/models/base MOE_ADAPTER=saves/my_smora opencompass eval_configs/flan_eval.py -w outputs/flan

Each task is generated greedily and scored with its own metric: exact match (case-insensitive, OpenCompass's
EMEvaluator normalisation), ROUGE-L or sacreBLEU. The summary lists one number per task, an average per domain,
`flan-avg` (mean over tasks) and `flan-domain-avg` (mean over domains). All scores are 0-100.

Environment variables (all optional except where a default cannot be found):
    MOE_BASE_MODEL       base model directory the adapter was trained on
                         (default: the offline SmolLM2 demo model, if `python -m llamafactory_moe.models` prepared it)
    MOE_ADAPTER          adapter directory (LLaMA-Factory `output_dir`: LoRA or any llamafactory-moe method);
                         unset = evaluate the base model
    MOE_EVAL_DATA        data root holding flan/combined_test.json (default: ../shared/data next to the repository)
    MOE_EVAL_TASKS       comma-separated subset, e.g. `sst2,common_gen,wmt16_translate_deen` (default: all 48)
    MOE_EVAL_LIMIT       first N examples per task, for smoke runs (default: all, ~50 per task)
    MOE_EVAL_BATCH_SIZE  inference batch size (default 8)
    MOE_MAX_OUT_LEN      new tokens per answer (default 128)
    MOE_MAX_SEQ_LEN      prompt truncation length (default: the model's maximum)
    MOE_NUM_GPUS         GPUs per task; 0 = CPU (default: 1 if CUDA is available, else 0)
    MOE_CHAT_TEMPLATE    1 = wrap each input in the tokenizer's chat template (the one LLaMA-Factory saved next to
                         the adapter; use it when you trained with a chat `template:`), 0 = no chat template (default)
    MOE_PROMPT           without the chat template: `alpaca` (LLaMA-Factory's `alpaca` template, default) or `plain`
    MOE_MODEL_ABBR       column name in the summary (default: the adapter's, else the base model's folder name)

Nothing is downloaded: missing data or models stop the run with a message naming the expected path.
"""
# No import statement on purpose. mmengine parses a config that imports anything it does not consider built in (its
# test compares the module's path with the running interpreter's prefix, so in a venv even `importlib` fails it) in
# "lazy import" mode, where every imported name is a placeholder that raises a bare RuntimeError when called. A file
# without import statements is executed as plain Python, and the builtin __import__ really imports.
_oc = __import__('llamafactory_moe.integrations.opencompass', fromlist=['model_config'])
# '{{ fileDirname }}' is replaced by mmengine with this file's directory (used for the ../shared/data default).
_settings = _oc.settings_from_env('{{ fileDirname }}', default_max_out_len=128)

models = [_oc.model_config(_settings)]
datasets = _oc.flan_datasets(_settings)
summarizer = _oc.flan_summarizer(_settings)

del _oc, _settings
