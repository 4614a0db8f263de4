"""Runtime patches that teach stock LLaMA-Factory (0.9.5) our methods. Every patch is one row of ``PATCHES``.

Flow of ``llamafactory-cli train x.yaml`` with ``finetuning_type: smora``:

1. parser: ``MoeFinetuningArguments`` validates our keys (before any model loads); ``_parse_train_args`` then checks
   cross-dataclass settings (stage, gradient checkpointing mode, adapters to resume, data fallback).
2. loader: ``init_adapter`` builds our PEFT model (new adapter) or loads ours unmerged (resume / inference).
3. trainers: ``compute_loss`` opens the aux-loss window, adds the recorded terms with HF's gradient-accumulation
   scaling; ``log`` adds ``moe_*`` metrics (averaged over steps and ranks exactly as HF averages ``loss``) and
   ``lm_loss`` (``loss`` without the aux terms) next to ``loss``.
4. callbacks and plots: ``trainer_log.jsonl``, ``training_lm_loss.png`` and ``training_moe_aux_loss.png`` carry them;
   a trainer callback runs once-per-optimizer-step updates (SMoRA's balancing) after each optimizer step.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from ..core.errors import MoeConfigError, check_float
from ..analysis.statistics import accumulate, expert_similarity, model_expert_vectors, routing_metrics
from ..core.step_hooks import apply_optimizer_step_updates
from .patching import FAILED_PATCHES, Patch

VERIFIED = "llamafactory 0.9.5"
ROUTING_METRICS = ("moe_load_cv", "moe_router_entropy", "moe_dropped_expert_frac", "moe_inactive_expert_frac",
                   "moe_expert_similarity")
ROUTING_LOG = "moe_routing_log.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Errors: a user mistake prints one line, not a traceback.
# ---------------------------------------------------------------------------------------------------------------------
def install_process_hooks() -> None:
    """Once per process: print MoeConfigError as one line (no traceback) and route our INFO logs like LLaMA-Factory's."""
    if getattr(sys.excepthook, "_llamafactory_moe", False):
        return
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, MoeConfigError):
            print(f"llamafactory-moe: invalid configuration: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    excepthook._llamafactory_moe = True
    sys.excepthook = excepthook
    _share_llamafactory_log_handler()


def _share_llamafactory_log_handler() -> None:
    """Print our ``llamafactory_moe.*`` INFO logs (adapter created/loaded, GOAT's SVD time) the way LLaMA-Factory
    prints its own: its handler sits on the ``llamafactory`` logger only, so ours would fall through to Python's
    last-resort handler, which drops INFO."""
    import logging as std_logging

    try:
        from llamafactory.extras import logging as lf_logging

        library_logger = lf_logging.get_logger()  # configures LLaMA-Factory's handler and level
        handler = getattr(lf_logging, "_default_handler", None)
    except Exception:  # an upstream change only costs us INFO lines
        return
    ours = std_logging.getLogger("llamafactory_moe")
    if handler is not None and handler not in ours.handlers:
        ours.addHandler(handler)
        ours.setLevel(library_logger.getEffectiveLevel())
        ours.propagate = False


def peft_type_of(adapter_dir: str) -> Optional[str]:
    """The ``peft_type`` in ``adapter_config.json`` (upper case), or None if the directory has no adapter config."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["peft_type"]).upper()
    except (ValueError, KeyError) as exc:
        raise MoeConfigError("adapter_name_or_path", adapter_dir, f"has an unreadable adapter_config.json ({exc})",
                             "restore the file or point to another checkpoint") from None


def our_method_of(adapter_dir: str) -> Optional[str]:
    from ..methods import ALL_METHODS

    peft_type = peft_type_of(adapter_dir)
    return peft_type.lower() if peft_type and peft_type.lower() in ALL_METHODS else None


def _adapter_paths(model_args) -> list[str]:
    return list(model_args.adapter_name_or_path or [])


def _require_patches() -> None:
    if FAILED_PATCHES:
        names = ", ".join(sorted(FAILED_PATCHES))
        raise MoeConfigError("finetuning_type", "<llamafactory-moe method>",
                             f"cannot run because these LLaMA-Factory patches failed: {names}",
                             "see the warning printed at start-up; use a supported LLaMA-Factory version (0.9.5)")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------------------
def _replace_finetuning_arguments(original, module):
    from .arguments import build_finetuning_arguments_class

    moe_cls = build_finetuning_arguments_class(original)
    for list_name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "_TRAIN_MCA_ARGS"):
        lst = getattr(module, list_name, None)
        if isinstance(lst, list):  # replace by identity: upstream main adds entries to these lists
            lst[:] = [moe_cls if item is original else item for item in lst]
    return moe_cls


def _raw_args(module, args) -> dict:
    raw = module.read_args(args)
    return raw if isinstance(raw, dict) else {}


def _wrap_parse_args(original, module):
    def _parse_args(parser, args=None, allow_extra_keys=False):
        try:
            return original(parser, args, allow_extra_keys)
        except ValueError as exc:
            if "not used by the HfArgumentParser" in str(exc):
                from .arguments import unknown_key_error

                valid = [f.dest for f in parser._actions]
                raise unknown_key_error(str(exc), valid, module.read_args(args)) from None
            raise

    return _parse_args


def _check_adapters_match(method: Optional[str], paths: list[str], key: str) -> None:
    for path in paths:
        if not os.path.isdir(path):
            continue  # a hub id or a missing dir: LLaMA-Factory / peft report it
        peft_type = peft_type_of(path)
        if peft_type is None:
            earlier = _intact_earlier_checkpoint(path)  # a save killed before peft wrote its config
            raise MoeConfigError(key, path, "has no adapter_config.json", _damage_fix(earlier) if earlier else
                                 "point to a directory written by `save_pretrained` / a `checkpoint-N` folder")
        theirs = our_method_of(path)
        if method is not None and theirs != method:
            raise MoeConfigError(key, path, f"holds a `{peft_type.lower()}` adapter but `finetuning_type` is "
                                 f"`{method}`", f"set `finetuning_type: {theirs or 'lora'}` or start a new adapter")
        if theirs is not None:
            saved_adapter_shapes(path, key)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _intact_earlier_checkpoint(adapter_dir: str) -> Optional[str]:
    """The newest sibling ``checkpoint-M`` (M < N) whose adapter weights open, for ``.../checkpoint-N``."""
    path = Path(adapter_dir).resolve()
    match = _CHECKPOINT_RE.match(path.name)
    if not match:
        return None
    earlier = sorted(((int(m.group(1)), p) for p in path.parent.iterdir()
                      if (m := _CHECKPOINT_RE.match(p.name)) and int(m.group(1)) < int(match.group(1))), reverse=True)
    for _, candidate in earlier:
        try:
            if peft_type_of(str(candidate)) is not None:
                _read_weight_shapes(candidate / ADAPTER_WEIGHTS)
                return str(candidate)
        except Exception:
            continue
    return None


def _read_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # reads the header only; checks it covers the whole file
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def saved_adapter_shapes(adapter_dir: str, key: str) -> Optional[dict[str, tuple[int, ...]]]:
    """Tensor name -> shape of a saved adapter, or a clear error if its weights file is missing or damaged (a save that
    was interrupted, a truncated copy). None for the legacy ``adapter_model.bin`` format (peft checks it)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    earlier = None
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            return None
        earlier = _intact_earlier_checkpoint(adapter_dir)
        raise MoeConfigError(key, adapter_dir, f"has no {ADAPTER_WEIGHTS}", _damage_fix(earlier))
    try:
        return _read_weight_shapes(path)
    except Exception as exc:
        earlier = _intact_earlier_checkpoint(adapter_dir)
        raise MoeConfigError(key, adapter_dir, f"has a damaged {path} ({type(exc).__name__}: {exc})",
                             _damage_fix(earlier)) from None


def _damage_fix(earlier: Optional[str]) -> str:
    if earlier:
        return f"the save was probably interrupted; use the intact `{earlier}` (or delete the damaged checkpoint)"
    return "re-save the adapter, or point to another checkpoint"


def check_adapter_fits(model, adapter_dir: str, saved: dict[str, tuple[int, ...]], key: str) -> None:
    """Compare the saved adapter tensors with the ones the wrapped model holds: same names, same shapes.

    ``model`` is the PeftModel, or the base model after peft injected the layers (its names lack ``base_model.model.``).
    Under ZeRO-3 the full shape of a partitioned parameter is ``ds_shape``.
    """
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    peft_type = peft_type_of(adapter_dir)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) if peft_type else None
    if not prefix:
        return
    from peft import PeftModel

    lead = "" if isinstance(model, PeftModel) else "base_model.model."
    expected = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if prefix in name:
            expected[lead + name.replace(".default", "")] = tuple(getattr(tensor, "ds_shape", tensor.shape))
    saved = {k: v for k, v in saved.items() if prefix in k}
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    for name in sorted(set(saved) | set(expected)):
        if name not in expected:
            problem = f"{file} has `{name}`, which this model has no place for"
        elif name not in saved:
            problem = f"{file} lacks `{name}`, which this model needs"
        elif saved[name] != expected[name]:
            problem = f"{file} has `{name}` with shape {list(saved[name])}, this model needs {list(expected[name])}"
        else:
            continue
        raise MoeConfigError(key, adapter_dir, f"does not fit this base model: {problem}",
                             "load it on the base model it was trained on, with the adapter_config.json saved beside "
                             "it (an adapter from another base model, or a config edited after training?)")


def _packaged_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def _maybe_use_packaged_data(data_args) -> None:
    """``dataset_dir: data`` (LLaMA-Factory's default) that does not define the requested datasets, all of which are
    our packaged demo sets (``moe_demo``): read them from the package. A ./data/dataset_info.json that defines any of
    them wins, so a user's own definitions are never overridden."""
    if data_args.dataset_dir != "data":
        return
    info_path = _packaged_data_dir() / "dataset_info.json"
    if not info_path.is_file():
        return
    known = set(json.loads(info_path.read_text()))
    wanted = list(data_args.dataset or []) + list(data_args.eval_dataset or [])
    if not wanted or not all(name in known for name in wanted):
        return
    local_info = os.path.join("data", "dataset_info.json")
    if os.path.isfile(local_info):
        try:
            with open(local_info, encoding="utf-8") as f:
                if set(json.load(f)) & set(wanted):
                    return
        except (OSError, ValueError):
            return  # LLaMA-Factory reports the broken file itself
    data_args.dataset_dir = str(_packaged_data_dir())
    if data_args.media_dir in (None, "data"):
        data_args.media_dir = data_args.dataset_dir


def _expand_user_paths(model_args) -> None:
    """Accept ``~/...`` model and adapter paths (our demo configs point into ``~/.cache``); transformers would treat
    an unexpanded ``~`` path as a hub repo id."""
    if isinstance(model_args.model_name_or_path, str) and model_args.model_name_or_path.startswith("~"):
        model_args.model_name_or_path = os.path.expanduser(model_args.model_name_or_path)
    if model_args.adapter_name_or_path:
        model_args.adapter_name_or_path = [os.path.expanduser(p) if p.startswith("~") else p
                                           for p in model_args.adapter_name_or_path]


def _reject_ignored_lora_keys(method: str, config, raw_args: dict) -> None:
    """A LoRA key the user wrote that this method does not read (S'MoRE sizes experts per layer) is an error, not a
    silent no-op: the run would otherwise train a differently sized adapter than the yaml says."""
    for lf_key, field_name in (("lora_rank", "expert_rank"), ("lora_alpha", "lora_alpha")):
        if raw_args.get(lf_key) is not None and field_name not in config.shared_fields:
            replacements = [f"moe_{name}" for name in config.own_field_names() if field_name.split("_")[-1] in name]
            raise MoeConfigError(lf_key, raw_args[lf_key], f"is not used by `{method}`",
                                 f"remove it (`{method}` sets this with {', '.join(f'`{k}`' for k in replacements)})"
                                 if replacements else "remove it")


def _wrap_parse_train_args(original, module):
    def _parse_train_args(args=None):
        parsed = original(args)
        model_args, data_args, training_args, finetuning_args, _ = parsed
        _expand_user_paths(model_args)
        _maybe_use_packaged_data(data_args)
        method = getattr(finetuning_args, "moe_method", None)
        if method is None:
            for path in _adapter_paths(model_args):
                if os.path.isdir(path) and our_method_of(path):
                    _require_patches()
                    _force_non_reentrant_checkpointing(model_args, _raw_args(module, args), our_method_of(path))
            return parsed
        _require_patches()
        config = finetuning_args.moe_peft_config
        _reject_ignored_lora_keys(method, config, _raw_args(module, args))
        if model_args.moe_aux_loss_coef is not None:
            check_float("moe_aux_loss_coef", model_args.moe_aux_loss_coef, minimum=0.0, method=method)
            if "aux_loss_coef" in config.shared_fields:
                config.aux_loss_coef = float(model_args.moe_aux_loss_coef)
            else:  # still LLaMA-Factory's router-loss weight for MoE *base* models (ModelArguments.moe_aux_loss_coef)
                from llamafactory.extras import logging

                logging.get_logger("llamafactory_moe").warning_rank0(
                    f"`moe_aux_loss_coef` is not used by `{method}` (it has no auxiliary loss); it only weights the "
                    "router loss of a mixture-of-experts base model.")
        if model_args.quantization_bit is not None and config.modifies_base_weights:
            raise MoeConfigError("quantization_bit", model_args.quantization_bit,
                                 f"cannot be used with `{method}`, which corrects the frozen base weights",
                                 "train on an unquantized base model")
        _check_adapters_match(method, _adapter_paths(model_args), "adapter_name_or_path")
        resume = training_args.resume_from_checkpoint or _auto_resume_checkpoint(training_args)
        if resume and os.path.isdir(str(resume)):
            _check_adapters_match(method, [str(resume)], "resume_from_checkpoint")
        _force_non_reentrant_checkpointing(model_args, _raw_args(module, args), method)
        return parsed

    return _parse_train_args


def _auto_resume_checkpoint(training_args) -> Optional[str]:
    """The checkpoint LLaMA-Factory will resume from on its own (hparams/parser.py: an existing output_dir without
    `overwrite_output_dir`), so a damaged one is reported before the model loads."""
    if training_args.resume_from_checkpoint is not None or not training_args.do_train:
        return None
    if not os.path.isdir(training_args.output_dir) or getattr(training_args, "overwrite_output_dir", False):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(training_args.output_dir)


def _force_non_reentrant_checkpointing(model_args, raw: dict, method: str) -> None:
    # Reentrant checkpointing runs the first forward under no_grad, so aux losses recorded inside a checkpointed layer
    # have no graph and the routers would silently get no balancing gradient (verified for HF Mixtral too).
    if raw.get("use_reentrant_gc") in (True, "true", "True", 1):
        raise MoeConfigError("use_reentrant_gc", raw["use_reentrant_gc"],
                             "is not supported: reentrant checkpointing runs the checkpointed forward without a graph, "
                             "which drops the gradient of in-layer auxiliary losses", "remove the key (llamafactory-moe "
                             "uses non-reentrant checkpointing for every method) or set it to false", method=method)
    model_args.use_reentrant_gc = False


def _wrap_parse_infer_args(original, module):
    def _parse_infer_args(args=None):
        parsed = original(args)
        model_args, _data_args, finetuning_args, _ = parsed
        _expand_user_paths(model_args)
        methods = {m for m in (our_method_of(p) for p in _adapter_paths(model_args) if os.path.isdir(p)) if m}
        if getattr(finetuning_args, "moe_method", None):
            methods.add(finetuning_args.moe_method)
        if not methods:
            return parsed
        _require_patches()
        method = sorted(methods)[0]
        backend = str(getattr(model_args, "infer_backend", "huggingface")).lower()
        if backend not in ("huggingface", "hf", "inferbackend.huggingface"):
            raise MoeConfigError("infer_backend", model_args.infer_backend,
                                 f"cannot serve `{method}` adapters: vLLM / SGLang load adapters as plain LoRA and "
                                 "would drop the experts", "use `infer_backend: huggingface`")
        if len(_adapter_paths(model_args)) > 1:
            raise MoeConfigError("adapter_name_or_path", model_args.adapter_name_or_path,
                                 "lists several adapters; a llamafactory-moe adapter must be loaded alone")
        if model_args.export_dir is not None:
            from ..core.peft_types import METHODS

            if not METHODS[method].config_cls.supports_merge:
                raise MoeConfigError("export_dir", model_args.export_dir,
                                     f"cannot be used: `llamafactory-cli export` merges adapters into the base "
                                     f"weights, and `{method}` routes each token through input-dependent experts, "
                                     "so it cannot be merged",
                                     "serve base model + adapter unmerged (`adapter_name_or_path`); "
                                     "only `moslora` (and plain LoRA) export merged")
        return parsed

    return _parse_infer_args


# ---------------------------------------------------------------------------------------------------------------------
# 2. Model: create our adapter for training, load ours unmerged for resume and inference.
# ---------------------------------------------------------------------------------------------------------------------
def _wrap_init_adapter(original, module):
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        method = getattr(finetuning_args, "moe_method", None)
        paths = _adapter_paths(model_args)
        ours = [p for p in paths if os.path.isdir(p) and our_method_of(p)]
        if method is None and not ours:
            return original(config, model, model_args, finetuning_args, is_trainable)
        return _setup_moe_adapter(model, model_args, finetuning_args, is_trainable, paths)

    return init_adapter


def _setup_moe_adapter(model, model_args, finetuning_args, is_trainable: bool, paths: list[str]):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    from llamafactory.extras import logging

    logger = logging.get_logger("llamafactory_moe")
    _require_patches()
    if is_trainable and getattr(model, "quantization_method", None) is not None and finetuning_args.moe_method:
        from ..core.peft_types import METHODS

        if METHODS[finetuning_args.moe_method].config_cls.modifies_base_weights:
            raise MoeConfigError("quantization_bit", model_args.quantization_bit,
                                 f"cannot be used with `{finetuning_args.moe_method}`")

    cast_to_fp32 = (is_trainable and not finetuning_args.pure_bf16 and not finetuning_args.use_badam
                    and not (model_args.quantization_bit is None and is_deepspeed_zero3_enabled()))

    if paths:
        if len(paths) > 1:
            raise MoeConfigError("adapter_name_or_path", paths,
                                 "lists several adapters; a llamafactory-moe adapter must be loaded alone")
        _check_adapters_match(getattr(finetuning_args, "moe_method", None), paths, "adapter_name_or_path")
        saved = saved_adapter_shapes(paths[0], "adapter_name_or_path") if os.path.isdir(paths[0]) else None
        try:
            model = PeftModel.from_pretrained(model, paths[0], is_trainable=is_trainable,
                                              cache_dir=model_args.cache_dir, token=model_args.hf_hub_token)
        except RuntimeError as exc:  # torch's "size mismatch for ..." while loading: name the file and the key
            if saved is not None:
                check_adapter_fits(model, paths[0], saved, "adapter_name_or_path")
            raise exc
        if saved is not None:
            check_adapter_fits(model, paths[0], saved, "adapter_name_or_path")
        peft_config = model.peft_config["default"]
        logger.info_rank0(f"Loaded {peft_config.method_name} adapter from {paths[0]} (unmerged).")
        if not is_trainable and model_args.export_dir is not None and peft_config.supports_merge:
            model = model.merge_and_unload()
            logger.info_rank0("Merged the adapter into the base weights for export.")
    elif is_trainable:
        config = finetuning_args.moe_peft_config
        target_modules = list(finetuning_args.lora_target)
        if len(target_modules) == 1 and target_modules[0] == "all":
            from llamafactory.model.model_utils.misc import find_all_linear_modules

            target_modules = find_all_linear_modules(model, finetuning_args.freeze_vision_tower)
        config = type(config)(**{**config.to_dict(), "target_modules": target_modules,
                                 "peft_type": None, "inference_mode": False})
        model = get_peft_model(model, config, autocast_adapter_dtype=cast_to_fp32)
        logger.info_rank0(f"Created a {config.method_name} adapter on {sorted(set(target_modules))}.")
    else:
        return model

    if is_trainable and cast_to_fp32:
        for param in filter(lambda p: p.requires_grad, model.parameters()):
            param.data = param.data.to(torch.float32)
    if is_trainable and is_deepspeed_zero3_enabled():
        _mark_zero3_leaf_modules(model)
    return model


def _mark_zero3_leaf_modules(model) -> None:
    """Gather every expert/router parameter of a layer together: data-dependent routing must not break ZeRO-3's
    prefetch trace (DeepSpeed ``set_z3_leaf_modules``)."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..core.layer import MoeLoraLayer

    classes = sorted({type(m) for m in model.modules() if isinstance(m, MoeLoraLayer)}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Trainers: aux losses in the loss, metrics in the logs.
# ---------------------------------------------------------------------------------------------------------------------
class _MoeLogAccumulator:
    """Detached aux-loss and routing statistics since the last log, per rank.

    The aux terms are averaged the way transformers' Trainer averages ``loss`` (see ``_wrap_log``): each micro-batch
    counts ``weight = 1 / current_gradient_accumulation_steps``, so ``sums / steps`` is the mean over optimizer steps
    of the mean over each step's micro-batches, also when an epoch's last step has fewer micro-batches.
    """

    def __init__(self):
        self.sums: dict[str, Any] = {}  # detached scalar tensors, read back to the host only when logging
        self.steps = 0.0  # optimizer steps covered: the sum of the micro-batch weights
        self.routing: dict[str, Any] = {}

    def add(self, window, weight: float = 1.0, replaced=None, restart: int = 0) -> None:
        """Add one training micro-batch with ``weight = 1 / current_gradient_accumulation_steps``.

        ``replaced``: a bool tensor (not a bool: no host sync), True when the Trainer's ``logging_nan_inf_filter``
        replaces this micro-batch's loss by ``tr_loss / (1 + restart)`` (``restart``: optimizer steps since the last
        log); the aux sums then take the same replacement, so they stay the aux share of what the Trainer logs."""
        import torch

        # Coefficient-weighted sums over layers, as `window.detached_terms()` but kept as tensors: a float() here would
        # wait for the device on every micro-batch.
        terms = window.term_totals()
        terms = {"aux_loss": sum(terms.values()), **terms}
        for name, value in terms.items():
            key = f"moe_{name}"
            previous = self.sums.get(key, 0.0)
            added = previous + weight * value
            if replaced is not None:
                condition = replaced.to(added.device) if isinstance(added, torch.Tensor) else replaced
                added = torch.where(condition, previous + previous / (1 + restart), added)
            self.sums[key] = added
        self.steps += weight
        for layer_name, records in window.routing.items():
            for record in records:
                accumulate(self.routing.setdefault(layer_name, {}), record)


def _is_moe_model(model) -> bool:
    from ..core.layer import MoeLoraLayer

    cached = getattr(model, "_llamafactory_moe_is_moe", None)
    if cached is None:
        cached = any(isinstance(m, MoeLoraLayer) for m in model.modules())
        try:
            object.__setattr__(model, "_llamafactory_moe_is_moe", cached)
        except Exception:
            pass
    return cached


def _wrap_compute_loss(original, module):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if not model.training or not _is_moe_model(model):
            return original(self, model, inputs, *args, **kwargs)
        from ..core import aux_loss

        logging_steps = max(int(getattr(self.args, "logging_steps", 1) or 1), 1)
        collect_routing = (self.state.global_step + 1) % logging_steps == 0
        # The Trainer's inputs are the collator's BatchEncoding: a Mapping (UserDict), not a dict.
        from collections.abc import Mapping

        token_mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        with aux_loss.collect(token_mask=token_mask, collect_routing=collect_routing) as window:
            result = original(self, model, inputs, *args, **kwargs)
        aux_total = window.weighted_total()
        # Mirror transformers' Trainer.training_step: it divides the returned loss by the accumulation steps only when
        # the model does not normalise by `num_items_in_batch` itself; aux terms are per-micro-batch means, so they
        # must be divided either way.
        accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        hf_divides = ((not getattr(self, "model_accepts_loss_kwargs", False) or num_items is None)
                      and getattr(self, "compute_loss_func", None) is None)
        scale = 1.0 if hf_divides else 1.0 / accumulation
        if aux_total is not None:
            if isinstance(result, tuple):
                loss, *rest = result
                result = (loss + scale * aux_total.to(loss.dtype), *rest)
            else:
                result = result + scale * aux_total.to(result.dtype)
        # Either way each aux term enters the Trainer's `tr_loss` as `aux / accumulation`: the accumulator weights it
        # so, and replaces it where the Trainer replaces a non-finite micro-batch loss (`logging_nan_inf_filter`).
        replaced = None
        if getattr(self.args, "logging_nan_inf_filter", False) and hasattr(self, "_globalstep_last_logged"):
            import torch
            from transformers.utils import is_torch_xla_available

            if not is_torch_xla_available():
                total = result[0] if isinstance(result, tuple) else result
                replaced = ~torch.isfinite(total.detach()).all()
        accumulator = self.__dict__.setdefault("_moe_log_accumulator", _MoeLogAccumulator())
        accumulator.add(window, weight=1.0 / accumulation, replaced=replaced,
                        restart=self.state.global_step - getattr(self, "_globalstep_last_logged", 0))
        return result

    return compute_loss


def _routing_metrics(trainer, routing: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict]]:
    """Overall ``moe_*`` routing scalars and per-layer statistics (definitions: ``analysis.statistics``); expert
    similarity is read from the weights here, on logging steps only."""
    if not routing:
        return {}, {}
    model = getattr(trainer, "model", None)
    vectors = model_expert_vectors(model) if model is not None else {}
    similarities = {name: expert_similarity(v) for name, v in vectors.items()}
    return routing_metrics(routing, {k: v for k, v in similarities.items() if v is not None})


def _write_routing_log(trainer, per_layer: dict[str, dict]) -> None:
    """One row per logging step in ``<output_dir>/moe_routing_log.jsonl`` (main process only; its own batches)."""
    is_main = getattr(trainer, "is_world_process_zero", lambda: True)()
    output_dir = getattr(trainer.args, "output_dir", None)
    if not per_layer or not is_main or not output_dir:
        return
    os.makedirs(output_dir, exist_ok=True)
    row = {"step": int(getattr(getattr(trainer, "state", None), "global_step", 0)), "layers": per_layer}
    with open(os.path.join(output_dir, ROUTING_LOG), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _wrap_log(original, module):
    def log(self, logs, *args, **kwargs):
        accumulator = self.__dict__.get("_moe_log_accumulator")
        if accumulator is not None and "loss" in logs and accumulator.steps:
            import torch

            metrics = {k: v / accumulator.steps for k, v in sorted(accumulator.sums.items())}
            routing, per_layer = _routing_metrics(self, accumulator.routing)
            metrics.update(routing)
            _write_routing_log(self, per_layer)
            keys = sorted(metrics)
            values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float32,
                                  device=getattr(self.args, "device", "cpu"))
            # Every rank logs at the same steps (transformers gathers the loss here too), so this collective is safe.
            if getattr(self.args, "world_size", 1) > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            logs.update({k: round(float(v), 6) for k, v in zip(keys, values.tolist())})
            _insert_lm_loss(logs)
            self.__dict__["_moe_log_accumulator"] = _MoeLogAccumulator()
        return original(self, logs, *args, **kwargs)

    return log


def _insert_lm_loss(logs: dict) -> None:
    """Put ``lm_loss = loss - moe_aux_loss`` right after ``loss`` (in place, keeping ``logs`` the same dict).

    Why the difference is exact (transformers 4.57 ``Trainer``). With ``G`` = ``current_gradient_accumulation_steps``
    (the micro-batches of this optimizer step), ``training_step`` returns per micro-batch either ``(lm + aux) / G`` (the
    Trainer divides: the model ignores ``num_items_in_batch``, as in dpo/kto/rm and multimodal sft) or
    ``lm_part + aux / G`` (the model or ``compute_loss_func`` normalises by the tokens of the whole accumulation window;
    ``compute_loss`` above divides the aux terms itself). ``tr_loss`` sums these over the micro-batches since the last
    log; ``_maybe_log_save_evaluate`` takes the mean over ranks, divides by the optimizer steps since the last log and
    rounds to 4 decimals. That is linear in the aux share ``sum(aux / G)``, which ``_MoeLogAccumulator`` sums the same
    way (weight ``1 / G``, the NaN/inf filter's replacement mirrored), divides by the same step count (the sum of the
    weights, also when an epoch's last step has fewer micro-batches) and ``log`` averages over ranks the same way. So
    ``moe_aux_loss`` is exactly the aux share of ``loss`` and ``loss - moe_aux_loss`` is the logged objective without
    the aux terms, in the same units: the LM loss for pt/sft; for dpo/kto/rm the stage's own objective (preference or
    pairwise ranking loss, with its ftx term if any), under the same key. It inherits ``loss``'s 4-decimal rounding
    (<= 5e-5); the aux keys carry 6 decimals, so ``lm_loss + moe_aux_loss == loss`` to float precision. Eval losses
    never contain aux terms (``compute_loss`` adds them in training only), so no ``eval_lm_loss`` is needed.
    """
    loss, aux = logs.get("loss"), logs.get("moe_aux_loss")
    if not isinstance(loss, (int, float)) or not isinstance(aux, (int, float)):
        return
    items = list(logs.items())
    at = next(i for i, (key, _) in enumerate(items) if key == "loss") + 1
    items.insert(at, ("lm_loss", round(loss - aux, 6)))
    logs.clear()
    logs.update(items)


def _wrap_create_optimizer(original, module):
    def create_optimizer(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        # Upstream cause: under DeepSpeed, transformers' `deepspeed_optim_sched` builds the LR scheduler on this
        # optimizer, then `DeepSpeedEngine._configure_optimizer` (deepspeed 0.19.8 runtime/engine.py:2348) deletes its
        # empty param groups in place. HF's weight-decay grouping leaves the no-decay group empty for adapters (no
        # trainable bias / norm), so the scheduler holds one lr more than the optimizer has groups and torch's
        # `zip(..., strict=True)` fails at the first `lr_scheduler.step()` (stock LoRA too). Dropping the empty groups
        # here, before the scheduler exists, is exactly what DeepSpeed does a moment later.
        if getattr(self, "is_deepspeed_enabled", False) and hasattr(optimizer, "param_groups"):
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if len(group["params"]) > 0]
        return optimizer

    return create_optimizer


class MoeStepCallback(TrainerCallback):
    """Runs once-per-optimizer-step adapter updates (e.g. SMoRA's loss-free bias) on every rank."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            apply_optimizer_step_updates(model)


def _wrap_run_exp(original, module):
    def run_exp(args=None, callbacks=None):
        from ..core.gloo_exit import register_exit_guard

        # LLaMA-Factory's destroy_process_group() leaves gloo's worker threads running (DeepSpeed and DDP keep the
        # groups referenced); one still releasing its last tensor when Python finalizes aborts the process (SIGABRT,
        # "terminate called without an active exception"). The guard waits for them at exit (gloo_exit.py).
        register_exit_guard()
        callbacks = list(callbacks or [])
        callbacks.append(MoeStepCallback())
        return original(args=args, callbacks=callbacks)

    return run_exp


# ---------------------------------------------------------------------------------------------------------------------
# 4. trainer_log.jsonl and plots
# ---------------------------------------------------------------------------------------------------------------------
def _wrap_log_callback_on_log(original, module):
    def on_log(self, args, state, control, **kwargs):
        last = state.log_history[-1] if state.log_history else {}
        extra = {k: v for k, v in last.items() if k == "lm_loss" or k.startswith("moe_")}
        if not extra:
            return original(self, args, state, control, **kwargs)
        write = type(self)._write_log
        # LogCallback hard-codes its keys and writes from a thread pool; a per-call closure carries ours along.
        self._write_log = lambda output_dir, logs: write(self, output_dir, {**logs, **extra})
        try:
            return original(self, args, state, control, **kwargs)
        finally:
            del self._write_log

    return on_log


def _wrap_plot_loss(original, module):
    def plot_loss(save_dictionary, keys=None):
        keys = list(keys or ["loss"])
        state_path = os.path.join(save_dictionary, "trainer_state.json")
        if os.path.isfile(state_path):
            with open(state_path, encoding="utf-8") as f:
                history = json.load(f).get("log_history", [])
            logged = {k for entry in history for k in entry}
            if "lm_loss" in logged and "lm_loss" not in keys:  # training_lm_loss.png, beside training_loss.png
                keys.insert(keys.index("loss") + 1 if "loss" in keys else len(keys), "lm_loss")
            keys += sorted(k for k in logged if k.startswith("moe_") and k not in keys)
        return original(save_dictionary, keys=keys)

    return plot_loss


# ---------------------------------------------------------------------------------------------------------------------
# The table. Order matters only within a module.
# ---------------------------------------------------------------------------------------------------------------------
_TRAINERS = (
    ("llamafactory.train.sft.trainer", "CustomSeq2SeqTrainer"),
    ("llamafactory.train.pt.trainer", "CustomTrainer"),
    ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
    ("llamafactory.train.kto.trainer", "CustomKTOTrainer"),
    ("llamafactory.train.rm.trainer", "PairwiseTrainer"),
)

PATCHES: list[Patch] = [
    Patch("finetuning_arguments", "llamafactory.hparams.parser", "FinetuningArguments",
          _replace_finetuning_arguments,
          "accept our finetuning_type values and moe_* keys, validated before the model loads", VERIFIED),
    Patch("parse_args", "llamafactory.hparams.parser", "_parse_args", _wrap_parse_args,
          "name the unknown key and suggest the closest valid one", VERIFIED, ("parser", "args", "allow_extra_keys")),
    Patch("parse_train_args", "llamafactory.hparams.parser", "_parse_train_args", _wrap_parse_train_args,
          "cross-checks (stage, quantization, resume type), non-reentrant checkpointing, packaged demo data",
          VERIFIED, ("args",)),
    Patch("parse_infer_args", "llamafactory.hparams.parser", "_parse_infer_args", _wrap_parse_infer_args,
          "refuse vLLM/SGLang and merged export for routed adapters before loading", VERIFIED, ("args",)),
    Patch("init_adapter", "llamafactory.model.loader", "init_adapter", _wrap_init_adapter,
          "create our adapters for training; load them unmerged for resume and inference", VERIFIED,
          ("config", "model", "model_args", "finetuning_args", "is_trainable")),
    Patch("run_exp", "llamafactory.train.tuner", "run_exp", _wrap_run_exp,
          "add the once-per-optimizer-step callback (the CLI offers no way to pass callbacks); wait at exit for "
          "gloo's worker threads (else a rank can abort after training)", VERIFIED,
          ("args", "callbacks")),
    Patch("log_callback", "llamafactory.train.callbacks", "LogCallback.on_log", _wrap_log_callback_on_log,
          "write lm_loss and moe_* metrics into trainer_log.jsonl (LogCallback hard-codes its keys)", VERIFIED,
          ("self", "args", "state", "control")),
    Patch("plot_loss", "llamafactory.extras.ploting", "plot_loss", _wrap_plot_loss,
          "plot lm_loss and moe_* curves (training_lm_loss.png, training_moe_aux_loss.png) beside the loss plot",
          VERIFIED, ("save_dictionary", "keys")),
] + [
    row
    for module_name, cls in _TRAINERS
    for row in (
        Patch(f"{cls}.compute_loss", module_name, f"{cls}.compute_loss", _wrap_compute_loss,
              "add in-layer aux losses with HF's gradient-accumulation scaling", VERIFIED, ("self", "model", "inputs")),
        Patch(f"{cls}.log", module_name, f"{cls}.log", _wrap_log,
              "log moe_* metrics (averaged over steps and ranks as HF averages the loss) and lm_loss (the loss "
              "without the aux terms) next to the loss", VERIFIED, ("self", "logs")),
        Patch(f"{cls}.create_optimizer", module_name, f"{cls}.create_optimizer", _wrap_create_optimizer,
              "DeepSpeed: drop empty param groups before HF builds the LR scheduler (DeepSpeed drops them after, "
              "so the first lr_scheduler.step() fails: zip() argument 2 is longer than argument 1)", VERIFIED,
              ("self",)),
    )
]
