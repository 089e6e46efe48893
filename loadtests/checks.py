"""The verdict at the end of a pass/fail load tool (overload, soak): checks printed, kept in the JSON."""

from __future__ import annotations

import json
from pathlib import Path


def conclude(report: dict, checks: list[tuple[str, bool]], json_path: Path | None) -> int:
    """Add `checks` (text, passed) to `report`, print them and write the report to `json_path` if given:
    the tool's exit code, 0 only if every check passed."""
    report["checks"] = [{"check": text, "passed": passed} for text, passed in checks]
    print("\nchecks:")
    for text, passed in checks:
        print(f"  [{'PASS' if passed else 'FAIL'}] {text}")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    return 0 if all(passed for _, passed in checks) else 1
