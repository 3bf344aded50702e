"""Model loading and scoring for the gate: transformers on CPU, deterministic.

:class:`Evaluator` loads the base model once per variant and keeps a small LRU of
loaded variants (base, candidate, each parent, the release, the "parents applied
together" model), because several checks score the same models:

* **adapters** are applied with PEFT (``PeftModel.from_pretrained`` then
  ``merge_and_unload``), exactly as a user would load them;
* **"parents applied together"** (merge equivalence) is built without PEFT: each
  parent's true delta ``s_i B_i A_i`` (:func:`gate.lora_deltas.lora_deltas`) times its merge
  coefficient is added to a copy of the base weights, so the reference does not
  share code with the adapter under test;
* a **derived model** (a merged-and-unloaded checkpoint) is loaded as is; a
  bitsandbytes-quantized one (``quantization_config`` in its ``config.json``) is
  loaded with ``device_map`` (bitsandbytes models cannot be moved with ``.to``), and
  its 4-bit layers are told not to take bitsandbytes' AVX512-BF16 CPU path, which
  computes in bfloat16 on some CPUs and not on others: every machine computes the
  same float32 ``dequantize``-then-matmul, so the gate's numbers do not depend on it.

Scoring primitives: :meth:`Evaluator.perplexity` (token-level NLL over windows of
``max_length`` tokens), :meth:`Evaluator.answer_logprob` (log-likelihood of an
answer after a prompt), :meth:`Evaluator.generate` / :meth:`Evaluator.generate_many`
(greedy decoding with a KV cache, stopping at EOS or a stop string; batched, see
:mod:`gate.decoding`), :meth:`Evaluator.logits`. Seeds are fixed with
``torch.manual_seed`` before every model load and generation; decoding is greedy,
so every number is reproducible on the same software stack.

Data files are read by :mod:`gate.eval_data` (the policy's hashed bytes).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gate.decoding import Generation, decode_batches, finish, forward_many, greedy
from gate.provenance import is_quantized
from merging.targeting import check_random_init_covered, saved_modules
from registry.errors import BadInputError
from registry.formats.patterns import explicit_peft_config
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"


def repeat_fraction(token_ids: Sequence[int], n: int) -> float:
    """Share of repeated n-grams: ``1 - distinct / total`` (0 when there are none)."""
    n = min(n, len(token_ids))
    if n <= 0:
        return 0.0
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def normalize_answer(text: str, case_sensitive: bool = True) -> str:
    """Collapse whitespace (and casefold unless ``case_sensitive``)."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def answer_matches(prediction: str, answer: str, case_sensitive: bool = True) -> bool:
    """Exact match: the normalized prediction equals the answer, or starts with it and the
    next character is not a letter or digit (``"Paris."`` matches ``"Paris"``,
    ``"Parisian"`` does not)."""
    pred, ans = normalize_answer(prediction, case_sensitive), normalize_answer(answer, case_sensitive)
    if not ans:
        return not pred
    return pred == ans or (pred.startswith(ans) and not pred[len(ans)].isalnum())


def adapts_tied_embeddings(model: Any) -> bool:
    """Whether PEFT put a LoRA layer on an input or output embedding that shares its
    weight with the other (a tied base)."""
    def weight(module: Any) -> Any:
        return getattr(getattr(module, "base_layer", module), "weight", None)

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or weight(inp) is not weight(out):
        return False
    return hasattr(inp, "base_layer") or hasattr(out, "base_layer")


class Evaluator:
    """Loads model variants on one device and scores them.

    Args:
        base_dir: The base model directory (weights + tokenizer).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        seed: Seed set before every load and generation.
        max_length: Token window for perplexity and log-likelihood.
        device: ``cpu`` (default) or e.g. ``cuda``.
        cache_size: How many loaded variants to keep.
    """

    def __init__(self, base_dir: Path, *, dtype: str = "float32", seed: int = 0,
                 max_length: int = 512, device: str = "cpu", cache_size: int = 3) -> None:
        self.base_dir = Path(base_dir)
        self.dtype_name, self.seed, self.max_length = dtype, seed, max_length
        self.device, self.cache_size = device, cache_size
        self._models: OrderedDict[str, PreTrainedModel] = OrderedDict()
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # --- loading -------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (loaded once).

        Raises:
            BadInputError: The base directory has no loadable tokenizer.
        """
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
            except (OSError, ValueError) as err:
                raise BadInputError(f"cannot load a tokenizer from {self.base_dir}: {err}",
                                    fix="the base directory needs tokenizer files") from None
        return self._tokenizer

    def _load_dir(self, model_dir: Path) -> PreTrainedModel:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-load bars would drown the gate's own output

        torch.manual_seed(self.seed)
        quantized = is_quantized(Path(model_dir))
        extra = {"device_map": self.device} if quantized else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=getattr(torch, self.dtype_name), **extra)
        except (OSError, ValueError, ImportError) as err:
            raise BadInputError(f"cannot load a causal LM from {model_dir}: {err}",
                                fix="pass a transformers model directory (a quantized one "
                                    "needs bitsandbytes installed)") from None
        if not quantized:
            # transformers wraps PreTrainedModel.to in a decorator whose stub drops the device
            return model.to(self.device).eval()  # type: ignore[arg-type]
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # a plain bool flag; torch's stubs type Module attributes as Tensor | Module
                module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
        return model.eval()

    def _cached(self, key: str, build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.cache_size:
            self._models.popitem(last=False)
        model = build()
        self._models[key] = model
        return model

    def base(self) -> PreTrainedModel:
        """The base model."""
        return self._cached("base", lambda: self._load_dir(self.base_dir))

    def with_adapter(self, key: str, adapter_dir: Path) -> PreTrainedModel:
        """Base + a PEFT adapter (merged into the weights), or a full model directory."""
        if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file():
            return self._cached(key, lambda: self._load_dir(adapter_dir))

        def build() -> PreTrainedModel:
            import torch
            from peft import PeftModel

            model = self._load_dir(self.base_dir)
            with tempfile.TemporaryDirectory(prefix="adapters-explicit-") as explicit:
                # PEFT matches config patterns with Python's re: give it literal names only
                source = Path(adapter_dir)
                config = loads_json((source / ADAPTER_CONFIG).read_text(encoding="utf-8"))
                names = [n for n, _ in model.named_modules()]
                head = model.get_output_embeddings()
                linear = [n for n, m in model.named_modules() if m is not head and
                          (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")]
                (Path(explicit) / ADAPTER_CONFIG).write_text(
                    json.dumps(explicit_peft_config(config, names, linear)), encoding="utf-8")
                for item in source.iterdir():
                    if item.name != ADAPTER_CONFIG:
                        (Path(explicit) / item.name).symlink_to(item.resolve())
                peft_model = PeftModel.from_pretrained(model, explicit, is_trainable=False)
                check_random_init_covered(source, config, peft_model, saved_modules(source))
                if adapts_tied_embeddings(model):
                    # merge_and_unload adds each side's delta into the one shared weight
                    # (lm_head's delta reaches the input side too, a tied pair's lands
                    # twice): the unmerged forward is the adapter's meaning, and unload's
                    return cast("PreTrainedModel", peft_model.eval())  # forwards as one
                return peft_model.merge_and_unload().eval()
        return self._cached(key, build)

    def with_deltas(self, key: str, parts: Sequence[tuple[Path, float]]) -> PreTrainedModel:
        """Base + ``Σ c_i ΔW_i`` over ``(adapter_dir, c_i)``, built without PEFT.

        Raises:
            UnsupportedAdapterError: A part is not plain LoRA
                (see :func:`gate.lora_deltas.lora_deltas`).
            BadInputError: A delta names a weight the base lacks or has another shape.
        """
        def build() -> PreTrainedModel:
            import torch

            from gate.lora_deltas import lora_deltas

            model = self._load_dir(self.base_dir)
            head, embed = model.get_output_embeddings(), model.get_input_embeddings()
            if head is not None and head.weight is embed.weight:
                # each side gets its own delta, as in PEFT's unmerged forward (the candidate
                # is scored that way: with_adapter); added into the shared weight, an
                # embedding delta reached lm_head too
                shared: torch.Tensor = embed.weight  # torch types Module attributes loosely
                head.weight = torch.nn.Parameter(shared.detach().clone())
            params = dict(model.named_parameters())
            conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
            # every part read against the untouched base (its saved base-weight copies too)
            read = [(d, c, lora_deltas(d, conv1d, params)) for d, c in parts]
            with torch.no_grad():
                for adapter_dir, coeff, deltas in read:
                    for key_, delta in deltas.items():
                        target = params.get(key_)
                        if target is None or tuple(target.shape) != tuple(delta.shape):
                            raise BadInputError(f"{adapter_dir}: delta for {key_} does not fit the base",
                                                fix="use parents trained on this base")
                        target.add_((coeff * delta).to(target.dtype).to(target.device))
            return model
        return self._cached(key, build)

    # --- scoring -------------------------------------------------------------------
    def _encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _forward(self, model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
        import torch

        with torch.no_grad():
            tensor = torch.tensor([list(ids)], device=self.device)
            return model(input_ids=tensor).logits[0].float()

    def windows(self, texts: Sequence[str], *, min_tokens: int = 1) -> list[list[int]]:
        """Token ids of ``texts`` cut into windows of ``max_length`` (shorter ones dropped)."""
        out = []
        for text in texts:
            ids = self._encode(text)
            out += [ids[start:start + self.max_length] for start in range(0, len(ids), self.max_length)]
        return [w for w in out if len(w) >= min_tokens]

    def logits_many(self, model: PreTrainedModel, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Float32 logits of each token-id row (:func:`gate.decoding.forward_many`)."""
        return forward_many(model, rows, pad_id=self._pad(model), device=self.device)

    def perplexity(self, model: PreTrainedModel, texts: Sequence[str]) -> float:
        """``exp`` of the mean token NLL over all texts (windows of ``max_length`` tokens,
        scored in batches, see :func:`gate.decoding.forward_many`).

        Raises:
            BadInputError: No text has two tokens to score.
        """
        import torch.nn.functional as F
        import torch

        windows = self.windows(texts, min_tokens=2)
        if not windows:
            raise BadInputError("held-out text is too short to score", fix="add longer documents")
        total, count = 0.0, 0
        for window, logits in zip(windows, forward_many(model, windows, pad_id=self._pad(model),
                                                        device=self.device), strict=True):
            target = torch.tensor(window[1:], device=logits.device)
            total += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
            count += len(window) - 1
        return math.exp(total / count) if math.isfinite(total) else float("nan")

    def _continuation(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        sep = "" if (not prompt or prompt[-1].isspace() or answer[:1].isspace()) else " "
        ctx = self._encode(prompt)
        full = self._encode(prompt + sep + answer)
        if full[:len(ctx)] == ctx and len(full) > len(ctx):
            return ctx, full[len(ctx):]
        return ctx, self._encode(sep + answer, special=False)

    def answer_logprob(self, model: PreTrainedModel, prompt: str, answer: str) -> tuple[float, int]:
        """Sum of log-probabilities of the answer tokens after the prompt, and their count."""
        return self.answer_logprobs(model, [(prompt, answer)])[0]

    def answer_logprobs(self, model: PreTrainedModel, pairs: Sequence[tuple[str, str]]
                        ) -> list[tuple[float, int]]:
        """:meth:`answer_logprob` of many ``(prompt, answer)`` pairs, scored in batches.

        A row is the last ``max_length`` tokens of prompt + answer (as perplexity windows
        are cut); an answer of ``max_length`` tokens or more is scored on its last
        ``max_length - 1``, the ones the window holds with a token before them.
        """
        import torch

        split = [self._continuation(prompt, answer) for prompt, answer in pairs]
        rows = [(ctx + cont)[-self.max_length:] for ctx, cont in split]
        out = []
        for (_, cont), row, logits in zip(split, rows, forward_many(model, rows, pad_id=self._pad(model),
                                                                     device=self.device), strict=True):
            scored = min(len(cont), len(row) - 1)
            if scored <= 0:
                out.append((0.0, 0))
                continue
            logp = torch.log_softmax(logits[-scored - 1:-1], dim=-1)
            picked = logp.gather(1, torch.tensor(cont[-scored:], device=logp.device)[:, None])
            out.append((float(picked.sum()), scored))
        return out

    def answer_tokens(self, prompt: str, answer: str) -> int:
        """How many tokens the answer takes after the prompt."""
        return len(self._continuation(prompt, answer)[1])

    def _eos_ids(self, model: PreTrainedModel) -> set[int]:
        ids: set[int] = set()
        for value in (self.tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def generate(self, model: PreTrainedModel, prompt: str, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> Generation:
        """Greedy continuation of ``prompt``: stops at EOS, ``max_new_tokens`` or a stop string."""
        return self.generate_many(model, [prompt], [max_new_tokens], stop)[0]

    def generate_many(self, model: PreTrainedModel, prompts: Sequence[str], budgets: Sequence[int],
                      stop: Sequence[str] = (), batch_size: int | None = None) -> list[Generation]:
        """:meth:`generate` for many prompts (``budgets``: each one's ``max_new_tokens``),
        decoded in batches of prompts of similar length (:func:`gate.decoding.decode_batches`:
        larger on a GPU; ``batch_size`` fixes it).

        Raises:
            BadInputError: A prompt encodes to no tokens.
        """
        import torch

        torch.manual_seed(self.seed)
        eos = self._eos_ids(model)
        pad = self._pad(model)
        encoded = [self._encode(p)[-self.max_length:] for p in prompts]
        for prompt, ids in zip(prompts, encoded, strict=True):
            if not ids:
                raise BadInputError(f"prompt {prompt!r} encodes to no tokens",
                                    fix="give every prompt some text")
        results: list[Generation | None] = [None] * len(prompts)
        for chunk in decode_batches([len(ids) for ids in encoded], str(self.device), batch_size):
            rows = greedy(model, [encoded[i] for i in chunk], [budgets[i] for i in chunk],
                          eos=eos, pad_id=pad, device=self.device)
            for i, tokens in zip(chunk, rows, strict=True):
                results[i] = finish(tokens, self._decode, stop)
        return [r for r in results if r is not None]

    def _pad(self, model: PreTrainedModel) -> int:
        """A padding id (masked out, so any valid id does): the tokenizer's, else EOS."""
        pad = self.tokenizer.pad_token_id
        return pad if isinstance(pad, int) else min(self._eos_ids(model), default=0)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def logits(self, model: PreTrainedModel, text: str) -> torch.Tensor:
        """Float32 logits ``(tokens, vocab)`` for ``text``."""
        return self._forward(model, self._encode(text)[-self.max_length:])
