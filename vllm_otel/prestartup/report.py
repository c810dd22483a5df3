"""Results of the pre-startup check: one :class:`CheckResult` per check, gathered in a :class:`Report`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CheckResult", "Report", "Status"]

Status = Literal["ok", "warn", "error", "skip"]
_RANK = {"skip": 0, "ok": 0, "warn": 1, "error": 2}


@dataclass
class CheckResult:
    """One check: ``name`` (stable, for scripts), ``status``, a sentence a person understands, and the
    fix when something is wrong. ``data`` holds the measured values (numbers, versions)."""

    name: str
    status: Status
    message: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    results: list[CheckResult] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # what --auto-fix did, one line each
    duration_s: float = 0.0
    platform: str = ""           # cuda, rocm or cpu
    dtype: str = ""              # what --dtype resolves to
    memory: dict[str, Any] = field(default_factory=dict)  # the memory check's numbers (--auto-fix)

    def add(self, name: str, status: Status, message: str, fix: str = "", **data: Any) -> CheckResult:
        r = CheckResult(name, status, message, fix, data)
        self.results.append(r)
        return r

    def get(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 warnings, 2 errors (the convention the CLI and ExecStartPre rely on)."""
        return max((_RANK[r.status] for r in self.results), default=0)

    @property
    def errors(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "duration_s": round(self.duration_s, 3),
                "platform": self.platform, "dtype": self.dtype,
                "results": [asdict(r) for r in self.results], "changes": list(self.changes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_text(self) -> str:
        """A plain table: one line per check, the fix indented under anything not ok."""
        width = max((len(r.name) for r in self.results), default=10)
        lines = []
        for r in self.results:
            lines.append(f"{r.status.upper():5} {r.name:<{width}}  {r.message}")
            if r.fix and r.status in ("warn", "error"):
                lines.append(f"{'':5} {'':<{width}}  fix: {r.fix}")
        for c in self.changes:
            lines.append(f"FIXED {c}")
        n = {s: sum(r.status == s for r in self.results) for s in ("ok", "warn", "error")}
        lines.append(f"{n['ok']} ok, {n['warn']} warnings, {n['error']} errors in {self.duration_s:.1f} s")
        return "\n".join(lines)
