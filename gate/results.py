"""Values a gate run produces: one :class:`CheckResult` per check and a :class:`GateResult`.

Both are frozen and round-trip through JSON (``to_json`` / ``from_json``), because
the JSON form is what the registry stores as the gate record and what ``promote``
reads back. A check's ``status`` is one of:

* ``pass`` / ``fail``: the check ran and its thresholds held / did not;
* ``skip``: the check does not apply (merge equivalence of a TIES merge, a
  ``release`` baseline before anything was released); it does not block;
* ``error``: the check could not run (unloadable candidate, a parent missing from
  the lineage); it blocks like ``fail``.

``metrics`` holds flat measured values and thresholds (JUnit properties, table
cells); ``details`` holds per-item breakdowns (per eval set, per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESULT_SCHEMA = "adapterkit.gate-result.v1"
STATUSES = ("pass", "fail", "skip", "error")
BLOCKING = ("fail", "error")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    name: str
    kind: str
    status: str
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    details: Any = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        """True unless the check failed or errored (a skip does not block)."""
        return self.status not in BLOCKING

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "status": self.status,
                "message": self.message, "metrics": dict(self.metrics),
                "details": self.details, "duration_s": round(self.duration_s, 3)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CheckResult:
        return cls(name=obj["name"], kind=obj["kind"], status=obj["status"],
                   message=obj.get("message", ""), metrics=dict(obj.get("metrics") or {}),
                   details=obj.get("details"), duration_s=float(obj.get("duration_s") or 0.0))


@dataclass(frozen=True)
class GateResult:
    """A whole gate run: the candidate, the policy, every check and the verdict.

    Attributes:
        candidate: What was gated (``name@sha256:..`` or a directory path).
        candidate_digest: The version digest (or ``dir:sha256:..`` for a plain directory).
        policy_digest: Digest of the policy and its data (see :mod:`gate.policy`).
        passed: True when no check failed or errored.
        checks: One result per policy check, in policy order.
        base: The base model directory used.
        base_fingerprint: Structural fingerprint of that base (``sha256:..``) or None.
        stored: Whether the result was written to the registry as a gate record.
        meta: Tool and library versions, seed, timestamps, policy source.
    """

    candidate: str
    candidate_digest: str
    policy_digest: str
    passed: bool
    checks: tuple[CheckResult, ...]
    base: str
    base_fingerprint: str | None = None
    stored: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        """Checks that block (``fail`` or ``error``)."""
        return tuple(c for c in self.checks if not c.passed)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each status."""
        return {s: sum(1 for c in self.checks if c.status == s) for s in STATUSES}

    def to_json(self) -> dict[str, Any]:
        return {"schema": RESULT_SCHEMA, "candidate": self.candidate,
                "candidate_digest": self.candidate_digest, "policy_digest": self.policy_digest,
                "passed": self.passed, "counts": self.counts(),
                "checks": [c.to_json() for c in self.checks], "base": self.base,
                "base_fingerprint": self.base_fingerprint, "stored": self.stored,
                "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GateResult:
        return cls(candidate=obj["candidate"], candidate_digest=obj["candidate_digest"],
                   policy_digest=obj["policy_digest"], passed=bool(obj["passed"]),
                   checks=tuple(CheckResult.from_json(c) for c in obj.get("checks", [])),
                   base=obj.get("base", ""), base_fingerprint=obj.get("base_fingerprint"),
                   stored=bool(obj.get("stored")), meta=dict(obj.get("meta") or {}))
