"""Greedy decoding with a static KV cache, and on CUDA the decoding step as a CUDA graph.

**Why.** On a GPU a small model's decoding step is bound by the host: transformers runs
some thirty Python-level operations per layer, each launching a kernel or two, so a step
of SmolLM2-135M (30 layers) took 23-33 ms on an H200 whatever the batch, while the GPU
was idle most of that time. A merge search scores dozens of candidates with the same
prompts on the same loaded model, and the gate decodes a few hundred tokens per check.
A CUDA graph replays a captured step's kernels with one launch, so the host's overhead
is paid once per batch shape instead of once per token.

**How** (:func:`static_greedy`), for one batch of left-padded prompts of width ``w`` and
at most ``n`` new tokens:

* a transformers ``StaticCache`` of ``w + n`` positions; its layers keep their write
  position in a device tensor (``cumulative_length``), so a replayed step writes the
  next position without the host;
* the attention masks are built here as 4D boolean tensors, which transformers uses as
  they are: the prefill's causal-and-padding mask (a padding query attends to itself
  only, so no row is empty), and the step's ``(batch, 1, 1, w + n)`` mask of the keys
  written so far, one column switched on before each step;
* ``position_ids`` count real tokens only, as in :func:`gate.decoding.greedy`;
* on CUDA the step (forward, last-position logits, ``argmax``) is captured once per
  batch shape, after one warm-up step on a side stream, and replayed per token; its
  buffers (input token, positions, mask, cache) are static and updated in place. The
  captured graph and its cache are kept on the model (:data:`GRAPHS_KEPT` shapes), so a
  model whose weights change in place (the search's live model) replays the same graph
  for every candidate: a graph reads the weights where they are, at replay time. A shape
  decoded a second time on the same model gets its prompts' pass captured too (a gate
  run, which decodes each shape once per model, never pays for that capture).

**Numbers.** Keys past the current position are masked, so their (stale or zero) values
never count; but attending over ``w + n`` masked keys instead of the growing cache can
round differently in the last bits, so this path's tokens may differ from
:func:`gate.decoding.greedy`'s where two logits nearly tie. A replay runs the very
kernels of the eager step, so the graph and the eager static path give the same tokens
(tested on CUDA), and the search and the gate, which both decode this way on CUDA, agree
exactly. The CPU keeps :func:`gate.decoding.greedy` (nothing to gain there).

**Where.** CUDA models whose architecture transformers marks as static-cache capable
(``_can_compile_fullgraph``), that attend over the whole sequence (no sliding window)
with SDPA (eager attention would add a boolean mask to the scores) and without ALiBi
(built from a 2D mask); anything else, or ``ADAPTERKIT_CUDA_GRAPHS=0``, decodes the eager
way. A model the static path or a capture fails on (any error) is decoded the eager way
from then on, its kept captures freed (:func:`give_up`).

**Memory.** A kept shape holds its cache and, once its prompt pass is captured, that
pass's logits (batch x width x vocabulary, in the graph's own memory). At most
:data:`GRAPHS_KEPT` shapes and :data:`KEPT_BYTES` per model are kept, and a prompt pass
with more than :data:`PREFILL_CAPTURE_BYTES` of logits is never captured.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

GRAPHS_KEPT = 16
"""Captured batch shapes kept per model at most (least recently used dropped first)."""
KEPT_BYTES = 2 << 30
"""Device memory the kept shapes of a model may hold at most: their caches and captured
prompt passes (whose logits, batch x width x vocabulary, live in the graph's memory)."""
PREFILL_CAPTURE_BYTES = 256 << 20
"""A prompt pass whose logits take more than this is not captured (it runs eagerly)."""
ENV_SWITCH = "ADAPTERKIT_CUDA_GRAPHS"
"""``0`` turns graph decoding off (the eager path of :func:`gate.decoding.greedy`)."""
ALIBI_MODELS = frozenset({"bloom", "mpt", "baichuan"})
"""Model types whose position bias (ALiBi) is built from a 2D mask."""
_ATTRIBUTE = "_adapterkit_decode_graphs"
FAILED = "_adapterkit_decode_graphs_failed"
"""Set on a model (the capture's error, for a look in a debugger) whose capture failed."""


def _inner(model: PreTrainedModel) -> Any:
    unwrap = getattr(model, "get_base_model", None)  # a PEFT model wraps the transformers one
    return unwrap() if callable(unwrap) else model


def take_tokens(chosen: Sequence[int], rows: list[list[int]], done: list[bool],
                budgets: Sequence[int], eos: set[int]) -> None:
    """One step's tokens into the unfinished rows: EOS ends a row (and is not kept), a
    row ends when it holds its budget."""
    for row, token in enumerate(chosen):
        if done[row]:
            continue
        if token in eos:
            done[row] = True
            continue
        rows[row].append(token)
        done[row] = len(rows[row]) >= budgets[row]


def full_attention(model: PreTrainedModel) -> bool:
    """Whether every layer attends over the whole sequence (no sliding window), the only
    case the masks built here describe."""
    config = _inner(model).config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    kinds = getattr(text, "layer_types", None)
    return kinds is None or all(kind == "full_attention" for kind in kinds)


def graphs_wanted(model: PreTrainedModel, device: str) -> bool:
    """Whether :func:`gate.decoding.greedy` should decode through :func:`static_greedy`
    with CUDA graphs: a CUDA device, a capable architecture, not switched off."""
    if not str(device).startswith("cuda") or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    inner = _inner(model)
    if inner.__dict__.get(FAILED):
        return False
    # boolean 4D masks mean "attend" to SDPA only (eager attention adds them to the scores),
    # and ALiBi models build their biases from a 2D mask
    return (bool(getattr(type(inner), "_can_compile_fullgraph", False)) and full_attention(model)
            and getattr(inner.config, "_attn_implementation", None) == "sdpa"
            and not getattr(inner.config, "alibi", False)
            and getattr(inner.config, "model_type", "") not in ALIBI_MODELS)


def give_up(model: PreTrainedModel, err: BaseException) -> None:
    """Decode ``model`` the eager way from now on: note why (:data:`FAILED`) and free the
    kept captures and caches."""
    import torch

    inner = _inner(model)
    inner.__dict__[FAILED] = f"{type(err).__name__}: {err}"[:300]
    inner.__dict__.pop(_ATTRIBUTE, None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class _Step:
    """One batch shape's static decoding state: the cache, the step's input and output
    buffers, and (on CUDA) the captured graph."""

    cache: Any
    token: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    chosen: torch.Tensor | None = None
    graph: Any = None
    prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The prefill's static inputs (ids, positions, 4D mask), once captured."""
    first: torch.Tensor | None = None
    """The captured prefill's output (the first chosen tokens)."""
    prefill: Any = None
    logits_bytes: int = 0
    """The prompt pass's logits (batch x width x vocabulary), once computed."""
    prefilled: int = 0
    """Prefills run eagerly so far: the prefill is captured on its second use only, so a
    model that decodes a shape once (a gate run) pays no capture it cannot repay."""


def _kept(model: PreTrainedModel) -> OrderedDict[tuple[int, int, int], _Step]:
    inner = _inner(model)
    kept = inner.__dict__.get(_ATTRIBUTE)
    if kept is None:
        kept = OrderedDict()
        inner.__dict__[_ATTRIBUTE] = kept
    return kept


def prefill_mask(pads: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """``(batch, 1, width, total)`` bool: query ``i`` of row ``b`` sees key ``j`` when
    ``pads[b] <= j <= i`` (its real tokens so far); a padding query sees itself only."""
    import torch

    keys = torch.arange(total, device=pads.device)
    queries = torch.arange(width, device=pads.device)
    causal = keys[None, None, :] <= queries[None, :, None]
    real = keys[None, None, :] >= pads[:, None, None]
    itself = keys[None, None, :] == queries[None, :, None]
    return ((causal & real) | itself)[:, None]


def static_greedy(model: PreTrainedModel, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *,
                  eos: set[int], pad_id: int, device: str, graphs: bool | None = None,
                  cache_kw: str = "past_key_values") -> list[list[int]]:
    """:func:`gate.decoding.greedy` over a static cache (module docstring); the step is a
    CUDA graph when ``graphs`` (default: on CUDA).

    Args:
        model: The model (eval mode).
        prompts: Non-empty token-id prompts (one batch).
        budgets: Each prompt's ``max_new_tokens``.
        eos: Token ids that end a row (not included in it).
        pad_id: A valid token id for padding (masked out).
        device: Where the model is.
        graphs: Capture and replay the step (CUDA only).
        cache_kw: The name ``forward`` takes the cache under.
    """
    import torch
    from transformers import StaticCache

    width = max(len(p) for p in prompts)
    steps = max(budgets, default=0)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [budget <= 0 for budget in budgets]
    if all(done):
        return rows
    total = width + steps
    use_graph = str(device).startswith("cuda") if graphs is None else graphs
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    positions = (torch.arange(width, device=device)[None, :] - pads[:, None]).clamp(min=0)
    key = (len(prompts), width, total)
    kept = _kept(model) if use_graph else OrderedDict()
    state = kept.pop(key, None)
    if state is None:
        state = _Step(cache=StaticCache(config=_inner(model).config, max_cache_len=total),
                      token=torch.empty((len(prompts), 1), dtype=torch.long, device=device),
                      positions=torch.empty((len(prompts), 1), dtype=torch.long, device=device),
                      mask=torch.empty((len(prompts), 1, 1, total), dtype=torch.bool, device=device))
    if use_graph:
        kept[key] = state
    with torch.no_grad():
        chosen = _run_prefill(model, state, (ids, positions, prefill_mask(pads, width, total)),
                              cache_kw, use_graph)
        state.positions.copy_(positions[:, -1:])
        keys = torch.arange(total, device=device)[None, :]
        state.mask.copy_(((keys >= pads[:, None]) & (keys < width))[:, None, None])
        for t in range(steps):
            take_tokens(chosen.tolist(), rows, done, budgets, eos)
            if all(done) or t == steps - 1:
                break
            state.token.copy_(chosen[:, None])
            state.positions.add_(1)
            state.mask[:, :, :, width + t] = True
            chosen = _run_step(model, state, cache_kw, use_graph)
            use_graph = use_graph and not _inner(model).__dict__.get(FAILED)
    if use_graph:
        _trim(kept)
    return rows


def _held_bytes(state: _Step) -> int:
    """Device memory a kept shape holds: its cache, and its captured prompt pass's logits."""
    held = 0
    for layer in getattr(state.cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                held += tensor.numel() * tensor.element_size()
    return held + state.logits_bytes * (state.prefill is not None)


def _trim(kept: OrderedDict[tuple[int, int, int], _Step]) -> None:
    """Drop the least recently used shapes beyond :data:`GRAPHS_KEPT` or :data:`KEPT_BYTES`
    (the newest is dropped too when it alone is over the bytes)."""
    total = sum(_held_bytes(s) for s in kept.values())
    while kept and (len(kept) > GRAPHS_KEPT or total > KEPT_BYTES):
        _, dropped = kept.popitem(last=False)
        total -= _held_bytes(dropped)


def _forward(model: PreTrainedModel, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: Any, cache_kw: str, state: _Step | None = None) -> torch.Tensor:
    """The next token of every row after ``ids`` (greedy): the last position's argmax
    (``state`` notes the size of the logits)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kw: cache})
    if state is not None:
        state.logits_bytes = out.logits.numel() * out.logits.element_size()
    return out.logits[:, -1].float().argmax(-1)


def _run_prefill(model: PreTrainedModel, state: _Step,
                 prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cache_kw: str,
                 use_graph: bool) -> torch.Tensor:
    """The prompts' pass (fills the cache from position 0): eager on a shape's first use,
    then (graphs) an eager pass on a side stream that is captured, then the captured
    graph on the kept inputs (same shape, any prompts)."""
    import torch

    state.cache.reset()  # zero keys and values, write position 0
    if use_graph and state.prefill is not None and state.prompt is not None and state.first is not None:
        for kept, given in zip(state.prompt, prompt, strict=True):
            kept.copy_(given)
        state.prefill.replay()
        return state.first.clone()
    if not use_graph or state.prefilled == 0 or state.logits_bytes > PREFILL_CAPTURE_BYTES:
        state.prefilled += 1
        return _forward(model, *prompt, state.cache, cache_kw, state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up the capture needs is the real pass
        chosen = _forward(model, *prompt, state.cache, cache_kw)
    torch.cuda.current_stream().wait_stream(side)
    try:  # recorded, not run: the cache keeps what the warm-up wrote
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first = _forward(model, *prompt, state.cache, cache_kw)
        state.prefill, state.prompt, state.first = graph, prompt, first
    except Exception as err:  # noqa: BLE001 - eager from now on (see _run_step)
        give_up(model, err)
    return chosen


def _step(model: PreTrainedModel, state: _Step, cache_kw: str) -> torch.Tensor:
    return _forward(model, state.token, state.positions, state.mask, state.cache, cache_kw)


def _run_step(model: PreTrainedModel, state: _Step, cache_kw: str, use_graph: bool) -> torch.Tensor:
    """One decoding step: eager, or the captured graph (captured on first use)."""

    if not use_graph:
        return _step(model, state, cache_kw)
    if state.graph is None:
        try:
            state.graph, state.chosen = _capture(model, state, cache_kw)
        except Exception as err:  # noqa: BLE001 - an architecture the capture cannot take: eager from now on
            give_up(model, err)
            return _step(model, state, cache_kw)
    state.graph.replay()
    assert state.chosen is not None
    return state.chosen.clone()


def _capture(model: PreTrainedModel, state: _Step, cache_kw: str) -> tuple[Any, torch.Tensor]:
    """Capture the step after one warm-up on a side stream (CUDA's recipe). The warm-up
    writes the step's key and value at the position the first replay writes again with
    the same inputs, and its advance of each layer's write position is taken back."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(model, state, cache_kw)
    torch.cuda.current_stream().wait_stream(side)
    for layer in state.cache.layers:
        layer.cumulative_length.sub_(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen = _step(model, state, cache_kw)
    return graph, chosen
