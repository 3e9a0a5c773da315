"""Quality next to speed: detection and mitigation numbers on attnmem's testbed model, read from
the committed validation (research/testbed/results/testbed_validation.json, written by
research/testbed/validate.py).

The header states which of the validation's verdicts (fixed before the results; see
attnmem/data/testbed/README.md) the testbed meets, so the tables are read for what they are.
Rerun research/testbed/validate.py after retraining, then `make bench`.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VALIDATION = ROOT / "research" / "testbed" / "results" / "testbed_validation.json"

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
        return [f"(no testbed validation at {path.relative_to(ROOT)}: quality not reported)"]
    s = json.loads(path.read_text())["summary"]
    det, mit = s["detection"], s["mitigation"]
    verdicts = s.get("verdicts", {})
    met = [k for k, v in verdicts.items() if v["met"]]
    missed = [k for k, v in verdicts.items() if not v["met"]]
    if not verdicts:
        status = "The validation has no verdicts: read the model card before these numbers."
    elif not missed:
        status = "The testbed meets every verdict of its validation (" + ", ".join(met) + ")."
    else:
        status = (
            f"Verdicts met: {', '.join(met) or 'none'}; **not met: {', '.join(missed)}** "
            "(see `attnmem/data/testbed/README.md` for what this does and does not show)."
        )
    lines = [
        "#### Quality on the testbed model (memorized vs held-out style-matched prompts)",
        "",
        f"From `research/testbed/results/testbed_validation.json`. {status}",
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
        "| mitigation (guidance, bos_scale) | memorization rate: unmitigated → mitigated | similarity to training image, change [95% CI] | held-out: similarity to unmitigated output [95% CI] |",
        "|---|---:|---:|---:|",
    ]
    for key, m in mit.items():
        if "mem_delta_corr_train" in m:
            g, _, c1 = key.partition("_c1_")
            base = mit.get(f"{g}_none", {}).get("mem_rate")
            rate = f"{base[0]:.2f} → {m['mem_rate'][0]:.2f}" if base else f"{m['mem_rate'][0]:.2f}"
            lines.append(
                f"| {g.lstrip('g')}, {c1} | {rate} | {_ci(m['mem_delta_corr_train'])} | {m['neg_corr_vs_plain'][0]:.3f} [{m['neg_corr_vs_plain'][1]:.3f}, {m['neg_corr_vs_plain'][2]:.3f}] |"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(quality_lines()))
