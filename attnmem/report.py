"""Plots, an HTML page and a JSON summary of an ``attnmem scan`` results file.

``make_report(results, out_dir, labels=None)`` writes into ``out_dir``:

- ``scores.png``: the score histogram (per label when labels are given) and, with labels, the
  ROC curve with its AUROC and TPR at 1/3/5/10 % FPR under both conventions of
  :func:`attnmem.evaluate.summarize` ("nearest": Ren et al.'s code; "below": Wen et al.'s);
- ``tokens.png`` (attention metrics): the per-token attention of the top-scoring prompts and,
  for contrast, of the lowest-scoring one: BOS, prompt tokens, EOS and the first summary
  (padding) positions in different colours, the remaining summary positions as one summed bar;
- ``entropy_steps.png`` (metric D): attention entropy over the denoising steps, per prompt and
  the mean per label, with the steps the metric averages shaded;
- ``report.html``: one self-contained page (the PNGs embedded as base64) with the tables;
- ``summary.json``: counts, the evaluation, per-label score statistics, the ranking, failures.

Each PNG carries its own title and legend, so it reads without the HTML page.

**Labels file** (1 = memorized, 0 = not), one of:

- plain text, one ``0``/``1`` per non-blank line, in the order of the prompt file's non-blank
  lines (line k labels prompt id k, the ids ``attnmem scan`` assigns);
- two columns ``id,label`` per line (comma, tab or spaces; an ``id,label`` header is allowed);
- JSON: a list of 0/1 (index = id) or an object ``{"id": 0/1}``.

Every scored id needs a label; labels of ids that were not scored are ignored.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnmem.errors import ReportError

__all__ = ["ReportError", "Report", "make_report", "compare_reports", "read_labels", "load_results"]

_COLORS = {
    "bos": "#8c8c8c",
    "prompt": "#1f77b4",
    "eos": "#ff7f0e",
    "summary": "#9467bd",
    "summary_rest": "#c5b0d5",
}
_LABEL_COLORS = {1: "#d62728", 0: "#1f77b4", None: "#555555"}
_LABEL_NAMES = {1: "memorized", 0: "not memorized", None: "unlabelled"}
_TOKEN_PLOTS = 4  # top-scoring prompts shown per token; plus the lowest-scoring one
_SUMMARY_SHOWN = 3  # summary positions shown one by one after EOS; the rest are summed
_FPRS = (0.01, 0.03, 0.05, 0.10)


@dataclass
class Report:
    """What :func:`make_report` wrote and computed."""

    out_dir: Path
    html: Path
    summary_json: Path
    pngs: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def load_results(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scored records, failed records) of a results file, one record per id, sorted by id.

    Accepts an unmerged or interrupted file too (a partial last line is ignored; for an id
    present twice a record without error wins).
    """
    from attnmem.results import best_records

    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no results file {path}")
    best = best_records([path])
    records = [best[i] for i in sorted(best)]
    if not records:
        raise ReportError(f"{path} holds no results")
    scored = [r for r in records if r.get("error") is None and r.get("score") is not None]
    failed = [r for r in records if not (r.get("error") is None and r.get("score") is not None)]
    return scored, failed


def _label_value(raw: Any, where: str) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return int(raw)
    if isinstance(raw, str) and raw.strip() in ("0", "1"):
        return int(raw.strip())
    raise ReportError(f"{where}: a label must be 0 or 1, got {raw!r}")


def read_labels(path: str | Path) -> dict[int, int]:
    """id -> 0/1 from a labels file (formats in the module docstring)."""
    return _read_labels(path)[0]


def _read_labels(path: str | Path) -> tuple[dict[int, int], bool]:
    """(id -> 0/1, whether the file is a plain list: one label per prompt, in order)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read labels file {path}: {e}") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, list):
            return {i: _label_value(v, f"{path}[{i}]") for i, v in enumerate(obj)}, True
        if isinstance(obj, dict):
            try:
                return {int(k): _label_value(v, f"{path}[{k!r}]") for k, v in obj.items()}, False
            except ValueError:
                raise ReportError(f"{path}: JSON keys must be prompt ids (integers)") from None
        raise ReportError(f"{path}: JSON labels must be a list or an object")
    rows = [
        (n, re.split(r"[,\t ]+", line.strip()))
        for n, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]
    if rows and len(rows[0][1]) == 2 and not rows[0][1][0].strip().lstrip("-").isdigit():
        rows = rows[1:]  # an "id,label" header
    if not rows:
        raise ReportError(f"{path}: no labels (the file is empty)")
    widths = {len(fields) for _, fields in rows}
    if widths == {1}:
        return {k: _label_value(f[0], f"{path}, line {n}") for k, (n, f) in enumerate(rows)}, True
    if widths == {2}:
        out = {}
        for n, (i, v) in rows:
            if not i.lstrip("-").isdigit():
                raise ReportError(f"{path}, line {n}: the id must be an integer, got {i!r}")
            out[int(i)] = _label_value(v, f"{path}, line {n}")
        return out, False
    raise ReportError(
        f"{path}: every line must hold one label (0/1) or two fields (id, label); "
        f"found lines with {sorted(widths)} fields"
    )


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _plain(s: str) -> str:
    """Text for matplotlib without math-mode parsing of ``$``."""
    return s.replace("$", r"\$")


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _figure(width: float, height: float) -> Any:
    # A bare Figure (no pyplot): no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, format="png")
    return path


def _is_demo_model(model: Any) -> bool:
    from attnmem.pipelines import BUILTIN_MODELS

    return model in BUILTIN_MODELS


def _scores_png(
    path: Path,
    scores: np.ndarray,
    labels: np.ndarray | None,
    evaluation: dict[str, Any] | None,
    title: str,
) -> Path:
    from attnmem.evaluate import roc_curve

    fig = _figure(11.5 if labels is not None else 6.5, 4.6)
    axes = fig.subplots(1, 2 if labels is not None else 1, squeeze=False)[0]
    ax = axes[0]
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(len(scores) // 3, 8, 40)) + 1)
    groups = (
        [(None, scores)] if labels is None else [(1, scores[labels == 1]), (0, scores[labels == 0])]
    )
    for lab, s in groups:
        if len(s):
            ax.hist(
                s,
                bins=bins,
                alpha=0.55,
                color=_LABEL_COLORS[lab],
                label=f"{_LABEL_NAMES[lab]} (n={len(s)})",
                edgecolor="white",
                linewidth=0.4,
            )
    ax.set_xlabel("score (higher = more likely memorized)")
    ax.set_ylabel("prompts")
    ax.set_title("Score distribution")
    ax.legend(frameon=False)
    if labels is not None and evaluation is not None:
        ax = axes[1]
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
        ax.plot(fpr, tpr, color="#d62728", lw=2, label=f"AUROC = {evaluation['auroc']:.3f}")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"ROC ({evaluation['n_pos']} memorized, {evaluation['n_neg']} not)")
        ax.legend(loc="lower right", frameon=False)
        t = evaluation["tpr_at_fpr"]
        lines = ["TPR at FPR   nearest  below"] + [
            f"{float(k) * 100:>6g} %    {t['nearest'][k]:>7.3f}  {t['below'][k]:>5.3f}"
            for k in t["nearest"]
        ]
        ax.text(
            0.98,
            0.30,
            "\n".join(lines),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            family="monospace",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round"},
        )
    fig.suptitle(_plain(title), fontsize=10)
    return _save(fig, path)


def _token_bars(rec: dict[str, Any]) -> tuple[list[str], list[float], list[str]]:
    """(labels, values, colour keys) for one prompt: positions 0..L-1, a few summary
    positions, and the sum over the remaining summary positions."""
    att = rec["attention"]
    tokens = rec.get("tokens") or [str(j) for j in range(len(att))]
    L = rec.get("L") or len(att)
    names = {"<|startoftext|>": "<bos>", "<|endoftext|>": "<eos>"}
    labels, values, kinds = [], [], []
    for j in range(min(len(att), L + _SUMMARY_SHOWN)):
        kind = "bos" if j == 0 else "prompt" if j < L - 1 else "eos" if j == L - 1 else "summary"
        tok = names.get(tokens[j], tokens[j])
        labels.append(f"{tok}·{j}" if kind == "summary" else tok)
        values.append(float(att[j]))
        kinds.append(kind)
    rest = att[L + _SUMMARY_SHOWN :]
    if rest:
        labels.append(f"Σ {L + _SUMMARY_SHOWN}–{len(att) - 1}")
        values.append(float(sum(rest)))
        kinds.append("summary_rest")
    return labels, values, kinds


def _tokens_png(path: Path, ranked: list[dict[str, Any]], label_of: dict[int, int]) -> Path | None:
    with_att = [(k, r) for k, r in enumerate(ranked, 1) if r.get("attention")]
    if not with_att:
        return None
    rows = [(f"#{k}", r) for k, r in with_att[:_TOKEN_PLOTS]]
    if len(with_att) > _TOKEN_PLOTS:
        k, r = with_att[-1]
        rows.append((f"lowest score (#{k})", r))
    widest = max(len(_token_bars(r)[0]) for _, r in rows)
    fig = _figure(max(8.0, 0.22 * widest + 2.0), 2.6 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (rank, rec) in zip(axes, rows):
        labels, values, kinds = _token_bars(rec)
        x = np.arange(len(values))
        # BOS (and the summed summary bar) can take most of the mass: clip them so the
        # prompt tokens stay readable, and print their value above the clipped bar.
        top = max(
            (v for v, k in zip(values, kinds) if k not in ("bos", "summary_rest")), default=0.0
        )
        ceiling = top * 1.4 if top > 0 and max(values) > 2.5 * top else None
        shown = values if ceiling is None else [min(v, ceiling) for v in values]
        bars = ax.bar(x, shown, color=[_COLORS[k] for k in kinds], width=0.8)
        if ceiling is not None:
            ax.set_ylim(0, ceiling * 1.12)
            for j, v in enumerate(values):
                if v > ceiling:
                    bars[j].set_hatch("//")
                    ax.text(j, ceiling * 1.01, f"{v:.2f}↑", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [_plain(s) for s in labels], rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(values) - 0.4)
        ax.set_ylabel("attention", fontsize=8)
        lab = label_of.get(rec["id"])
        tag = f" [{_LABEL_NAMES[lab]}]" if lab is not None else ""
        trunc = " (truncated to 77 tokens)" if rec.get("truncated") else ""
        ax.set_title(
            _plain(
                f"{rank}  id {rec['id']}  score {rec['score']:.4f}{tag}{trunc}: "
                f"{_short(rec['prompt'], 90)}"
            ),
            fontsize=8,
            loc="left",
        )
    from matplotlib.patches import Patch

    legend = [
        Patch(color=_COLORS["bos"], label="BOS"),
        Patch(color=_COLORS["prompt"], label="prompt tokens"),
        Patch(color=_COLORS["eos"], label="EOS"),
        Patch(color=_COLORS["summary"], label="summary (padding) tokens"),
        Patch(color=_COLORS["summary_rest"], label="remaining summary tokens, summed"),
    ]
    legend.append(
        Patch(facecolor="white", edgecolor="black", hatch="//", label="clipped (value above)")
    )
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(
        "Cross-attention per token (pixel, head and layer averaged): top-scoring prompts",
        fontsize=10,
    )
    return _save(fig, path)


def _entropy_png(
    path: Path, scored: list[dict[str, Any]], label_of: dict[int, int], last: int | None
) -> Path | None:
    series = [r for r in scored if r.get("entropy_steps")]
    if not series:
        return None
    fig = _figure(8.0, 4.6)
    ax = fig.subplots()
    by_label: dict[Any, list[np.ndarray]] = {}
    steps_all: list[int] = []
    for r in series:
        steps = r["entropy_steps"]["steps"]
        ent = np.asarray(r["entropy_steps"]["entropy"], dtype=float)
        lab = label_of.get(r["id"])
        ax.plot(steps, ent, color=_LABEL_COLORS[lab], alpha=0.25, lw=0.8)
        by_label.setdefault(lab, []).append(ent)
        steps_all = steps if len(steps) > len(steps_all) else steps_all
    for lab, curves in by_label.items():
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(
            steps_all[:n],
            mean,
            color=_LABEL_COLORS[lab],
            lw=2.5,
            label=f"mean, {_LABEL_NAMES[lab]} (n={len(curves)})",
        )
    if last and steps_all:
        k = min(last, len(steps_all))
        ax.axvspan(steps_all[-k] - 0.5, steps_all[-1] + 0.5, color="#eeeeee", zorder=0)
        ax.text(
            steps_all[-k],
            0.98,
            f" last {k} steps (metric D)",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
        )
    ax.set_xlabel("denoising step index (0 = noisiest)")
    ax.set_ylabel("attention entropy (nats)")
    ax.set_title("Attention entropy over denoising steps")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _stats(s: np.ndarray) -> dict[str, float | int]:
    return {
        "n": int(len(s)),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "median": float(np.median(s)),
        "max": float(s.max()),
    }


def _generated(folder: Path) -> dict[str, dict[str, Any]]:
    """prompt -> what ``attnmem generate`` made of it in ``folder`` (image path, similarity),
    for the prompts whose image exists."""
    from attnmem.generate import RESULTS_NAME
    from attnmem.results import best_records

    path = folder / RESULTS_NAME
    if not path.is_file():
        raise ReportError(f"--generated {folder}: no {RESULTS_NAME} (run attnmem generate first)")
    out = {}
    for rec in best_records([path]).values():
        image = folder / str(rec.get("image") or "")
        if rec.get("error") is None and rec.get("image") and image.is_file():
            out[rec["prompt"]] = {
                "image": str(image),
                "pixel_r": rec.get("pixel_r"),
                "rms": rec.get("rms"),
                "mitigation": (rec.get("mitigation") or {}).get("spec"),
            }
    return out


def make_report(
    results: str | Path,
    out_dir: str | Path = "report",
    labels: str | Path | None = None,
    top: int = 10,
    generated: str | Path | None = None,
) -> Report:
    """Write the plots, ``report.html`` and ``summary.json`` for a results file into ``out_dir``.

    ``generated``: a folder written by ``attnmem generate``; the top prompts that it holds
    (matched by prompt text) are shown with their plain and mitigated images."""
    results = Path(results)
    scored, failed = load_results(results)
    if not scored:
        raise ReportError(
            f"{results}: none of the {len(failed)} prompts has a score (all failed); first "
            f"error: {failed[0].get('error')}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"-o {out_dir} is a file; the report is a folder (PNGs, HTML, JSON)")
    label_of: dict[int, int] = {}
    if labels is not None:
        all_labels, is_list = _read_labels(labels)
        n_prompts = scored[0].get("n_prompts")
        if n_prompts is not None:
            beyond = sorted(i for i in all_labels if not 0 <= i < n_prompts)
            if (is_list and len(all_labels) != n_prompts) or beyond:
                what = f"{len(all_labels)} labels" if is_list else f"labels for ids {beyond[:5]}"
                raise ReportError(
                    f"{labels} has {what}, but the prompt file of these results has {n_prompts} "
                    "prompts (non-blank lines): one label per non-blank prompt line, in order "
                    "(a blank line in one file but not the other shifts every label after it)"
                )
        missing = [r["id"] for r in scored if r["id"] not in all_labels]
        if missing:
            raise ReportError(
                f"{labels} has no label for {len(missing)} scored prompt id(s), e.g. "
                f"{missing[:5]}; the labels file must cover every prompt of the results "
                f"({len(all_labels)} labels for ids up to {max(r['id'] for r in scored)})"
            )
        label_of = {r["id"]: all_labels[r["id"]] for r in scored}
    out_dir.mkdir(parents=True, exist_ok=True)

    first = scored[0]
    metric, model, settings = first.get("metric"), first.get("model"), first.get("settings")
    scores = np.array([r["score"] for r in scored], dtype=float)
    y = np.array([label_of[r["id"]] for r in scored]) if label_of else None
    evaluation = None
    if y is not None and 0 < y.sum() < len(y):
        from attnmem.evaluate import summarize

        evaluation = summarize(scores, y, _FPRS)
        # With n negatives the FPR moves in steps of 1/n: a target below 1/n can only be met
        # by a threshold above every negative, so that TPR rests on no false positive at all.
        evaluation["fpr_below_resolution"] = [
            f"{f:g}" for f in _FPRS if f < 1.0 / evaluation["n_neg"]
        ]
    order = sorted(range(len(scored)), key=lambda k: (-scored[k]["score"], scored[k]["id"]))
    ranked = [scored[k] for k in order]

    made = _generated(Path(generated)) if generated is not None else {}
    demo = _is_demo_model(model)
    title = f"attnmem scan of {results.name}: model {model}, metric {metric}, {len(scored)} prompts"
    if demo:
        title += "\nrandom-weight demonstration model: these scores say nothing about memorization"
    pngs = [
        _scores_png(out_dir / "scores.png", scores, y if evaluation else None, evaluation, title)
    ]
    tok = _tokens_png(out_dir / "tokens.png", ranked, label_of)
    last = settings.get("last") if isinstance(settings, dict) else None
    ent = _entropy_png(out_dir / "entropy_steps.png", scored, label_of, last)
    pngs += [p for p in (tok, ent) if p is not None]

    per_label = {"all": _stats(scores)}
    if y is not None:
        for lab in (1, 0):
            if (y == lab).any():
                per_label[_LABEL_NAMES[lab]] = _stats(scores[y == lab])
    summary: dict[str, Any] = {
        "results": str(results),
        "model": model,
        "demo_model": demo,
        "metric": metric,
        "settings": settings,
        "n_records": len(scored) + len(failed),
        "n_scored": len(scored),
        "n_failed": len(failed),
        "n_truncated": sum(1 for r in scored if r.get("truncated")),
        "labels": str(labels) if labels is not None else None,
        "evaluation": evaluation,
        "score_stats": per_label,
        "top": [
            {
                "rank": k + 1,
                "id": r["id"],
                "score": r["score"],
                "label": label_of.get(r["id"]),
                "L": r.get("L"),
                "truncated": r.get("truncated"),
                "triggers": r.get("triggers") or [],
                "prompt": r["prompt"],
                "generated": made.get(r["prompt"]),
            }
            for k, r in enumerate(ranked[:top])
        ],
        "failed": [
            {"id": r["id"], "prompt": r.get("prompt"), "error": r.get("error")} for r in failed
        ],
        "files": [p.name for p in pngs] + ["report.html", "summary.json"],
    }
    if y is not None and evaluation is None:
        which = "memorized (1)" if y.all() else "not memorized (0)"
        summary["evaluation_skipped"] = (
            f"all {len(y)} scored prompts are labelled {which}; the ROC curve, AUROC and TPR "
            "at FPR need both memorized and non-memorized prompts"
        )
    summary_path = out_dir / "summary.json"
    summary_path.write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    html_path = out_dir / "report.html"
    html_path.write_text(_html(summary, pngs), encoding="utf-8")
    return Report(
        out_dir=out_dir, html=html_path, summary_json=summary_path, pngs=pngs, summary=summary
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.warn { background: #fff4e5; border: 1px solid #f0b35b; padding: 0.6em 1em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _html(summary: dict[str, Any], pngs: list[Path]) -> str:
    e = html.escape
    images = {p.name: base64.b64encode(p.read_bytes()).decode("ascii") for p in pngs}

    def img(name: str, alt: str) -> str:
        if name not in images:
            return ""
        return f'<img alt="{e(alt)}" src="data:image/png;base64,{images[name]}">'

    def num(x: Any, digits: int = 4) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>attnmem report</title>",
        f"<style>{_CSS}</style></head><body><h1>attnmem report</h1>",
    ]
    if summary["demo_model"]:
        parts.append(
            f"<p class='warn'>Model <code>{e(str(summary['model']))}</code> is a built-in "
            "<b>random-weight</b> model for demonstration only: these scores say nothing "
            "about memorization. Scan a real Stable Diffusion pipeline with "
            "<code>--model</code>.</p>"
        )
    parts.append(
        "<table>"
        f"<tr><th>results</th><td>{e(summary['results'])}</td></tr>"
        f"<tr><th>model</th><td>{e(str(summary['model']))}</td></tr>"
        f"<tr><th>metric</th><td>{e(str(summary['metric']))}</td></tr>"
        f"<tr><th>settings</th><td><code>{e(json.dumps(summary['settings']))}</code></td></tr>"
        f"<tr><th>prompts</th><td>{summary['n_scored']} scored, {summary['n_failed']} failed, "
        f"{summary['n_truncated']} truncated to 77 tokens</td></tr>"
        f"<tr><th>labels</th><td>{e(str(summary['labels']))}</td></tr></table>"
    )
    ev = summary["evaluation"]
    parts.append("<h2>Detection</h2>")
    if ev is not None:
        rows = "".join(
            f"<tr><td class='num'>{float(k) * 100:g} %</td>"
            f"<td class='num'>{ev['tpr_at_fpr']['nearest'][k]:.3f}</td>"
            f"<td class='num'>{ev['tpr_at_fpr']['below'][k]:.3f}</td></tr>"
            for k in ev["tpr_at_fpr"]["nearest"]
        )
        parts.append(
            f"<p>AUROC <b>{ev['auroc']:.4f}</b> ({ev['n_pos']} memorized, {ev['n_neg']} not; "
            "ties count half).</p><table><tr><th>FPR</th><th>TPR, nearest ROC point "
            "(Ren et al.)</th><th>TPR, last point below (Wen et al.)</th></tr>"
            f"{rows}</table>"
        )
        if ev.get("fpr_below_resolution"):
            low = ", ".join(f"{float(k) * 100:g} %" for k in ev["fpr_below_resolution"])
            parts.append(
                f"<p class='warn'>Only {ev['n_neg']} non-memorized prompts: the FPR moves in "
                f"steps of {100 / ev['n_neg']:.3g} %, so TPR at {low} FPR can only count "
                "thresholds above every negative. More negatives are needed to measure it.</p>"
            )
    elif summary.get("evaluation_skipped"):
        parts.append(f"<p>No ROC: {e(summary['evaluation_skipped'])}.</p>")
    else:
        parts.append("<p>No labels given (<code>--labels</code>): scores only.</p>")
    parts.append(img("scores.png", "score histogram and ROC"))
    parts.append("<h2>Top prompts</h2><table><tr><th>rank</th><th>id</th><th>score</th>")
    parts.append("<th>label</th><th>L</th><th>trigger tokens</th><th>prompt</th></tr>")
    for t in summary["top"]:
        label = "" if t["label"] is None else _LABEL_NAMES[t["label"]]
        trig = ", ".join(f"{tok} ({v:.3f})" for _, tok, v in t["triggers"][:5])
        trunc = " (truncated)" if t["truncated"] else ""
        parts.append(
            f"<tr><td class='num'>{t['rank']}</td><td class='num'>{t['id']}</td>"
            f"<td class='num'>{num(t['score'])}</td><td>{e(label)}</td>"
            f"<td class='num'>{'' if t['L'] is None else t['L']}{trunc}</td>"
            f"<td>{e(trig)}</td><td>{e(t['prompt'])}</td></tr>"
        )
    parts.append("</table>")
    if "tokens.png" in images:
        parts.append("<h2>Per-token attention</h2>")
        parts.append(
            "<p>Attention of each key position averaged over pixels, heads and the metric's "
            "layers: BOS (grey), prompt tokens (blue), EOS (orange), summary/padding tokens "
            "(purple). Memorized prompts move attention from BOS onto trigger tokens.</p>"
        )
        parts.append(img("tokens.png", "per-token attention of the top prompts"))
    shown = [t for t in summary["top"] if t.get("generated")]
    if shown:
        parts.append("<h2>Generated images of the top prompts</h2>")
        parts.append(
            "<p>From <code>attnmem generate</code>: each row one image, plain (left) and "
            "mitigated (right) from the same starting noise; pixel_r is their pixel "
            "correlation (1 = unchanged).</p>"
        )
        for t in shown:
            gen = t["generated"]
            data = base64.b64encode(Path(gen["image"]).read_bytes()).decode("ascii")
            parts.append(
                f"<p>#{t['rank']} (id {t['id']}), mitigation <code>{e(str(gen['mitigation']))}"
                f"</code>, pixel_r {num(gen['pixel_r'], 3)}, RMS {num(gen['rms'], 3)}: "
                f"{e(t['prompt'])}<br><img alt='plain and mitigated images of prompt "
                f"{t['id']}' src='data:image/png;base64,{data}'></p>"
            )
    if "entropy_steps.png" in images:
        parts.append("<h2>Entropy over steps</h2>")
        parts.append(img("entropy_steps.png", "attention entropy over denoising steps"))
    if summary["failed"]:
        parts.append(
            "<h2>Failed prompts</h2><table><tr><th>id</th><th>prompt</th><th>error</th></tr>"
        )
        for f in summary["failed"]:
            parts.append(
                f"<tr><td class='num'>{f['id']}</td><td>{e(str(f['prompt']))}</td>"
                f"<td>{e(str(f['error']))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def compare_reports(
    results: list[str | Path], out_dir: str | Path, labels: str | Path, top: int = 10
) -> dict[str, Any]:
    """Several detectors side by side: one report per results file (in ``out_dir/<name>/``,
    ``<name>`` the file's stem, or ``<parent>-<stem>`` when two files share a stem), then
    ``compare.png`` (every ROC curve on one plot; cost per prompt against AUROC, cost as the
    records' mean ``seconds`` and UNet passes) and ``compare.json``. A curve is named by its
    metric, with the file's name added when two results files have the same metric. Needs
    labels."""
    from attnmem.evaluate import roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in results]
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}-{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    if len(set(names)) < len(names):
        raise ReportError(f"results files with the same folder and file names: {names}")
    entries = []
    for path, name in zip(paths, names):
        rep = make_report(path, out_dir / name, labels=labels, top=top)
        ev = rep.summary["evaluation"]
        if ev is None:
            raise ReportError(f"{path}: no ROC (labels of a single class); cannot compare")
        scored, _ = load_results(path)
        label_of = read_labels(labels)
        entries.append(
            {
                "results": str(path),
                "report": name,
                "metric": rep.summary["metric"],
                "settings": rep.summary["settings"],
                "auroc": ev["auroc"],
                "tpr@1%": {k: ev["tpr_at_fpr"][k]["0.01"] for k in ("nearest", "below")},
                "seconds_per_prompt": float(np.mean([r.get("seconds") or 0.0 for r in scored])),
                "unet_passes_per_prompt": float(
                    np.mean(
                        [
                            (r.get("forwards") or 0)
                            + (r.get("jvps") or 0)
                            + (r.get("backwards") or 0)
                            for r in scored
                        ]
                    )
                ),
                "_scores": np.array([r["score"] for r in scored], float),
                "_labels": np.array([label_of[r["id"]] for r in scored]),
            }
        )
    fig = _figure(12.0, 4.8)
    roc_ax, cost_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
    metrics = [e["metric"] for e in entries]
    for e in entries:
        name = e["metric"] if metrics.count(e["metric"]) == 1 else f"{e['metric']} ({e['report']})"
        fpr, tpr, _ = roc_curve(e["_scores"], e["_labels"])
        roc_ax.plot(fpr, tpr, lw=2, label=f"{name}: AUROC {e['auroc']:.3f}")
        cost_ax.scatter(e["seconds_per_prompt"], e["auroc"], s=40)
        cost_ax.annotate(_plain(name), (e["seconds_per_prompt"], e["auroc"]), fontsize=8)
    roc_ax.set_xlabel("false-positive rate")
    roc_ax.set_ylabel("true-positive rate")
    roc_ax.set_title("ROC, every detector")
    roc_ax.legend(loc="lower right", frameon=False, fontsize=8)
    cost_ax.set_xscale("log")
    cost_ax.set_xlabel("seconds per prompt (as recorded by the scans)")
    cost_ax.set_ylabel("AUROC")
    cost_ax.set_title("Cost against AUROC")
    _save(fig, out_dir / "compare.png")
    summary = {
        "labels": str(labels),
        "detectors": [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries],
        "files": ["compare.png", "compare.json"],
    }
    (out_dir / "compare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
