"""What a failed ``verify`` means: the one error (exit 3) naming its first problem.

:func:`registry.maintenance.integrity.verify` reports every problem it finds; the CLI
(``adapters verify``) and the web view (``/api/verify``) then fail with the same
:class:`~registry.errors.IntegrityError`, whose message names the first problem and
whose fix depends on its kind: an unsigned or badly signed version (sign it; a bad
signature is tampering), a binding the audit log does not explain (tampering:
restore from a backup), or a corrupt or missing blob (restore or re-push). Kept
here, once, so the two callers cannot word it differently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry.errors import IntegrityError

if TYPE_CHECKING:
    from registry.maintenance.integrity import BlobProblem
    from registry.maintenance.integrity import VerifyReport

SIGNATURE_KINDS = ("unsigned", "bad_signature")


def problem_line(problem: BlobProblem) -> str:
    """``unaudited names/x/versions/ab..: no audit entry records ...`` / ``corrupt blob ..``."""
    if problem.kind in ("unaudited", "removed"):
        return f"{problem.kind} {', '.join(problem.used_by)}: {problem.detail}"
    what = "version" if problem.kind in SIGNATURE_KINDS else "blob"
    return f"{problem.kind} {what} {problem.digest}"


def problem_fix(kind: str) -> str:
    """What to do about a problem of ``kind``."""
    if kind in SIGNATURE_KINDS:
        return ("sign the version with a trusted key (`adapters sign REF --key KEY.pem`); "
                "treat a bad signature as tampering")
    if kind == "unaudited":
        return ("treat it as tampering: it was written outside adapterkit; restore the "
                "store from a backup and check `adapters audit log`")
    if kind == "removed":
        return ("treat it as tampering: it was deleted outside adapterkit; restore the "
                "store from a backup and check `adapters audit log`")
    return "restore the blobs from a copy of the store, or re-push the affected adapters"


def verify_error(report: VerifyReport) -> IntegrityError | None:
    """The error a report with problems fails with (exit 3); None when it is clean."""
    if report.ok:
        return None
    first = report.problems[0]
    return IntegrityError(f"{len(report.problems)} problem(s) in the store, first: "
                          f"{problem_line(first)}", fix=problem_fix(first.kind))
