"""Registry of merge methods: one small file per method, found by name.

A method merges the inputs of *one module* and returns either exact factors
(:class:`Factors`, for methods whose result is a sum of the inputs' deltas:
``linear``, ``task_arithmetic``, ``cat``) or the dense float32 merged delta
(TIES, DARE, magnitude pruning, which act entry by entry and must see the true
delta ``s·B·A``). The method's ``output`` says what the engine
(:mod:`merging.engine`) does with the result: ``"exact"`` factors are re-factored
exactly to their true rank (QR + small SVD), ``"concat"`` factors are stored as
they are, ``"dense"`` deltas are re-factored by truncated randomized SVD to the
requested rank (:mod:`merging.refactor`); the error is measured in every case.

Adding a method touches one file::

    # merging/methods/my_method.py
    from merging.methods import register_method

    @register_method("my_method", output="dense", params={"density", "lambda"},
                     summary="what it does")
    def my_method(inputs, params, ctx):
        ...  # return Factors(B, A) or a dense (out, in) float32 tensor

and one line in :data:`_BUILTIN` below. ``params`` lists the optional parameters
the method accepts (``density``, ``lambda``, ``normalize``, ``sign_election``);
giving any other one explicitly is an error, so a typo never passes silently.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from registry.errors import BadInputError

if TYPE_CHECKING:
    import torch

PARAMETERS = ("density", "lambda", "normalize", "sign_election")
OUTPUTS = ("exact", "concat", "dense")
SIGN_ELECTIONS = ("sum", "frequency", "mergekit")
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class ModuleInput:
    """One input adapter's contribution to a module.

    Attributes:
        index: Position of the adapter among all inputs (0-based).
        B: ``(out, r)`` float32 with the LoRA scale already folded in (``s·B``).
        A: ``(r, in)`` float32.
        weight: The adapter's merge weight.
    """

    index: int
    B: torch.Tensor
    A: torch.Tensor
    weight: float


@dataclass(frozen=True)
class MergeParams:
    """Resolved method parameters (defaults filled in).

    Attributes:
        density: Fraction of entries kept per tensor, in (0, 1] (TIES, DARE, prune).
        lam: ``lambda``: the merged delta is multiplied by it.
        normalize: Divide by the sum of all input weights.
        sign_election: ``sum`` | ``frequency`` | ``mergekit`` (TIES-style methods).
        weight_sum: Sum of *all* inputs' weights (a module missing from an input
            still counts its weight: that input contributes a zero delta).
    """

    density: float = DEFAULT_DENSITY
    lam: float = 1.0
    normalize: bool = False
    sign_election: str = "sum"
    weight_sum: float = 0.0


@dataclass(frozen=True)
class ModuleContext:
    """Where a method runs: the module and the run's seed.

    Attributes:
        name: Module path as saved.
        shape: ``(out, in)`` of the module's delta.
        seed: The run's seed (DARE masks, randomized SVD).
    """

    name: str
    shape: tuple[int, int]
    seed: int

    def generator(self, *parts: object) -> torch.Generator:
        """A CPU generator seeded from ``sha256(seed, module name, *parts)``.

        Independent of module order, threads and Python's hash randomisation.
        """
        import torch

        text = "\x1f".join(str(p) for p in (self.seed, self.name, *parts))
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
        return torch.Generator(device="cpu").manual_seed(seed)


@dataclass(frozen=True)
class Factors:
    """An exact factored result ``B @ A`` (B ``(out, k)``, A ``(k, in)``, float32)."""

    B: torch.Tensor
    A: torch.Tensor


MethodResult = Union[Factors, "torch.Tensor"]
MethodFn = Callable[[Sequence[ModuleInput], MergeParams, ModuleContext], MethodResult]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method.

    Attributes:
        name: CLI/library name.
        fn: ``fn(inputs, params, ctx) -> Factors | Tensor``.
        output: ``"exact"`` | ``"concat"`` (fn returns :class:`Factors`) or ``"dense"``.
        params: Optional parameters it accepts.
        summary: One line for ``--help`` and the README.
    """

    name: str
    fn: MethodFn
    output: str
    params: frozenset[str]
    summary: str

    def resolve(self, given: dict[str, Any] | None, weights: Sequence[float]) -> MergeParams:
        """Check explicitly given parameters and fill in defaults.

        Raises:
            BadInputError: Unknown parameter, one this method ignores, density outside
                (0, 1], non-finite lambda, unknown sign election.
        """
        # None (and normalize=False) mean "not chosen": they never trip the checks below
        given = {k: v for k, v in (given or {}).items()
                 if v is not None and not (k == "normalize" and v is False)}
        for key in given:
            if key not in PARAMETERS:
                raise BadInputError(f"unknown merge parameter {key!r}",
                                    fix=f"use one of {', '.join(PARAMETERS)}")
            if key not in self.params:
                accepted = ", ".join(sorted(self.params)) or "none"
                raise BadInputError(f"--{key.replace('_', '-')} does not apply to method {self.name}",
                                    fix=f"{self.name} accepts: {accepted}")
        density = given.get("density", DEFAULT_DENSITY)
        if (isinstance(density, bool) or not isinstance(density, (int, float))
                or not 0.0 < float(density) <= 1.0):
            raise BadInputError(f"density must be in (0, 1], got {density!r}",
                                fix="pass e.g. --density 0.5 (the fraction of entries kept)")
        lam = given.get("lambda", 1.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam != lam \
                or abs(lam) == float("inf"):
            raise BadInputError(f"lambda must be a finite number, got {lam!r}", fix="pass e.g. --lambda 1.0")
        election = given.get("sign_election", "sum")
        if election not in SIGN_ELECTIONS:
            raise BadInputError(f"unknown sign election {election!r}",
                                fix=f"use one of {', '.join(SIGN_ELECTIONS)}")
        weight_sum = float(sum(weights))
        normalize = bool(given.get("normalize", False))
        if normalize and abs(weight_sum) < 1e-12:
            raise BadInputError("--normalize divides by the sum of the weights, which is 0",
                                fix="choose weights that do not sum to zero, or drop --normalize")
        return MergeParams(density=float(density), lam=float(lam),
                           normalize=normalize, sign_election=election, weight_sum=weight_sum)

    def recorded(self, params: MergeParams) -> dict[str, Any]:
        """Every parameter this method uses, for the lineage recipe."""
        values = {"density": params.density, "lambda": params.lam,
                  "normalize": params.normalize, "sign_election": params.sign_election}
        return {k: values[k] for k in PARAMETERS if k in self.params}


METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, output: str, params: set[str] | frozenset[str] = frozenset(),
                    summary: str = "") -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn`` under ``name``.

    Raises:
        ValueError: The name is taken, or a parameter or output kind is unknown
            (programming errors).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    unknown = set(params) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for method {name}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in METHODS and METHODS[name].fn is not fn:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, fn, output, frozenset(params), summary)
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Raises:
        BadInputError: No such method (the message lists the known ones).
    """
    method = METHODS.get(name)
    if method is None:
        raise BadInputError(f"unknown merge method {name!r}",
                            fix=f"use one of {', '.join(sorted(METHODS))}")
    return method


_BUILTIN = ("linear", "task_arithmetic", "cat", "ties", "dare", "magnitude_prune")
for _module in _BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")
