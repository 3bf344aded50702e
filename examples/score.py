"""Greedy exact-match scoring of a model (base, or base + PEFT adapter) on a JSONL task.

Batched greedy generation with left padding, a few new tokens; the continuation up
to its first newline (or eos) must match the answer by the gate's rule
(:func:`gate.evaluate.answer_matches`: equal after whitespace normalization, or the
answer followed by a non-alphanumeric character).
This is the example's own scorer, used for the results table (the gate does its own
evaluation with the policy's settings; the matching rule and the perplexity are the
gate's, so the numbers agree). :class:`Scorer` keeps one base model in memory and
switches PEFT adapters in it.

``python examples/score.py BASE_DIR EVAL_JSONL [ADAPTER_DIR]``
"""

from __future__ import annotations

import contextlib
import json
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
        for row, seq in zip(chunk, gen[:, enc["input_ids"].shape[1] :], strict=True):
            text = normalize(tokenizer.decode(seq, skip_special_tokens=True))
            outputs.append(text)
            correct += matches(text, row["answer"])
    return correct / max(1, len(rows)), outputs


class Scorer:
    """Exact match on both eval sets and held-out perplexity, for base + any adapter.

    One base model stays in memory; adapters are loaded into it by name (PEFT) and
    switched. Exact match is batched greedy decoding (``score.py``) with the gate's
    matching rule; perplexity is the gate's own (:class:`gate.evaluate.Evaluator`),
    so the table and the gate agree. Results are cached in ``work/scores.json`` by
    the digests of the adapter weights and of the data, so a rerun is instant.
    """

    def __init__(self, base: Path, eval_sets: dict[str, Path], heldout: Path, cache: Path) -> None:
        from tasks import read_jsonl

        self.base_dir, self.eval_sets, self.heldout = Path(base), eval_sets, Path(heldout)
        self.model = self.tokenizer = None
        self.rows = {t: read_jsonl(Path(p)) for t, p in eval_sets.items()}
        self.loaded: set[str] = set()
        self.cache_path = cache
        self.cache = json.loads(cache.read_text()) if cache.exists() else {}

    def score(self, label: str, adapter_dir: Path | None) -> dict[str, float]:
        """``{task: exact match, ..., "ppl": perplexity}`` of base + ``adapter_dir`` (None: base)."""
        from tasks import sha256_file

        weights = (sha256_file(Path(adapter_dir) / "adapter_model.safetensors")
                   if adapter_dir is not None else
                   [sha256_file(f) for f in sorted(self.base_dir.glob("*.json"))])
        key = json.dumps({"w": weights, "eval": {t: sha256_file(Path(p)) for t, p in self.eval_sets.items()},
                          "heldout": sha256_file(self.heldout)}, sort_keys=True)
        if key not in self.cache:
            self.cache[key] = self._score(label, adapter_dir)
            self.cache_path.write_text(json.dumps(self.cache, indent=1, sort_keys=True) + "\n")
        return self.cache[key]

    def _model_for(self, label: str, adapter_dir: Path | None):
        if self.model is None:
            from smollm2 import load

            self.model, self.tokenizer = load(self.base_dir)
        if adapter_dir is None:
            return self.model, (self.model.disable_adapter() if self.loaded else contextlib.nullcontext())
        from peft import PeftModel

        if not self.loaded:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=label)
        elif label not in self.loaded:
            self.model.load_adapter(str(adapter_dir), adapter_name=label)
        self.loaded.add(label)
        self.model.set_adapter(label)
        self.model.eval()
        return self.model, contextlib.nullcontext()

    def _score(self, label: str, adapter_dir: Path | None) -> dict[str, float]:
        from gate.evaluate import Evaluator, read_texts

        model, ctx = self._model_for(label, adapter_dir)
        with ctx:
            out = {t: round(exact_match(model, self.tokenizer, rows)[0], 3)
                   for t, rows in self.rows.items()}
            ppl = Evaluator(self.base_dir).perplexity(model, read_texts(self.heldout))
        out["ppl"] = round(ppl, 2)
        return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2 import load
    from tasks import read_jsonl

    base, eval_jsonl = Path(sys.argv[1]), Path(sys.argv[2])
    adapter = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    model, tokenizer = load(base, adapter_dir=adapter)
    rows = read_jsonl(eval_jsonl)
    score, outs = exact_match(model, tokenizer, rows)
    for row, out in list(zip(rows, outs, strict=True))[:10]:
        print(f"{row['prompt']!r:40} -> {out!r} (want {row['answer']!r})")
    print(f"exact match: {score:.3f} on {len(rows)}")


if __name__ == "__main__":
    main()
