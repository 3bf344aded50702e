"""The shape of a manifest's ``lineage`` (see :mod:`registry.lineage`), checked by hand.

Kept apart from :mod:`registry.lineage` (the graph queries, which read the store) so that
:func:`registry.storage.manifest.check_manifest` can check every manifest it reads back
without an import cycle: :func:`lineage_shape` is what each lineage reader relies on
(parents with digests, roles and weights, a recipe with a method); :func:`validate_lineage`
adds the JSON round trip of the free-form report that a write needs.
"""

from __future__ import annotations

import math
from typing import Any

from registry import __version__
from registry.digests import canonical_json, is_digest
from registry.errors import BadInputError, shorten


def _bad(field_name: str, msg: str, got: Any = ...) -> BadInputError:
    detail = "" if got is ... else f", got {shorten(got)}"
    return BadInputError(f"lineage.{field_name} {msg}{detail}",
                         fix="see DESIGN.md (manifest lineage) for the expected shape")


def _parent(entry: Any, i: int) -> dict[str, Any]:
    where = f"parents[{i}]"
    if not isinstance(entry, dict):
        raise _bad(where, "must be an object", entry)
    unknown = set(entry) - {"digest", "ref", "role", "weight"}
    if unknown:
        raise _bad(f"{where}.{sorted(unknown)[0]}", "is not a known field")
    if not is_digest(entry.get("digest")):
        raise _bad(f"{where}.digest", "must be 'sha256:' + 64 hex digits", entry.get("digest"))
    ref, role, weight = entry.get("ref"), entry.get("role", "input"), entry.get("weight")
    if ref is not None and (not isinstance(ref, str) or not ref.endswith("@" + entry["digest"])
                            or len(ref) == len(entry["digest"]) + 1):
        # readers show and link the ref: it must name the digest the entry binds
        raise _bad(f"{where}.ref", "must be null or NAME@ its digest", ref)
    if not isinstance(role, str) or not role:
        raise _bad(f"{where}.role", "must be a non-empty string", role)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight)):
        raise _bad(f"{where}.weight", "must be a finite number or null", weight)
    return {"digest": entry["digest"], "ref": ref, "role": role, "weight": weight}


def validate_lineage(lineage: dict | None) -> dict | None:
    """Check and normalise a lineage object (None passes through).

    Raises:
        BadInputError: A field is missing or malformed (the message names it).
    """
    out = lineage_shape(lineage)
    try:
        canonical_json(out)
    except BadInputError as err:
        raise _bad("(root)", f"must be JSON: {err.message}") from None
    return out


def lineage_shape(lineage: Any) -> dict | None:
    """:func:`validate_lineage` without the (costly) JSON round trip of the report: the
    shape every lineage reader relies on (parents with digests, roles and weights, a
    recipe with a method). :func:`registry.storage.manifest.check_manifest` runs it on
    every manifest read back, so a hand-written manifest cannot crash a reader.

    Raises:
        BadInputError: A field is missing or malformed (the message names it).
    """
    if lineage is None:
        return None
    if not isinstance(lineage, dict):
        raise _bad("(root)", "must be an object or null", lineage)
    unknown = set(lineage) - {"parents", "recipe", "report"}
    if unknown:
        raise _bad(sorted(unknown)[0], "is not a known field")
    parents = lineage.get("parents")
    parents = [] if parents is None else parents
    if not isinstance(parents, list):
        raise _bad("parents", "must be a list", parents)
    recipe = lineage.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, dict):
            raise _bad("recipe", "must be an object or null", recipe)
        unknown = set(recipe) - {"method", "parameters", "tool", "tool_version"}
        if unknown:
            raise _bad(f"recipe.{sorted(unknown)[0]}", "is not a known field")
        if not isinstance(recipe.get("method"), str) or not recipe["method"]:
            raise _bad("recipe.method", "must be a non-empty string", recipe.get("method"))
        params = recipe.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise _bad("recipe.parameters", "must be an object", params)
        recipe = {"method": recipe["method"], "parameters": params,
                  "tool": str(recipe.get("tool") or "adapterkit"),
                  "tool_version": str(recipe.get("tool_version") or __version__)}
    report = lineage.get("report")
    if report is not None and not isinstance(report, dict):
        raise _bad("report", "must be an object or null", report)
    return {"parents": [_parent(p, i) for i, p in enumerate(parents)], "recipe": recipe,
            "report": report}


__all__ = ["lineage_shape", "validate_lineage"]
