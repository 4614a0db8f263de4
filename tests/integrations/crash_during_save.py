"""Test helper: train with LLaMA-Factory and die by SIGKILL in the middle of writing checkpoint-<N>'s adapter weights.

    python tests/integrations/crash_during_save.py args.json N

The kill point is deterministic: peft's `safe_save_file` (what `PeftModel.save_pretrained` writes
adapter_model.safetensors with) is wrapped so that, for checkpoint-N, it writes the first half of the real file, syncs
it to disk and sends SIGKILL to its own process, as a power cut or an OOM kill during a save would. A callback
records the sha256 of every file of each earlier checkpoint right after it is saved (`hashes.json` in output_dir), so
the test can prove the crash changed none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback


class RecordCheckpointHashes(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        out = Path(args.output_dir)
        checkpoint = out / f"checkpoint-{state.global_step}"
        record = json.loads((out / "hashes.json").read_text()) if (out / "hashes.json").is_file() else {}
        record[checkpoint.name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                   for p in sorted(checkpoint.iterdir()) if p.is_file()}
        (out / "hashes.json").write_text(json.dumps(record))


def main(args_path: str, kill_step: int) -> None:
    import peft.peft_model
    from safetensors.torch import save

    real_save_file = peft.peft_model.safe_save_file

    def save_file_then_die(tensors, filename, *args, **kwargs):
        if f"checkpoint-{kill_step}" not in str(filename):
            return real_save_file(tensors, filename, *args, **kwargs)
        data = save(tensors, metadata=kwargs.get("metadata"))
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    peft.peft_model.safe_save_file = save_file_then_die
    from llamafactory.train.tuner import run_exp

    run_exp(args=json.loads(Path(args_path).read_text()), callbacks=[RecordCheckpointHashes()])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
