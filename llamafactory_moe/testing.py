"""Offline test assets: a tiny random Llama 3-style model with a real tokenizer, built in seconds on CPU.

    from llamafactory_moe.testing import tiny_llama_path
    model_dir = tiny_llama_path()          # built once, then cached
    # yaml: model_name_or_path: <model_dir>, template: llama3

Nothing is downloaded. The tokenizer is a byte-level BPE trained in memory on a fixed English text plus the
project's demo data, and already contains every special token LLaMA-Factory's ``llama3`` template uses, so the template
adds no token and the embedding never needs ``resize_vocab``.
The model is a randomly initialised ``LlamaForCausalLM`` in fp32.

``python -m llamafactory_moe.testing [OUT_DIR]`` builds into OUT_DIR (or the cache) and prints the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ._cache import cache_root as _resolve_cache_root
from ._cache import get_or_build

__all__ = ["LLAMA3_SPECIAL_TOKENS", "build_tiny_llama", "tiny_llama_path"]

# Bump when the build recipe changes in a way the other cache-key inputs do not capture.
_BUILD_VERSION = 1
TOKENIZER_VOCAB_SIZE = 768
MAX_POSITION_EMBEDDINGS = 512

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
# Everything LLaMA-Factory's `llama3` template emits or registers as a stop word, plus Llama 3's pad token.
LLAMA3_SPECIAL_TOKENS = (
    BOS,
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
    "<|eom_id|>",
    PAD,
)

# The same turn layout as Llama 3 Instruct (header, blank line, content, <|eot_id|>), so chat / api / OpenCompass
# prompts look like the `llama3` template's training prompts. BOS comes from the template, as in Llama 3.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A fixed, self-written English text so the merges are ordinary English sub-words, not only demo-data fragments.
_BASE_CORPUS = """\
A mixture of experts splits a layer into several small experts and lets a router choose which of them to use for
each token. The router is a tiny linear layer; its scores pick the top experts, and a balance loss keeps all the
experts busy. Low-rank adapters add a small update to a frozen weight: the input goes down to a few dimensions and
comes back up again. When many adapters act as experts, the model can learn one skill per expert.
The system prompt tells the assistant how to behave. The user asks a question, and the assistant gives a short and
helpful answer. Please write the answer in one line. Here is an example of an instruction, an input and an output.
Translate the following sentence into French. Summarize the text in one sentence. Give three tips for staying
healthy. What is the capital of France? The capital of France is Paris. How many days are there in a week? There are
seven days in a week. Explain why the sky is blue. Sunlight is scattered by the air, and blue light is scattered more
than red light. Write a short poem about the sea. The quick brown fox jumps over the lazy dog.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 64 100 128 256 512 1000.
Letters: a b c d e f g h i j k l m n o p q r s t u v w x y z. A B C D E F G H I J K L M N O P Q R S T U V W X Y Z.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } - + = * /
system user assistant ipython tool function true false yes no
"""


def _corpus() -> list[str]:
    """The tokenizer's training text: the fixed English text plus every string of the packaged demo data."""
    from .data import demo_data_dir

    texts = [_BASE_CORPUS]
    for name in ("moe_demo.json", "moe_demo_eval.json"):
        path = demo_data_dir() / name
        if path.is_file():  # absent only in a broken checkout; the tokenizer still works, just with fewer merges
            for record in json.loads(path.read_text(encoding="utf-8")):
                texts.extend(str(record.get(key, "")) for key in ("instruction", "input", "output"))
    return texts


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level like Llama 3: every string is encodable, so the tokenizer needs no <unk>.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Llama 3's tokenizer adds BOS itself; LLaMA-Factory encodes with add_special_tokens=False and puts BOS in
    # through the template prefix, so both paths see exactly one BOS.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Train the tokenizer, randomly initialise a ``LlamaForCausalLM`` (fp32) and ``save_pretrained`` both.

    Deterministic: the same arguments give the same tokenizer and bit-identical weights. The caller's global torch RNG
    state is left untouched.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(_corpus())
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in LLAMA3_SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Stop on either Llama 3 end-of-turn token, as the `llama3` template's stop words do.
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids["<|eom_id|>"], ids["<|end_of_text|>"]],
        pad_token_id=ids[PAD],
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama_path(
    cache_root: str | os.PathLike | None = None,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """The directory of a cached :func:`build_tiny_llama` build with these arguments, building it on first use.

    The cache lives in ``cache_root``, else ``$LLAMAFACTORY_MOE_CACHE``, else ``~/.cache/llamafactory_moe``. The
    entry name hashes the arguments, the tokenizer corpus and the torch / transformers / tokenizers versions, so a
    change to any of them builds a new entry instead of reusing a stale one. Safe to call from concurrent processes.
    """
    import tokenizers
    import torch
    import transformers

    params = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_layers": num_layers,
              "num_heads": num_heads, "num_kv_heads": num_kv_heads, "seed": seed}
    key = json.dumps({
        "params": params,
        "build": _BUILD_VERSION,
        "vocab": TOKENIZER_VOCAB_SIZE,
        "corpus": hashlib.sha256("\x00".join(_corpus()).encode("utf-8")).hexdigest(),
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    entry = _resolve_cache_root(cache_root) / f"tiny-llama-h{hidden_size}-l{num_layers}-s{seed}-{digest}"
    return get_or_build(entry, lambda tmp: build_tiny_llama(tmp, **params))


if __name__ == "__main__":
    print(build_tiny_llama(sys.argv[1]) if len(sys.argv) > 1 else tiny_llama_path())
