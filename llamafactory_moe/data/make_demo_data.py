"""Generate the project's own demo dataset: short, mechanically checkable tasks in alpaca format.

    python -m llamafactory_moe.data.make_demo_data [--out DIR] [--seed 0]

Six tasks with distinct input shapes and answer rules, so a router has something to tell apart and a plain string
check (``llamafactory_moe.data.score_demo_answer``) can grade generations. Each task has three phrasings of its
instruction, so the model cannot key on one fixed string. Standard library only, and fully deterministic for a given
seed: the committed ``moe_demo.json`` / ``moe_demo_eval.json`` are exactly what this script writes with the defaults
(a test checks that).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

TRAIN_PER_TASK = 80
EVAL_PER_TASK = 10
DEFAULT_SEED = 0

# Short common words (3-7 letters) so every example stays well under 40 tokens even with a tiny tokenizer.
WORDS = (
    "apple", "river", "garden", "stone", "window", "orange", "planet", "candle", "forest", "silver",
    "bridge", "pencil", "rabbit", "winter", "summer", "yellow", "market", "castle", "dragon", "flower",
    "harbor", "island", "jacket", "kitten", "lemon", "meadow", "needle", "ocean", "pepper", "rocket",
    "saddle", "tomato", "valley", "wallet", "basket", "button", "cloud", "desert", "engine", "finger",
    "guitar", "hammer", "ladder", "mirror", "number", "pillow", "puzzle", "shadow", "spider", "ticket",
    "tunnel", "violin", "anchor", "butter", "carpet", "doctor", "farmer", "helmet", "kettle", "monkey",
    "bread", "chair", "house", "light", "music", "paper", "plant", "table", "train", "water",
)
SUBJECTS = ("the cat", "my friend", "a small dog", "the teacher", "our team", "the old man", "a bird", "the child")
VERBS = ("likes", "found", "painted", "carried", "watched", "cleaned", "opened", "saw")
OBJECTS = ("the red door", "a green box", "the long road", "a warm coat", "the big ship", "a quiet room",
           "the blue kite", "a sweet cake")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Task name -> three phrasings of its instruction.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "reverse_word": ("Reverse the letters of the word.", "Write the word backwards.",
                     "Spell this word in reverse order."),
    "uppercase": ("Rewrite the sentence in uppercase.", "Convert the sentence to capital letters.",
                  "Write the sentence using only uppercase letters."),
    "add": ("Add the two numbers.", "What is the sum?", "Compute the sum of the two numbers."),
    "sort_letters": ("Sort the letters alphabetically.", "Put these letters in alphabetical order.",
                     "Arrange the letters from a to z."),
    "digits_to_words": ("Write each digit as an English word.", "Spell out every digit in words.",
                        "Say each digit of the number as a word."),
    "larger": ("Which number is larger?", "Pick the bigger of the two numbers.",
               "Answer with the larger number."),
}
TASKS = tuple(INSTRUCTIONS)


def _reverse_word(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    return sentence, sentence.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a} + {b}", str(a + b)


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(LETTERS, rng.randint(3, 6))
    return " ".join(letters), " ".join(sorted(letters))


def _digits_to_words(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4)))
    return digits, " ".join(DIGIT_WORDS[int(d)] for d in digits)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 100), 2)  # distinct, so "the larger" is always defined
    return f"{a} or {b}", str(max(a, b))


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse_word": _reverse_word,
    "uppercase": _uppercase,
    "add": _add,
    "sort_letters": _sort_letters,
    "digits_to_words": _digits_to_words,
    "larger": _larger,
}


def _draw(rng: random.Random, task: str, count: int, exclude: set[str], remember: bool) -> list[dict]:
    """``count`` records of ``task`` whose input is not in ``exclude``; with ``remember``, add each input to it."""
    records: list[dict] = []
    for _ in range(100 * count):
        if len(records) == count:
            return records
        query, answer = MAKERS[task](rng)
        if query in exclude:
            continue
        if remember:
            exclude.add(query)
        records.append({"instruction": rng.choice(INSTRUCTIONS[task]), "input": query, "output": answer,
                        "task": task})
    if len(records) == count:
        return records
    raise RuntimeError(f"task {task!r} ran out of distinct inputs; lower the per-task counts")


def generate(seed: int = DEFAULT_SEED, train_per_task: int = TRAIN_PER_TASK,
             eval_per_task: int = EVAL_PER_TASK) -> tuple[list[dict], list[dict]]:
    """Return ``(train, eval)`` lists of alpaca records; no input of a task occurs in both splits."""
    rng = random.Random(seed)
    train: list[dict] = []
    held_out: list[dict] = []
    for task in TASKS:
        # Draw the eval split first, with distinct inputs, and keep its *inputs* (not just exact pairs) out of training,
        # so evaluation measures the rule, not an answer memorised under another phrasing. Training may repeat an input
        # (with another phrasing): a few tasks have fewer distinct inputs than training examples.
        eval_inputs: set[str] = set()
        held_out += _draw(rng, task, eval_per_task, exclude=eval_inputs, remember=True)
        train += _draw(rng, task, train_per_task, exclude=eval_inputs, remember=False)
    # Interleave tasks so that small `max_samples` still covers all of them.
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def write(out_dir: Path, seed: int = DEFAULT_SEED) -> tuple[Path, Path]:
    train, held_out = generate(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "moe_demo.json", out_dir / "moe_demo_eval.json")
    for path, records in zip(paths, (train, held_out)):
        # One record per line keeps diffs of the committed files readable.
        lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in records)
        path.write_text("[\n" + lines + "\n]\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output directory (default: next to this script, i.e. the packaged data dir)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for path in write(args.out, args.seed):
        print(f"wrote {path} ({len(json.loads(path.read_text(encoding='utf-8')))} records)")


if __name__ == "__main__":
    main()
