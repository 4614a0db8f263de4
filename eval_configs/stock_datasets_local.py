"""OpenCompass config: stock OpenCompass dataset configs (ARC-c, ARC-e, BoolQ) pointed at data already on disk.

    MOE_OC_DATA=/data/OpenCompassData MOE_BASE_MODEL=/models/base MOE_ADAPTER=saves/my_smora \
        opencompass eval_configs/stock_datasets_local.py -w outputs/stock

OpenCompass's own configs name their data by id (e.g. `opencompass/ai2_arc-dev`) and, when the file is not under
$COMPASS_DATA_CACHE or ~/.cache/opencompass, try to download it. Here every dataset's `path` is replaced by an
absolute file under MOE_OC_DATA (the unpacked OpenCompassData release: a folder that contains `data/ARC/...`), and a
missing file stops the run with its expected location; nothing is downloaded. To add another stock dataset, import
its `*_datasets` list below and add its relative path(s) to `_LOCAL_FILES` (the expected layouts are listed in
specs/opencompass-integration.md §3.2). Setting COMPASS_DATA_CACHE=<folder containing data/> is the other way.

Environment variables: MOE_OC_DATA (required), and the model variables of commonsense_eval.py (MOE_BASE_MODEL,
MOE_ADAPTER, MOE_EVAL_BATCH_SIZE, MOE_MAX_OUT_LEN, MOE_NUM_GPUS, MOE_EVAL_LIMIT, MOE_CHAT_TEMPLATE, MOE_MODEL_ABBR).
"""
# `read_base` puts mmengine in "lazy import" mode: any other import statement whose module mmengine does not consider
# built in (in a venv that includes `importlib` and, before Python 3.11, `os`) becomes a placeholder that raises a bare
# RuntimeError when called. So the only import statements are OpenCompass's configs; the builtin __import__ really
# imports the rest.
from mmengine.config import read_base

with read_base():
    # Gen variants need no likelihood scoring, so they also run with MOE_CHAT_TEMPLATE=1 (the chat wrapper).
    from opencompass.configs.datasets.ARC_c.ARC_c_gen import ARC_c_datasets
    from opencompass.configs.datasets.ARC_e.ARC_e_gen import ARC_e_datasets
    from opencompass.configs.datasets.SuperGLUE_BoolQ.SuperGLUE_BoolQ_gen import BoolQ_datasets

# dataset abbr -> file relative to MOE_OC_DATA (the layout of the OpenCompassData release).
_LOCAL_FILES = {
    'ARC-c': 'data/ARC/ARC-c/ARC-Challenge-Dev.jsonl',
    'ARC-e': 'data/ARC/ARC-e/ARC-Easy-Dev.jsonl',
    'BoolQ': 'data/SuperGLUE/BoolQ/val.jsonl',
}
_os = __import__('os')
_root = _os.environ.get('MOE_OC_DATA')
if not _root:
    raise ValueError('`MOE_OC_DATA` is not set: point it at the folder that contains data/ARC/... '
                     '(the OpenCompassData release, published by OpenCompass on GitHub); nothing is downloaded.')

datasets = [*ARC_c_datasets, *ARC_e_datasets, *BoolQ_datasets]
_limit = _os.environ.get('MOE_EVAL_LIMIT')
for _d in datasets:
    _file = _os.path.join(_root, _LOCAL_FILES[_d['abbr']])
    if not _os.path.isfile(_file):
        raise FileNotFoundError(f"{_d['abbr']}: expected {_file} (MOE_OC_DATA={_root}); nothing is downloaded.")
    _d['path'] = _file  # an absolute path is used as is (opencompass.utils.datasets.get_data_path)
    if _limit:
        _d['reader_cfg']['test_range'] = f'[0:{int(_limit)}]'

_oc = __import__('llamafactory_moe.integrations.opencompass', fromlist=['model_config'])
_settings = _oc.settings_from_env('.', default_max_out_len=32, needs_data=False)
models = [_oc.model_config(_settings)]

del _oc, _settings, _d, _file, _root, _limit, _os
