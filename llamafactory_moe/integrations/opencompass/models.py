"""Model wrappers: base model + (MoE-)LoRA adapter, CPU-safe defaults, the tokenizer's chat template.

Mirrors ``opencompass.models.huggingface_above_v4_33`` (``HuggingFaceBaseModel``, ``HuggingFacewithChatTemplate``,
registered in ``MODELS``). The adapter is loaded by OpenCompass's ``peft_path`` (``PeftModel.from_pretrained``), after
the package's ``import llamafactory_moe`` has registered our PEFT types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opencompass.models import HuggingFaceBaseModel, HuggingFacewithChatTemplate
from opencompass.models.base import LMTemplateParser
from opencompass.registry import MODELS

from .settings import _has_tokenizer

# --------------------------------------------------------------------------------------------------------------------
# Model wrappers
# --------------------------------------------------------------------------------------------------------------------

def _cpu_friendly_kwargs(model_kwargs: Optional[dict], tokenizer_path: Optional[str],
                         peft_path: Optional[str]) -> tuple[dict, Optional[str]]:
    model_kwargs = dict(model_kwargs or {})
    # OpenCompass falls back to float16 when no dtype is given, which is slow or unsupported on CPU; routers and
    # adapters are trained in fp32 anyway.
    model_kwargs.setdefault("torch_dtype", "float32")
    if "device_map" not in model_kwargs:
        import torch

        model_kwargs["device_map"] = "auto" if torch.cuda.is_available() else "cpu"
    if peft_path is not None and not (Path(peft_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"`peft_path` ({peft_path}) has no adapter_config.json; point it at the output_dir "
                                "of `llamafactory-cli train`.")
    # LLaMA-Factory saves the tokenizer, with the chat template it trained with, next to the adapter.
    if tokenizer_path is None and peft_path is not None and _has_tokenizer(peft_path):
        tokenizer_path = peft_path
    return model_kwargs, tokenizer_path


def _ensure_batch_encode_plus(tokenizer) -> None:
    # transformers 5 removed `batch_encode_plus`, which OpenCompass 0.5.4 still calls (open-compass/opencompass#2573).
    if not hasattr(tokenizer, "batch_encode_plus"):
        object.__setattr__(tokenizer, "batch_encode_plus", tokenizer.__call__)


def chat_meta_template(tokenizer) -> dict:
    """An OpenCompass meta template that reproduces ``tokenizer``'s chat template for one user turn.

    Rendering a sentinel message shows what the template puts before and after the user's text (system prompt,
    turn headers, the assistant header of the generation prompt). A BOS the template writes is dropped when the
    tokenizer adds BOS itself, so the model sees exactly one.
    """
    sentinel = "\x00MOE_SENTINEL\x00"
    text = tokenizer.apply_chat_template([dict(role="user", content=sentinel)], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(sentinel)
    bos = tokenizer.bos_token
    if bos and before.startswith(bos):
        ids = tokenizer("a")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            before = before[len(bos):]
    return dict(round=[dict(role="HUMAN", begin=before, end=after),
                       dict(role="BOT", begin="", end="", generate=True)])


@MODELS.register_module()
class MoeHFBaseModel(HuggingFaceBaseModel):
    """OpenCompass's ``HuggingFaceBaseModel`` for base + (MoE-)LoRA adapters, with CPU-safe defaults.

    Differences from the stock class: importing this class registers our PEFT types in the worker; ``torch_dtype``
    defaults to float32 and ``device_map`` to ``cpu`` without a GPU; ``tokenizer_path`` defaults to the adapter
    directory when LLaMA-Factory saved a tokenizer there; ``chat_template=True`` wraps each prompt in the tokenizer's
    chat template (as one user turn), which also works for PPL scoring.
    """

    def __init__(self, path: str, model_kwargs: Optional[dict] = None, tokenizer_path: Optional[str] = None,
                 peft_path: Optional[str] = None, chat_template: bool = False, **kwargs):
        model_kwargs, tokenizer_path = _cpu_friendly_kwargs(model_kwargs, tokenizer_path, peft_path)
        super().__init__(path=path, model_kwargs=model_kwargs, tokenizer_path=tokenizer_path, peft_path=peft_path,
                         **kwargs)
        if chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"`MOE_CHAT_TEMPLATE` is on but the tokenizer at {tokenizer_path or path} has no "
                                 "chat template; unset it or point `tokenizer_path` at a tokenizer that has one.")
            self.template_parser = LMTemplateParser(chat_meta_template(self.tokenizer))

    def _load_tokenizer(self, path, kwargs, pad_token_id=None):
        super()._load_tokenizer(path, kwargs, pad_token_id)
        _ensure_batch_encode_plus(self.tokenizer)

    def continuation_logprobs(self, contexts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """``(sum of log p(continuation tokens | context), number of continuation tokens)`` per pair.

        Tokenised as lm-eval-harness does: the continuation's tokens are those of ``context + continuation`` after
        the length of the context's own encoding, so a merge across the boundary is scored the way the model reads
        the joined text. An over-long pair loses tokens from the left; the continuation is always kept whole.
        (OpenCompass's ``get_ppl(mask_length=...)`` cannot be used: it counts the mask from the left edge of a
        left-padded batch.)
        """
        import torch

        rows = []
        for context, continuation in zip(contexts, continuations):
            whole = self.tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
            start = min(len(self.tokenizer(context, add_special_tokens=True)["input_ids"]), len(whole) - 1)
            overflow = len(whole) - self.max_seq_len
            if overflow > 0:
                if overflow >= start:
                    raise ValueError(f"an option of {len(whole) - start} tokens does not fit `max_seq_len` "
                                     f"({self.max_seq_len}); raise MOE_MAX_SEQ_LEN.")
                whole, start = whole[overflow:], start - overflow
            rows.append((whole, max(start, 1)))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right padding keeps every real token at the position it has alone, so the scores do not depend on batching.
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=self.model.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
                            device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        results = []
        for i, (ids, start) in enumerate(rows):
            # Token t is predicted by the logits at t - 1; only the continuation's rows get a softmax.
            logprobs = torch.log_softmax(logits[i, start - 1: len(ids) - 1].float(), dim=-1)
            targets = input_ids[i, start: len(ids)]
            results.append((float(logprobs.gather(-1, targets[:, None]).sum()), len(ids) - start))
        return results


@MODELS.register_module()
class MoeHFChatModel(HuggingFacewithChatTemplate):
    """OpenCompass's ``HuggingFacewithChatTemplate`` with the same defaults as :class:`MoeHFBaseModel`.

    Generation only (OpenCompass implements PPL scoring on the base class). The prompt is rendered by the
    tokenizer's chat template, which is the one LLaMA-Factory saved next to the adapter.
    """

    def __init__(self, path: str, model_kwargs: Optional[dict] = None, tokenizer_path: Optional[str] = None,
                 peft_path: Optional[str] = None, **kwargs):
        model_kwargs, tokenizer_path = _cpu_friendly_kwargs(model_kwargs, tokenizer_path, peft_path)
        super().__init__(path=path, model_kwargs=model_kwargs, tokenizer_path=tokenizer_path, peft_path=peft_path,
                         **kwargs)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer at {tokenizer_path or path} has no chat template; unset "
                             "`MOE_CHAT_TEMPLATE` or point `tokenizer_path` at a tokenizer that has one.")

    def _load_tokenizer(self, path, kwargs, pad_token_id=None):
        super()._load_tokenizer(path, kwargs, pad_token_id)
        _ensure_batch_encode_plus(self.tokenizer)
