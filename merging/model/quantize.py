"""``adapters quantize``: a bitsandbytes-quantized copy of a model, streamed.

:func:`quantize` is the streaming rewrite (:func:`merging.model.execute.rewrite_model`)
with no adapter and a :class:`merging.model.bnb.QuantSpec`: each weight transformers
would convert is quantized as it streams (:mod:`merging.model.bnb` describes the
serialization, which transformers' ``from_pretrained`` reads back), every other tensor
is copied, and peak memory is about one module. :func:`quantize_with_transformers` is
the whole-model route, kept as the reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merging.devices import resolve_device
from merging.model.bnb import QuantSpec
from merging.model.execute import TensorCallback, rewrite_model
from merging.model.probe import config_dtype
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from merging.model.results import UnloadResult
    from registry.storage.store import Store


def quantize(model_dir: str | Path, to: str, *, out: str | Path, double_quant: bool = False,
             blocksize: int = 64, compute_dtype: str | None = None,
             skip_modules: Iterable[str] = (), max_shard_size: int | str | None = None,
             probe: bool | None = None, store: Store | None = None, name: str | None = None,
             progress: Callable[[int], None] | None = None,
             on_tensor: TensorCallback | None = None, sync: bool = True,
             device: str | torch.device = "cpu") -> UnloadResult:
    """Write a bitsandbytes-quantized copy of a model, streamed one tensor at a time.

    Args:
        model_dir: Source model (safetensors, single file or sharded).
        to: ``nf4``, ``fp4`` or ``int8``.
        out: Output directory (must not exist or be empty).
        double_quant, blocksize, compute_dtype, skip_modules: See :class:`merging.model.bnb.QuantSpec`.
        max_shard_size: Reshard the output (``"2GB"``); default keeps the source files.
        probe: Measure logits drift against the source model (default: when the
            weights are at most :data:`merging.model.probe.PROBE_MAX_BYTES`).
        store, name: Record the output in this store under ``name`` (by reference).
        progress: Called with the source bytes processed.
        on_tensor: Called with each output tensor's name after it is written.
        sync: fsync before publishing (see :func:`merging.model.unload.unload`).
        device: Where bitsandbytes quantizes (``cpu``, ``cuda``, ``auto``;
            :func:`merging.devices.resolve_device`): the output bytes are those
            transformers writes on that device.

    Returns:
        The :class:`merging.model.results.UnloadResult` (``quantization`` holds the errors).

    Raises:
        BadInputError: bad settings, an already-quantized or unsupported model, a
            device torch does not see.
        ConflictError: ``out`` exists and is not empty.
        NotFoundError: ``model_dir`` is missing.
    """
    spec = QuantSpec(to, double_quant, blocksize, compute_dtype, tuple(skip_modules),
                     device=str(resolve_device(device)))
    return rewrite_model(model_dir, out, adapter=None, quant=spec, max_shard_size=max_shard_size,
                         probe=probe, store=store, name=name, progress=progress,
                         on_tensor=on_tensor, sync=sync)


def quantize_with_transformers(model_dir: str | Path, spec: QuantSpec, out: str | Path) -> None:
    """Reference route: ``from_pretrained(quantization_config=...)`` + ``save_pretrained``.

    Loads the whole model on ``spec.device`` (where bitsandbytes quantizes it); used
    by the tests to check the streamed output.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = loads_json((Path(model_dir) / "config.json").read_text())
    dtype = config_dtype(config) or torch.float32
    qcfg = BitsAndBytesConfig.from_dict(spec.bnb_config(dtype))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg,
                                                 device_map=spec.device, dtype=dtype)
    model.save_pretrained(out)


