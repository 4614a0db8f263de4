"""``python -m llamafactory_moe.bench``: run the benchmark, print the markdown table, write markdown + JSON."""

from __future__ import annotations

import argparse
import shlex
import sys

from .report import analyse, to_markdown, write
from .runner import Settings, run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llamafactory_moe.bench", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="random LlamaForCausalLM (hidden 64, 2 layers) built in-process "
                                                       "and small shapes, for CI")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (CUDA events, peak CUDA memory)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, for stable timings)")
    p.add_argument("--model-dir", default=None, help="HF model folder (default: llamafactory_moe.models."
                                                    "prepare_smollm2())")
    p.add_argument("--methods", default=None, help="comma-separated subset of the implemented methods")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per variant")
    p.add_argument("--layer-reps", type=int, default=None, help="timed single-layer repetitions per variant")
    p.add_argument("--gen-reps", type=int, default=None, help="timed generate() calls per variant")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per generate() call")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None, help="write <OUT>.md and <OUT>.json")
    p.add_argument("--compile", action="store_true",
                   help="compiled mode (bench/compiled.py): each wrapped layer under torch.compile(fullgraph=True, "
                        "inductor) beside compiled LoRA: fwd+bwd time, generated kernels, compile time")
    p.add_argument("--compile-rounds", type=int, default=3, help="--compile: timing rounds (the spread is over rounds)")
    p.add_argument("--compile-train", action="store_true", help="--compile: also the compiled whole-model train step")
    p.add_argument("--compile-skip-layers", action="store_true", help="--compile: skip the single-layer part")
    p.add_argument("--compile-generate", action="store_true",
                   help="compiled generation (bench/compiled_generate.py): greedy generate() with a static KV cache "
                        "and the forward compiled (inductor, fullgraph) beside compiled LoRA, tokens/s per round with "
                        "the eager tokens/s and the first-call (compile) time; --gen-reps repetitions per round, "
                        "--compile-rounds rounds, --new-tokens")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = dict(device=args.device, threads=args.threads, model_dir=args.model_dir,
                     methods=args.methods.split(",") if args.methods else None)
    for name, key in (("train_steps", "train_reps"), ("layer_reps", "layer_reps"), ("gen_reps", "gen_reps"),
                      ("new_tokens", "new_tokens"), ("seq_len", "seq_len"), ("batch_size", "batch_size")):
        if getattr(args, name) is not None:
            overrides[key] = getattr(args, name)
    return Settings.for_tiny(**overrides) if args.tiny else Settings(**overrides)


def _run_mode(args: argparse.Namespace):
    """(result, its markdown writer, the table's title) of the mode the flags select."""
    settings = settings_from(args)
    if args.compile_generate:
        from .compiled_generate import run_compiled_generate, to_markdown_compiled_generate

        return (run_compiled_generate(settings, rounds=args.compile_rounds), to_markdown_compiled_generate,
                "compiled generation benchmark")
    if args.compile:
        from .compiled import run_compiled, to_markdown_compiled

        result = run_compiled(settings, rounds=args.compile_rounds, train=args.compile_train,
                              shapes=() if args.compile_skip_layers else None)
        return result, to_markdown_compiled, "compiled benchmark"
    return analyse(run(settings)), to_markdown, "benchmark"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python -m llamafactory_moe.bench " + shlex.join(argv)
    result, to_md, title = _run_mode(args)
    result["command"] = command
    markdown = to_md(result, header=f"## llamafactory-moe {title}\n\nCommand: `{command}`")
    print(markdown)
    if args.out:
        write(result, markdown, args.out + ".md", args.out + ".json")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
