"""Quality next to speed: detection and mitigation numbers on attnmem's testbed model, read from
the committed validation of the bundled checkpoint (research/testbed/results/, written by
research/testbed/validate.py: ``testbed_validation.json`` for a run's final weights,
``testbed_validation_step<N>.json`` for the snapshot of step N; :func:`bundled_validation`).

The header states which of the validation's verdicts (fixed before the results; see
attnmem/data/testbed/README.md) the testbed meets, so the tables are read for what they are.
Rerun research/testbed/validate.py after retraining, then `make bench`.

The coupling with the validation file is this module only: :func:`detector_quality` and
:func:`mitigation_quality` find a benchmark row's entry by key (:func:`validation_keys`: e.g.
``wen_n4``, ``anisotropy_n1`` or ``anisotropy``; a mitigator by guidance and spec string, e.g.
``g7.5_cfg-delay:mode=static``, Ren et al.'s as ``g7.5_c1_<bos_scale>``) and accept an AUROC as a number or as ``[mean, lo, hi]``. A row whose
key the validation lacks shows "–".
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "research" / "testbed" / "results"
MODEL = ROOT / "attnmem" / "data" / "testbed"


def bundled_validation(model: Path = MODEL) -> Path:
    """The validation file of the checkpoint the model folder holds: a snapshot's
    ``training.json`` names the run it was taken from (``snapshot_of_run``)."""
    info = json.loads((model / "training.json").read_text())
    if "snapshot_of_run" in info:
        return RESULTS / f"testbed_validation_step{info['steps']}.json"
    return RESULTS / "testbed_validation.json"


VALIDATION = bundled_validation()

DETECTORS = [
    ("E", "attnmem metric E (the model's calibrated layer)"),
    ("E (default layer)", "attnmem metric E (default layer)"),
    ("D", "attnmem metric D"),
    ("wen_n1", "Wen et al., n = 1"),
    ("wen_n4", "Wen et al., n = 4"),
    ("carlini_n4", "Carlini-style, n = 4"),
]


def _ci(v: list[float], digits: int = 3) -> str:
    return f"{v[0]:+.{digits}f} [{v[1]:+.{digits}f}, {v[2]:+.{digits}f}]"


def _summary(path: Path = VALIDATION) -> dict | None:
    return json.loads(path.read_text())["summary"] if path.exists() else None


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _mean(v) -> float:
    return float(v[0] if isinstance(v, (list, tuple)) else v)


def validation_keys(metric: str, options: dict) -> list[str]:
    """Keys under which the validation may hold a detector's numbers, most specific first."""
    n = options.get("n")
    keys = []
    if metric == "wen" and options.get("end", 1) > 1:
        keys.append(f"wen_n{n or 1}_steps{options['end']}")
    elif n is not None:
        keys.append(f"{metric}_n{n}")
    if metric != "wen" or options.get("end", 1) == 1:
        keys.append(metric)
    return keys


def detector_quality(metric: str, options: dict, path: Path = VALIDATION) -> dict | None:
    """AUROC (``auroc``: mean; ``auroc_text``: with its interval when given) and TPR at 1 % FPR
    under both conventions of the first matching validation entry, or None."""
    s = _summary(path)
    det = (s or {}).get("detection", {})
    for key in validation_keys(metric, options):
        if key in det:
            d = det[key]
            a = d["auroc"]
            text = (
                f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]"
                if isinstance(a, (list, tuple))
                else f"{a:.3f}"
            )
            return {
                "key": key,
                "auroc": _mean(a),
                "auroc_text": text,
                "tpr_nearest": _mean(d["tpr@1%_nearest"]),
                "tpr_below": _mean(d["tpr@1%_below"]),
            }
    return None


def mitigation_quality(spec: str, guidance: float = 7.5, path: Path = VALIDATION) -> str | None:
    """The validation's memorization-rate change and held-out similarity for a mitigator spec."""
    s = _summary(path)
    mit = (s or {}).get("mitigation", {})
    key = f"g{guidance:g}_{spec}"
    if spec.startswith("attention"):
        from attnmem.mitigate import parse

        key = f"g{guidance:g}_c1_{parse(spec).bos_scale:g}"
    m = mit.get(key)
    if not m or "mem_rate" not in m:
        return None
    base = mit.get(f"g{guidance:g}_none", {}).get("mem_rate")
    rate = (
        f"memorization {_mean(base):.2f} → {_mean(m['mem_rate']):.2f}"
        if base
        else f"memorization {_mean(m['mem_rate']):.2f}"
    )
    if "neg_corr_vs_plain" in m:
        rate += f"; held-out r with unmitigated {_mean(m['neg_corr_vs_plain']):.2f}"
    return rate


def quality_lines(path: Path = VALIDATION) -> list[str]:
    """Markdown lines of the quality tables, or a line saying the validation is missing."""
    if not path.exists():
        return [f"(no testbed validation at {_shown(path)}: quality not reported)"]
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
        f"From `{_shown(path)}`. {status}",
        "",
        "| detector | AUROC | TPR@1% FPR (nearest) | TPR@1% FPR (below) |",
        "|---|---:|---:|---:|",
    ]
    for key, name in DETECTORS:
        if key in det:
            d = det[key]
            lines.append(
                f"| {name} | {_mean(d['auroc']):.3f} | {_mean(d['tpr@1%_nearest']):.3f} | {_mean(d['tpr@1%_below']):.3f} |"
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
