"""Push a merge result as a store version: the one push path of every merge.

``adapters merge`` (:mod:`cli.merge_cmds`) and the merge search (:mod:`gate.search`) both
publish through :func:`push_merge`, so a searched merge is indistinguishable from a
hand-made merge with the same recipe: the PEFT directory is written under a work directory and
added like any adapter (:func:`registry.add.add_adapter`: the ingest checks of ``push``, the
record, the push), recorded with the first input's base (id, revision, fingerprint) and the
label ``merge_method``, with lineage: parents ``{digest, ref, role: input,
weight}``, recipe ``{method, parameters: {...method parameters, seed, rank,
allow_base_mismatch}}`` and report ``{error, max_error, dtype, warnings, modules}``
(6 significant digits). ``extra_report`` adds keys to the report (the search adds
``search``); it cannot replace the merge's own keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merging.lora.results import MergeResult
    from registry.storage.manifest import PushResult, Version
    from registry.storage.store import Store


def sig(value: float, digits: int = 6) -> float:
    """Round to ``digits`` significant digits (lineage numbers stay readable and stable)."""
    return float(f"{value:.{digits}g}")


def merge_lineage(versions: Sequence[Version], result: MergeResult, *, method: str,
                  warnings: Sequence[str], allow_base_mismatch: bool = False,
                  extra_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The lineage ``adapters merge`` records for ``result`` (see module docstring).

    Raises:
        BadInputError: ``extra_report`` clashes with a report key, or is not JSON.
    """
    from registry.errors import BadInputError
    from registry.lineage import make_lineage, parent

    report = result.report
    body: dict[str, Any] = {
        "error": sig(report["error"]), "max_error": sig(report["max_error"]),
        "dtype": report["dtype"], "warnings": list(warnings),
        "modules": {m: {"rank": e["rank"], "error": sig(e["error"]), "norm": sig(e["norm"])}
                    for m, e in report["modules"].items()}}
    clash = sorted(set(extra_report or {}) & set(body))
    if clash:
        raise BadInputError(f"report key {clash[0]!r} is the merge's own", fix="use another key")
    body.update(extra_report or {})
    return make_lineage(
        [parent(v, weight=w) for v, w in zip(versions, report["weights"], strict=True)],
        method=method,
        parameters={**report["parameters"], "seed": report["seed"], "rank": report["rank"],
                    "allow_base_mismatch": allow_base_mismatch},
        report=body)


def push_merge(store: Store, versions: Sequence[Version], result: MergeResult, target: str, *,
               work_dir: Path, method: str, warnings: Sequence[str] = (),
               allow_base_mismatch: bool = False,
               extra_report: dict[str, Any] | None = None) -> PushResult:
    """Write ``result`` under ``work_dir/merged``, validate it and push it as ``target``.

    Args:
        store: The registry.
        versions: The merge's inputs, in order (parents of the lineage).
        result: The merge (:func:`merging.lora.engine.merge_adapters`).
        target: The name to push under.
        work_dir: A scratch directory (the merged PEFT directory goes in ``merged/``).
        method: The merge method (record label and recipe).
        warnings: Base-check warnings, before the merge's own.
        allow_base_mismatch: Recorded in the recipe.
        extra_report: Extra lineage report keys.

    Returns:
        The :class:`registry.storage.manifest.PushResult` (an identical re-push is not a new version).

    Raises:
        BadInputError: The output fails the ingest checks, or a bad ``extra_report``.
        ConflictError: ``work_dir/merged`` exists and is not empty.
    """
    from merging.lora.peft_output import write_peft_dir
    from registry.add import AdapterMetadata, add_adapter

    merged_dir = write_peft_dir(result, Path(work_dir) / "merged")
    first_base = versions[0].record.get("base_model") or {}
    all_warnings = list(warnings) + list(result.report["warnings"])
    lineage = merge_lineage(versions, result, method=method, warnings=all_warnings,
                            allow_base_mismatch=allow_base_mismatch, extra_report=extra_report)
    metadata = AdapterMetadata(base_model=first_base.get("id"), base_revision=first_base.get("revision"),
                               fingerprint=first_base.get("fingerprint"), labels={"merge_method": method})
    return add_adapter(store, merged_dir, target, metadata=metadata, lineage=lineage).push
