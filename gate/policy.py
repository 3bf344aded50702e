"""Gate policies: a YAML file, validated by hand, with a digest that binds its data.

A policy says which checks a candidate must pass and with which thresholds::

    version: 1
    seed: 0                       # torch.manual_seed before every evaluation
    dtype: float32                # float32 | bfloat16 | float16 (evaluation dtype, CPU)
    max_length: 512               # token window for perplexity and log-likelihood
    release: null                 # ref of the 'release' baseline (default <candidate name>:release)
    require_source_gate: false    # promote also needs passing records for the lineage (custody)
    checks:
      - kind: structural          # finite tensors, shapes vs base, fingerprint, serving
        max_rank: 64
      - kind: merge_equivalence   # linear-family merges only; others are skipped
        prompts: ["The capital of France is"]
        max_abs_diff: 0.001
      - kind: perplexity
        data: data/heldout.jsonl  # JSONL {"text": ...} or plain text (blank-line separated)
        baseline: base            # base | parents | release
        max_increase: 0.05        # candidate <= baseline * (1 + 0.05)
      - kind: retention
        sets: {adapter-a: data/a_eval.jsonl}   # parent name -> JSONL {"prompt", "answer"}
        metric: exact_match       # exact_match | loglik
        min_ratio: 0.9
      - kind: generation
        prompts: ["Tell me a joke."]
        max_repeat_fraction: 0.5
      - kind: drift               # derived models vs their source; adapters skip it
        data: data/heldout.jsonl
        max_kl: 0.05              # and/or min_top1, max_logit_diff

Every check has a ``kind`` and an optional unique ``name`` (default: the kind).
Unknown keys are errors, not warnings: a misspelt threshold in a release gate must
not silently fall back to a default. Errors name the field (``checks[2].min_ratio``)
and exit 2.

Relative paths are resolved against the policy file's directory, and a data file must
stay inside it: each path is resolved with ``os.path.realpath`` (symlinks followed) and
checked with ``os.path.commonpath``, so ``../../etc/passwd``, ``/proc/self/environ``, any
absolute path elsewhere or a symlink pointing out is refused (exit 2, naming the field)
unless ``allow_outside_data=True`` (``adapters gate --allow-outside-data``). The policy digest
is ``sha256`` of the canonical JSON of ``{"policy": <validated policy with defaults
filled in, paths as written>, "data": {<path as written>: <sha256 of the file>}}``:
editing a threshold *or an eval set* changes the digest, so a gate record can never
vouch for data it did not see, while moving the checkout elsewhere does not.

A policy file is untrusted input. :func:`load_policy` reads at most
:data:`MAX_POLICY_BYTES` and parses with :func:`gate.safe_yaml.load_yaml`, which bounds
the document's size with YAML aliases expanded (a 470-byte "billion laughs" expands into
gigabytes through them) and its nesting (:data:`MAX_DEPTH`). Every
error is a one-line :class:`~registry.errors.BadInputError` whose values are shown with a
bounded ``repr`` (:func:`_show`, at most 200 characters), never the whole structure.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from registry.digests import canonical_json, sha256_digest
from registry.errors import BadInputError

POLICY_VERSION = 1
CHECK_KINDS = ("structural", "merge_equivalence", "perplexity", "retention", "generation", "drift")
BASELINES = ("base", "parents", "release")
DTYPES = ("float32", "bfloat16", "float16")
LINEAR_METHODS = ("linear", "cat", "task_arithmetic")
FIX = "see examples/gate.yaml for a documented policy"
MAX_POLICY_BYTES = 1 << 20
"""Largest policy file read (a real policy is a few hundred bytes)."""
MAX_DEPTH = 32
"""Deepest nesting of YAML collections accepted."""
MAX_SHOWN = 200
_MISSING = object()
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6


def _show(value: Any) -> str:
    """A ``repr`` of an untrusted value bounded in depth, width and to 200 characters."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


@dataclass(frozen=True)
class CheckSpec:
    """One validated check: its ``kind``, unique ``name`` and parameters (defaults filled)."""

    kind: str
    name: str
    params: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def path(self, key: str) -> Path:
        """An absolute path parameter (resolved against the policy directory)."""
        return Path(self.params["_paths"][key])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name,
                **{k: v for k, v in self.params.items() if not k.startswith("_")}}


@dataclass(frozen=True)
class Policy:
    """A validated gate policy.

    Attributes:
        checks: The checks, in file order.
        digest: ``sha256:`` digest of the policy and its data files (see module doc).
        source: The file it was read from, if any.
        data_digests: Path as written -> sha256 of that file.
    """

    version: int
    seed: int
    dtype: str
    max_length: int
    release: str | None
    checks: tuple[CheckSpec, ...]
    digest: str
    source: str | None = None
    data_digests: Mapping[str, str] = field(default_factory=dict)
    require_source_gate: bool = False

    def to_json(self) -> dict[str, Any]:
        """The canonical policy object (what the digest covers, minus the data digests).

        ``require_source_gate`` appears only when true, so the digests of policies
        without it are what they were before the field existed."""
        custody = {"require_source_gate": True} if self.require_source_gate else {}
        return {"version": self.version, "seed": self.seed, "dtype": self.dtype,
                "max_length": self.max_length, "release": self.release, **custody,
                "checks": [c.to_json() for c in self.checks]}

    def canonical_bytes(self) -> bytes:
        """The exact bytes whose sha256 is :attr:`digest` (stored as a blob by the gate)."""
        return canonical_json({"policy": self.to_json(), "data": dict(self.data_digests)})


# --- field validators: each returns the cleaned value or raises via _bad -------------

def _bad(where: str, msg: str, got: Any = _MISSING) -> BadInputError:
    detail = "" if got is _MISSING else f", got {_show(got)}"
    where = where if len(where) <= MAX_SHOWN else where[: MAX_SHOWN - 3] + "..."
    return BadInputError(f"policy field {where} {msg}{detail}", fix=FIX)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(where, "must be true or false", v)
    return v


def _int(lo: int | None = None) -> Callable[[Any, str], int]:
    def check(v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            raise _bad(where, f"must be an integer{'' if lo is None else f' >= {lo}'}", v)
        return v
    return check


_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _num(lo: float | None = None, hi: float | None = None) -> Callable[[Any, str], float]:
    def check(v: Any, where: str) -> float:
        if isinstance(v, str) and _EXPONENT.fullmatch(v.strip()):
            v = float(v)  # PyYAML (YAML 1.1) reads 1e-3 as a string; accept it as the number
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
            raise _bad(where, f"must be a finite number{rng}", v)
        return float(v)
    return check


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def check(v: Any, where: str) -> str:
        if v not in choices:
            raise _bad(where, f"must be one of {', '.join(choices)}", v)
        return v
    return check


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(where, "must be a non-empty string", v)
    return v


def _str_list(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
        raise _bad(where, "must be a non-empty list of non-empty strings", v)
    return list(v)


def _opt(inner: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda v, where: None if v is None else inner(v, where)


def _path(v: Any, where: str) -> str:
    return _str(v, where)


def _path_map(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not v:
        raise _bad(where, "must be a non-empty mapping of parent name -> eval file", v)
    for key, value in v.items():
        _str(key, f"{where} key")
        _str(value, f"{where}.{key}")
    return dict(v)


def _stop_list(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _bad(where, "must be a list of non-empty strings", v)
    return list(v)


REQUIRED = object()
# kind -> field -> (validator, default). Fields named in PATH_FIELDS are files.
SCHEMA: dict[str, dict[str, tuple[Callable[[Any, str], Any], Any]]] = {
    "structural": {
        "finite": (_bool, True), "shapes": (_bool, True),
        "fingerprint": (_choice("match", "skip"), "match"),
        "serving": (_bool, True), "max_rank": (_opt(_int(1)), None),
    },
    "merge_equivalence": {
        "prompts": (_opt(_str_list), None), "data": (_opt(_path), None),
        "max_abs_diff": (_num(0), 1e-3), "min_top1_agreement": (_opt(_num(0, 1)), None),
        "methods": (_str_list, list(LINEAR_METHODS)), "limit": (_int(1), 16),
    },
    "perplexity": {
        "data": (_path, REQUIRED), "field": (_str, "text"),
        "baseline": (_choice(*BASELINES), "base"),
        "max_increase": (_opt(_num(0)), None), "max": (_opt(_num(1)), None),
        "limit": (_int(1), 256),
    },
    "retention": {
        "sets": (_path_map, REQUIRED), "metric": (_choice("exact_match", "loglik"), "exact_match"),
        "baseline": (_choice("parents", "release"), "parents"),
        "min_ratio": (_opt(_num(0)), None), "min_score": (_opt(_num(0, 1)), None),
        "max_new_tokens": (_opt(_int(1)), None), "stop": (_stop_list, ["\n"]),
        "case_sensitive": (_bool, True), "limit": (_int(1), 256),
    },
    "generation": {
        "prompts": (_str_list, REQUIRED), "max_new_tokens": (_int(1), 32),
        "min_chars": (_int(0), 1), "ngram": (_int(1), 3),
        "max_repeat_fraction": (_num(0, 1), 0.5),
    },
    "drift": {  # derived models vs their source (gate/checks/drift.py)
        "data": (_path, REQUIRED), "field": (_str, "text"), "limit": (_int(1), 64),
        "max_kl": (_opt(_num(0)), None), "min_top1": (_opt(_num(0, 1)), None),
        "max_logit_diff": (_opt(_num(0)), None),
    },
}
PATH_FIELDS = {"merge_equivalence": ("data",), "perplexity": ("data",), "retention": (),
               "drift": ("data",)}
TOP_LEVEL = {"version", "seed", "dtype", "max_length", "release", "require_source_gate", "checks"}



def _data_file(where: str, written: str, base_dir: Path, allow_outside: bool) -> Path:
    """Resolve a data path against the policy directory; refuse one that leaves it.

    Raises:
        BadInputError: the real path (symlinks followed) is outside ``base_dir`` and
            ``allow_outside`` is false, or it is not a file.
    """
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(root, os.path.expanduser(written)))
    shown = _show(written)
    if not allow_outside and os.path.commonpath([root, real]) != root:
        raise BadInputError(
            f"policy field {where}: data file {shown} resolves to {_show(real)}, outside the "
            f"policy's directory {_show(root)}",
            fix="put the data beside the policy file, or pass --allow-outside-data if you "
                "trust this policy")
    if not os.path.isfile(real):
        raise BadInputError(f"policy field {where}: file {shown} not found "
                            f"(looked at {_show(real)})", fix="paths are relative to the policy file")
    return Path(real)


def _check(raw: Any, i: int, base_dir: Path, data: dict[str, str],
           names: set[str], allow_outside: bool) -> CheckSpec:
    where = f"checks[{i}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be a mapping with a 'kind'", raw)
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise _bad(f"{where}.kind", f"must be one of {', '.join(CHECK_KINDS)}", kind)
    name = _str(raw.get("name", kind), f"{where}.name")
    if name in names:
        raise _bad(f"{where}.name", "must be unique (give repeated kinds distinct names)", name)
    names.add(name)
    schema = SCHEMA[kind]
    unknown = sorted(set(raw) - set(schema) - {"kind", "name"}, key=str)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", f"is not a known field of a {kind} check "
                   f"(known: {', '.join(sorted(schema))})")
    params: dict[str, Any] = {}
    for key, (validate, default) in schema.items():
        if key in raw:
            params[key] = validate(raw[key], f"{where}.{key}")
        elif default is REQUIRED:
            raise _bad(f"{where}.{key}", f"is required for a {kind} check")
        else:
            params[key] = list(default) if isinstance(default, list) else default
    _cross_checks(kind, params, where)
    paths: dict[str, str] = {}
    files = [(key, params[key]) for key in PATH_FIELDS.get(kind, ()) if params.get(key)]
    if kind == "retention":
        files = [(f"sets.{k}", v) for k, v in params["sets"].items()]
    for key, written in files:
        resolved = _data_file(f"{where}.{key}", written, base_dir, allow_outside)
        paths[key] = str(resolved)
        data[written] = _file_digest(resolved)
    params["_paths"] = paths
    return CheckSpec(kind=kind, name=name, params=params)


def _cross_checks(kind: str, p: dict[str, Any], where: str) -> None:
    if kind == "perplexity" and p["max_increase"] is None and p["max"] is None:
        raise _bad(f"{where}.max_increase", "or .max is required (a threshold to hold)")
    if kind == "retention" and p["min_ratio"] is None and p["min_score"] is None:
        raise _bad(f"{where}.min_ratio", "or .min_score is required (a threshold to hold)")
    if kind == "drift" and all(p[k] is None for k in ("max_kl", "min_top1", "max_logit_diff")):
        raise _bad(f"{where}.max_kl", "or .min_top1 or .max_logit_diff is required (a threshold to hold)")
    if kind == "merge_equivalence" and not p["prompts"] and not p["data"]:
        raise _bad(f"{where}.prompts", "or .data is required (text to compare logits on)")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def parse_policy(raw: Any, *, base_dir: Path, source: str | None = None,
                 allow_outside_data: bool = False) -> Policy:
    """Validate a policy object (already parsed from YAML/JSON).

    Args:
        raw: The parsed document.
        base_dir: Directory that relative data paths are resolved against; data files
            must resolve inside it.
        source: Where it came from, for messages.
        allow_outside_data: Accept data files outside ``base_dir`` (a trusted policy).

    Returns:
        The validated :class:`Policy` with its digest.

    Raises:
        BadInputError: A field is missing, unknown or out of range (the message names it),
            or a data file named by the policy does not exist or leaves ``base_dir``.
    """
    if not isinstance(raw, dict):
        raise _bad("(root)", "must be a mapping with 'version' and 'checks'", raw)
    unknown = sorted(set(raw) - TOP_LEVEL, key=str)
    if unknown:
        raise _bad(str(unknown[0]), f"is not a known top-level field (known: {', '.join(sorted(TOP_LEVEL))})")
    if raw.get("version") != POLICY_VERSION:
        raise _bad("version", f"must be {POLICY_VERSION}", raw.get("version", None))
    seed = _int(0)(raw.get("seed", 0), "seed")
    dtype = _choice(*DTYPES)(raw.get("dtype", "float32"), "dtype")
    max_length = _int(8)(raw.get("max_length", 512), "max_length")
    release = _opt(_str)(raw.get("release"), "release")
    custody = _bool(raw.get("require_source_gate", False), "require_source_gate")
    checks_raw = raw.get("checks")
    if not isinstance(checks_raw, list) or not checks_raw:
        raise _bad("checks", "must be a non-empty list of checks", checks_raw)
    data: dict[str, str] = {}
    names: set[str] = set()
    checks = tuple(_check(c, i, base_dir, data, names, allow_outside_data)
                   for i, c in enumerate(checks_raw))
    policy = Policy(version=POLICY_VERSION, seed=seed, dtype=dtype, max_length=max_length,
                    release=release, checks=checks, digest="", source=source,
                    data_digests=dict(sorted(data.items())), require_source_gate=custody)
    return replace(policy, digest=sha256_digest(policy.canonical_bytes()))


def load_policy(path: str | Path, *, allow_outside_data: bool = False) -> Policy:
    """Read and validate a YAML (or JSON) policy file.

    Args:
        path: The policy file.
        allow_outside_data: Accept data files outside the policy's directory
            (``adapters gate --allow-outside-data``); refused by default.

    Raises:
        BadInputError: The file, or a data file it names, does not exist; a data file
            leaves the policy's directory; the file is too large, not valid YAML, expands
            to too many nodes through aliases or nests too deeply; or a field is invalid.
    """
    from gate.safe_yaml import load_yaml

    path = Path(path).expanduser()
    raw = load_yaml(path, what="policy", max_bytes=MAX_POLICY_BYTES, max_depth=MAX_DEPTH,
                    fix=FIX)
    try:
        return parse_policy(raw, base_dir=path.resolve().parent, source=str(path),
                            allow_outside_data=allow_outside_data)
    except BadInputError as err:
        raise BadInputError(f"{path}: {err.message}", fix=err.fix) from None
