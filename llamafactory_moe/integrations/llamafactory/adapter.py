"""Create our adapter for training, load ours unmerged for resume and inference (merged only for ``export`` of a
mergeable method). Mirrors ``llamafactory.model.adapter`` (``init_adapter``), patched where
``llamafactory.model.loader`` imported it.
"""

from __future__ import annotations

import os

from ...core.errors import MoeConfigError
from ..arguments import in_llamafactory_keys
from ..patching import Patch
from ...checkpoints import (_adapter_paths, _check_adapters_match, adapter_method, check_adapter_fits,
                          saved_adapter_shapes)
from .common import VERIFIED, _require_patches, check_quantized_base


def _wrap_init_adapter(original, module):
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        method = getattr(finetuning_args, "moe_method", None)
        paths = _adapter_paths(model_args)
        ours = [p for p in paths if adapter_method(p, model_args)]  # a local dir or a hub id
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
    if is_trainable and getattr(model, "quantization_method", None) is not None:
        check_quantized_base(finetuning_args.moe_method, model_args.quantization_bit or model.quantization_method)

    cast_to_fp32 = (is_trainable and not finetuning_args.pure_bf16 and not finetuning_args.use_badam
                    and not (model_args.quantization_bit is None and is_deepspeed_zero3_enabled()))

    if paths:
        _check_adapters_match(getattr(finetuning_args, "moe_method", None), paths, "adapter_name_or_path")
        saved = saved_adapter_shapes(paths[0], "adapter_name_or_path") if os.path.isdir(paths[0]) else None
        # upstream's `init_kwargs` (_setup_lora_tuning); paths[0] already includes `adapter_folder` for a local dir
        source = model_args.adapter_name_or_path[0]
        init_kwargs = {"subfolder": model_args.adapter_folder, "offload_folder": model_args.offload_folder,
                       "cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                       "token": model_args.hf_hub_token}
        try:
            model = PeftModel.from_pretrained(model, source, is_trainable=is_trainable, **init_kwargs)
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
        config = _with_upstream_targets(finetuning_args.moe_peft_config, model, model_args, finetuning_args, logger)
        target_modules = config.target_modules
        try:
            model = get_peft_model(model, config, autocast_adapter_dtype=cast_to_fp32)
        except MoeConfigError as exc:  # a mistake known only once the layer shapes are (e.g. GOAT's spectrum split)
            raise in_llamafactory_keys(exc, type(config), config.method_name) from None
        logger.info_rank0(f"Created a {config.method_name} adapter on {sorted(set(target_modules))}.")
    else:
        return model

    if is_trainable and cast_to_fp32:
        for param in filter(lambda p: p.requires_grad, model.parameters()):
            param.data = param.data.to(torch.float32)
    if is_trainable and is_deepspeed_zero3_enabled():
        _mark_zero3_leaf_modules(model)
    return model


def _with_upstream_targets(config, model, model_args, finetuning_args, logger):
    """Our config with the modules upstream's ``_setup_lora_tuning`` would train: ``lora_target`` (``all`` expanded),
    narrowed by ``patch_target_modules`` on multimodal bases (no vision tower unless asked), and with
    ``resize_vocab`` the resized input/output embeddings as ``additional_target`` (``modules_to_save``).
    ``use_llama_pro`` (``find_expanded_modules``) is refused while parsing, so it has no branch here."""
    from llamafactory.model.model_utils.misc import find_all_linear_modules
    from llamafactory.model.model_utils.visual import patch_target_modules

    if len(finetuning_args.lora_target) == 1 and finetuning_args.lora_target[0] == "all":
        target_modules = find_all_linear_modules(model, finetuning_args.freeze_vision_tower)
    else:
        target_modules = finetuning_args.lora_target
    target_modules = list(patch_target_modules(model, finetuning_args, target_modules))

    if model_args.resize_vocab and finetuning_args.additional_target is None:
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        module_names = {name.split(".")[-1] for name, module in model.named_modules()
                        if any(module is e for e in embeddings)}
        finetuning_args.additional_target = module_names
        logger.warning_rank0("Vocab has been resized, add {} to trainable params.".format(",".join(module_names)))
    modules_to_save = finetuning_args.additional_target
    return type(config)(**{**config.to_dict(), "target_modules": target_modules, "peft_type": None,
                           "inference_mode": False,
                           "modules_to_save": sorted(modules_to_save) if modules_to_save else None})


def _mark_zero3_leaf_modules(model) -> None:
    """Gather every expert/router parameter of a layer together: data-dependent routing must not break ZeRO-3's
    prefetch trace (DeepSpeed ``set_z3_leaf_modules``)."""
    from deepspeed.utils import set_z3_leaf_modules

    from ...core.layer import MoeLoraLayer

    classes = sorted({type(m) for m in model.modules() if isinstance(m, MoeLoraLayer)}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)


PATCHES: list[Patch] = [
    Patch("init_adapter", "llamafactory.model.loader", "init_adapter", _wrap_init_adapter,
          "create our adapters for training; load them unmerged for resume and inference", VERIFIED,
          ("config", "model", "model_args", "finetuning_args", "is_trainable")),
]
