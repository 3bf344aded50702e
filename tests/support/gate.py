"""A tiny, fully offline world for gate and promotion tests.

Builds, deterministically and in about 10-20 s on a CPU:

* a tiny Llama (:func:`tests.support.tiny_llama.tiny_llama`: 2 layers, hidden size 96)
  saved as safetensors,
  with a word-level tokenizer built in code (no hub downloads);
* two rank-4 LoRA adapters, each trained for 150 steps on its own lookup task
  ("A cat =" -> "meow" for task a, "B red :" -> "rose" for task b), so each parent
  scores 1.0 exact-match on its own eval set and a merge has something to keep;
* the exact linear merge of the two with weights 0.5/0.5 (factors concatenated,
  ``w_i * scale_i`` folded into B), a copy with one NaN weight, and a "noisy" merge
  whose task-a factors are replaced by large random noise (destroys task a while
  keeping the lineage of a linear merge);
* eval files: each task's prompt/answer pairs (JSONL), held-out text (JSONL) and a
  generation-sanity prompt list.

Why these sizes: with a hidden size of 32 and the default ``initializer_range`` the
logits cannot get confident (loss stalls near 3) and any merge flips the argmax; a
wider init, hidden size 96 and tasks whose prompts share no token (own prefix and
separator) give each adapter margins that survive the 0.5/0.5 merge, so "a good merge
passes retention" holds by construction rather than by luck.

The world is built once per process (``world()`` caches it in a temporary directory).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.tiny_llama import tiny_llama

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TASK_A = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "pig": "oink"}
TASK_B = {"red": "rose", "blue": "sky", "green": "grass", "gold": "sun", "white": "snow", "black": "night"}
FILLER = "the a of and is on in it to was big small old new".split()
SEPARATOR = {"A": "=", "B": ":"}
WORDS = ["A", "B", "=", ":"] + list(TASK_A) + list(TASK_A.values()) + list(TASK_B) + list(TASK_B.values()) + FILLER
HELDOUT = [
    "the cat is on the big old dog",
    "a small owl was in the new sky",
    "it is the sun and the snow",
    "the pig and the cow was old",
]
GEN_PROMPTS = ["A cat =", "B blue :", "A owl ="]


@dataclass(frozen=True)
class GateWorld:
    """Paths of everything a gate test needs (all under ``root``)."""

    root: Path
    base: Path
    adapter_a: Path
    adapter_b: Path
    merged: Path
    nan_merge: Path
    noisy_merge: Path
    eval_a: Path
    eval_b: Path
    heldout: Path
    weights: tuple[float, float]


def build_tokenizer(out_dir: Path):
    """Word-level tokenizer over ``WORDS``, saved into ``out_dir``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(out_dir)
    return tok


def build_base(out_dir: Path, seed: int = 0):
    """Save a tiny random Llama plus tokenizer to ``out_dir``; returns (model, tokenizer)."""
    tok = build_tokenizer(out_dir)
    model = tiny_llama(seed=seed, vocab_size=len(SPECIALS) + len(WORDS), hidden_size=96,
                       intermediate_size=192,
                       initializer_range=0.15,  # wide enough for confident logits
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, tok


def train_adapter(base_dir: Path, out_dir: Path, pairs: dict[str, str], prefix: str, *, seed: int) -> None:
    """Train a rank-4 LoRA so that ``"<prefix> key <sep>"`` greedily yields ``"value </s>"``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    texts = [f"{prefix} {k} {SEPARATOR[prefix]} {v}" for k, v in pairs.items()]
    ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts])
    labels = ids.clone()
    labels[:, :3] = -100  # learn the answer and the end token only
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)


def _lora_factors(adapter_dir: Path):
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return config, tensors


def write_concat_merge(parents: list[Path], weights: list[float], out_dir: Path, *,
                       noise_parent: int | None = None, noise_std: float = 3.0,
                       nan: bool = False, seed: int = 0) -> None:
    """Exact linear merge: concatenate factors, fold ``w_i * scale_i`` into B (alpha = r).

    ``noise_parent`` replaces that parent's factors with N(0, noise_std) noise;
    ``nan`` poisons one B matrix with NaN.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    loaded = [_lora_factors(p) for p in parents]
    config = dict(loaded[0][0])
    keys_a = sorted(k for k in loaded[0][1] if k.endswith("lora_A.weight"))
    out: dict[str, torch.Tensor] = {}
    total_r = 0
    for key_a in keys_a:
        key_b = key_a.replace("lora_A", "lora_B")
        a_parts, b_parts = [], []
        for i, ((cfg, tensors), w) in enumerate(zip(loaded, weights, strict=True)):
            scale = cfg["lora_alpha"] / cfg["r"]
            a, b = tensors[key_a].float(), tensors[key_b].float() * (w * scale)
            if noise_parent == i:
                a = torch.randn(a.shape, generator=gen) * noise_std
                b = torch.randn(b.shape, generator=gen) * noise_std
            a_parts.append(a)
            b_parts.append(b)
        out[key_a] = torch.cat(a_parts, 0).contiguous()
        out[key_b] = torch.cat(b_parts, 1).contiguous()
        total_r = out[key_a].shape[0]
    if nan:
        first_b = sorted(k for k in out if k.endswith("lora_B.weight"))[0]
        out[first_b][0, 0] = float("nan")
    config.update(r=total_r, lora_alpha=total_r, rank_pattern={}, alpha_pattern={})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(out, str(out_dir / "adapter_model.safetensors"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_world(root: Path) -> GateWorld:
    """Build every artefact under ``root`` (about 10-20 s on a laptop CPU)."""
    base = root / "base"
    build_base(base)
    a, b = root / "adapter-a", root / "adapter-b"
    train_adapter(base, a, TASK_A, "A", seed=1)
    train_adapter(base, b, TASK_B, "B", seed=2)
    weights = (0.5, 0.5)
    merged, nan_merge, noisy = root / "merged", root / "nan-merge", root / "noisy-merge"
    write_concat_merge([a, b], list(weights), merged)
    write_concat_merge([a, b], list(weights), nan_merge, nan=True)
    write_concat_merge([a, b], list(weights), noisy, noise_parent=0)
    data = root / "data"
    data.mkdir()
    eval_a = write_jsonl(data / "a_eval.jsonl", [{"prompt": f"A {k} =", "answer": v} for k, v in TASK_A.items()])
    eval_b = write_jsonl(data / "b_eval.jsonl", [{"prompt": f"B {k} :", "answer": v} for k, v in TASK_B.items()])
    heldout = write_jsonl(data / "heldout.jsonl", [{"text": t} for t in HELDOUT])
    return GateWorld(root, base, a, b, merged, nan_merge, noisy, eval_a, eval_b, heldout, weights)


@functools.lru_cache(maxsize=1)
def world() -> GateWorld:
    """The process-wide world, built on first use and removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="adapterkit-gate-"))
    atexit.register(shutil.rmtree, root, True)
    return build_world(root)


def write_policy(path: Path, w: GateWorld, **overrides: object) -> Path:
    """Write a gate policy for ``w`` that a good merge passes; ``overrides`` replace checks by kind.

    The eval data is copied to ``data/`` beside the policy and named by relative paths: a
    policy may only read data inside its own directory (``gate/policy.py``).
    """
    import yaml

    data = path.parent / "data"
    data.mkdir(parents=True, exist_ok=True)
    for src in (w.heldout, w.eval_a, w.eval_b):
        shutil.copyfile(src, data / src.name)
    checks = {
        "structural": {"kind": "structural", "max_rank": 16},
        "merge_equivalence": {"kind": "merge_equivalence", "prompts": GEN_PROMPTS, "max_abs_diff": 1e-3},
        "perplexity": {"kind": "perplexity", "data": f"data/{w.heldout.name}", "max_increase": 0.25,
                       "baseline": "parents"},
        "retention": {"kind": "retention", "sets": {"adapter-a": f"data/{w.eval_a.name}",
                                                    "adapter-b": f"data/{w.eval_b.name}"},
                      "metric": "exact_match", "min_ratio": 0.8},
        "generation": {"kind": "generation", "prompts": GEN_PROMPTS, "max_new_tokens": 8,
                       "max_repeat_fraction": 0.5},
    }
    for kind, value in overrides.items():
        if value is None:
            checks.pop(kind, None)
        else:
            checks[kind] = value  # type: ignore[assignment]
    path.write_text(yaml.safe_dump({"version": 1, "seed": 0, "checks": list(checks.values())}, sort_keys=False))
    return path


def push_adapter(store, name: str, adapter_dir: Path, base_dir: Path, *, lineage: dict | None = None):
    """Push a PEFT dir with a record carrying the base fingerprint; returns the Version."""
    from registry.formats.fingerprint import fingerprint_model
    from registry.ingest import prepare_adapter
    from registry.record import build_record

    with prepare_adapter(adapter_dir, base_dir=base_dir) as prepared:
        record = build_record(prepared.peft_config, prepared.tensors, base_model="tiny-llama",
                              fingerprint=fingerprint_model(base_dir))
        return store.push(name, prepared.files, record, lineage=lineage).version


def build_store(root: Path, w: GateWorld):
    """A store holding adapter-a, adapter-b and three linear "merges" of them
    (``merged``: exact; ``nan-merge``: one NaN; ``noisy-merge``: task a replaced by
    noise), each with lineage naming both parents and their weights.

    Returns:
        ``(store, {name: Version})``.
    """
    from registry.lineage import make_lineage, parent
    from registry.storage.store import Store

    store = Store.open(root, create=True)
    versions = {"adapter-a": push_adapter(store, "adapter-a", w.adapter_a, w.base),
                "adapter-b": push_adapter(store, "adapter-b", w.adapter_b, w.base)}
    lineage = make_lineage([parent(versions["adapter-a"], weight=w.weights[0]),
                            parent(versions["adapter-b"], weight=w.weights[1])],
                           method="linear", parameters={"normalize": False})
    for name, path in (("merged", w.merged), ("nan-merge", w.nan_merge), ("noisy-merge", w.noisy_merge)):
        versions[name] = push_adapter(store, name, path, w.base, lineage=lineage)
    return store, versions
