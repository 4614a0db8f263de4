"""Adapter directories on disk: which method saved them, and whether their weights are intact and fit the model.

Independent of LLaMA-Factory: used by its integration (``integrations/llamafactory/hparams.py`` checks before the model
loads, ``adapter.py`` while loading) and by ``analysis`` without importing that integration.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from .core.errors import MoeConfigError


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
    from .core.peft_types import METHODS, register_all_methods

    register_all_methods()
    peft_type = peft_type_of(adapter_dir)
    return peft_type.lower() if peft_type and peft_type.lower() in METHODS else None


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def adapter_method(source: str, model_args) -> Optional[str]:
    """Our method of the adapter at ``source`` (one entry of ``_adapter_paths``), or None when it is not ours.

    A local directory is read directly. A hub id (``owner/name``) is read from its ``adapter_config.json`` the way peft
    will read it when the adapter loads (same ``adapter_folder``, ``model_revision``, ``cache_dir`` and token; the local
    cache first, the hub unless ``HF_HUB_OFFLINE``), so an adapter of ours named by its hub id is recognised even when
    ``finetuning_type`` is stock LoRA. Unreachable or not an adapter: None, and LLaMA-Factory / peft report their own
    error when they load it.
    """
    if os.path.isdir(source):
        return our_method_of(source)
    if not _HUB_ID.match(source):
        return None
    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(source, "adapter_config.json",
                                      subfolder=getattr(model_args, "adapter_folder", None) or None,
                                      revision=getattr(model_args, "model_revision", None),
                                      cache_dir=getattr(model_args, "cache_dir", None),
                                      token=getattr(model_args, "hf_hub_token", None))
    except Exception:  # noqa: BLE001 - offline, no such repo, no such file: not ours to report
        return None
    return our_method_of(os.path.dirname(config_file))


def _adapter_paths(model_args) -> list[str]:
    """The adapter directories to inspect: with ``adapter_folder`` (upstream loads ``subfolder=adapter_folder``) a local
    adapter lives in ``<path>/<adapter_folder>``."""
    folder = getattr(model_args, "adapter_folder", None)
    return [os.path.join(p, folder) if folder and os.path.isdir(os.path.join(p, folder)) else p
            for p in (model_args.adapter_name_or_path or [])]


def check_one_adapter(method: Optional[str], paths: list[str], key: str) -> None:
    """With one of our methods (``method``, or an adapter of ours among ``paths``) a run loads one adapter only. Asked
    when the arguments are parsed (train and inference) and again when the model loads."""
    if len(paths) > 1 and (method is not None or any(os.path.isdir(p) and our_method_of(p) for p in paths)):
        raise MoeConfigError(key, paths, "lists several adapters; a llamafactory-moe adapter must be loaded alone")


def _check_adapters_match(method: Optional[str], paths: list[str], key: str) -> None:
    """The adapters a run of ``method`` loads fit it: one adapter (``check_one_adapter``), each local one written by
    peft, of the run's method, with readable weights. Asked when the arguments are parsed and when the model loads."""
    check_one_adapter(method, paths, key)
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
