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
bounded ``repr`` (:func:`gate.policy_fields.show`, at most 200 characters), never the
whole structure. Each check kind declares its own parameters next to its code
(:class:`gate.check_kinds.CheckParams`); this module holds the top-level fields, the
walk over the checks, data-file resolution and the digest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gate.check_kinds import check_kinds, check_params
from gate.eval_data import DataFile, is_jsonl, read_pairs, read_texts
from gate.policy_fields import FIX, MAX_INT, POLICY, REQUIRED, bad, choice, label, show
from registry.digests import canonical_json
from registry.digests import sha256_digest
from registry.formats.fields import is_int, optional
from registry.errors import BadInputError
from registry.storage.refs import parse_ref

POLICY_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
MAX_POLICY_BYTES = 1 << 20
"""Largest policy file read (a real policy is a few hundred bytes)."""
MAX_SEED = 2**64 - 1
"""Largest ``seed``: what ``torch.manual_seed`` (the gate's one RNG) takes."""
MAX_DEPTH = 32
"""Deepest nesting of YAML collections accepted."""
@dataclass(frozen=True)
class CheckSpec:
    """One validated check: its ``kind``, unique ``name`` and parameters (defaults filled)."""

    kind: str
    name: str
    params: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def data_file(self, key: str) -> DataFile:
        """A data file parameter, as hashed into the policy digest (:class:`DataFile`)."""
        file: DataFile = self.params["_files"][key]
        return file

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


TOP_LEVEL = {"version", "seed", "dtype", "max_length", "release", "require_source_gate", "checks"}


def _data_file(where: str, written: str, base_dir: Path, allow_outside: bool) -> Path:
    """Resolve a data path against the policy directory; refuse one that leaves it.

    Raises:
        BadInputError: the real path (symlinks followed) is outside ``base_dir`` and
            ``allow_outside`` is false, or it is not a file.
    """
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(root, os.path.expanduser(written)))
    shown = show(written)
    if not allow_outside and os.path.commonpath([root, real]) != root:
        raise BadInputError(
            f"policy field {where}: data file {shown} resolves to {show(real)}, outside the "
            f"policy's directory {show(root)}",
            fix="put the data beside the policy file, or pass --allow-outside-data if you "
                "trust this policy")
    if not os.path.isfile(real):
        raise BadInputError(f"policy field {where}: file {shown} not found "
                            f"(looked at {show(real)})", fix="paths are relative to the policy file")
    return Path(real)


def _check(raw: Any, i: int, base_dir: Path, data: dict[str, str], snapshots: dict[Path, DataFile],
           names: set[str], allow_outside: bool) -> CheckSpec:
    """Validate ``checks[i]`` against its kind's declared :class:`gate.checks.CheckParams`.

    Raises:
        BadInputError: An unknown kind or field, a bad or missing value, no threshold,
            or a data file that is missing or leaves ``base_dir``.
    """
    where = f"checks[{i}]"
    if not isinstance(raw, dict):
        raise bad(where, "must be a mapping with a 'kind'", raw)
    kind = raw.get("kind")
    declared = check_params(kind) if isinstance(kind, str) else None
    if declared is None or not isinstance(kind, str):
        raise bad(f"{where}.kind", f"must be one of {', '.join(check_kinds())}", kind)
    name = label(raw.get("name", kind), f"{where}.name")
    if name in names:
        raise bad(f"{where}.name", "must be unique (give repeated kinds distinct names)", name)
    names.add(name)
    schema = declared.fields
    unknown = sorted(set(raw) - set(schema) - {"kind", "name"}, key=str)
    if unknown:
        raise bad(f"{where}.{unknown[0]}", f"is not a known field of a {kind} check "
                  f"(known: {', '.join(sorted(schema))})")
    params: dict[str, Any] = {}
    for key, (validate, default) in schema.items():
        if key in raw:
            params[key] = validate(raw[key], f"{where}.{key}")
        elif default is REQUIRED:
            raise bad(f"{where}.{key}", f"is required for a {kind} check")
        else:
            params[key] = list(default) if isinstance(default, list) else default
    if declared.one_of and all(params[key] is None for key in declared.one_of):
        first, *others = declared.one_of
        raise bad(f"{where}.{first}", f"or {' or '.join('.' + k for k in others)} is required "
                  f"({declared.one_of_why})")
    found: dict[str, DataFile] = {}
    files = [(key, params[key]) for key in declared.files if params.get(key)]
    files += [(f"{key}.{label}", written) for key in declared.file_maps
              for label, written in params[key].items()]
    for key, written in files:
        resolved = _data_file(f"{where}.{key}", written, base_dir, allow_outside)
        if resolved not in snapshots:  # read once: every check sees the bytes hashed
            snapshots[resolved] = _snapshot(f"{where}.{key}", resolved)
        found[key] = replace(snapshots[resolved], written=written)
        data[written] = sha256_digest(found[key].data)
        _parse(f"{where}.{key}", found[key], key in declared.files, params.get("field") or "text")
    # a field other than the default names a JSONL key: on plain text it would be ignored
    if params.get("field", "text") != "text" and "data" in found and not is_jsonl(found["data"]):
        raise bad(f"{where}.field", "applies to JSONL data (.jsonl, .ndjson) only; "
                  f"{show(found['data'].written)} is read as plain text", raw["field"])
    params["_files"] = found
    return CheckSpec(kind=kind, name=name, params=params)


def _parse(where: str, file: DataFile, texts: bool, text_field: str) -> None:
    """Parse a data file as its check will (texts for ``files`` fields, prompt/answer pairs
    for ``file_maps``), so a malformed one is bad input now, not a check error later.

    Raises:
        BadInputError: A bad line, no rows, not UTF-8 (the message names the field).
    """
    try:
        read_texts(file, field=text_field) if texts else read_pairs(file)
    except BadInputError as err:
        raise BadInputError(f"policy field {where}: {err.message}", fix=err.fix) from None


def _snapshot(where: str, path: Path) -> DataFile:
    """The file's bytes, read once.

    Raises:
        BadInputError: It cannot be read.
    """
    try:
        return DataFile(path=path, data=path.read_bytes())
    except OSError as err:
        raise BadInputError(f"policy field {where}: cannot read {show(str(path))}: "
                            f"{err.strerror or err}", fix="make the data file readable") from None


def _release_ref(value: Any, where: str) -> str:
    """The ``release`` field: a ref the registry can resolve (checked now, not when a
    check compares with it and would fail the gate instead of refusing the policy)."""
    ref = POLICY.string(value, where)
    try:
        parse_ref(ref)
    except BadInputError as err:
        raise bad(where, f"must be a registry ref (name, name:alias, name@sha256:...): {err}",
                  value) from None
    return ref


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
        raise bad("(root)", "must be a mapping with 'version' and 'checks'", raw)
    unknown = sorted(set(raw) - TOP_LEVEL, key=str)
    if unknown:
        raise bad(str(unknown[0]), f"is not a known top-level field (known: {', '.join(sorted(TOP_LEVEL))})")
    if not (is_int(raw.get("version")) and raw["version"] == POLICY_VERSION):  # not true, not 1.0
        raise bad("version", f"must be the integer {POLICY_VERSION}", raw.get("version", None))
    seed = POLICY.integer(raw.get("seed", 0), "seed", minimum=0, maximum=MAX_SEED)
    dtype = choice(*DTYPES)(raw.get("dtype", "float32"), "dtype")
    max_length = POLICY.integer(raw.get("max_length", 512), "max_length", minimum=8, maximum=MAX_INT)
    release = optional(_release_ref)(raw.get("release"), "release")
    custody = POLICY.boolean(raw.get("require_source_gate", False), "require_source_gate")
    checks_raw = raw.get("checks")
    if not isinstance(checks_raw, list) or not checks_raw:
        raise bad("checks", "must be a non-empty list of checks", checks_raw)
    data: dict[str, str] = {}
    snapshots: dict[Path, DataFile] = {}
    names: set[str] = set()
    checks = tuple(_check(c, i, base_dir, data, snapshots, names, allow_outside_data)
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
