"""The adapter record: what a version says about itself, schema-checked by hand.

A record is a plain JSON object stored inside the version manifest (so it is part
of the version digest). Two kinds exist, told apart by ``record["kind"]``:

``"adapter"`` (built by :func:`build_record`)::

    {"kind": "adapter",
     "peft": {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
              "alpha_pattern", "use_rslora", "use_dora", "modules_to_save", "bias",
              "task_type", ["layers_to_transform", "layers_pattern", "exclude_modules",
              "lora_bias" (only when true)]},
     "tensors": {"count": int, "dtypes": {"F16": 12, ...}, "parameters": int},
     "base_model": {"id": str|null, "revision": str|null,
                    "fingerprint": {"struct_digest": digest, "weights_digest": digest|null}|null},
     "dataset": {"version": str|null, "digest": str|null} | null,
     "hyperparameters": {str: json}, "metrics": {str: finite number},
     "known_risks": [str], "license": str|null,
     "created": "YYYY-MM-DDTHH:MM:SS[.ffffff]Z", "author": str, "labels": {str: str}}

``"model"`` (built by :func:`build_model_record`, for derived full models such as a
merge-and-unload output that is recorded by reference, without its weights):
the same common fields, ``"weights": {"struct_digest", "weights_digest"}`` (the
fingerprint of the derived model) instead of ``peft``, and optional ``tensors``,
``location`` (where it was written), ``quantization`` (free-form object) and ``config``
(the digest of its ``config.json``, written only when known).

The bracketed ``peft`` fields restrict which modules the adapter touches
(``layers_to_transform``: layer indices, ``layers_pattern``: the layer container
name(s), ``exclude_modules``: names or a regex); they are kept only when the PEFT
config sets them, so records of adapters without them, and their digests, are the
same as before these fields existed.

:func:`validate_record` checks every field with a message naming it (e.g.
``record.metrics.loss must be a finite number``), refuses unknown fields, fills
optional ones with defaults and returns the normalised copy. No jsonschema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from registry.digests import canonical_json, is_digest
from registry.errors import BadInputError
from registry.formats.fields import FieldChecker
from registry.formats.patterns import check_config_patterns
from registry.stamps import default_actor, utc_now_iso

if TYPE_CHECKING:
    from registry.formats.fingerprint import BaseFingerprint

KINDS = ("adapter", "model")
BIAS_VALUES = ("none", "all", "lora_only")
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)\Z")


@dataclass(frozen=True)
class TensorSummary:
    """Counts of an adapter's tensors.

    Attributes:
        count: Number of tensors.
        dtypes: Safetensors dtype name (``F32``, ``BF16``...) -> number of tensors.
        parameters: Total number of elements.
    """

    count: int
    dtypes: dict[str, int] = field(default_factory=dict)
    parameters: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the record."""
        return {"count": self.count, "dtypes": dict(sorted(self.dtypes.items())),
                "parameters": self.parameters}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSummary":
        """Inverse of :meth:`to_json` (validated).

        Raises:
            BadInputError: A field is missing or has the wrong type.
        """
        checked = _tensors(data, "tensors")
        return cls(checked["count"], checked["dtypes"], checked["parameters"])


def _fail(path: str, msg: str, got: Any = ...) -> BadInputError:
    detail = "" if got is ... else f", got {got!r}"
    return BadInputError(f"record.{path} {msg}{detail}",
                         fix=f"fix '{path}' in the record (see DESIGN.md, adapter record)")


_FIELDS = FieldChecker(_fail, blank_is_empty=True)
"""Field rules from :mod:`registry.formats.fields`, failures worded as record errors."""


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be an object", value)
    for key in value:
        if not isinstance(key, str) or not key:
            raise _fail(path, "keys must be non-empty strings", key)
    return value












def _mapping(value: Any, path: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    value = {} if value is None else _obj(value, path)
    return {key: check(item, f"{path}.{key}") for key, item in sorted(value.items())}


def _digest(value: Any, path: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not is_digest(value):
        raise _fail(path, "must be 'sha256:' + 64 lowercase hex digits", value)
    return value


def _json_value(value: Any, path: str) -> Any:
    try:
        canonical_json(value)
    except BadInputError:
        raise _fail(path, "must be JSON (finite numbers, strings, lists, objects)", value) from None
    return value


def _exact_keys(obj: dict[str, Any], path: str, allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(f"{path}.{unknown[0]}" if path else unknown[0],
                    f"is not a known field (allowed: {', '.join(sorted(allowed))})")


def _tensors(value: Any, path: str) -> dict[str, Any]:
    obj = _obj(value, path)
    _exact_keys(obj, path, {"count", "dtypes", "parameters"})
    return {"count": _FIELDS.integer(obj.get("count"), f"{path}.count", minimum=0),
            "dtypes": _mapping(obj.get("dtypes"), f"{path}.dtypes",
                               lambda v, p: _FIELDS.integer(v, p, minimum=1)),
            "parameters": _FIELDS.integer(obj.get("parameters", 0), f"{path}.parameters",
                                          minimum=0)}


def _fingerprint(value: Any, path: str, *, optional: bool = True) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):  # a BaseFingerprint-like object
        value = {"struct_digest": getattr(value, "struct_digest", None),
                 "weights_digest": getattr(value, "weights_digest", None)}
    obj = _obj(value, path)
    _exact_keys(obj, path, {"struct_digest", "weights_digest"})
    return {"struct_digest": _digest(obj.get("struct_digest"), f"{path}.struct_digest"),
            "weights_digest": _digest(obj.get("weights_digest"), f"{path}.weights_digest",
                                      optional=optional)}


PEFT_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
               "alpha_pattern", "use_rslora", "use_dora", "modules_to_save", "bias", "task_type")
PEFT_RESTRICTIONS = ("layers_to_transform", "layers_pattern", "exclude_modules")
"""Optional ``peft`` fields, recorded only when set (module docstring)."""
PEFT_FLAGS = ("lora_bias",)
"""Optional ``peft`` booleans, recorded only when true (older records keep their digests)."""


def _str_or_list(value: Any, path: str) -> str | list[str]:
    if isinstance(value, str):
        return _FIELDS.string(value, path)
    return _FIELDS.string_list(value, path)


def _restrictions(obj: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    layers = obj.get("layers_to_transform")
    if layers is not None:
        items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(items, (list, tuple)):
            raise _fail(f"{path}.layers_to_transform", "must be a layer index or a list of them",
                        layers)
        out["layers_to_transform"] = sorted(
            {_FIELDS.integer(v, f"{path}.layers_to_transform[{i}]", minimum=0)
             for i, v in enumerate(items)})
    for key in ("layers_pattern", "exclude_modules"):
        if obj.get(key) is not None:
            value = _str_or_list(obj[key], f"{path}.{key}")
            out[key] = sorted(value) if isinstance(value, list) else value
    return out


def _peft(value: Any, path: str = "peft") -> dict[str, Any]:
    obj = _obj(value, path)
    _exact_keys(obj, path, set(PEFT_FIELDS) | set(PEFT_RESTRICTIONS) | set(PEFT_FLAGS))
    targets = obj.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        targets = sorted(_FIELDS.string_list(targets, f"{path}.target_modules"))
    bias = obj.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise _fail(f"{path}.bias", f"must be one of {', '.join(BIAS_VALUES)}", bias)
    saved = obj.get("modules_to_save")
    out = {
        "peft_type": _FIELDS.string(obj.get("peft_type"), f"{path}.peft_type"),
        "r": _FIELDS.integer(obj.get("r"), f"{path}.r", minimum=1),
        "lora_alpha": _FIELDS.number(obj.get("lora_alpha"), f"{path}.lora_alpha"),
        "target_modules": targets,
        "rank_pattern": _mapping(obj.get("rank_pattern"), f"{path}.rank_pattern",
                                 lambda v, p: _FIELDS.integer(v, p, minimum=1)),
        "alpha_pattern": _mapping(obj.get("alpha_pattern"), f"{path}.alpha_pattern",
                                  _FIELDS.number),
        "use_rslora": _FIELDS.boolean(obj.get("use_rslora", False), f"{path}.use_rslora"),
        "use_dora": _FIELDS.boolean(obj.get("use_dora", False), f"{path}.use_dora"),
        "modules_to_save": (None if saved is None
                            else _FIELDS.string_list(saved, f"{path}.modules_to_save")),
        "bias": bias,
        "task_type": _FIELDS.optional_string(obj.get("task_type"), f"{path}.task_type"),
        **_restrictions(obj, path),
        **{flag: True for flag in PEFT_FLAGS if _FIELDS.boolean(obj.get(flag, False), f"{path}.{flag}")},
    }
    # the patterns PEFT will match must be RE2-matchable (registry/formats/patterns.py)
    check_config_patterns(out, source=f"record field {path}.")
    return out


def _created(value: Any, path: str = "created") -> str:
    if not isinstance(value, str) or not _CREATED_RE.match(value):
        raise _fail(path, "must be a UTC ISO time like 2025-01-31T12:00:00Z", value)
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(path, "is not a valid date/time", value) from None
    return value


def _common(obj: dict[str, Any]) -> dict[str, Any]:
    base = _obj(obj.get("base_model") or {}, "base_model")
    _exact_keys(base, "base_model", {"id", "revision", "fingerprint"})
    dataset = obj.get("dataset")
    if dataset is not None:
        dataset = _obj(dataset, "dataset")
        _exact_keys(dataset, "dataset", {"version", "digest"})
        dataset = {"version": _FIELDS.optional_string(dataset.get("version"), "dataset.version"),
                   "digest": _FIELDS.optional_string(dataset.get("digest"), "dataset.digest")}
    return {
        "base_model": {"id": _FIELDS.optional_string(base.get("id"), "base_model.id"),
                       "revision": _FIELDS.optional_string(base.get("revision"),
                                                           "base_model.revision"),
                       "fingerprint": _fingerprint(base.get("fingerprint"),
                                                   "base_model.fingerprint")},
        "dataset": dataset,
        "hyperparameters": _mapping(obj.get("hyperparameters"), "hyperparameters", _json_value),
        "metrics": _mapping(obj.get("metrics"), "metrics", _FIELDS.number),
        "known_risks": _FIELDS.string_list(obj.get("known_risks") or [], "known_risks"),
        "license": _FIELDS.optional_string(obj.get("license"), "license"),
        "created": _created(obj.get("created")),
        "author": _FIELDS.string(obj.get("author"), "author"),
        "labels": _mapping(obj.get("labels"), "labels", lambda v, p: _FIELDS.string(v, p)),
    }


_COMMON_KEYS = {"kind", "base_model", "dataset", "hyperparameters", "metrics", "known_risks",
                "license", "created", "author", "labels"}


def validate_record(record: dict) -> dict:
    """Check a record against the schema and return its normalised copy.

    Raises:
        BadInputError: A field is missing, unknown or of the wrong type; the message
            names the field (``record.peft.r must be an integer >= 1, got 0``).
    """
    obj = _obj(record, "(root)")
    kind = obj.get("kind", "adapter")
    if kind not in KINDS:
        raise _fail("kind", f"must be one of {', '.join(KINDS)}", kind)
    if kind == "adapter":
        _exact_keys(obj, "", _COMMON_KEYS | {"peft", "tensors"})
        out = {"kind": kind, "peft": _peft(obj.get("peft")),
               "tensors": _tensors(obj.get("tensors"), "tensors")}
    else:
        _exact_keys(obj, "", _COMMON_KEYS | {"weights", "tensors", "location", "quantization",
                                             "config"})
        tensors = obj.get("tensors")
        quant = obj.get("quantization")
        out = {"kind": kind,
               "weights": _fingerprint(obj.get("weights"), "weights", optional=False),
               "tensors": None if tensors is None else _tensors(tensors, "tensors"),
               "location": _FIELDS.optional_string(obj.get("location"), "location"),
               "quantization": None if quant is None else _json_value(_obj(quant, "quantization"),
                                                                     "quantization")}
        if obj.get("config") is not None:  # written only when known: older records keep digests
            out["config"] = _digest(obj["config"], "config", optional=False)
    out.update(_common(obj))
    return out


def _dataset_arg(dataset: Any) -> dict[str, Any] | None:
    if dataset is None or isinstance(dataset, dict):
        return dataset
    if isinstance(dataset, str):
        return {"version": None, "digest": dataset} if is_digest(dataset) else \
            {"version": dataset, "digest": None}
    raise _fail("dataset", "must be a version string, a digest or {version, digest}", dataset)


def _common_args(base_model: str | None, base_revision: str | None, fingerprint: Any,
                 dataset: Any, hyperparameters: dict | None, metrics: dict | None,
                 known_risks: list | None, license: str | None, author: str | None,
                 labels: dict | None, created: str | None) -> dict[str, Any]:
    return {"base_model": {"id": base_model, "revision": base_revision,
                           "fingerprint": _fingerprint(fingerprint, "base_model.fingerprint")},
            "dataset": _dataset_arg(dataset), "hyperparameters": dict(hyperparameters or {}),
            "metrics": dict(metrics or {}), "known_risks": list(known_risks or []),
            "license": license, "created": created or utc_now_iso(),
            "author": author or default_actor(), "labels": dict(labels or {})}


def build_record(peft_config: dict, tensors: TensorSummary, *, base_model: str | None = None,
                 base_revision: str | None = None, fingerprint: BaseFingerprint | dict[str, Any] | None = None,
                 dataset: Any = None,
                 hyperparameters: dict | None = None, metrics: dict | None = None,
                 known_risks: list | None = None, license: str | None = None,
                 author: str | None = None, labels: dict | None = None,
                 created: str | None = None) -> dict:
    """Build and validate an adapter record from a PEFT config and tensor summary.

    Args:
        peft_config: Parsed ``adapter_config.json``; the record keeps the fields listed
            in the module docstring (``target_modules`` sorted, PEFT defaults filled).
        tensors: Counts from the safetensors header.
        base_model: Hub id or path of the base model (default: the config's
            ``base_model_name_or_path``).
        base_revision: Base model revision (commit), if known.
        fingerprint: A ``BaseFingerprint`` (or ``{struct_digest, weights_digest}``).
        dataset: Version string, ``sha256:`` digest, or ``{"version", "digest"}``.
        hyperparameters: Training settings (any JSON values).
        metrics: Name -> finite number.
        known_risks: Free-text risk statements.
        license: SPDX id or free text.
        author: Defaults to ``$ADAPTERS_ACTOR`` or the login name.
        labels: Free-form string -> string labels.
        created: UTC ISO time (default: now).

    Raises:
        BadInputError: Any field is invalid (the message names it).
    """
    cfg = _obj(peft_config, "peft")
    peft = {key: cfg[key] for key in PEFT_FIELDS + PEFT_RESTRICTIONS + PEFT_FLAGS if key in cfg}
    record: dict[str, Any] = {"kind": "adapter", "peft": peft, "tensors": tensors.to_json()}
    record.update(_common_args(base_model or cfg.get("base_model_name_or_path"), base_revision,
                               fingerprint, dataset, hyperparameters, metrics, known_risks,
                               license, author, labels, created))
    return validate_record(record)


def build_model_record(weights: BaseFingerprint | dict[str, Any] | None, *, tensors: TensorSummary | None = None,
                       location: str | None = None, quantization: dict | None = None,
                       config: str | None = None,
                       base_model: str | None = None, base_revision: str | None = None,
                       base_fingerprint: BaseFingerprint | dict[str, Any] | None = None, dataset: Any = None,
                       hyperparameters: dict | None = None, metrics: dict | None = None,
                       known_risks: list | None = None, license: str | None = None,
                       author: str | None = None, labels: dict | None = None,
                       created: str | None = None) -> dict:
    """Build and validate the record of a derived full model (kind ``"model"``).

    Args:
        weights: Fingerprint of the derived model itself (a ``BaseFingerprint`` or
            ``{struct_digest, weights_digest}``; both digests required).
        tensors: Optional tensor summary of the model.
        location: Where the model was written (informational; not stored).
        quantization: Free-form description (method, bits, group size...).
        config: Digest of the model's ``config.json``
            (:func:`registry.derived_check.config_digest`), bound like the weights.
        base_model, base_revision, base_fingerprint: The base it was derived from.
        Others: as in :func:`build_record`.

    Raises:
        BadInputError: Any field is invalid (the message names it).
    """
    record: dict[str, Any] = {"kind": "model",
                              "weights": _fingerprint(weights, "weights", optional=False),
                              "tensors": None if tensors is None else tensors.to_json(),
                              "location": location, "quantization": quantization}
    if config is not None:
        record["config"] = config
    record.update(_common_args(base_model, base_revision, base_fingerprint, dataset,
                               hyperparameters, metrics, known_risks, license, author, labels,
                               created))
    return validate_record(record)
