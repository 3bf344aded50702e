"""A loaded PEFT model whose LoRA factors are swapped in place: one base load, many merges.

The merge search (:mod:`gate.search`) evaluates dozens of candidate merges of the same
inputs. Writing each candidate as a PEFT directory and loading base + adapter again
would cost a model load per trial; here the base is loaded once and wrapped once:

1. :meth:`LiveLora.attach` injects LoRA layers (PEFT ``get_peft_model``) into every
   module of the inputs' union, all of one rank ``R`` = the largest sum of the inputs'
   ranks over the modules. That bound holds every result the engine can produce with
   its default rank: a dense method's output has the largest input rank, an exact or
   KnOTS-aligned one at most the sum of the ranks, ``cat`` exactly the sum. ``lora_alpha
   = R`` and every layer's ``scaling`` is set to 1, since merged factors carry their
   scales and weights folded in (:mod:`merging.lora.peft_output`).
2. :meth:`LiveLora.load` copies a :class:`merging.lora.engine.MergeResult`'s factors (as
   stored: already cast to the output dtype) into the first ``k`` rows of each A and
   columns of each B and zeroes the rest, so ``B @ A`` is exactly the merged delta; a
   module the result lacks gets zeros (no delta). :meth:`LiveLora.load_factors` does
   the same from ``{module: (B, A)}`` (a parent's own ``s·B``, ``A``), and
   :meth:`LiveLora.clear` zeroes everything: the model is then exactly the base.

Nothing is written to disk and no weights are reloaded; a swap is a few ``copy_`` calls.
The forward pass is PEFT's unmerged LoRA path (``W x + B (A x)``), which agrees with the
gate's ``merge_and_unload`` model up to float rounding; the gate run on the pushed pick
is the verdict that counts. Only plain LoRA on linear and embedding modules is
supported (the engine already refuses DoRA, biases and the rest); ``fan_in_fan_out``
inputs and ``modules_to_save`` tensors are refused, since they are not factor swaps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from registry.errors import UnsupportedAdapterError
from registry.formats.peft_keys import strip_prefix

if TYPE_CHECKING:
    import torch

    from merging.adapter import LoraAdapter
    from merging.lora.results import MergeResult

ADAPTER_NAME = "default"


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
                f"{adapter.path}: fan_in_fan_out adapters cannot be swapped into a live model",
                fix="search merges of adapters for Linear/Embedding modules (Llama-style models)")
        if adapter.extras:
            raise UnsupportedAdapterError(
                f"{adapter.path}: modules_to_save tensors ({adapter.extras[0]}, ...) are full "
                "weights, not LoRA factors",
                fix="retrain without modules_to_save to search merges, or merge by hand")
        for name, info in adapter.infos.items():
            bound[name] = bound.get(name, 0) + info.rank
    return bound


class LiveLora:
    """A base model wrapped once by PEFT; candidate factors are swapped in place.

    Args:
        model: The ``PeftModel`` (from :meth:`attach`).
        modules: Module path (as saved) -> the injected LoRA layer.
        rank: The injected rank ``R``.
    """

    def __init__(self, model: Any, modules: Mapping[str, Any], rank: int) -> None:
        self.model, self.modules, self.rank = model, dict(modules), rank

    @classmethod
    def attach(cls, base_model: Any, bound: Mapping[str, int]) -> LiveLora:
        """Inject rank-``max(bound)`` LoRA layers into ``base_model`` (modified in place).

        Args:
            base_model: A loaded transformers model (it becomes the PEFT model's base).
            bound: Module path -> largest rank needed (:func:`rank_bound`).

        Raises:
            UnsupportedAdapterError: No module to adapt, or a module PEFT cannot wrap.
        """
        from peft import LoraConfig, get_peft_model

        if not bound:
            raise UnsupportedAdapterError("the inputs adapt no module", fix="pass LoRA adapters")
        rank = max(bound.values())
        targets = sorted(strip_prefix(name) for name in bound)
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                            target_modules=targets)
        try:
            model = get_peft_model(base_model, config, adapter_name=ADAPTER_NAME)
        except (ValueError, TypeError) as err:
            raise UnsupportedAdapterError(f"cannot wrap the base with the inputs' modules: {err}",
                                          fix="use adapters trained on this base model") from None
        layers = {}
        for name in bound:
            layer = model.get_submodule(name)
            if ADAPTER_NAME not in getattr(layer, "scaling", {}):
                raise UnsupportedAdapterError(f"module {name} did not get a LoRA layer",
                                              fix="use adapters trained on this base model")
            layer.scaling[ADAPTER_NAME] = 1.0
            layers[name] = layer
        model.eval()
        live = cls(model, layers, rank)
        live.clear()
        return live

    def _params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.modules[name]
        if ADAPTER_NAME in getattr(layer, "lora_A", {}):
            return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        return layer.lora_embedding_A[ADAPTER_NAME], layer.lora_embedding_B[ADAPTER_NAME]

    def load_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set each module's delta to ``B @ A`` (``factors``: path -> (B, A)); others to 0.

        Raises:
            UnsupportedAdapterError: A module was not injected, or its rank exceeds ``R``.
        """
        import torch

        unknown = sorted(set(factors) - set(self.modules))
        if unknown:
            raise UnsupportedAdapterError(f"module {unknown[0]} is not in the live model",
                                          fix="swap only merges of the inputs it was built for")
        with torch.no_grad():
            for name in self.modules:
                a_param, b_param = self._params(name)
                if name not in factors:
                    a_param.zero_()
                    b_param.zero_()
                    continue
                b, a = factors[name]
                k = a.shape[0]
                if k > self.rank or tuple(b.shape) != (b_param.shape[0], k) \
                        or a.shape[1] != a_param.shape[1]:
                    raise UnsupportedAdapterError(
                        f"module {name}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                        f"the live rank-{self.rank} layer", fix="merge with the default rank")
                a_param[:k].copy_(a)
                a_param[k:].zero_()
                b_param[:, :k].copy_(b)
                b_param[:, k:].zero_()

    def load(self, result: MergeResult, adapters: Sequence[LoraAdapter]) -> None:
        """Swap in a merge result's stored factors (scale 1: the engine folds scales in).

        Raises:
            UnsupportedAdapterError: The result carries extra tensors or does not fit.
        """
        keys = {}
        for adapter in adapters:
            for name, info in adapter.infos.items():
                keys.setdefault(name, info.keys)
        factors = {name: (result.tensors[k.b], result.tensors[k.a]) for name, k in keys.items()
                   if k.a in result.tensors}
        extra = sorted(set(result.tensors) - {t for k in keys.values() for t in (k.a, k.b)})
        if extra:
            raise UnsupportedAdapterError(f"merged tensor {extra[0]} is not a LoRA factor",
                                          fix="search merges of plain LoRA adapters")
        self.load_factors(factors)

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Swap in one adapter on its own (``s·B``, ``A``): a parent's baseline."""
        self.load_factors({name: (m.B.float() * m.scale, m.A.float())
                           for name, m in adapter.modules.items()})

    def clear(self) -> None:
        """Zero every LoRA factor: the model computes exactly the base model."""
        self.load_factors({})
