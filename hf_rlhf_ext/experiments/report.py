"""The chapter's report: claims decided by measured statistics, kept in ``claims.json``, and ``report.md``.

A claim is a sentence of the RLHF chapter, the statistic that decides it, the threshold, the measured values and the
verdict — never a verdict without its numbers. An *experimental* claim also carries a control measured in the same
invocation (a run or a planted corruption on which the effect must be absent): the claim's own rule is applied to the
control, and the claim holds only when the rule holds on the real effect and does *not* hold on the control — a rule
that passes on its control decides nothing. *Exact* claims (an identity checked to float precision) need no control.
A claim whose data are missing (e.g. it needs the lab's gold reward and the run used another model without a judge) is
*skipped* with the reason, not faked.

Stages of a long pipeline keep their results in ``<output_dir>/stages/<name>.json`` (:class:`StageStore`) with a
fingerprint of what made them (package versions, the stage, its settings) and the invocation that ran them. A rerun
after a kill redoes only the stages without a result; a stored result is reused only when its fingerprint equals the
current one, so a file from other settings, an older version or no run at all (hand-written) is never read as data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ..results import _jsonable

__all__ = ["Claim", "Finding", "StageStore", "write_claims", "read_claims", "render_report", "Section"]

CLAIMS_FILE = "claims.json"
REPORT_FILE = "report.md"


@dataclass
class Claim:
    """One claim of the chapter and its verdict. ``holds`` is None when the claim was skipped (``skipped`` says why)."""

    id: str
    exercise: str
    statement: str
    statistic: str
    threshold: Any
    values: dict[str, Any]
    holds: bool | None
    skipped: str | None = None
    kind: str = "experiment"
    control: dict[str, Any] | None = None
    control_holds: bool | None = None
    seeds: list[int] | None = None
    provenance: dict[str, Any] | None = None

    def __post_init__(self):
        if self.kind not in ("experiment", "exact"):
            raise ValueError(f"kind must be 'experiment' or 'exact', got {self.kind!r}")
        if self.holds and self.kind == "experiment" and self.control_holds:
            raise ValueError(f"claim {self.id!r}: its rule also holds on its control, so it cannot hold")

    @classmethod
    def skip(cls, id: str, exercise: str, statement: str, statistic: str, threshold: Any, reason: str,
             kind: str = "experiment") -> "Claim":
        return cls(id, exercise, statement, statistic, threshold, {}, None, skipped=reason, kind=kind)

    @classmethod
    def experiment(cls, id: str, exercise: str, statement: str, statistic: str, threshold: Any,
                   values: dict[str, Any], rule_holds: bool, control: dict[str, Any] | None = None,
                   control_holds: bool | None = None, seeds: list[int] | None = None) -> "Claim":
        """Holds only when the rule holds on the effect and not on the control (when one was measured)."""
        holds = bool(rule_holds) and control_holds is not True
        return cls(id, exercise, statement, statistic, threshold, values, holds, kind="experiment", control=control,
                   control_holds=control_holds, seeds=seeds)

    def verdict(self) -> str:
        if self.holds is None:
            return f"skipped ({self.skipped})"
        if self.kind == "experiment" and self.control_holds:
            return "does NOT hold (its rule also holds on the control)"
        text = "holds" if self.holds else "does NOT hold"
        return text + (", no control measured" if self.kind == "experiment" and self.control is None else "")


@dataclass
class Finding:
    """A measured result reported without a pass/fail claim (a fit, an honest comparison); ``verdict`` reads it, e.g.
    "fits" only above a stated R², else "no fit" with the reason."""

    id: str
    statement: str
    values: dict[str, Any]
    verdict: str | None = None


@dataclass
class Section:
    """One experiment in the report: title, the paragraph that reads its result, its numbers, its plots."""

    title: str
    reading: str
    table: list[tuple[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


PROVENANCE = "_provenance"


def _digest(result: dict[str, Any]) -> str:
    """SHA-256 of a result without its provenance: numbers edited after the run no longer match."""
    body = {k: v for k, v in result.items() if k != PROVENANCE}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def new_invocation_id() -> str:
    """UTC time, process id and a random tag: unique per invocation (also two in one second), readable in a report."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StageStore:
    """``<output_dir>/stages/<name>.json`` per finished stage; each stage's files go to ``<output_dir>/<name>/``.

    A result is stored with ``_provenance`` = {fingerprint, invocation, created}; it is reused only for an equal
    fingerprint, so stale or planted files are rerun (or left out), never reported as this run's numbers."""

    def __init__(self, output_dir: str, invocation: str | None = None) -> None:
        self.output_dir = output_dir
        self.root = os.path.join(output_dir, "stages")
        self.invocation = invocation or new_invocation_id()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.json")

    def stage_dir(self, name: str) -> str:
        path = os.path.join(self.output_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def load(self, name: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result made with this fingerprint, else None (missing, unreadable, unfingerprinted, stale)."""
        try:
            with open(self._path(name)) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return None
        prov = result.get(PROVENANCE) if isinstance(result, dict) else None
        valid = isinstance(prov, dict) and prov.get("invocation") and prov.get("digest") == _digest(result)
        if not valid or prov.get("fingerprint") != _jsonable(fingerprint):
            return None
        return result

    def done(self, name: str, fingerprint: dict[str, Any]) -> bool:
        return self.load(name, fingerprint) is not None

    def stale_reason(self, name: str, fingerprint: dict[str, Any]) -> str | None:
        """Why a stored file is not used (None when there is no file or it is valid)."""
        if not os.path.isfile(self._path(name)) or self.done(name, fingerprint):
            return None
        return "its stored result was not used: no fingerprint matching this run's settings and versions"

    def save(self, name: str, result: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        os.makedirs(self.root, exist_ok=True)
        result = _jsonable(result)
        prov = {"fingerprint": fingerprint, "invocation": self.invocation, "digest": _digest(result),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self._path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable({**result, PROVENANCE: prov}), f, indent=2, sort_keys=True)
        os.replace(tmp, self._path(name))  # a killed stage leaves no result, so it is redone

    def run(self, name: str, stage: Callable[[str], dict[str, Any]],
            fingerprint: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(result, reused): the stored result with this fingerprint, or ``stage(stage_dir)`` run and stored."""
        if (stored := self.load(name, fingerprint)) is not None:
            return stored, True
        start = time.perf_counter()
        result = stage(self.stage_dir(name))
        self.save(name, {**result, "stage_seconds": round(time.perf_counter() - start, 1)}, fingerprint)
        return self.load(name, fingerprint), False

    def provenance(self, result: dict[str, Any]) -> dict[str, Any]:
        """Whether a result was made in this invocation or reused, and from which invocation."""
        prov = result.get(PROVENANCE) or {}
        ran = "this invocation" if prov.get("invocation") == self.invocation else "reused"
        return {"ran": ran, "invocation": prov.get("invocation"), "created": prov.get("created")}


def write_claims(output_dir: str, claims: Sequence[Claim], findings: Sequence[Finding], seconds: float,
                 quick: bool, extra: dict[str, Any] | None = None) -> str:
    path = os.path.join(output_dir, CLAIMS_FILE)
    payload = {"claims": [asdict(c) for c in claims], "findings": [asdict(f) for f in findings],
               "seconds": round(seconds, 1), "quick": quick, **(extra or {})}
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
    return path


def read_claims(output_dir: str) -> dict[str, Any]:
    with open(os.path.join(output_dir, CLAIMS_FILE)) as f:
        return json.load(f)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _control_cell(c: Claim) -> str:
    if c.kind == "exact":
        return "exact check"
    if c.control is None:
        return "—"
    return (f"{c.control['statement']}: {_fmt(c.control.get('values', {}))}; rule "
            f"{'holds' if c.control_holds else 'does not hold'} there")


def render_report(title: str, intro: str, sections: Sequence[Section], claims: Sequence[Claim],
                  findings: Sequence[Finding], concepts: str = "", provenance: dict[str, Any] | None = None) -> str:
    """``report.md``: the claims table first (what held), then one section per experiment in the chapter's order."""
    lines = [f"# {title}", "", intro, "", "## Claims", "",
             "| # | exercise | claim | statistic | threshold | measured | control | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.exercise} | {c.statement} | {c.statistic} | {_fmt(c.threshold)} | "
                     f"{_fmt(c.values) if c.values else '—'} | {_control_cell(c)} | **{c.verdict()}** |")
    if findings:
        lines += ["", "## Findings", ""]
        lines += [f"- **{f.id}**: {f.statement} ({_fmt(f.values)})" + (f": **{f.verdict}**" if f.verdict else "")
                  for f in findings]
    if provenance:
        lines += ["", "## Where the numbers come from", "", "| stage | result | invocation | created |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {p['ran']} | {p.get('invocation') or '—'} | {p.get('created') or '—'} |"
                  for name, p in provenance.items()]
    if concepts:
        lines += ["", "## Concepts, shown on this run", "", concepts]
    for s in sections:
        lines += ["", f"## {s.title}", "", s.reading, ""]
        if s.table:
            lines += ["| quantity | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in s.table] + [""]
        lines += [f"![{os.path.basename(p)}]({p})" for p in s.plots]
    return "\n".join(lines) + "\n"
