"""Write ``OUTDIR/summary.md`` for ``benchmarks/gpu_check.sh`` from what its sections left in OUTDIR.

GPU windows are short and rare, so the one file to read afterwards says everything: the
device and versions, every section's outcome (pass / fail / skip, why, how long), the test
counts, the step benchmark tables and each pass's share of the copy probe against the
≥ 85 % goal.  Standard library only (no torch import), so it runs in a fraction of a second
and still works when torch itself is what broke.

Inputs in OUTDIR: ``sections.tsv`` (name, status, reason, seconds; one line per section, as
the script recorded it), ``env.json`` (from the env section), ``<section>.xml`` (pytest's
JUnit reports), ``<section>.json`` / ``<section>.md`` (the benchmarks' results).

    python benchmarks/gpu_check_summary.py OUTDIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: The share of the copy probe's bandwidth each Triton pass should reach (issue #14).
GOAL_PCT = 85.0


def read_sections(out: Path) -> list[dict]:
    rows = []
    path = out / "sections.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                name, status, reason, seconds = (line.split("\t") + ["", "", "", ""])[:4]
                rows.append(dict(name=name, status=status, reason=reason, seconds=seconds))
    return rows


def junit_counts(path: Path) -> str:
    """``passed / failed / skipped`` from a pytest JUnit report, or why there is none."""
    if not path.exists():
        return ""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return f"unreadable JUnit report: {err}"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    text = f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"
    failed = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if failed:
        text += "; failing: " + ", ".join(failed[:12]) + (" …" if len(failed) > 12 else "")
    return text


def pass_shares(result: dict) -> list[str]:
    """Markdown rows: each MUNBa row (whole step and each pass) as a % of the copy probe, flagged."""
    lines = []
    for name, row in result.get("rows", {}).items():
        if not name.startswith("munba-"):
            continue
        if "pct_of_probe_bandwidth" not in row:
            lines.append(f"| {name} | not run: {row.get('unavailable', 'no copy probe in this run')} |||||")
            continue
        pct = row["pct_of_probe_bandwidth"]
        mark = "meets" if pct >= GOAL_PCT else "**below**"
        lines.append(
            f"| {name} | {row['median_ms']:.3f} | {row.get('bytes_moved', 0) / 1e9:.3g} | "
            f"{row['gb_per_s']:.0f} | {pct:.0f}% | {mark} |"
        )
    return lines


def env_lines(out: Path) -> list[str]:
    path = out / "env.json"
    if not path.exists():
        return ["(no env.json: the env section did not run or failed; see env.log)"]
    env = json.loads(path.read_text())
    keys = [
        ("device", "device"),
        ("cuda", "CUDA (torch build)"),
        ("torch", "torch"),
        ("triton", "triton"),
        ("python", "python"),
        ("cpp_extension", "C++ extension"),
        ("import_without_cpp", "package imports without the C++ extension"),
        ("backends", "backends available"),
        ("optional", "optional packages"),
    ]
    return [f"* {label}: {env[k]}" for k, label in keys if k in env]


def summary(out: Path) -> str:
    sections = read_sections(out)
    lines = ["# GPU check", "", *env_lines(out), "", "## Sections", ""]
    lines += ["| section | result | why | seconds | tests |", "|---|---|---|---:|---|"]
    for s in sections:
        tests = junit_counts(out / f"{s['name']}.xml")
        lines.append(f"| {s['name']} | {s['status']} | {s['reason'] or '–'} | {s['seconds']} | {tests or '–'} |")
    failed = [s["name"] for s in sections if s["status"] == "fail"]
    skipped = [s["name"] for s in sections if s["status"] == "skip"]
    lines += ["", f"Failed: {', '.join(failed) or 'none'}. Skipped: {', '.join(skipped) or 'none'}.", ""]

    shares, tables = [], []
    for s in sections:
        result_path = out / f"{s['name']}.json"
        if not result_path.exists():
            continue
        result = json.loads(result_path.read_text())
        if "rows" in result:  # the step benchmark
            label = f"{s['name']} ({result.get('device_name', result.get('device'))})"
            rows = pass_shares(result)
            if rows:
                shares += [f"| **{label}** ||||||", *rows]
        md = out / f"{s['name']}.md"
        if md.exists():
            tables += [f"### {s['name']}", "", md.read_text().rstrip(), ""]
    if shares:
        lines += [
            f"## Share of the copy probe (goal: each Triton pass ≥ {GOAL_PCT:.0f}%)",
            "",
            "Effective GB/s = the bytes the row's math must move (column GB) / median time; the copy",
            "probe (`_foreach_copy_` of one gradient, in the same run) is the bandwidth ceiling.",
            "",
            "| row | median ms | GB moved | GB/s | % of copy probe | goal |",
            "|---|---:|---:|---:|---:|---|",
            *shares,
            "",
        ]
    if tables:
        lines += ["## Benchmark tables", "", *tables]
    lines += ["## Files", "", *(f"* `{p.name}`" for p in sorted(out.iterdir()) if p.name != "summary.md"), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: gpu_check_summary.py OUTDIR")
    out = Path(args[0])
    (out / "summary.md").write_text(summary(out))


if __name__ == "__main__":
    main()
