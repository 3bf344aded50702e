"""Render a :class:`gate.results.GateResult` for people and for CI systems.

* :func:`to_junit` / :func:`write_junit`: JUnit XML (``xml.etree``), one
  ``<testsuite name="adapterkit-gate">`` with suite-level ``<properties>`` (candidate,
  digests, verdict) and one ``<testcase classname="gate.<kind>" name="<check>">``
  per check. Each testcase carries its measured values and thresholds as
  ``<property name=... value=...>``; a failed check has ``<failure
  message="..." type="GateCheckFailed">``, an errored one ``<error ...>``, a skipped
  one ``<skipped message="..."/>``. CI test-report widgets (GitHub, GitLab, Jenkins)
  show the failing check and its message without opening logs.
* :func:`to_markdown` / :func:`append_step_summary`: a Markdown table appended to
  ``$GITHUB_STEP_SUMMARY`` when that variable is set (the job summary page).
* :func:`rich_table`: the terminal table the CLI prints.

The JSON form is :meth:`GateResult.to_json` itself.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gate.results import GateResult
from registry.errors import BadInputError, shorten

if TYPE_CHECKING:
    from rich.table import Table

STATUS_ICON = {"pass": "✅ pass", "fail": "❌ fail", "error": "💥 error", "skip": "⏭️ skip"}
_HIDDEN_METRICS = ("baseline",)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def _short(digest: str, n: int = 12) -> str:
    return digest.split(":")[-1][:n]


def to_junit(result: GateResult) -> ET.ElementTree:
    """The JUnit XML tree of a gate result (see module docstring)."""
    counts = result.counts()
    total_time = sum(c.duration_s for c in result.checks)
    suites = ET.Element("testsuites", name="adapterkit-gate", tests=str(len(result.checks)),
                        failures=str(counts["fail"]), errors=str(counts["error"]),
                        skipped=str(counts["skip"]), time=f"{total_time:.3f}")
    suite = ET.SubElement(suites, "testsuite", name="adapterkit-gate",
                          tests=str(len(result.checks)), failures=str(counts["fail"]),
                          errors=str(counts["error"]), skipped=str(counts["skip"]),
                          time=f"{total_time:.3f}", timestamp=str(result.meta.get("started", "")))
    props = ET.SubElement(suite, "properties")
    for name, value in (("candidate", result.candidate), ("candidate_digest", result.candidate_digest),
                        ("policy_digest", result.policy_digest), ("base", result.base),
                        ("base_fingerprint", result.base_fingerprint),
                        ("passed", str(result.passed).lower()), ("stored", str(result.stored).lower())):
        ET.SubElement(props, "property", name=name, value=_value(value))
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"gate.{check.kind}", name=check.name,
                             time=f"{check.duration_s:.3f}")
        if check.metrics:
            cprops = ET.SubElement(case, "properties")
            for key, value in check.metrics.items():
                ET.SubElement(cprops, "property", name=str(key), value=_value(value))
        if check.status == "fail":
            failure = ET.SubElement(case, "failure", message=check.message, type="GateCheckFailed")
            failure.text = _details_text(check.details)
        elif check.status == "error":
            error = ET.SubElement(case, "error", message=check.message, type="GateCheckError")
            error.text = check.message
        elif check.status == "skip":
            ET.SubElement(case, "skipped", message=check.message)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = check.message
    for element in suites.iter():  # model output and data text may hold any character
        element.attrib = {k: xml_safe(v) for k, v in element.attrib.items()}
        if element.text:
            element.text = xml_safe(element.text)
    ET.indent(suites)
    return ET.ElementTree(suites)


_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold (control characters, lone
    surrogates) written as ``\\xNN`` / ``\\uNNNN`` escapes, so every JUnit consumer parses it."""
    return _NOT_XML.sub(lambda m: ascii(m.group())[1:-1], text)


def _details_text(details: Any) -> str:
    if details is None:
        return ""
    return json.dumps(details, indent=2, sort_keys=True, default=str)


def check_junit_path(path: str | Path) -> None:
    """Refuse a JUnit path that cannot become a file, before the gate runs and records.

    Raises:
        BadInputError: It is a directory (``--junit ""`` reads as ``.``), or lies under a
            file.
    """
    target = Path(path)
    if target.is_dir():
        raise BadInputError(f"--junit {shorten(str(path))} is a directory",
                            fix="name a file, e.g. --junit reports/gate.xml")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInputError(f"--junit {shorten(str(path))} lies under the file {shorten(str(parent))}",
                                    fix="name a file in a directory, e.g. --junit reports/gate.xml")
            return


def write_junit(result: GateResult, path: str | Path) -> Path:
    """Write the JUnit XML report to ``path`` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_junit(result).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _metrics_cell(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={_value(v)}" for k, v in metrics.items()
             if not k.startswith("threshold_") and k not in _HIDDEN_METRICS
             and isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(shown[:6])


def _thresholds_cell(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k[len('threshold_'):]}={_value(v)}" for k, v in metrics.items()
                     if k.startswith("threshold_"))


def to_markdown(result: GateResult) -> str:
    """A Markdown summary: verdict line and one table row per check."""
    verdict = "✅ **passed**" if result.passed else "❌ **failed**"
    lines = [f"### adapterkit gate: {verdict}", "",
             f"Candidate `{result.candidate}` (`{_short(result.candidate_digest)}`), "
             f"policy `{_short(result.policy_digest)}`, base `{result.base}`", "",
             "| check | kind | status | measured | threshold | message |",
             "|---|---|---|---|---|---|"]
    for c in result.checks:
        message = c.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c.name} | {c.kind} | {STATUS_ICON.get(c.status, c.status)} | "
                     f"{_metrics_cell(c.metrics)} | {_thresholds_cell(c.metrics)} | {message} |")
    return "\n".join(lines) + "\n"


def append_step_summary(result: GateResult, path: str | None = None) -> Path | None:
    """Append :func:`to_markdown` to ``path`` or ``$GITHUB_STEP_SUMMARY``; None if neither."""
    target = path or os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(to_markdown(result) + "\n")
    return Path(target)


def rich_table(result: GateResult) -> Table:
    """A rich Table of the checks (status coloured), titled with the verdict."""
    from rich.markup import escape as escape_markup
    from rich.table import Table

    from registry.text import escape_control

    def escape(value: object) -> str:  # one visible line: markup and control chars escaped
        return escape_markup(escape_control(str(value)))

    colour = {"pass": "green", "fail": "red", "error": "red", "skip": "yellow"}
    verdict = "[green]PASSED[/green]" if result.passed else "[red]FAILED[/red]"
    table = Table(title=f"gate {verdict}: {escape(result.candidate)}", title_justify="left")
    for column in ("check", "kind", "status", "measured", "threshold", "message"):
        table.add_column(column, overflow="fold")
    for c in result.checks:
        table.add_row(escape(c.name), c.kind, f"[{colour.get(c.status, 'white')}]{c.status}[/]",
                      escape(_metrics_cell(c.metrics)), escape(_thresholds_cell(c.metrics)),
                      escape(c.message))
    return table
