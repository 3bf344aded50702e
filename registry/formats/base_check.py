"""Does an adapter fit a base model? Shapes from headers only, no weights read.

Each LoRA module's base weight (via :func:`registry.formats.fingerprint.model_weight_shapes`)
must exist and have shape ``(out, in)``, or ``(in, out)`` for a ``Conv1D`` module (PEFT
transposes exactly those, whatever ``fan_in_fan_out`` says; headers cannot tell, so the
model's skeleton does: :func:`registry.formats.architecture.conv1d_weights`, with the flag
deciding when the architecture cannot be built); ``(num_embeddings, dim)`` for embeddings); the first offender raises
``BaseMismatchError`` naming the module and both shapes. A LoRA on ``lm_head`` of a
model with tied embeddings is checked against the input embedding. Extra tensors
(``modules_to_save`` copies) must match their base tensor when the base has one.

Used by ingest (``push --base``), the structural gate check and merge-and-unload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from registry.errors import BaseMismatchError
from registry.formats.architecture import conv1d_weights
from registry.formats.fingerprint import model_config, model_weight_shapes
from registry.formats.peft_keys import LoraKeys, base_key_for_extra, base_weight_key
from registry.formats.safetensors_header import SafetensorsHeader

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                      "embed_in.weight")
"""Names of input-embedding weights (a tied ``lm_head`` shares one of them)."""


def check_against_base(
    modules: dict[str, LoraKeys],
    extras: list[str],
    header: SafetensorsHeader,
    config: dict[str, Any],
    base_dir: str | Path,
) -> None:
    """Check that every adapted module fits the base model's weight shapes.

    Args:
        modules: LoRA modules (from :func:`registry.ingest.check_adapter_tensors`).
        extras: Non-LoRA tensors of the adapter.
        header: The adapter's header.
        config: The adapter's config.
        base_dir: The base model directory (headers are read, not weights).

    Raises:
        BaseMismatchError: the first module (in name order) whose base weight is
            missing or has another shape; the message names it and both shapes.
        NotFoundError: ``base_dir`` does not exist.
        BadInputError: ``base_dir`` holds no valid safetensors weights.
    """
    shapes = model_weight_shapes(base_dir)
    base_config = model_config(base_dir) or {}
    fix = "check that the base model is the one this adapter was trained on"
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    conv1d: set[str] | None = None
    for module, keys in modules.items():
        key = base_weight_key(module)
        got = _base_shape(key, shapes, base_config)
        a, b = header.tensors[keys.a], header.tensors[keys.b]
        if keys.embedding:
            expected = (a.shape[1], b.shape[0])
        else:  # PEFT transposes on Conv1D modules whatever fan_in_fan_out says; headers do
            # not tell a Conv1D from a Linear, so the model's skeleton decides (built once,
            # only for a module stored transposed: a Linear adapter never needs it)
            expected = (b.shape[0], a.shape[1])
            if got == (a.shape[1], b.shape[0]) != expected:
                if conv1d is None:
                    conv1d = conv1d_weights(base_config) if base_config else None
                if (key in conv1d) if conv1d is not None else fan_in_fan_out:
                    expected = got
        if got is None:
            raise BaseMismatchError(
                f"module {module}: the base model has no weight {key!r}", fix=fix
            )
        if got != expected:
            raise BaseMismatchError(
                f"module {module}: adapter needs base weight {key} of shape {expected} "
                f"but the base has {got}",
                fix=fix,
            )
    for name in extras:
        key = base_key_for_extra(name)
        got = shapes.get(key)
        mine = header.tensors[name].shape
        if got is not None and got != mine:
            raise BaseMismatchError(
                f"tensor {name}: shape {mine} but the base tensor {key} has {got}", fix=fix
            )


def _base_shape(
    key: str, shapes: dict[str, tuple[int, ...]], base_config: dict[str, Any]
) -> tuple[int, ...] | None:
    if key in shapes:
        return shapes[key]
    tied = base_config.get("tie_word_embeddings")
    text = base_config.get("text_config")
    if tied is None and isinstance(text, dict):
        tied = text.get("tie_word_embeddings")
    if key.endswith("lm_head.weight") and tied is True:
        embeddings = [k for k in shapes if k.endswith(EMBEDDING_SUFFIXES)]
        if len(embeddings) == 1:
            return shapes[embeddings[0]]
    return None
