"""Argument parsing and validation. Mirrors ``llamafactory.hparams.parser`` (patched there: ``FinetuningArguments``,
``_parse_args``, ``_parse_train_args``, ``_parse_infer_args``).

``MoeFinetuningArguments`` (built in ``integrations/arguments.py``) validates our keys before any model loads;
``_parse_train_args`` then checks cross-dataclass settings (stage, quantization, gradient checkpointing mode,
adapters to resume, packaged demo data); ``_parse_infer_args`` refuses vLLM / SGLang serving and merged
``export`` of routed adapters before loading.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from ...checkpoints import _adapter_paths, _check_adapters_match, adapter_method, check_one_adapter, our_method_of
from ...core.errors import MoeConfigError, check_float
from ...data import demo_data_dir
from ..patching import Patch
from .common import VERIFIED, _require_patches, check_quantized_base


def _replace_finetuning_arguments(original, module):
    from ..arguments import build_finetuning_arguments_class

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
                from ..arguments import unknown_key_error

                valid = [f.dest for f in parser._actions]
                raise unknown_key_error(str(exc), valid, module.read_args(args)) from None
            raise

    return _parse_args


def _maybe_use_packaged_data(data_args) -> None:
    """``dataset_dir: data`` (LLaMA-Factory's default) that does not define the requested datasets, all of which are
    our packaged demo sets (``moe_demo``): read them from the package. A ./data/dataset_info.json that defines any of
    them wins, so a user's own definitions are never overridden."""
    if data_args.dataset_dir != "data":
        return
    info_path = demo_data_dir() / "dataset_info.json"
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
    data_args.dataset_dir = str(demo_data_dir())
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


# ModelArguments switches that replace LLaMA-Factory's LoRA path (Unsloth / KTransformers build plain LoRA; our
# adapter path ignores them) or that checkpoint reentrantly (Unsloth's gradient checkpointing), which drops in-layer
# auxiliary-loss gradients like `use_reentrant_gc`.
IGNORED_BACKENDS = {
    "use_unsloth": "is not supported: Unsloth builds its own plain-LoRA adapter, so the experts would be ignored",
    "use_unsloth_gc": "is not supported: Unsloth's gradient checkpointing is reentrant, which drops the gradient of "
                      "in-layer auxiliary losses",
    "use_kt": "is not supported: KTransformers builds its own plain-LoRA adapter, so the experts would be ignored",
}


def _raw_method(raw: dict) -> Optional[str]:
    """Our method named by the raw arguments (`finetuning_type`, or an adapter of ours to load), or None."""
    from ...core.peft_types import METHODS, register_all_methods

    register_all_methods()
    if str(raw.get("finetuning_type", "")).lower() in METHODS:
        return str(raw["finetuning_type"]).lower()
    paths = raw.get("adapter_name_or_path") or []
    paths = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else list(paths)
    folder = raw.get("adapter_folder")
    for path in paths:
        path = os.path.expanduser(str(path))
        path = os.path.join(path, folder) if folder and os.path.isdir(os.path.join(path, folder)) else path
        if os.path.isdir(path) and our_method_of(path):
            return our_method_of(path)
    return None


def _refuse_ignored_backends(raw: dict, method: Optional[str] = None) -> None:
    """Before LLaMA-Factory parses (it would first demand the Unsloth / KTransformers packages); again after parsing
    with the parsed values (command-line arguments have no raw dict)."""
    enabled = [key for key in IGNORED_BACKENDS if raw.get(key) in (True, "true", "True", 1)]
    method = method or (_raw_method(raw) if enabled else None)
    if enabled and method is not None:
        raise MoeConfigError(enabled[0], raw[enabled[0]], IGNORED_BACKENDS[enabled[0]],
                             "remove the key (llamafactory-moe loads and trains with transformers + peft)",
                             method=method)


def _wrap_parse_train_args(original, module):
    def _parse_train_args(args=None):
        _refuse_ignored_backends(_raw_args(module, args))
        parsed = original(args)
        model_args, data_args, training_args, finetuning_args, _ = parsed
        _expand_user_paths(model_args)
        _maybe_use_packaged_data(data_args)
        method = getattr(finetuning_args, "moe_method", None)
        if method is None:
            paths = _adapter_paths(model_args)
            for path in paths:
                theirs = adapter_method(path, model_args)  # a local dir or a hub id
                if theirs:
                    _require_patches()
                    check_one_adapter(theirs, paths, "adapter_name_or_path")
                    _refuse_ignored_backends(vars(model_args), theirs)
                    _force_non_reentrant_checkpointing(model_args, _raw_args(module, args), theirs)
            return parsed
        _require_patches()
        _refuse_ignored_backends(vars(model_args), method)
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
        check_quantized_base(method, model_args.quantization_bit)
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
                             "which drops the gradient of in-layer auxiliary losses",
                             "remove the key (llamafactory-moe uses non-reentrant checkpointing for every method) or "
                             "set it to false", method=method)
    model_args.use_reentrant_gc = False


def _wrap_parse_infer_args(original, module):
    def _parse_infer_args(args=None):
        _refuse_ignored_backends(_raw_args(module, args))
        parsed = original(args)
        model_args, _data_args, finetuning_args, _ = parsed
        _expand_user_paths(model_args)
        methods = {m for m in (adapter_method(p, model_args) for p in _adapter_paths(model_args)) if m}
        if getattr(finetuning_args, "moe_method", None):
            methods.add(finetuning_args.moe_method)
        if not methods:
            return parsed
        _require_patches()
        method = sorted(methods)[0]
        _refuse_ignored_backends(vars(model_args), method)
        backend = str(getattr(model_args, "infer_backend", "huggingface")).lower()
        if backend not in ("huggingface", "hf", "inferbackend.huggingface"):
            raise MoeConfigError("infer_backend", model_args.infer_backend,
                                 f"cannot serve `{method}` adapters: vLLM / SGLang load adapters as plain LoRA and "
                                 "would drop the experts", "use `infer_backend: huggingface`")
        check_one_adapter(method, _adapter_paths(model_args), "adapter_name_or_path")
        if model_args.export_dir is not None:
            from ...core.peft_types import METHODS

            if not METHODS[method].config_cls.supports_merge:
                raise MoeConfigError("export_dir", model_args.export_dir,
                                     f"cannot be used: `llamafactory-cli export` merges adapters into the base "
                                     f"weights, and `{method}` routes each token through input-dependent experts, "
                                     "so it cannot be merged",
                                     "serve base model + adapter unmerged (`adapter_name_or_path`); "
                                     f"only {_mergeable_methods()} (and plain LoRA) export merged")
        return parsed

    return _parse_infer_args


def _mergeable_methods() -> str:
    from ...core.peft_types import METHODS

    return ", ".join(f"`{name}`" for name, spec in METHODS.items() if spec.config_cls.supports_merge)


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
]
