"""A loaded base model whose weights take one candidate merge at a time: one load, many merges.

The merge search (:mod:`gate.search`) evaluates dozens of candidate merges of the same
inputs. Writing each candidate as a PEFT directory and loading base + adapter again
(what ``adapters gate`` does for one candidate) costs a model load per trial; here the
base is loaded once and each candidate is **merged into its weights in place**:

1. :meth:`LiveLora.attach` finds every module of the inputs' union in the loaded base
   (a ``Linear`` or an ``Embedding``) and keeps a copy of its weight ``W0``;
2. :meth:`LiveLora.load` restores every ``W0`` (``copy_``: bit-exact) and adds each
   module's delta the way PEFT's ``merge_and_unload`` does for the gate's candidate
   model, operation for operation, so the live model's weights are **bit-identical** to
   the model the gate scores for the same merge:

   * PEFT holds LoRA factors in float32 (it upcasts half-precision adapters on load),
     so the factors are cast to float32;
   * ``delta = (B @ A) * scale`` (``Linear``), ``delta = (B @ A).T * scale``
     (``Embedding``), with PEFT's scale: 1 for a merge result (the engine folds every
     input's scale and weight into the factors; :mod:`merging.lora.peft_output` writes
     ``lora_alpha = r``), ``alpha / r`` (or ``alpha / sqrt(r)``) for a parent;
   * ``W += delta`` (``Linear``), ``W += delta.to(W.dtype)`` (``Embedding``).

   :meth:`LiveLora.load_adapter` does the same for one adapter on its own (a parent's
   or the release's baseline) and :meth:`LiveLora.clear` restores the base exactly.

Why in place rather than LoRA layers whose factors are swapped: the forward pass is
then the base model's own (a plain ``Linear`` per module, no ``B (A x)`` side path,
which cost 10-40% per forward with a rank that must hold the largest merge), and the
objectives the search optimises are exactly the gate's numbers for the same merge,
not an approximation of them. Nothing is written to disk and no weights are reloaded;
a swap is one ``copy_``, one matmul and one ``add_`` per module. Memory: one extra copy
of the adapted modules' weights.

Only plain LoRA on linear modules (and embeddings saved without PEFT's base-weight
copies) is supported (the engine already refuses DoRA, biases and the rest); ``fan_in_fan_out`` inputs and ``modules_to_save``
tensors are refused, since they are not factor merges, and so is LoRA on a base's tied
embeddings (merged in place, a delta would land on both sides; the gate scores those
adapters unmerged: :meth:`gate.evaluate.Evaluator.with_adapter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from registry.errors import UnsupportedAdapterError
from registry.formats.peft_keys import LoraKeys, strip_prefix

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from merging.adapter import LoraAdapter
    from merging.lora.results import MergeResult

Factors = Mapping[str, "tuple[torch.Tensor, torch.Tensor, float]"]
"""Module path -> ``(B, A, scale)``: the delta ``scale · B @ A`` of that module."""


def rank_bound(adapters: Sequence[LoraAdapter]) -> dict[str, int]:
    """Module path -> sum of the inputs' ranks there (the largest rank a merge can need).

    Raises:
        UnsupportedAdapterError: An input uses ``fan_in_fan_out`` or carries
            ``modules_to_save`` tensors.
    """
    bound: dict[str, int] = {}
    for adapter in adapters:
        if adapter.config.get("fan_in_fan_out"):
            raise UnsupportedAdapterError(
                f"{adapter.path}: fan_in_fan_out adapters cannot be merged into a live model",
                fix="search merges of adapters for Linear/Embedding modules (Llama-style models)")
        copies = [e for e in adapter.extras if e.endswith(".base_layer.weight")]
        if copies:  # PEFT saves these for every embedding / lm_head it adapts
            raise UnsupportedAdapterError(
                f"{adapter.path}: LoRA on embeddings or lm_head (PEFT saved their base "
                f"weights, {copies[0]}) cannot be searched: merge-search adapts Linear layers",
                fix="search merges of adapters without embed_tokens/lm_head LoRA, or merge "
                    "and gate candidates by hand")
        if adapter.extras:
            raise UnsupportedAdapterError(
                f"{adapter.path}: modules_to_save tensors ({adapter.extras[0]}, ...) are full "
                "weights, not LoRA factors",
                fix="retrain without modules_to_save to search merges, or merge by hand")
        for name, info in adapter.infos.items():
            bound[name] = bound.get(name, 0) + info.rank
    return bound


class LiveLora:
    """A loaded base model; candidate merges are written into its weights in place.

    Args:
        model: The loaded transformers model (its weights are modified in place).
        modules: Module path (as saved) -> the model's ``Linear``/``Embedding`` there.
        originals: Module path -> a copy of that module's base weight ``W0``.
        rank: The largest rank a merge of the inputs can need (:func:`rank_bound`).
    """

    def __init__(self, model: PreTrainedModel, modules: Mapping[str, torch.nn.Linear | torch.nn.Embedding],
                 originals: Mapping[str, torch.Tensor], rank: int) -> None:
        self.model, self.modules, self.rank = model, dict(modules), rank
        self.originals = dict(originals)

    @classmethod
    def attach(cls, base_model: PreTrainedModel, bound: Mapping[str, int]) -> LiveLora:
        """Take ``base_model`` (modified in place from now on) for the modules of ``bound``.

        Args:
            base_model: A loaded transformers model.
            bound: Module path -> largest rank needed (:func:`rank_bound`).

        Raises:
            UnsupportedAdapterError: No module to adapt, a module that the base lacks or
                that is neither a ``Linear`` nor an ``Embedding``, or LoRA on tied embeddings.
        """
        import torch

        if not bound:
            raise UnsupportedAdapterError("the inputs adapt no module", fix="pass LoRA adapters")
        modules: dict[str, torch.nn.Linear | torch.nn.Embedding] = {}
        originals: dict[str, torch.Tensor] = {}
        for name in sorted(bound):
            try:
                module = base_model.get_submodule(strip_prefix(name))
            except AttributeError:
                raise UnsupportedAdapterError(f"module {name} is not in the base model",
                                              fix="use adapters trained on this base model") from None
            if type(module) is not torch.nn.Linear and type(module) is not torch.nn.Embedding:
                raise UnsupportedAdapterError(
                    f"module {name} is a {type(module).__name__}, not a Linear or an Embedding",
                    fix="search merges of adapters for Linear/Embedding modules")
            modules[name] = module
            originals[name] = module.weight.detach().clone()
        tied = base_model.get_input_embeddings(), base_model.get_output_embeddings()
        if tied[1] is not None and tied[0].weight is tied[1].weight and any(
                m is tied[0] or m is tied[1] for m in modules.values()):
            # merged in place, a delta on one side lands on both (and a tied pair's twice);
            # the gate scores these adapters unmerged, which no in-place swap reproduces
            raise UnsupportedAdapterError(
                "the inputs adapt the base's tied embeddings, which a search cannot merge "
                "in place", fix="search merges of adapters that leave embed_tokens and "
                                "lm_head alone, or merge and gate candidates one by one")
        base_model.eval()
        return cls(base_model, modules, originals, max(bound.values()))

    def load_factors(self, factors: Factors) -> None:
        """Set the model to the base plus each module's ``scale · B @ A`` (see module
        docstring: the operations of PEFT's merge); modules not in ``factors`` get W0.

        Raises:
            UnsupportedAdapterError: A module that was not attached, or factors whose
                product does not have the module's weight shape.
        """
        import torch

        unknown = sorted(set(factors) - set(self.modules))
        if unknown:
            raise UnsupportedAdapterError(f"module {unknown[0]} is not in the live model",
                                          fix="swap only merges of the inputs it was built for")
        for name, (b, a, _) in factors.items():  # all checked before any weight changes
            weight = self.modules[name].weight
            embedding = isinstance(self.modules[name], torch.nn.Embedding)
            shape = tuple(weight.shape)[::-1] if embedding else tuple(weight.shape)
            if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != shape:
                raise UnsupportedAdapterError(
                    f"module {name}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                    f"its weight {tuple(weight.shape)}",
                    fix="swap only merges of adapters trained on this base model")
        with torch.no_grad():
            for name, module in self.modules.items():  # every W0 first: tied weights share
                module.weight.copy_(self.originals[name])  # storage, both deltas must land
            for name, module in self.modules.items():
                if name not in factors:
                    continue
                weight = module.weight
                b, a, scale = factors[name]
                # on the weight's device, as PEFT's merge there does (factors live on the host)
                delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                if isinstance(module, torch.nn.Embedding):  # PEFT: (B @ A).T * s, cast, added
                    weight += (delta.T * scale).to(weight.dtype)
                else:  # PEFT: W += (B @ A) * s (the add promotes to float32, then rounds)
                    weight += delta * scale

    def load(self, result: MergeResult, adapters: Sequence[LoraAdapter]) -> None:
        """Merge a result's stored factors into the base (scale 1: the engine folds
        scales and weights into them, as the written PEFT config says).

        Raises:
            UnsupportedAdapterError: The result carries extra tensors or does not fit.
        """
        keys: dict[str, LoraKeys] = {}
        for adapter in adapters:
            for name, info in adapter.infos.items():
                keys.setdefault(name, info.keys)
        factors = {name: (result.tensors[k.b], result.tensors[k.a], 1.0)
                   for name, k in keys.items() if k.a in result.tensors}
        extra = sorted(set(result.tensors) - {t for k in keys.values() for t in (k.a, k.b)})
        if extra:
            raise UnsupportedAdapterError(f"merged tensor {extra[0]} is not a LoRA factor",
                                          fix="search merges of plain LoRA adapters")
        self.load_factors(factors)

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Merge one adapter on its own into the base (``scale · B @ A``, its PEFT scale):
        a parent's or the release's baseline.

        Raises:
            UnsupportedAdapterError: The adapter adapts a module that was not attached.
        """
        self.load_factors({name: (m.B, m.A, m.scale) for name, m in adapter.modules.items()})

    def clear(self) -> None:
        """Restore every attached weight to ``W0``: the model is exactly the base again."""
        self.load_factors({})
