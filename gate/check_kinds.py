"""Which check kinds exist and what parameters each takes, found beside their code.

A check kind is a module of :mod:`gate.checks` that declares ``PARAMS``
(:class:`CheckParams`); its name is the kind. :mod:`gate.policy` validates a policy's
checks with the declarations and the runner calls each module's ``run``. The modules
are found by listing the package directory (not by importing the package), so this
module sits below both :mod:`gate.checks` and :mod:`gate.policy` and neither cycle
back through it; they are imported once, on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gate.policy_fields import Checker

CHECKS_DIR = Path(__file__).resolve().parent / "checks"


@dataclass(frozen=True)
class CheckParams:
    """The parameters a check kind takes, declared next to its code.

    Attributes:
        listed: Place of the kind in the list of kinds that messages show (ascending).
        fields: Field -> (checker from :mod:`gate.policy_fields`, default or
            :data:`gate.policy_fields.REQUIRED`), in the order they are checked.
        files: Fields naming one data file (resolved against the policy's directory,
            hashed into the policy digest).
        file_maps: Fields mapping labels to data files (each file is ``FIELD.LABEL``).
        one_of: At least one of these fields must be set (not null) ...
        one_of_why: ... and why, for the message.
    """

    listed: int
    fields: Mapping[str, tuple[Checker, Any]]
    files: tuple[str, ...] = ()
    file_maps: tuple[str, ...] = ()
    one_of: tuple[str, ...] = ()
    one_of_why: str = "a threshold to hold"



@cache
def _modules() -> dict[str, ModuleType]:
    """Kind -> module, for every module of this package that declares ``PARAMS``."""
    found = {}
    for info in pkgutil.iter_modules([str(CHECKS_DIR)]):
        module = importlib.import_module(f"gate.checks.{info.name}")
        if isinstance(getattr(module, "PARAMS", None), CheckParams):
            found[info.name] = module
    return dict(sorted(found.items(), key=lambda item: item[1].PARAMS.listed))


def check_kinds() -> tuple[str, ...]:
    """Every check kind, in the order messages list them."""
    return tuple(_modules())


def check_module(kind: str) -> ModuleType:
    """The module of check kind ``kind`` (its ``PARAMS`` and ``run``).

    Raises:
        KeyError: An unknown kind.
    """
    return _modules()[kind]


def check_params(kind: str) -> CheckParams | None:
    """The declared parameters of ``kind``; None for an unknown kind."""
    module = _modules().get(kind)
    return None if module is None else module.PARAMS
