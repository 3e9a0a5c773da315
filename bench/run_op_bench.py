"""`make bench` (op part): run the pytest-benchmark suite and write bench/results/op_cpu.{json,md}.

The markdown table gives medians and ratios against SDPA (no statistics) and eager+statistics
measured in the same run, with the machine, torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

from bench.machine import describe, header_lines

HERE = Path(__file__).resolve().parent

TARGETS = "attnmem+stats <= 1.0x SDPA (no stats) at Nq 4096 and 1024; >= 3x faster than eager+stats at Nq 4096"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    ap.add_argument("--name", default="op_cpu", help="file stem of the results")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        rc = pytest.main(
            [
                str(HERE / "test_op_bench.py"),
                "-q",
                "-p",
                "no:cacheprovider",
                "--benchmark-only",
                f"--benchmark-json={raw}",
            ]
        )
        if rc != 0:
            print(f"benchmark run failed (pytest exit {rc})", file=sys.stderr)
            return int(rc)
        data = json.loads(raw.read_text())

    rows: dict[tuple[int, int], dict[str, dict]] = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        rows.setdefault((e["Nq"], e["D"]), {})[e["case"]] = {
            "median_ms": b["stats"]["median"] * 1e3,
            "iqr_ms": b["stats"]["iqr"] * 1e3,
            "rounds": b["stats"]["rounds"],
        }
    machine = describe()
    results = []
    for (nq, d), cases in sorted(rows.items(), reverse=True):
        a, s, e = (
            cases[c]["median_ms"] for c in ("attnmem+stats", "sdpa (no stats)", "eager+stats")
        )
        results.append(
            {
                "Nq": nq,
                "D": d,
                "cases": cases,
                "attnmem_over_sdpa": a / s,
                "eager_over_attnmem": e / a,
            }
        )

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "shape": "B=2, H=8, Nk=77, fp32, diffusers (B, N, H, D) views",
        "targets": TARGETS,
        "results": results,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")

    lines = [
        "### Op on SD1.x cross-attention shapes (CPU, fp32, B=2, H=8, Nk=77)",
        "",
        *header_lines(machine),
        "",
        "| Nq | D | attnmem + stats, time / SDPA without stats | eager + stats, time / attnmem + stats |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['Nq']} | {r['D']} | {r['attnmem_over_sdpa']:.2f}x | {r['eager_over_attnmem']:.1f}x |"
        )
    lines += [
        "",
        f"Ratios of medians of 30 rounds measured in the same run (absolute times are in the JSON). Targets: {TARGETS}.",
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
