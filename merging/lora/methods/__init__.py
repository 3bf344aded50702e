"""Registry of merge methods: one small file per method, found by name.

A method merges the inputs of *one module* and returns either exact factors
(:class:`Factors`, for methods whose result is a sum of the inputs' deltas:
``linear``, ``task_arithmetic``, ``cat``) or the dense float32 merged delta
(TIES, DARE, magnitude pruning, which act entry by entry and must see the true
delta ``s·B·A``). The method's ``output`` says what the engine
(:mod:`merging.lora.engine`) does with the result: ``"exact"`` factors are re-factored
exactly to their true rank (QR + small SVD), ``"concat"`` factors are stored as
they are, ``"dense"`` deltas are re-factored by truncated randomized SVD to the
requested rank (:mod:`merging.lora.factorize`); the error is measured in every case.

Adding a method touches one file::

    # merging/lora/methods/my_method.py
    from merging.lora.methods import register_method

    @register_method("my_method", output="dense", params={"density", "lambda"},
                     summary="what it does")
    def my_method(inputs, params, ctx):
        ...  # return Factors(B, A) or a dense (out, in) float32 tensor

Every module of this package is imported when the registry is (sorted by name),
so nothing else needs editing. ``params`` lists the optional parameters the method
accepts (see :data:`PARAMETER_HELP` for each one's meaning, default and bounds);
giving any other one explicitly is an error, so a typo never passes silently.
``align`` (:data:`ALIGNMENTS`, :mod:`merging.lora.align`) is accepted by every
``"dense"`` (entry-wise) method without being listed.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from registry.errors import BadInputError, MergeRangeError

if TYPE_CHECKING:
    import torch

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: weights and lambda beyond it cannot scale a float32 delta."""
FLOAT32_TINY = 1.1754943508222875e-38
"""Smallest normal float32: a smaller density rounds DARE's ``1/density`` rescale to inf."""
PARAMETERS = ("density", "lambda", "normalize", "sign_election", "gamma", "epsilon", "align")
OUTPUTS = ("exact", "concat", "dense")
SIGN_ELECTIONS = ("sum", "frequency", "mergekit")
ALIGNMENTS = ("knots",)
DEFAULT_DENSITY = 0.5
DEFAULT_GAMMA = 0.01
"""mergekit's default for ``breadcrumbs``/``breadcrumbs_ties``."""
DEFAULT_EPSILON = 0.15
"""mergekit's default for ``della``/``della_linear``."""
ALIGNED = frozenset({"align"})
"""Parameters every entry-wise (``output="dense"``) method takes without declaring them."""

PARAMETER_HELP = {
    "density": "Fraction of entries kept per tensor, in (0, 1] (default 0.5).",
    "lambda": "Scale of the merged delta, any finite number (default 1).",
    "normalize": "Divide by the sum of the weights (which must not be 0).",
    "sign_election": "sum (default) | frequency | mergekit.",
    "gamma": "Fraction of largest magnitudes dropped as outliers per tensor, in [0, 1) "
             "(default 0.01; breadcrumbs*).",
    "epsilon": "Half-width of the keep probabilities density ± epsilon, >= 0 with "
               "density ± epsilon in (0, 1) (default 0.15; della*).",
    "align": "knots: merge in the shared SVD basis of the inputs' deltas (KnOTS; any "
             "entry-wise method).",
}
"""One line per parameter (meaning, bounds, default): ``--help`` and the README."""


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
        gamma: Fraction of largest magnitudes dropped as outliers, in [0, 1)
            (breadcrumbs).
        epsilon: Keep probabilities range over ``density ± epsilon`` (DELLA).
        align: None, or ``"knots"`` (:mod:`merging.lora.align`).
    """

    density: float = DEFAULT_DENSITY
    lam: float = 1.0
    normalize: bool = False
    sign_election: str = "sum"
    weight_sum: float = 0.0
    gamma: float = DEFAULT_GAMMA
    epsilon: float = DEFAULT_EPSILON
    align: str | None = None


@dataclass(frozen=True)
class ModuleContext:
    """Where a method runs: the module and the run's seed.

    Attributes:
        name: Module path as saved.
        shape: ``(out, in)`` of the module's delta.
        seed: The run's seed (DARE masks, randomized SVD).
        transposed: The model stores this module's weight as the transpose of ``B @ A``
            (embeddings, ``fan_in_fan_out`` layers): a method that works on the rows of
            the weight (DELLA) works on the columns of the delta.
    """

    name: str
    shape: tuple[int, int]
    seed: int
    transposed: bool = False

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
GroupSelectFn = Callable[["torch.Tensor", Sequence[Sequence[ModuleInput]], Sequence[ModuleContext],
                          MergeParams], None]
"""``select(deltas, group, contexts, params)``: a dense method's entry-wise step (trim, drop,
band) applied in place to a group's ``(modules, inputs, out, in)`` float32 true deltas;
``deltas[m, i]`` is ``group[m][i]``'s delta in module ``contexts[m]``."""


@dataclass(frozen=True)
class GroupedForm:
    """How a dense method merges a group of same-shaped modules at once
    (:mod:`merging.lora.device_trim`: one batched product, one selection, one combine),
    the engine's path on a GPU, where merging modules one at a time is bound by kernel
    launches. Its result must be the per-module ``fn``'s, bit for bit on the CPU.

    Attributes:
        select: The entry-wise step (:data:`GroupSelectFn`).
        elect: Combine by sign election and disjoint mean (TIES family), else a
            weighted sum (``normalize`` honoured).
    """

    select: GroupSelectFn
    elect: bool


@dataclass(frozen=True)
class MergeMethod:
    """A registered method.

    Attributes:
        name: CLI/library name.
        fn: ``fn(inputs, params, ctx) -> Factors | Tensor``.
        output: ``"exact"`` | ``"concat"`` (fn returns :class:`Factors`) or ``"dense"``.
        params: Optional parameters it accepts.
        summary: One line for ``--help`` and the README.
        grouped: How to merge same-shaped modules together (dense methods that have
            one; the engine merges the others module by module).
    """

    name: str
    fn: MethodFn
    output: str
    params: frozenset[str]
    summary: str
    grouped: GroupedForm | None = None

    @property
    def accepted(self) -> frozenset[str]:
        """The parameters this method takes: its own, plus ``align`` if entry-wise."""
        return self.params | ALIGNED if self.output == "dense" else self.params

    def resolve(self, given: dict[str, Any] | None, weights: Sequence[float]) -> MergeParams:
        """Check explicitly given parameters and fill in defaults.

        Raises:
            BadInputError: Unknown parameter, one this method ignores, density outside
                (0, 1], non-finite lambda, unknown sign election, gamma outside [0, 1),
                epsilon negative or with density ± epsilon outside (0, 1), unknown
                alignment, ``normalize`` with weights summing to 0.
        """
        # None (and normalize=False) mean "not chosen": they never trip the checks below
        given = {k: v for k, v in (given or {}).items()
                 if v is not None and not (k == "normalize" and v is False)}
        for key in given:
            if key not in PARAMETERS:
                raise BadInputError(f"unknown merge parameter {key!r}",
                                    fix=f"use one of {', '.join(PARAMETERS)}")
            if key not in self.accepted:
                accepted = ", ".join(sorted(self.accepted)) or "none"
                fix = f"{self.name} accepts: {accepted}"
                if key in ALIGNED:
                    fix += "; --align works with the entry-wise methods: " + ", ".join(
                        sorted(n for n, m in METHODS.items() if m.output == "dense"))
                raise BadInputError(f"--{key.replace('_', '-')} does not apply to method {self.name}",
                                    fix=fix)
        # float32's smallest normal: below it 1/density (DARE's rescale) is not a float32
        density = _number(given, "density", DEFAULT_DENSITY, lambda v: FLOAT32_TINY <= v <= 1.0,
                          "must be in (0, 1] and at least 1.2e-38 (float32)",
                          "pass e.g. --density 0.5 (the fraction of entries kept)")
        lam = _number(given, "lambda", 1.0, math.isfinite, "must be a finite number",
                      "pass e.g. --lambda 1.0")
        gamma = _number(given, "gamma", DEFAULT_GAMMA, lambda v: 0.0 <= v < 1.0,
                        "must be in [0, 1)", "pass e.g. --gamma 0.01 (the fraction of outliers dropped)")
        epsilon = _epsilon(given, density) if "epsilon" in self.params else DEFAULT_EPSILON
        election = given.get("sign_election", "sum")
        if election not in SIGN_ELECTIONS:
            raise BadInputError(f"unknown sign election {election!r}",
                                fix=f"use one of {', '.join(SIGN_ELECTIONS)}")
        align = given.get("align")
        if align is not None and align not in ALIGNMENTS:
            raise BadInputError(f"unknown alignment {align!r}", fix=f"use one of {', '.join(ALIGNMENTS)}")
        too_big = [v for v in (lam, *weights) if abs(float(v)) > FLOAT32_MAX]
        if too_big:  # every delta is computed in float32: such a factor cannot even be applied
            raise MergeRangeError(f"weight or lambda {too_big[0]:g} does not fit float32 "
                                  f"(at most {FLOAT32_MAX:.3g})",
                                  fix="use smaller --weights or --lambda")
        weight_sum = float(sum(weights))
        normalize = bool(given.get("normalize", False))
        if normalize and abs(weight_sum) < 1e-12:
            raise BadInputError("--normalize divides by the sum of the weights, which is 0",
                                fix="choose weights that do not sum to zero, or drop --normalize")
        return MergeParams(density=density, lam=lam, normalize=normalize, sign_election=election,
                           weight_sum=weight_sum, gamma=gamma, epsilon=epsilon, align=align)

    def recorded(self, params: MergeParams) -> dict[str, Any]:
        """Every parameter this method uses, for the lineage recipe (``align`` when set)."""
        values = {"density": params.density, "lambda": params.lam,
                  "normalize": params.normalize, "sign_election": params.sign_election,
                  "gamma": params.gamma, "epsilon": params.epsilon, "align": params.align}
        return {k: values[k] for k in PARAMETERS
                if k in self.params or (k in ALIGNED and values[k] is not None)}


def _number(given: dict[str, Any], key: str, default: float, ok: Callable[[float], bool],
            bounds: str, fix: str) -> float:
    """``given[key]`` (or ``default``) as a float, checked by ``ok``.

    Raises:
        BadInputError: Not a number (booleans included), NaN, or ``ok`` is false.
    """
    value = given.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or not ok(float(value)):
        raise BadInputError(f"{key} {bounds}, got {value!r}", fix=fix)
    return float(value)


def _epsilon(given: dict[str, Any], density: float) -> float:
    """DELLA's epsilon: >= 0, and density ± epsilon in (0, 1) unless density is 1.

    mergekit's ``della_magprune`` refuses the same values (density 1 keeps everything
    and ignores epsilon).

    Raises:
        BadInputError: Negative, not finite, or pushes a probability out of (0, 1).
    """
    epsilon = _number(given, "epsilon", DEFAULT_EPSILON, lambda v: 0.0 <= v < 1.0,
                      "must be in [0, 1)", "pass e.g. --epsilon 0.15")
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise BadInputError(
            f"density ± epsilon must lie in (0, 1), got density {density:g} and epsilon {epsilon:g}",
            fix="choose epsilon < min(density, 1 - density), e.g. --epsilon "
                f"{max(min(density, 1.0 - density) / 2, 0.0):.3g}")
    return epsilon


METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, output: str, params: set[str] | frozenset[str] = frozenset(),
                    summary: str = "", grouped: GroupedForm | None = None
                    ) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn`` under ``name``.

    Raises:
        ValueError: The name is taken, or a parameter or output kind is unknown, or a
            non-dense method has a grouped form (programming errors).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if grouped is not None and output != "dense":
        raise ValueError(f"method {name}: only dense methods have a grouped form")
    unknown = set(params) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for method {name}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in METHODS and METHODS[name].fn is not fn:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, fn, output, frozenset(params), summary, grouped)
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


def _import_all() -> None:
    """Import every module of this package (sorted), registering its methods."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
