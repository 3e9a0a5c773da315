"""``attnmem report``: PNGs, the self-contained HTML page and summary.json, with and without
labels, for attention metrics (E, D) and for baselines without attention (wen)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attnmem import cli
from attnmem.evaluate import auroc, summarize
from attnmem.report import ReportError, make_report, read_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synth_records(n_pos: int = 6, n_neg: int = 7, metric: str = "E") -> list[dict]:
    """Records shaped like attnmem scan's, with BOS-heavy attention (as in real SD)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_pos + n_neg):
        memorized = i < n_pos
        L = 4 + i % 6
        words = [f"w{i}_{j}" for j in range(L - 2)]
        tokens = ["<|startoftext|>", *words] + ["<|endoftext|>"] * (77 - L + 1)
        att = np.full(77, 0.002)
        att[0] = 0.6 if memorized else 0.9
        att[1 : L - 1] = rng.uniform(0.01, 0.08 if memorized else 0.02, L - 2)
        att /= att.sum()
        rec = {
            "id": i,
            "prompt": f"prompt {i} costs $10 <i>italic</i>",
            "seed": i,
            "metric": metric,
            "settings": {"metric": metric, "num_inference_steps": 50, "last": 10},
            "model": "some/model",
            "dtype": "float16",
            "score": float(rng.normal(4.0 + memorized, 0.4)),
            "L": L,
            "truncated": i == 2,
            "tokens": tokens,
            "attention": att.round(7).tolist(),
            "triggers": [[1, words[0], float(att[1])]],
            "entropy_steps": None,
            "forwards": 1,
            "seconds": 0.1,
            "error": None,
        }
        if metric == "D":
            rec["entropy_steps"] = {
                "steps": list(range(50)),
                "entropy": (np.linspace(1.0, 0.5, 50) + memorized).round(6).tolist(),
            }
        if metric == "wen":
            rec.update(L=None, truncated=None, tokens=None, attention=None, triggers=[])
        out.append(rec)
    return out


def write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def labels_file(path: Path, n_pos: int = 6, n_neg: int = 7) -> Path:
    path.write_text("\n".join(["1"] * n_pos + ["0"] * n_neg) + "\n", encoding="utf-8")
    return path


def check_pngs(rep, names: set[str]) -> None:
    assert {p.name for p in rep.pngs} == names
    for p in rep.pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    page = rep.html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(names)
    assert "<img" in page and 'src="http' not in page  # self-contained


def test_report_with_labels(tmp_path):
    recs = synth_records()
    res = write(tmp_path / "results.jsonl", recs)
    rep = make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "labels.txt"), top=5)
    check_pngs(rep, {"scores.png", "tokens.png"})
    summary = json.loads(rep.summary_json.read_text(encoding="utf-8"))
    scores = [r["score"] for r in recs]
    labels = [1] * 6 + [0] * 7
    ev = dict(summary["evaluation"])
    assert ev.pop("fpr_below_resolution") == ["0.01", "0.03", "0.05", "0.1"]  # 7 negatives
    assert ev == summarize(scores, labels)
    assert summary["evaluation"]["auroc"] == pytest.approx(auroc(scores, labels))
    assert set(summary["evaluation"]["tpr_at_fpr"]) == {"nearest", "below"}
    assert set(summary["evaluation"]["tpr_at_fpr"]["below"]) == {"0.01", "0.03", "0.05", "0.1"}
    top = summary["top"]
    assert len(top) == 5 and [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert [t["score"] for t in top] == sorted(scores, reverse=True)[:5]
    assert all(t["label"] == labels[t["id"]] for t in top)
    assert summary["n_scored"] == 13 and summary["n_failed"] == 0 and summary["n_truncated"] == 1
    assert summary["score_stats"]["memorized"]["n"] == 6
    assert not summary["demo_model"]
    page = rep.html.read_text(encoding="utf-8")
    assert "AUROC" in page and "Wen et al." in page and "Ren et al." in page
    assert "&lt;i&gt;italic&lt;/i&gt;" in page and "<i>italic</i>" not in page  # escaped


def test_report_without_labels(tmp_path):
    res = write(tmp_path / "results.jsonl", synth_records())
    rep = make_report(res, tmp_path / "rep")
    check_pngs(rep, {"scores.png", "tokens.png"})
    assert rep.summary["evaluation"] is None and rep.summary["labels"] is None
    assert all(t["label"] is None for t in rep.summary["top"])
    assert "No labels given" in rep.html.read_text(encoding="utf-8")
    assert (tmp_path / "rep" / "summary.json").is_file()


def test_report_metric_d_plots_entropy_over_steps(tmp_path):
    res = write(tmp_path / "results.jsonl", synth_records(metric="D"))
    rep = make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "l.txt"))
    check_pngs(rep, {"scores.png", "tokens.png", "entropy_steps.png"})


def test_report_baseline_without_attention(tmp_path):
    res = write(tmp_path / "results.jsonl", synth_records(metric="wen"))
    rep = make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "l.txt"))
    check_pngs(rep, {"scores.png"})
    assert "Per-token attention" not in rep.html.read_text(encoding="utf-8")


def test_report_lists_failures_and_ignores_a_partial_line(tmp_path):
    recs = synth_records()
    recs[3] = dict(recs[3], score=None, error="RuntimeError: boom")
    res = write(tmp_path / "results.jsonl", recs, tail='{"id": 13, "prom')
    rep = make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "l.txt"))
    assert rep.summary["n_failed"] == 1 and rep.summary["n_scored"] == 12
    assert rep.summary["failed"] == [
        {"id": 3, "prompt": recs[3]["prompt"], "error": "RuntimeError: boom"}
    ]
    assert "RuntimeError: boom" in rep.html.read_text(encoding="utf-8")


def test_single_class_labels_skip_the_roc(tmp_path):
    res = write(tmp_path / "results.jsonl", synth_records())
    lab = tmp_path / "l.txt"
    lab.write_text("1\n" * 13, encoding="utf-8")
    rep = make_report(res, tmp_path / "rep", labels=lab)
    assert (
        rep.summary["evaluation"] is None
        and "need both memorized and non-memorized" in rep.summary["evaluation_skipped"]
    )
    check_pngs(rep, {"scores.png", "tokens.png"})


@pytest.mark.parametrize(
    "name, content",
    [
        ("plain.txt", "1\n\n0\n1\n"),
        ("pairs.csv", "id,label\n0,1\n2,1\n1,0\n"),
        ("pairs.tsv", "0\t1\n1\t0\n2\t1\n"),
        ("list.json", "[1, 0, 1]"),
        ("object.json", '{"0": 1, "1": 0, "2": true}'),
    ],
)
def test_label_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert read_labels(path) == {0: 1, 1: 0, 2: 1}


@pytest.mark.parametrize(
    "content, message",
    [
        ("1\n2\n", "must be 0 or 1"),
        ("1\n0,1\n", "or two fields"),
        ("", "no labels"),
        ('{"a": 1}', "prompt ids"),
    ],
)
def test_bad_labels(tmp_path, content, message):
    path = tmp_path / "labels.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ReportError, match=message):
        read_labels(path)


def test_labels_must_cover_every_scored_prompt(tmp_path):
    res = write(tmp_path / "results.jsonl", synth_records())
    with pytest.raises(ReportError, match="no label for 3 scored prompt"):
        make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "l.txt", 5, 5))


def test_report_cli_after_a_real_scan(tmp_path, capsys):
    """scan -> report, as `make demo` runs them (a random-weight model, then the default)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "The No Limits Business Woman Podcast\nMothers influence on her young hippo\n"
        "A serene beach at sunrise\nA tranquil bamboo forest\n",
        encoding="utf-8",
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n1\n0\n0\n", encoding="utf-8")
    res = tmp_path / "results.jsonl"
    assert cli.main(["scan", str(prompts), "--out", str(res), "--model", "tiny-sd1"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "report"
    assert cli.main(["report", str(res), "--labels", str(labels), "-o", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "random-weight demonstration model" in printed and "AUROC" in printed
    assert "rank" in printed and "Mothers influence on her young hippo" in printed
    assert printed.strip().endswith(f"report: {out_dir / 'report.html'}")
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["demo_model"] and summary["n_scored"] == 4
    assert {"scores.png", "tokens.png", "report.html", "summary.json"} <= {
        p.name for p in out_dir.iterdir()
    }
    # the default model is the trained testbed: no random-weight warning
    res2, out2 = tmp_path / "default.jsonl", tmp_path / "report2"
    assert cli.main(["scan", str(prompts), "--out", str(res2)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(res2), "--labels", str(labels), "-o", str(out2)]) == 0
    printed = capsys.readouterr().out
    assert "on testbed" in printed and "random-weight" not in printed
    assert not json.loads((out2 / "summary.json").read_text(encoding="utf-8"))["demo_model"]


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "none.jsonl")]) == 1
    assert "no results file" in capsys.readouterr().err
    res = write(tmp_path / "r.jsonl", [dict(synth_records()[0], score=None, error="x")])
    with pytest.raises(ReportError, match="all failed"):
        make_report(res, tmp_path / "rep")


def test_several_results_files_are_drawn_side_by_side(tmp_path):
    from attnmem.report import compare_reports

    labels = tmp_path / "labels.txt"
    labels.write_text("1\n0\n1\n0\n", encoding="utf-8")
    files = []
    for name, scores in (("a", [0.9, 0.1, 0.8, 0.2]), ("b", [0.1, 0.9, 0.6, 0.2])):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, s in enumerate(scores):
                rec = {
                    "id": i,
                    "prompt": f"p{i}",
                    "seed": i,
                    "metric": name,
                    "settings": {},
                    "model": "m",
                    "dtype": "float32",
                    "score": s,
                    "forwards": 2,
                    "jvps": 0,
                    "backwards": 0,
                    "seconds": 0.5 if name == "a" else 2.0,
                    "error": None,
                }
                f.write(json.dumps(rec) + "\n")
        files.append(path)
    out = tmp_path / "cmp"
    summary = compare_reports(files, out, labels)
    aurocs = {d["metric"]: d["auroc"] for d in summary["detectors"]}
    assert aurocs == {"a": 1.0, "b": 0.25}
    assert summary["detectors"][1]["seconds_per_prompt"] == 2.0
    assert (out / "compare.png").stat().st_size > 0 and (out / "a" / "report.html").exists()
    assert cli.main(["report", str(files[0]), str(files[1]), "-o", str(out)]) == 1  # no labels

    # two scans that both wrote results.jsonl: one report folder each, named by their folders
    same = []
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        same.append(tmp_path / name / "results.jsonl")
        same[-1].write_text(files[0].read_text(), encoding="utf-8")
    summary = compare_reports(same, tmp_path / "cmp2", labels)
    assert [d["report"] for d in summary["detectors"]] == ["x-results", "y-results"]
    assert all((tmp_path / "cmp2" / d / "report.html").exists() for d in ("x-results", "y-results"))


def test_report_into_a_file_is_refused_before_any_work(tmp_path, capsys):
    res = write(tmp_path / "r.jsonl", synth_records())
    target = tmp_path / "report.html"
    target.write_text("", encoding="utf-8")
    assert cli.main(["report", str(res), "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"-o {target} is a file" in err and "Traceback" not in err


def test_labels_whose_length_differs_from_the_prompts_are_an_error(tmp_path):
    recs = [dict(r, n_prompts=13) for r in synth_records()]
    res = write(tmp_path / "r.jsonl", recs)
    longer = tmp_path / "l.txt"
    longer.write_text("1\n" * 6 + "0\n" * 8, encoding="utf-8")  # 14 labels, 13 prompts
    with pytest.raises(ReportError, match="has 14 labels, but the prompt file .* has 13 prompts"):
        make_report(res, tmp_path / "rep", labels=longer)
    beyond = tmp_path / "ids.txt"
    beyond.write_text("".join(f"{i},{int(i < 6)}\n" for i in range(14)), encoding="utf-8")
    with pytest.raises(ReportError, match=r"labels for ids \[13\]"):
        make_report(res, tmp_path / "rep", labels=beyond)
    assert make_report(res, tmp_path / "rep", labels=labels_file(tmp_path / "ok.txt")).summary[
        "evaluation"
    ]


def test_cli_explains_the_tpr_conventions_and_warns_on_few_negatives(tmp_path, capsys):
    res = write(tmp_path / "r.jsonl", synth_records())
    lab, o = labels_file(tmp_path / "l.txt"), tmp_path / "o"
    assert cli.main(["report", str(res), "--labels", str(lab), "-o", str(o)]) == 0
    out = capsys.readouterr().out
    assert "TPR at 1%/3%/5%/10% FPR, nearest ROC point (Ren et al.'s code):" in out
    assert "last ROC point with FPR strictly below (Wen et al.'s code)" in out
    assert "warning: only 7 non-memorized prompts, so the FPR moves in steps of 14.3%" in out
    assert "TPR at 1%, 3%, 5%, 10% FPR can only count thresholds above every negative" in out
    summary = json.loads((o / "summary.json").read_text(encoding="utf-8"))
    assert summary["evaluation"]["fpr_below_resolution"] == ["0.01", "0.03", "0.05", "0.1"]


def test_cli_says_why_there_is_no_auroc(tmp_path, capsys):
    res = write(tmp_path / "r.jsonl", synth_records())
    lab = tmp_path / "l.txt"
    lab.write_text("0\n" * 13, encoding="utf-8")
    assert cli.main(["report", str(res), "--labels", str(lab), "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "no AUROC: all 13 scored prompts are labelled not memorized (0)" in out
