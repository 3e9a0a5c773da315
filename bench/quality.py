"""Quality next to speed: detection and mitigation numbers on attnmem's testbed model, read from
the committed validation (bench/results/testbed_validation.json, written by testbed/validate.py).

The testbed run behind that file does not reproduce the paper's attention signature (see
attnmem/data/testbed/README.md): its detection AUROCs are near 0.5 for every method, so they do
not rank the detectors. Rerun testbed/validate.py after retraining, then `make bench`.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VALIDATION = HERE / "results" / "testbed_validation.json"

DETECTORS = [
    ("E", "attnmem metric E (default layer)"),
    ("D", "attnmem metric D"),
    ("wen_n1", "Wen et al., n = 1"),
    ("wen_n4", "Wen et al., n = 4"),
    ("carlini_n4", "Carlini-style, n = 4"),
]


def _ci(v: list[float], digits: int = 3) -> str:
    return f"{v[0]:+.{digits}f} [{v[1]:+.{digits}f}, {v[2]:+.{digits}f}]"


def quality_lines(path: Path = VALIDATION) -> list[str]:
    """Markdown lines of the quality tables, or a line saying the validation is missing."""
    if not path.exists():
        return [f"(no testbed validation at {path.relative_to(HERE.parent)}: quality not reported)"]
    s = json.loads(path.read_text())["summary"]
    det, mit = s["detection"], s["mitigation"]
    lines = [
        "#### Quality on the testbed model (memorized vs held-out style-matched prompts)",
        "",
        "From `bench/results/testbed_validation.json`. **The testbed does not reproduce the paper's "
        "signature** (no detector separates its memorized prompts; see `attnmem/data/testbed/README.md`), "
        "so these numbers do not rank the methods.",
        "",
        "| detector | AUROC | TPR@1% FPR (nearest) | TPR@1% FPR (below) |",
        "|---|---:|---:|---:|",
    ]
    for key, name in DETECTORS:
        if key in det:
            d = det[key]
            lines.append(
                f"| {name} | {d['auroc']:.3f} | {d['tpr@1%_nearest']:.3f} | {d['tpr@1%_below']:.3f} |"
            )
    lines += [
        "",
        "| mitigation (guidance, c1) | similarity to training image, change [95% CI] | held-out: similarity to unmitigated output [95% CI] |",
        "|---|---:|---:|",
    ]
    for key, m in mit.items():
        if "mem_delta_corr_train" in m:
            g, _, c1 = key.partition("_c1_")
            lines.append(
                f"| {g.lstrip('g')}, {c1} | {_ci(m['mem_delta_corr_train'])} | {m['neg_corr_vs_plain'][0]:.3f} [{m['neg_corr_vs_plain'][1]:.3f}, {m['neg_corr_vs_plain'][2]:.3f}] |"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(quality_lines()))
