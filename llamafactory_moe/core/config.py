"""``MoeLoraConfig``: the fields every mixture-of-LoRA-experts method shares, with one meaning everywhere.

A method config subclasses it, re-declares a shared field only to change its default, adds its own fields, and lists
in ``shared_fields`` which shared fields it reads (the LLaMA-Factory layer rejects ``moe_*`` keys a method ignores).
Capabilities are ``ClassVar`` flags so tests and integrations read flags, never class names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

from peft.config import PeftConfig

from .errors import MoeConfigError, check_bool, check_float, check_int
from .peft_types import extend_peft_type

# Shared fields and the LLaMA-Factory key each one is read from. `lora_*` keys are LLaMA-Factory's own.
SHARED_FIELD_TO_LF_KEY = {
    "num_experts": "moe_num_experts",
    "top_k": "moe_top_k",
    "expert_rank": "lora_rank",
    "lora_alpha": "lora_alpha",
    "expert_dropout": "lora_dropout",
    "aux_loss_coef": "moe_aux_loss_coef",
}


@dataclass(frozen=True)
class Example:
    """One example setting of a method, carried by its config class (``examples``): the test matrix, stages, numerics,
    scaling-out and OpenCompass tests run every method through its examples (``tests/method_cases.py``).

    ``kwargs`` build the PEFT config (besides ``target_modules``); ``lf_keys`` are the same setting as LLaMA-Factory
    yaml keys (besides ``finetuning_type``). Keep them tiny: the tests use hidden-size-64 models."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    lf_keys: dict[str, Any] = field(default_factory=dict)


@dataclass
class MoeLoraConfig(PeftConfig):
    """Shared configuration of the mixture-of-LoRA-experts methods (see each method's docstring for its paper).

    The update a layer adds to its frozen base output is ``scaling * sum_e w_e(x) * B_e A_e dropout(x)`` in the
    one-to-one methods; other methods document their own pairing.
    """

    method_name: ClassVar[str] = ""
    # Shared fields this method reads; the others are rejected when set from LLaMA-Factory.
    shared_fields: ClassVar[tuple[str, ...]] = ("num_experts", "top_k", "expert_rank", "lora_alpha",
                                                 "expert_dropout", "aux_loss_coef")
    supports_merge: ClassVar[bool] = False  # the update is input-independent and can be folded into W0
    identity_at_init: ClassVar[bool] = True  # output equals the base model at init (with init_weights=True)
    modifies_base_weights: ClassVar[bool] = False  # e.g. GOAT's residual-corrected W0
    aux_loss_terms: ClassVar[tuple[str, ...]] = ()  # names of the auxiliary terms the layers record
    has_router: ClassVar[bool] = True  # layers route tokens to experts (False: e.g. MoSLoRA's dense mixer)
    # Example settings (the first is the method's default case in tests); every method needs at least one.
    examples: ClassVar[tuple[Example, ...]] = ()
    # Position in every listing of methods (help texts, the README key table); equal values sort by name.
    listing_order: ClassVar[int] = 1000

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or a regex, or 'all-linear') to wrap with experts."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) never to wrap."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only wrap modules in these transformer layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with `layers_to_transform`."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved (e.g. a resized embedding)."}
    )
    num_experts: int = field(default=4, metadata={"help": "Number of LoRA experts per wrapped layer."})
    top_k: Optional[int] = field(
        default=2, metadata={"help": "Experts (or ranks, for SMoRA) each token activates; None = all (soft routing)."}
    )
    expert_rank: int = field(default=8, metadata={"help": "Rank of one expert's A/B pair (`lora_rank`)."})
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "LoRA alpha; scaling is alpha / expert_rank unless the method says otherwise. "
                                        "None = 2 * expert_rank (LLaMA-Factory's default)."}
    )
    expert_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (one shared mask)."})
    aux_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Weight of the auxiliary (load-balancing / regulariser) loss; None = the "
                                        "method's published default."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero up-projections so the adapter starts as the identity. False: "
                                        "random up-projections (for tests)."}
    )

    # The method's published default for `aux_loss_coef` when the user leaves it None.
    default_aux_loss_coef: ClassVar[float] = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(self.method_name)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check shared fields. Subclasses call ``super().validate()`` and then check their own."""
        m = self.method_name
        check_int("num_experts", self.num_experts, minimum=1, method=m)
        check_int("expert_rank", self.expert_rank, minimum=1, method=m)
        if "top_k" in self.shared_fields and self.top_k is not None:
            check_int("top_k", self.top_k, minimum=1, method=m)
            if self.top_k > self.num_experts:
                raise MoeConfigError("top_k", self.top_k, f"must be <= `num_experts` ({self.num_experts})",
                                     "lower `top_k` or raise `num_experts`", method=m)
        if self.lora_alpha is not None:
            check_float("lora_alpha", self.lora_alpha, minimum=0.0, min_exclusive=True, method=m)
        check_float("expert_dropout", self.expert_dropout, minimum=0.0, maximum=0.999, method=m)
        if self.aux_loss_coef is not None:
            check_float("aux_loss_coef", self.aux_loss_coef, minimum=0.0, method=m)
        check_bool("init_weights", self.init_weights, method=m)

    # -- derived quantities -----------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.expert_rank

    @property
    def scaling(self) -> float:
        return self.alpha / self.expert_rank

    @property
    def effective_aux_loss_coef(self) -> float:
        return self.default_aux_loss_coef if self.aux_loss_coef is None else float(self.aux_loss_coef)

    @classmethod
    def own_field_names(cls) -> list[str]:
        """Fields the method adds on top of the shared ones (these become ``moe_<field>`` keys)."""
        base = {f.name for f in fields(MoeLoraConfig)}
        return [f.name for f in fields(cls) if f.name not in base and f.init]
