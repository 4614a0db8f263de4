"""OpenCompass config: the 8 commonsense tasks of LLM-Adapters (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-c,
ARC-e, OBQA), as evaluated by the MoE-LoRA papers (D2MoRA, GOAT, HydraLoRA, DoRA tables).

    MOE_BASE_MODEL=/models/base MOE_ADAPTER=saves/my_goat opencompass eval_configs/commonsense_eval.py -w outputs/cs

MOE_EVAL_MODE=gen (default) follows the papers: generate an answer, take the first match of the task's label
vocabulary ("true|false", "answer1..5", ...), exact accuracy. MOE_EVAL_MODE=ppl scores "the correct answer is <label>"
for each candidate label and picks the most likely one: no decoding, several times cheaper on CPU; the numbers are
close to, but not the same protocol as, the papers'. Both need a model that has learnt the label vocabulary (an
adapter trained on the LLM-Adapters data); an untrained small model scores chance with them.
MOE_EVAL_MODE=choice is the zero-shot protocol of lm-eval-harness, for any model: the options are parsed out of each
instruction and each option's TEXT is scored as the continuation of the question ("Question: <q>\nAnswer:" +
" <option>"; HellaSwag: context + " <ending>"; WinoGrande: the blank filled with each option, scoring the rest of the
sentence; BoolQ: " true" / " false"). The prediction is the label (solution1, answer3, ...) of the option with the
highest log-likelihood, compared with the `answer` field. Two rules are reported: `acc_norm` (log-likelihood per
UTF-8 byte of the option; the summary's headline for every task but BoolQ) and `acc` (summed log-likelihood;
BoolQ's headline, where the options are fixed words and normalising only biases towards "false").
Choice mode defaults to MOE_PROMPT=plain (no wrapper); MOE_PROMPT=alpaca or MOE_CHAT_TEMPLATE=1 wrap the context as
the instruction / user turn and score the option as the response.
Tasks whose test.json is missing are skipped with a message (e.g. HellaSwag is not in ../shared/data). The summary
lists accuracy per task and `commonsense-avg` (in choice mode, then the other metric of every task).

Environment variables (all optional except where a default cannot be found):
    MOE_BASE_MODEL       base model directory the adapter was trained on
                         (default: the offline SmolLM2 demo model, if `python -m llamafactory_moe.models` prepared it)
    MOE_ADAPTER          adapter directory (LLaMA-Factory `output_dir`); unset = evaluate the base model
    MOE_EVAL_DATA        data root holding commonsense/<task>/test.json (default: ../shared/data next to the repo)
    MOE_EVAL_MODE        gen (default) | ppl | choice
    MOE_EVAL_TASKS       comma-separated subset of boolq,piqa,siqa,hellaswag,winogrande,arc-c,arc-e,obqa
                         (LLM-Adapters folder names such as ARC-Challenge or social_i_qa also work; default: all)
    MOE_EVAL_LIMIT       first N examples per task, for smoke runs (default: all)
    MOE_EVAL_BATCH_SIZE  inference batch size (default 8)
    MOE_MAX_OUT_LEN      new tokens per answer in gen mode (default 32, as LLM-Adapters)
    MOE_MAX_SEQ_LEN      prompt truncation length (default: the model's maximum); choice mode cuts the context
                         from the left and always keeps the option whole
    MOE_NUM_GPUS         GPUs per task; 0 = CPU (default: 1 if CUDA is available, else 0)
    MOE_CHAT_TEMPLATE    1 = wrap each instruction in the tokenizer's chat template (the one LLaMA-Factory saved
                         next to the adapter), 0 = no chat template (default)
    MOE_PROMPT           without the chat template: `alpaca` (LLM-Adapters' prompt = LLaMA-Factory's `alpaca`
                         template; default in gen and ppl mode) or `plain` (default in choice mode)
    MOE_MODEL_ABBR       column name in the summary (default: the adapter's, else the base model's folder name)

Nothing is downloaded: missing data or models stop the run with a message naming the expected path.
"""
# No import statement on purpose. mmengine parses a config that imports anything it does not consider built in (its
# test compares the module's path with the running interpreter's prefix, so in a venv even `importlib` fails it) in
# "lazy import" mode, where every imported name is a placeholder that raises a bare RuntimeError when called. A file
# without import statements is executed as plain Python, and the builtin __import__ really imports.
_oc = __import__('llamafactory_moe.integrations.opencompass', fromlist=['model_config'])
# '{{ fileDirname }}' is replaced by mmengine with this file's directory (used for the ../shared/data default).
_settings = _oc.settings_from_env('{{ fileDirname }}', default_max_out_len=32)

models = [_oc.model_config(_settings, needs_ppl=_settings['mode'] in ('ppl', 'choice'))]
datasets = _oc.commonsense_datasets(_settings)
summarizer = _oc.commonsense_summarizer(datasets)

del _oc, _settings
