"""Where merges, quantization and gate evaluations run: one resolver for ``--device``.

Every command that computes on tensors (``merge``, ``quantize``, ``unload --quantize``,
``gate``, ``merge-search``) takes ``--device cpu|cuda|auto`` and every library function
behind them a ``device`` argument; they all go through :func:`resolve_device`, so the
spelling, the default and the error for an unusable device are the same everywhere.

``auto`` means CUDA when torch sees a CUDA device, else the CPU. ``cuda`` (or
``cuda:N``) on a machine where torch sees no CUDA device is refused with a
:class:`registry.errors.BadInputError` (exit 2) naming the fix, before any work is
done, rather than failing deep inside a kernel. Other torch device strings (``mps``,
...) are passed through as torch parses them, for the gate, which only moves a model.

torch is imported inside :func:`resolve_device`, so the CLI can import this module
at start-up for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry.errors import BadInputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("cpu", "cuda", "auto")
"""The documented spellings of ``--device`` (``cuda:N`` is accepted too)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device that ``--device`` names.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (None means
            ``"auto"``): CUDA when torch sees a CUDA device, else the CPU), or a
            :class:`torch.device`.

    Returns:
        The :class:`torch.device`.

    Raises:
        BadInputError: An unknown device name, or a CUDA device when torch sees none
            (or fewer than the index asks for).
    """
    import torch

    if isinstance(device, torch.device):
        chosen = device
    else:
        text = (device or "auto").strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            chosen = torch.device(text)
        except RuntimeError:
            raise BadInputError(f"unknown device {device!r}",
                                fix="use --device cpu, cuda or auto") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError("--device cuda: torch sees no CUDA device on this machine",
                                fix="use --device cpu (or auto), or install a CUDA build of torch "
                                    "on a machine with an NVIDIA GPU")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {chosen}: torch sees only "
                                f"{torch.cuda.device_count()} CUDA device(s)",
                                fix="use --device cuda (the first device) or a smaller index")
    return chosen
