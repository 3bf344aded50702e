"""The merged adapter as a value: what the engine returns and every consumer reads.

:class:`MergeResult` lives apart from :mod:`merging.lora.engine` so the modules that only
read a merge (:mod:`merging.lora.peft_output`, :mod:`merging.lora.publish`,
:mod:`merging.lora.live`, the search's scoring) depend on this small module, not on the
engine, and the engine can use the PEFT writer's config builder without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeResult:
    """A merged adapter, ready for :func:`merging.lora.peft_output.write_peft_dir`.

    Attributes:
        config: The output ``adapter_config.json``.
        tensors: Output tensor name -> tensor (safetensors content).
        report: JSON-able: ``method``, ``parameters``, ``weights``, ``seed``, ``rank``,
            ``dtype``, ``modules`` (name -> ``{"rank", "error", "norm", "inputs"}``),
            ``error`` (overall relative Frobenius error), ``max_error``, ``warnings``.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    report: dict[str, Any]
