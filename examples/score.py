"""Greedy exact-match scoring of a model (base, or base + PEFT adapter) on a JSONL task.

Batched greedy generation with left padding, a few new tokens, then the
continuation up to its first newline (or eos), stripped, must equal the answer.
This is the example's own scorer, used for the results table; the gate does its
own evaluation with the policy's settings.

``python examples/score.py BASE_DIR EVAL_JSONL [ADAPTER_DIR]``
"""

from __future__ import annotations

import sys
from pathlib import Path


def normalize(text: str) -> str:
    """The continuation up to its first newline."""
    return text.split("\n", 1)[0].strip()


def matches(prediction: str, answer: str) -> bool:
    """The gate's exact-match rule when available (same numbers as its retention check)."""
    try:
        from gate.evaluate import answer_matches
    except ImportError:
        return prediction == answer.strip()
    return answer_matches(prediction, answer)


def exact_match(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 8,
                batch_size: int = 64) -> tuple[float, list[str]]:
    """Fraction of rows whose greedy continuation equals the answer; plus the outputs."""
    import torch

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row, seq in zip(chunk, gen[:, enc["input_ids"].shape[1] :]):
            text = normalize(tokenizer.decode(seq, skip_special_tokens=True))
            outputs.append(text)
            correct += matches(text, row["answer"])
    return correct / max(1, len(rows)), outputs


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2 import load
    from tasks import read_jsonl

    base, eval_jsonl = Path(sys.argv[1]), Path(sys.argv[2])
    adapter = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    model, tokenizer = load(base, adapter_dir=adapter)
    rows = read_jsonl(eval_jsonl)
    score, outs = exact_match(model, tokenizer, rows)
    for row, out in list(zip(rows, outs))[:10]:
        print(f"{row['prompt']!r:40} -> {out!r} (want {row['answer']!r})")
    print(f"exact match: {score:.3f} on {len(rows)}")


if __name__ == "__main__":
    main()
