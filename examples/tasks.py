"""The two small tasks of the example, generated here, deterministically.

Each task writes ``train.jsonl`` and ``eval.jsonl`` with ``{"prompt", "answer"}``
lines; the eval prompts never occur in the training split. The prompt formats are
plain text (no chat template) and differ between the tasks, so one adapter's
format does not leak into the other's prompts.

- ``reverse``: ``Reverse: fire road stone\\nReversed:`` -> ``stone road fire``, three
  words from a 40-word list; scored on unseen triples. The base model answers with
  something else entirely (exact match 0).
- ``arithmetic``: ``Add 23 and 45.\\nSum:`` -> ``68`` for two-digit operands; scored
  on unseen pairs. The base model echoes ``23 + 45 =`` instead of answering.

Both are rules, not memorized facts: an adapter that scores on the eval split has
learned the rule, and a merge that keeps the score has kept it.

The splits are functions of the seed only: same seed, same bytes (and the same
dataset digest in the registry record).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "table", "green", "music", "horse", "bread", "light",
    "chair", "ocean", "paper", "tiger", "glass", "night", "lemon", "train", "field", "smile",
    "house", "plant", "water", "snow", "fire", "bird", "road", "book", "moon", "star",
    "tree", "door", "fish", "king", "rain", "gold", "milk", "ship", "wolf", "rose",
)


def reverse(seed: int, n_eval: int, n_train: int = 400) -> tuple[list[dict], list[dict]]:
    """Three words -> the same words in reverse order; eval triples are unseen."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    rows = []
    while len(rows) < n_eval + n_train:
        words = tuple(rng.sample(WORDS, 3))
        if words in seen:
            continue
        seen.add(words)
        rows.append({"prompt": f"Reverse: {' '.join(words)}\nReversed:",
                     "answer": " ".join(reversed(words))})
    return rows[n_eval:], rows[:n_eval]


def arithmetic(seed: int, n_eval: int, n_train: int = 600) -> tuple[list[dict], list[dict]]:
    """Two-digit addition; eval pairs (a, b) never appear in training."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    rows = [{"prompt": f"Add {a} and {b}.\nSum:", "answer": str(a + b)} for a, b in pairs]
    return rows[n_eval:n_eval + n_train], rows[:n_eval]


TASKS = {"reverse": reverse, "arithmetic": arithmetic}
"""Task name -> generator(seed, n_eval) returning (train rows, eval rows)."""


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line, keys sorted (stable bytes, stable digest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes (the dataset digest pushed with an adapter)."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def generate(task: str, out_dir: Path, *, seed: int = 0, n_eval: int = 40) -> dict:
    """Write ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; return paths and digests."""
    train, evaluation = TASKS[task](seed, n_eval)
    out_dir = Path(out_dir)
    write_jsonl(train, out_dir / "train.jsonl")
    write_jsonl(evaluation, out_dir / "eval.jsonl")
    return {
        "task": task,
        "seed": seed,
        "train": str(out_dir / "train.jsonl"),
        "eval": str(out_dir / "eval.jsonl"),
        "n_train": len(train),
        "n_eval": len(evaluation),
        "train_digest": sha256_file(out_dir / "train.jsonl"),
        "eval_digest": sha256_file(out_dir / "eval.jsonl"),
    }


def heldout_text(out_path: Path) -> Path:
    """A small held-out plain-text file for the perplexity check (general English,
    one document per paragraph)."""
    text = (
        "The library opens at nine in the morning and closes at six in the evening.\n"
        "Rivers carry water from the mountains down to the sea.\n"
        "She bought bread, cheese and apples at the market on Saturday.\n"
        "Good software is easy to read, easy to test and easy to change.\n"
        "The train to the city leaves every twenty minutes from platform two.\n"
        "Plants need light, water and air to grow well.\n"
        "He wrote a short letter to his grandmother and posted it the same day.\n"
        "The museum has a large collection of paintings from the last century.\n"
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text.replace("\n", "\n\n"))
    return out_path
