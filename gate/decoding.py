"""Greedy decoding and scoring passes for the gate, many prompts at once.

Retention scores every prompt of an eval set by greedy exact match; decoding them one
at a time was ~90% of a gate run on the demo model. :func:`greedy` decodes a batch
the way ``generate`` does for greedy search, written out so that nothing from a
model's ``generation_config`` (repetition penalties, n-gram blocking, forced tokens)
changes the gate's numbers:

* prompts are **left-padded** to a common length with an attention mask, and
  ``position_ids`` count only real tokens, so each row sees the positions it would
  see alone;
* one forward pass over the prompts fills the KV cache, then one token per step for
  every unfinished row; the batch stops when every row has hit EOS or its own token
  budget (rows that finished keep a slot, their extra tokens are dropped);
* on CUDA the same steps run over a static cache, each captured as a CUDA graph
  (:mod:`gate.graph_decoding`), for the models that path takes.

:func:`finish` turns a row's tokens into a :class:`Generation` with the same rules as
decoding that prompt alone: stop before EOS, stop after the first token whose decoded
text contains a stop string, cut the text at that string. Because decoding is
causal, a row's tokens do not depend on how long other rows run; batched and
one-at-a-time results agree up to float rounding of padded matmuls (tests compare
them, and against ``transformers``' own greedy ``generate``).

:func:`forward_many` is the scoring counterpart (perplexity windows, answer
log-likelihoods): one forward pass per batch, **right**-padded, since a causal model's
real tokens never attend to padding that comes after them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gate.graph_decoding import give_up, graphs_wanted, static_greedy, take_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BATCH_SIZE = 16
"""Prompts decoded together on the CPU (the demo model on 2 cores: ~6x faster than one by one)."""
DEVICE_BATCH_SIZE = 64
"""Prompts decoded together on a GPU, where a decoding step costs about the same for 16 or
64 rows (it is bound by kernel launches, not arithmetic): fewer batches, fewer steps."""
DEVICE_BATCH_TOKENS = 8192
"""A GPU batch holds at most this many prompt tokens (rows x the longest prompt), so the
first pass's logits stay bounded (8192 x a 128k vocabulary x 2 bytes = 2 GiB)."""


def decode_batches(lengths: Sequence[int], device: str = "cpu",
                   batch_size: int | None = None) -> list[list[int]]:
    """Prompt indices in decoding batches: sorted by length (less padding), then cut into
    batches of :data:`BATCH_SIZE` on the CPU, or of up to :data:`DEVICE_BATCH_SIZE` rows
    and :data:`DEVICE_BATCH_TOKENS` padded prompt tokens on another device.
    ``batch_size`` fixes the rows per batch (tests: 1 decodes one prompt at a time).

    A row's tokens do not depend on its batch beyond float rounding (module docstring),
    but the batches are part of what a gate's numbers are: they depend only on the
    prompts' lengths and the device type, never on free memory.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    on_cpu = str(device).split(":")[0] == "cpu"
    rows = batch_size or (BATCH_SIZE if on_cpu else DEVICE_BATCH_SIZE)
    budget = None if batch_size or on_cpu else DEVICE_BATCH_TOKENS
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        # sorted by length: the newcomer is the longest, so it sets the padded width
        if last is not None and len(last) < rows and (
                budget is None or (len(last) + 1) * lengths[i] <= budget):
            last.append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Generation:
    """A greedy continuation: its decoded ``text`` (cut at a stop string) and token ids."""

    text: str
    token_ids: tuple[int, ...]


def greedy(model: PreTrainedModel, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *,
           eos: set[int], pad_id: int, device: str = "cpu") -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` (one batch), each at most its
    ``budgets`` entry long and ending before the first EOS.

    Raises:
        ValueError: ``prompts`` and ``budgets`` differ in length, or a prompt is empty.
    """
    import torch

    if len(prompts) != len(budgets):
        raise ValueError("one budget per prompt")
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    if not prompts:
        return []
    if graphs_wanted(model, device):
        try:
            return static_greedy(model, prompts, budgets, eos=eos, pad_id=pad_id, device=device,
                                 cache_kw=_cache_keyword(model))
        except Exception as err:  # noqa: BLE001 - a model the static path cannot take: decode it eagerly
            give_up(model, err)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_keyword(model)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [budget <= 0 for budget in budgets]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range(max(budgets, default=0)):
            chosen = out.logits[:, -1].float().argmax(-1).tolist()
            take_tokens(chosen, rows, done, budgets, eos)
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            positions = positions[:, -1:] + 1
            past = out.get("cache")
            out = model(input_ids=torch.tensor(chosen, device=device)[:, None],
                        attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_kw: out.get("past_key_values") if past is None else past})
    return rows


def _cache_keyword(model: PreTrainedModel) -> str:
    """The name the model's ``forward`` takes the KV cache under: ``cache`` from transformers
    5.24 (``past_key_values`` is deprecated there, with a warning per call), else
    ``past_key_values``."""
    import inspect

    unwrap = getattr(model, "get_base_model", None)  # a PEFT model wraps the transformers one
    inner = unwrap() if callable(unwrap) else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def forward_many(model: PreTrainedModel, rows: Sequence[Sequence[int]], *, pad_id: int, device: str = "cpu",
                 batch_size: int = BATCH_SIZE) -> list[torch.Tensor]:
    """Float32 logits ``(len(row), vocab)`` of each token-id row, computed in batches of
    rows of similar length, **right**-padded: with causal attention a real token never
    sees the padding after it, so its logits are those of the row alone (up to float
    rounding of the batched matmuls). For perplexity and answer log-likelihoods.

    Raises:
        ValueError: A row is empty.
    """
    import torch

    if any(not row for row in rows):
        raise ValueError("empty row")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.tensor([list(rows[i]) + [pad_id] * (width - len(rows[i])) for i in chunk],
                               device=device)
            mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in chunk],
                                device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for j, i in enumerate(chunk):
                out[i] = logits[j, :len(rows[i])]
    return [row for row in out if row is not None]  # every row was filled


def finish(tokens: Sequence[int], decode: Callable[[list[int]], str],
           stop: Sequence[str] = ()) -> Generation:
    """A row's :class:`Generation`: tokens up to the first one whose decoded text (less
    leading whitespace) contains a stop string, text cut at that string."""
    kept: list[int] = []
    for token in tokens:
        kept.append(token)
        if stop and any(s in decode(kept).lstrip() for s in stop):
            break
    text = decode(kept)
    if stop:  # a leading newline is not an answer boundary
        text = text.lstrip()
    for s in stop:
        text = text.split(s, 1)[0]
    return Generation(text=text, token_ids=tuple(kept))
