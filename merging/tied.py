"""PEFT's ``ensure_weight_tying``: one LoRA saved twice, for tied input and output embeddings.

When a model ties ``lm_head.weight`` to its input embedding and the adapter sets
``ensure_weight_tying``, PEFT trains one LoRA for the shared weight and saves it on both
sides: the embedding's ``lora_embedding_A`` (``r × vocab``) and ``lora_embedding_B``
(``hidden × r``), and ``lm_head``'s ``lora_A = lora_embedding_Bᵀ`` and
``lora_B = lora_embedding_Aᵀ``, so both deltas are the same matrix. Two things follow:

* **A merge must keep the two sides one LoRA.** Merged side by side, DARE and DELLA draw
  their masks per module name and in each side's own layout, and the randomized SVD
  seeds its sketch per module name, so the merged ``lm_head`` delta stopped being the
  embedding's (measured: 0.8 relative difference for ``dare_ties``), while the output
  still said ``ensure_weight_tying``: PEFT then used one side for both and ``unload`` the
  other. :func:`mirror_pair` decides when the embedding alone is merged and ``lm_head``
  gets its transposed factors (:func:`head_factors`).
* **A saved pair whose sides differ is not one LoRA.** peft 0.21 breaks the sharing when
  it casts the adapter to float32 on a bfloat16/float16 base, so after training the file
  holds two different LoRAs; PEFT applies them separately in 16-bit but ties them (one
  side for both) in float32. No single meaning exists on a base that ties its
  embeddings, so there ``unload`` refuses such an adapter (:func:`check_tied_factors`,
  ``UnsupportedAdapterError``, exit 2), naming the fix: ``ensure_weight_tying: false``
  with ``lm_head`` added to ``target_modules`` makes PEFT (and these tools) use the two
  LoRAs as saved. A merge (which knows no base) merges such an input's sides as two
  LoRAs and says ``ensure_weight_tying: false``; on an untied base PEFT applies the two
  as saved anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from registry.errors import UnsupportedAdapterError
from registry.formats.peft_keys import strip_prefix

if TYPE_CHECKING:
    import torch


class ModuleShape(Protocol):
    """What is needed of a :class:`merging.adapter.ModuleInfo` (a protocol: that module
    imports this one)."""

    @property
    def embedding(self) -> bool: ...

    @property
    def out_features(self) -> int: ...

    @property
    def in_features(self) -> int: ...


class LoraAdapter(Protocol):
    """What is needed of a :class:`merging.adapter.LoraAdapter`."""

    path: Path
    config: dict[str, Any]

    @property
    def infos(self) -> Mapping[str, Any]: ...

    def module(self, name: str) -> Any: ...

HEAD_MODULE = "lm_head"
"""The output embedding's module path (without ``base_model.model.``), as unload writes it."""


@dataclass(frozen=True)
class TiedPair:
    """The two module names under which an adapter saved its tied embedding LoRA.

    Attributes:
        embed: The embedding module (``lora_embedding_A``/``_B``).
        head: The ``lm_head`` module (``lora_A``/``lora_B``).
    """

    embed: str
    head: str


def tied_pair(config: Mapping[str, Any], infos: Mapping[str, ModuleShape]) -> TiedPair | None:
    """The adapter's tied pair: ``ensure_weight_tying`` set, one embedding LoRA and an
    ``lm_head`` LoRA of the transposed shape; None otherwise."""
    if not config.get("ensure_weight_tying"):
        return None
    embeds = [name for name, info in infos.items() if info.embedding]
    heads = [name for name, info in infos.items()
             if not info.embedding and strip_prefix(name) == HEAD_MODULE]
    if len(embeds) != 1 or len(heads) != 1:
        return None
    embed, head = infos[embeds[0]], infos[heads[0]]
    if (head.out_features, head.in_features) != (embed.in_features, embed.out_features):
        return None
    return TiedPair(embed=embeds[0], head=heads[0])


def is_one_lora(adapter: LoraAdapter, pair: TiedPair) -> bool:
    """Whether the pair's two sides are one LoRA: ``lm_head``'s factors the embedding's
    transposed, at the same scale (reads the two modules)."""
    import torch

    embed, head = adapter.module(pair.embed), adapter.module(pair.head)
    return (embed.scale == head.scale and torch.equal(head.A, embed.B.T)
            and torch.equal(head.B, embed.A.T))


def check_tied_factors(adapter: LoraAdapter) -> None:
    """Refuse an ``ensure_weight_tying`` adapter whose two sides are not one LoRA, for a
    base that ties its embeddings (on an untied base PEFT applies the two as saved).

    Raises:
        UnsupportedAdapterError: ``lm_head``'s factors are not the embedding's transposed,
            or the two sides have different scales (module docstring).
    """
    pair = tied_pair(adapter.config, adapter.infos)
    if pair is not None and not is_one_lora(adapter, pair):
        raise UnsupportedAdapterError(
            f"{adapter.path}: ensure_weight_tying is set but its {strip_prefix(pair.head)} and "
            f"{strip_prefix(pair.embed)} LoRAs differ (peft unties them when training on a "
            "bfloat16/float16 base), so PEFT applies it differently in float32 and 16-bit",
            fix="to use the two LoRAs as saved (as they were trained), set "
                "\"ensure_weight_tying\": false and add \"lm_head\" to target_modules in "
                "adapter_config.json; or retrain on a float32 base")


def mirror_pair(adapters: Sequence[LoraAdapter]) -> TiedPair | None:
    """The pair to merge as one LoRA (the embedding merged, ``lm_head`` mirrored), or None.

    Every input that has either module must carry them as a tied pair whose sides are one
    LoRA (:func:`is_one_lora`); an input with neither does not matter. If some input
    carries one side untied, or two different LoRAs, the sides are merged as two LoRAs and
    the output must not say ``ensure_weight_tying`` (:func:`output_ties`).
    """
    pairs = [tied_pair(a.config, a.infos) for a in adapters]
    found = {p for p in pairs if p is not None}
    if len(found) != 1:
        return None
    pair = found.pop()
    for adapter, own in zip(adapters, pairs, strict=True):
        if own is None and ({pair.embed, pair.head} & set(adapter.infos)):
            return None
        if own is not None and not is_one_lora(adapter, own):  # two LoRAs already
            return None
    return pair


def output_ties(adapters: Sequence[LoraAdapter], mirrored: TiedPair | None) -> bool | None:
    """``ensure_weight_tying`` for the merged adapter: True when the pair was mirrored,
    False when an input carries a tied pair but the sides were merged apart, None when
    no input carries one (the flag alone, without embedding LoRA, changes nothing)."""
    if mirrored is not None:
        return True
    return False if any(tied_pair(a.config, a.infos) is not None for a in adapters) else None


def head_factors(embed_b: torch.Tensor, embed_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_head``'s ``(lora_B, lora_A)`` for an embedding's merged ``(B, A)``: ``(Aᵀ, Bᵀ)``."""
    return embed_a.T.contiguous(), embed_b.T.contiguous()
