"""LlamaBoard (``llamafactory-cli webui``): our methods selectable, configurable, trainable, chattable and exportable.

Every change is one row of ``LLAMABOARD_PATCHES`` (``Patch`` rows, appended to ``integrations.llamafactory.PATCHES``):

* the fine-tuning method dropdown lists our methods, and they count as PEFT methods (checkpoints list as adapters and
  load unmerged): ``METHODS`` / ``PEFT_METHODS`` are extended in place, before the UI is built;
* the Train tab gets a "MoE" accordion beside LLaMA-Factory's LoRA one, with one group of widgets per method, built
  from the method registry (defaults, help texts and lower bounds from the config dataclasses); only the chosen
  method's group is shown;
* the runner passes the LoRA keys the method reuses plus every ``moe_*`` key that differs from the method's default,
  so "Preview command" shows the yaml keys ``llamafactory-cli train`` gets; before previewing or starting, the keys are
  parsed by LLaMA-Factory's (patched) argument parser, and an invalid value shows our one-line message instead;
* the loss plot shows ``lm_loss`` and ``moe_aux_loss`` beside ``loss``;
* chat loading and export show our message when we refuse a configuration (e.g. merging a routed adapter).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from ..core.errors import MoeConfigError
from .patching import Patch

VERIFIED = "llamafactory 0.9.5, gradio 5.50"
ERROR_PREFIX = "llamafactory-moe: invalid configuration: "
# LLaMA-Factory's LoRA widgets our methods reuse: widget id -> (yaml key, config field that reads it; None = always).
REUSED_LORA_WIDGETS = {
    "train.lora_rank": ("lora_rank", "expert_rank"),
    "train.lora_alpha": ("lora_alpha", "lora_alpha"),
    "train.lora_dropout": ("lora_dropout", "expert_dropout"),
    "train.lora_target": ("lora_target", None),
    "train.additional_target": ("additional_target", None),
}
_SHARED_KEYS = ("num_experts", "top_k", "aux_loss_coef")  # shared config fields with a moe_* key of their own


def method_names() -> list[str]:
    from .arguments import all_method_names

    return list(all_method_names())


# ---------------------------------------------------------------------------------------------------------------------
# The keys of one method, from the registry
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MoeKey:
    method: str
    key: str  # yaml key, e.g. moe_top_k
    field: str  # config field, e.g. top_k
    type: Any
    default: Any
    help: str

    @property
    def elem_name(self) -> str:  # LLaMA-Factory manager id "train.<elem_name>"; also the HTML elem_id
        return f"moe_{self.method}_{self.field}"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def method_keys(method: str) -> list[MoeKey]:
    """The ``moe_*`` keys ``method`` reads, shared ones first, with the config class's defaults and help texts."""
    from ..core.peft_types import METHODS, register_all_methods

    register_all_methods()
    cls = METHODS[method].config_cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [n for n in _SHARED_KEYS if n in cls.shared_fields and (n != "aux_loss_coef" or cls.aux_loss_terms)]
    keys = []
    for name in names + list(cls.own_field_names()):
        f = fields[name]
        default = cls.default_aux_loss_coef if name == "aux_loss_coef" else _field_default(f)
        help_text = " ".join(f.metadata.get("help", "").split())
        keys.append(MoeKey(method, f"moe_{name}", name, hints[name], default, help_text))
    return keys


def _accepts(method: str, field: str, value: Any) -> bool:
    """True if the method's config accepts ``field=value`` with every other field at its default."""
    from ..core.peft_types import METHODS

    try:
        METHODS[method].config_cls(task_type="CAUSAL_LM", **{field: value})
        return True
    except Exception:
        return False


def _base_type(typ) -> Any:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) is typing.Union and len(args) == 1 else typ


def _quoted_choices(key: MoeKey) -> list[str]:
    """String values named in quotes in the help text that the config accepts (e.g. S'MoRE's gate types)."""
    found = [c for c in dict.fromkeys(re.findall(r"'([A-Za-z0-9_]+)'", key.help)) if _accepts(key.method, key.field, c)]
    return found if key.default in found else []


def build_widget(key: MoeKey):
    """One gradio input for ``key`` (created unrendered; the accordion renders it). Numbers get ``minimum`` 0 when the
    config accepts 0 (integers: else 1 when it accepts 1); lists and numbers defaulting to None are yaml text."""
    import gradio as gr

    common = dict(label=key.key, info=key.help, elem_id=key.elem_name, render=False, interactive=True)
    base = _base_type(key.type)
    if base is bool:
        return gr.Checkbox(value=bool(key.default), **common)
    if base in (int, float) and key.default is not None:  # (gradio sends 0 for an empty Number: None needs text)
        low = 0 if _accepts(key.method, key.field, base(0)) else None
        if low is None and base is int and _accepts(key.method, key.field, 1):
            low = 1
        return gr.Number(value=key.default, minimum=low, precision=0 if base is int else None, **common)
    if base is str:
        choices = _quoted_choices(key)
        if choices:
            return gr.Dropdown(choices=choices, value=key.default, allow_custom_value=True, **common)
        return gr.Textbox(value=key.default, **common)
    # lists, and numbers whose default is None (empty = None): yaml text
    return gr.Textbox(value=_yaml_text(key.default), placeholder="empty = default (None)" if key.default is None
                      else None, **common)


def _yaml_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def widget_value(key: MoeKey, raw: Any) -> Any:
    """The yaml value of a widget's content (empty = None); a text that is not yaml is our one-line error."""
    base = _base_type(key.type)
    if raw is None or raw == "":
        return None
    if base is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if base is str or not isinstance(raw, str):
        return raw
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise MoeConfigError(key.key, raw, "is not a yaml value", "write e.g. [4, 4] or 0.5",
                             method=key.method) from None
    if typing.get_origin(base) is list and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]  # one value for a per-layer list (the config broadcasts it)
    return value


def moe_args(method: str, get) -> dict[str, Any]:
    """yaml keys for ``method`` from the UI: the reused LoRA keys it reads, and each ``moe_*`` key whose widget differs
    from the method's default. ``get(elem_id)`` reads a widget's value."""
    from ..core.peft_types import METHODS

    cls = METHODS[method].config_cls
    args: dict[str, Any] = {}
    for elem_id, (yaml_key, field) in REUSED_LORA_WIDGETS.items():
        if field is None or field in cls.shared_fields:
            args[yaml_key] = get(elem_id)
    args["lora_target"] = args.get("lora_target") or "all"
    args["additional_target"] = args.get("additional_target") or None
    for key in method_keys(method):
        value = widget_value(key, get(f"train.{key.elem_name}"))
        if value != key.default:
            args[key.key] = value
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------------------------------
def _extend_methods(original, module):
    original.extend(m for m in method_names() if m not in original)  # in place: top.py builds the dropdown from it
    return original


def _extend_peft_methods(original, module):
    original.update(method_names())  # in place: the same set object is imported by runner, chatter, export
    return original


def _wrap_clean_cmd(original, module):
    def _clean_cmd(args):
        cleaned = original(args)
        # LLaMA-Factory drops False values; `moe_svd_init: false` must reach the yaml (its default is true).
        cleaned.update({k: v for k, v in args.items() if k.startswith("moe_") and v is False})
        return cleaned

    return _clean_cmd


def _wrap_create_train_tab(original, module):
    def create_train_tab(engine):
        import gradio as gr

        keys = {m: method_keys(m) for m in method_names()}
        widgets = {k.elem_name: build_widget(k) for ks in keys.values() for k in ks}
        base_elems = engine.manager.get_base_elems
        # The tab binds preview / start / save / load to the inputs it collects from get_base_elems(): add ours.
        engine.manager.get_base_elems = lambda: base_elems() | set(widgets.values())
        try:
            elem_dict = original(engine)
        finally:
            del engine.manager.get_base_elems
        with gr.Accordion("MoE (llamafactory-moe)", open=True, visible=False, elem_id="moe_tab") as moe_tab:
            groups = {}
            for method, method_key_list in keys.items():
                with gr.Column(visible=False, elem_id=f"moe_group_{method}") as groups[method]:
                    gr.Markdown(f"**{method}** keys (`finetuning_type: {method}`); LoRA rank / alpha / dropout / "
                                "target come from the LoRA configurations above" if method_key_list else
                                f"**{method}** has no `moe_*` keys; it reads the LoRA configurations above")
                    for key in method_key_list:
                        widgets[key.elem_name].render()
        lora_tab = elem_dict.get("lora_tab")  # place the accordion right after LLaMA-Factory's LoRA accordion
        siblings = getattr(getattr(lora_tab, "parent", None), "children", [])
        if lora_tab in siblings and moe_tab in siblings:  # else it stays at the end of the tab
            siblings.remove(moe_tab)
            siblings.insert(siblings.index(lora_tab) + 1, moe_tab)

        def show(finetuning_type):
            return [gr.Accordion(visible=finetuning_type in groups)] + [
                gr.Column(visible=finetuning_type == m) for m in groups]

        finetuning_type = engine.manager.get_elem_by_id("top.finetuning_type")
        finetuning_type.change(show, [finetuning_type], [moe_tab] + list(groups.values()), queue=False)
        elem_dict.update(moe_tab=moe_tab, **widgets)
        return elem_dict

    return create_train_tab


def _wrap_runner_parse_train_args(original, module):
    def _parse_train_args(self, data):
        args = original(self, data)
        method = args.get("finetuning_type")
        if method in method_names():
            args.update(moe_args(method, lambda elem_id: data[self.manager.get_elem_by_id(elem_id)]))
        return args

    return _parse_train_args


def check_with_parser(args: dict[str, Any]) -> None:
    """Parse ``args`` as ``llamafactory-cli train`` will (our validation runs while parsing): raises MoeConfigError.

    Our finetuning arguments are parsed alone first, so their checks run even when another dataclass fails earlier
    (e.g. ``bf16`` on a CPU machine); then the whole command, for the cross-argument checks. Other errors are left to
    the training process, which reports them in the output box as LLaMA-Factory does."""
    from llamafactory.hparams import parser
    from transformers import HfArgumentParser

    from .arguments import _MoeArgumentsBase

    ours = [c for c in parser._TRAIN_ARGS if isinstance(c, type) and issubclass(c, _MoeArgumentsBase)]
    if ours:
        HfArgumentParser(ours[0]).parse_dict(dict(args), allow_extra_keys=True)
    try:
        parser._parse_train_args(dict(args))
    except MoeConfigError:
        raise
    except Exception:
        pass


def _wrap_runner_initialize(original, module):
    def _initialize(self, data, do_train, from_preview):
        error = original(self, data, do_train, from_preview)
        if error or data[self.manager.get_elem_by_id("top.finetuning_type")] not in method_names():
            return error
        try:
            check_with_parser(self._parse_train_args(data) if do_train else self._parse_eval_args(data))
        except MoeConfigError as exc:
            return ERROR_PREFIX + str(exc)
        return error

    return _initialize


def _wrap_gen_loss_plot(original, module):
    def gen_loss_plot(trainer_log):
        fig = original(trainer_log)
        ax = fig.axes[0] if fig.axes else None
        for key, color in (("lm_loss", "#2ca02c"), ("moe_aux_loss", "#d62728")):
            points = [(log["current_steps"], log[key]) for log in trainer_log if log.get(key) is not None]
            if ax is None or not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=key)
        if ax is not None and any(log.get("lm_loss") is not None for log in trainer_log):
            for line, label in zip(ax.get_lines(), ("loss (original)", "loss (smoothed)")):
                line.set_label(label)
            ax.legend()
        return fig

    return gen_loss_plot


def _wrap_export_save_model(original, module):
    def save_model(lang, *args, **kwargs):
        try:
            yield from original(lang, *args, **kwargs)
        except MoeConfigError as exc:
            import gradio as gr

            gr.Warning(ERROR_PREFIX + str(exc))
            yield ERROR_PREFIX + str(exc)

    return save_model


def _wrap_chat_load_model(original, module):
    def load_model(self, data):
        try:
            yield from original(self, data)
        except MoeConfigError as exc:
            import gradio as gr

            gr.Warning(ERROR_PREFIX + str(exc))
            yield ERROR_PREFIX + str(exc)

    return load_model


LLAMABOARD_PATCHES: list[Patch] = [
    Patch("webui_peft_methods", "llamafactory.webui.control", "PEFT_METHODS", _extend_peft_methods,
          "our methods count as PEFT methods: checkpoints list as adapters, load unmerged in chat / eval / export",
          VERIFIED),
    Patch("webui_methods", "llamafactory.webui.components.top", "METHODS", _extend_methods,
          "our methods in the fine-tuning method dropdown", VERIFIED),
    Patch("webui_clean_cmd", "llamafactory.webui.common", "_clean_cmd", _wrap_clean_cmd,
          "keep `moe_*: false` in the previewed / saved command (LLaMA-Factory drops False values)", VERIFIED,
          ("args",)),
    Patch("webui_train_tab", "llamafactory.webui.components.train", "create_train_tab", _wrap_create_train_tab,
          "MoE accordion with the chosen method's keys, bound to preview / start / save / load", VERIFIED,
          ("engine",)),
    Patch("webui_runner_train_args", "llamafactory.webui.runner", "Runner._parse_train_args",
          _wrap_runner_parse_train_args, "pass the reused LoRA keys and the changed moe_* keys for our methods",
          VERIFIED, ("self", "data")),
    Patch("webui_runner_initialize", "llamafactory.webui.runner", "Runner._initialize", _wrap_runner_initialize,
          "validate our keys with the argument parser before preview / start; show our one-line error", VERIFIED,
          ("self", "data", "do_train", "from_preview")),
    Patch("webui_loss_plot", "llamafactory.webui.control", "gen_loss_plot", _wrap_gen_loss_plot,
          "the Train tab's loss plot (control's import of extras.ploting.gen_loss_plot) also shows lm_loss and "
          "moe_aux_loss from trainer_log.jsonl", VERIFIED, ("trainer_log",)),
    Patch("webui_export", "llamafactory.webui.components.export", "save_model", _wrap_export_save_model,
          "show our refusal (merging a routed adapter) in the Export tab's info box", VERIFIED, ("lang",)),
    Patch("webui_chat_load", "llamafactory.webui.chatter", "WebChatModel.load_model", _wrap_chat_load_model,
          "show our refusal (e.g. vLLM for a routed adapter) in the Chat tab's info box", VERIFIED, ("self", "data")),
]
