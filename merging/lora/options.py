"""The merge's own options, parsed once: weights and output rank.

``adapters merge`` passes ``--weights`` and ``--rank`` as written; the engine's Python
callers pass numbers. Both go through these two functions, so the command line and the
API accept the same values and refuse the rest with the same messages (the CLI kept a
second copy until the merge became one library call, :mod:`merging.lora.merge_versions`).
The methods' own parameters (density, lambda, ...) are parsed by their registry,
:meth:`merging.lora.methods.MergeMethod.resolve`. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from registry.errors import BadInputError, shorten

Rank = int | str | None
"""An output rank: a positive int, ``"full"``, or None (the method's default)."""


def parse_weights(value: str | Sequence[float] | None, count: int) -> list[float]:
    """One finite weight per input: ``"0.5,0.5"`` or ``[0.5, 0.5]``; None -> 1.0 each.

    Raises:
        BadInputError: Not numbers, not finite, or not one per input.
    """
    if value is None:
        return [1.0] * count
    if isinstance(value, str):
        try:
            weights = [float(part) for part in value.split(",")]
        except ValueError:
            raise BadInputError(f"--weights expects comma-separated numbers, got {shorten(value)}",
                                fix="write e.g. --weights 0.5,0.5") from None
        if len(weights) != count or not all(math.isfinite(w) for w in weights):
            raise BadInputError(f"--weights needs {count} finite numbers, got {shorten(value)}",
                                fix="give one weight per adapter, e.g. --weights 0.5,0.5")
        return weights
    weights = list(value)
    if len(weights) != count:
        raise BadInputError(f"{len(weights)} weights for {count} adapters",
                            fix="give one weight per adapter, e.g. --weights 0.5,0.5")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise BadInputError(f"weight {w!r} is not a finite number", fix="e.g. --weights 0.5,0.5")
    return [float(w) for w in weights]


def parse_rank(value: Rank) -> Rank:
    """``"16"`` or 16 -> 16, ``"full"`` -> ``"full"``, None -> None.

    Raises:
        BadInputError: Anything else (zero, negative, a bool, other words).
    """
    if value is None or value == "full":
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise BadInputError(f"--rank must be a positive integer or 'full', got {shorten(str(value))}",
                        fix="write e.g. --rank 16")
