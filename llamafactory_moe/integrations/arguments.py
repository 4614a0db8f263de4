"""LLaMA-Factory arguments: ``finetuning_type: <our method>`` plus ``moe_*`` keys, validated before the model loads.

``MoeFinetuningArguments`` subclasses LLaMA-Factory's ``FinetuningArguments`` and replaces it in the parser's argument
lists. Its ``__post_init__`` turns ``finetuning_type: goat`` into ``finetuning_type: lora`` plus ``moe_method: goat``
and a validated PEFT config, so every LLaMA-Factory code path that branches on LoRA (adapter resume, label names,
chat / api / webchat) treats our adapter as a PEFT adapter.

Keys: the shared ones reuse LLaMA-Factory's names (``lora_rank`` is the rank of one expert, ``lora_alpha``,
``lora_dropout``, ``lora_target``, ``additional_target``, and ``ModelArguments.moe_aux_loss_coef``), plus
``moe_num_experts`` and ``moe_top_k``. Each method-specific config field ``<field>`` is exposed as ``moe_<field>``,
generated from the method config classes so that adding a method needs no edit here.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.config import SHARED_FIELD_TO_LF_KEY, MoeLoraConfig
from ..core.errors import MoeConfigError
from ..core.peft_types import METHODS, register_all_methods

STOCK_FINETUNING_TYPES = ("lora", "oft", "freeze", "full")
SUPPORTED_STAGES = ("pt", "sft", "dpo", "kto", "rm")

# Config field -> the LLaMA-Factory key a user writes (for error messages and mapping).
LF_KEY_FOR_FIELD = {**SHARED_FIELD_TO_LF_KEY, "target_modules": "lora_target", "modules_to_save": "additional_target"}
# LLaMA-Factory LoRA options that have no meaning for a mixture of experts.
CONFLICTING_LORA_OPTIONS = {
    "use_dora": False, "use_rslora": False, "pissa_init": False, "pissa_convert": False, "loraplus_lr_ratio": None,
    "create_new_adapter": False, "use_llama_pro": False,
}


def all_method_names() -> tuple[str, ...]:
    """Every registered llamafactory-moe ``finetuning_type`` (the registry, in listing order)."""
    register_all_methods()
    return tuple(METHODS)


def finetuning_type_help() -> str:
    return ("Fine-tuning method: lora, oft, freeze, full (LLaMA-Factory) or a llamafactory-moe method: "
            f"{', '.join(all_method_names())}.")


def method_specific_fields() -> dict[str, tuple[Any, str, list[str]]]:
    """``moe_<field>`` -> (type, help, methods using it), gathered from every registered method config."""
    register_all_methods()
    out: dict[str, tuple[Any, str, list[str]]] = {}
    for name, spec in sorted(METHODS.items()):
        hints = typing.get_type_hints(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            if f.name not in spec.config_cls.own_field_names():
                continue
            key = f"moe_{f.name}"
            if key in out:
                typ, help_text, users = out[key]
                if typ != hints[f.name]:
                    raise TypeError(f"method config field `{f.name}` has type {hints[f.name]} in `{name}` but {typ} in "
                                    f"`{users[0]}`; a shared yaml key must have one type")
                users.append(name)
            else:
                out[key] = (hints[f.name], f.metadata.get("help", ""), [name])
    return out


def _optional(typ):
    return typ if type(None) in typing.get_args(typ) else Optional[typ]


def build_finetuning_arguments_class(base_cls: type) -> type:
    """Create ``MoeFinetuningArguments(base_cls)`` with our keys. Called once, when the parser module is patched."""
    # `finetuning_type` re-declared only to list the registered methods in its help text.
    extra_fields = [("finetuning_type", str, field(default="lora", metadata={"help": finetuning_type_help()}))]
    for key, (typ, help_text, users) in method_specific_fields().items():
        extra_fields.append((key, _optional(typ), field(default=None, metadata={
            "help": f"[{', '.join(users)}] {help_text} (default: the method's)"})))
    cls = dataclasses.make_dataclass(
        "MoeFinetuningArguments", extra_fields, bases=(_MoeArgumentsBase, base_cls),
        namespace={"__module__": __name__, "__doc__": _MoeArgumentsBase.__doc__},
    )
    return cls


@dataclass
class _MoeArgumentsBase:
    """LLaMA-Factory ``FinetuningArguments`` extended with llamafactory-moe methods (see module docstring)."""

    finetuning_type: str = field(
        default="lora",
        metadata={"help": "Fine-tuning method: lora, oft, freeze, full (LLaMA-Factory) or a llamafactory-moe method "
                          "(the registered ones are listed by the generated class, `finetuning_type_help`)."},
    )
    moe_num_experts: Optional[int] = field(default=None, metadata={"help": "Experts per wrapped layer."})
    moe_top_k: Optional[int] = field(default=None, metadata={"help": "Experts (SMoRA: ranks) active per token."})

    def __post_init__(self):
        requested = self.finetuning_type
        self.moe_method: Optional[str] = None
        self.moe_peft_config: Optional[MoeLoraConfig] = None
        our_keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name.startswith("moe_") and getattr(self, f.name) is not None}

        if requested in STOCK_FINETUNING_TYPES:
            if our_keys:
                key = sorted(our_keys)[0]
                raise MoeConfigError(key, our_keys[key], f"is only used with a llamafactory-moe `finetuning_type`, "
                                     f"not `{requested}`", f"choose one of {', '.join(all_method_names())}")
            super().__post_init__()
            return

        if requested not in all_method_names():
            allowed = ", ".join(STOCK_FINETUNING_TYPES + all_method_names())
            close = difflib.get_close_matches(str(requested), STOCK_FINETUNING_TYPES + all_method_names(), n=1)
            raise MoeConfigError("finetuning_type", requested, f"must be one of {allowed}",
                                 f"did you mean `{close[0]}`?" if close else "")

        self._reject_conflicting_lora_options(requested)
        if self.stage not in SUPPORTED_STAGES:
            raise MoeConfigError("stage", self.stage, f"is not supported with `{requested}` adapters "
                                 f"(supported: {', '.join(SUPPORTED_STAGES)})",
                                 "PPO needs a value head and reward-model adapters that are plain LoRA")
        user_alpha = self.lora_alpha  # None means "LLaMA-Factory default"; read before super() fills it in
        self.moe_method = requested
        self.finetuning_type = "lora"  # LLaMA-Factory's LoRA code paths handle PEFT adapters generically
        super().__post_init__()
        self.moe_peft_config = self._build_peft_config(requested, our_keys, user_alpha)

    def _reject_conflicting_lora_options(self, method: str) -> None:
        for key, neutral in CONFLICTING_LORA_OPTIONS.items():
            value = getattr(self, key, neutral)
            if value != neutral and value is not None:
                raise MoeConfigError(key, value, f"cannot be combined with `finetuning_type: {method}`",
                                     f"remove `{key}` (it applies to plain LoRA only)")

    def _build_peft_config(self, method: str, our_keys: dict[str, Any], user_alpha) -> MoeLoraConfig:
        config_cls = METHODS[method].config_cls
        own = set(config_cls.own_field_names())
        kwargs: dict[str, Any] = {}
        for key, value in our_keys.items():
            name = key[len("moe_"):]
            if key in ("moe_num_experts", "moe_top_k"):
                if name not in config_cls.shared_fields:
                    raise MoeConfigError(key, value, f"is not used by `{method}`",
                                         "remove it (see the README's key table for what each method reads)")
                kwargs[name] = value
            elif name in own:
                kwargs[name] = value
            else:
                users = [m for m, spec in METHODS.items() if name in spec.config_cls.own_field_names()]
                raise MoeConfigError(key, value, f"is not used by `{method}`",
                                     f"it applies to: {', '.join(users)}" if users else "remove it")
        if "expert_rank" in config_cls.shared_fields:
            kwargs["expert_rank"] = self.lora_rank
        if "lora_alpha" in config_cls.shared_fields and user_alpha is not None:
            kwargs["lora_alpha"] = user_alpha
        if "expert_dropout" in config_cls.shared_fields:
            kwargs["expert_dropout"] = self.lora_dropout
        kwargs["modules_to_save"] = self.additional_target
        try:
            return config_cls(task_type="CAUSAL_LM", **kwargs)
        except MoeConfigError as exc:
            raise in_llamafactory_keys(exc, config_cls, method) from None
        except TypeError as exc:  # wrong value type that the dataclass rejected
            raise MoeConfigError("finetuning_type", method, f"got invalid keys: {exc}") from None


def in_llamafactory_keys(exc: MoeConfigError, config_cls: type, method: str) -> MoeConfigError:
    """The same error, naming the yaml keys a LLaMA-Factory user wrote (``lora_rank``, ``moe_num_experts`` ...) instead
    of the peft config's fields."""
    return MoeConfigError(_lf_key(exc.field), exc.value, _to_lf_wording(exc.constraint, config_cls),
                          _to_lf_wording(exc.fix, config_cls), method=method)


def _lf_key(config_field: str) -> str:
    return LF_KEY_FOR_FIELD.get(config_field, f"moe_{config_field}")


def _to_lf_wording(text: str, config_cls: type) -> str:
    """Rewrite backticked config field names in a message with the yaml keys the user actually wrote."""
    import re

    names = set(LF_KEY_FOR_FIELD) | set(config_cls.own_field_names())
    return re.sub(r"`([a-z_0-9]+)`", lambda m: f"`{_lf_key(m.group(1))}`" if m.group(1) in names else m.group(0),
                  text)


def unknown_key_error(message: str, valid_keys: list[str], raw_args=None) -> MoeConfigError:
    """Turn HfArgumentParser's "Some keys are not used" into an error that suggests the intended key."""
    import re

    found = re.findall(r"'([^']+)'", message)
    key = found[0] if found else "?"
    close = difflib.get_close_matches(key, valid_keys, n=1)
    value = raw_args.get(key, "<set>") if isinstance(raw_args, dict) else "<set>"
    return MoeConfigError(key, value, "is not a LLaMA-Factory or llamafactory-moe argument",
                          f"did you mean `{close[0]}`?" if close else "check the spelling")
