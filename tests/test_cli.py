"""``attnmem scan`` end to end on the tiny random-weight pipelines: records, resume after a
kill, per-prompt failures, input errors. CPU, a few seconds per test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnmem import cli, scan
from attnmem.errors import ScanError
from attnmem.pipelines import model_calibration
from attnmem.testing import tiny_sd1_pipeline

PROMPTS = [
    "a photo of a cat",
    "",
    "The No Limits Business Woman Podcast",
    "   ",
    "  Aretha Franklin Files $10 Million Suit  ",
    "A serene beach at sunrise",
    "Sony Won't Release <i>The Interview</i> on VOD",
]
NON_BLANK = [p.strip() for p in PROMPTS if p.strip()]

RECORD_KEYS = {
    "n_prompts",
    "id",
    "prompt",
    "seed",
    "metric",
    "settings",
    "model",
    "dtype",
    "score",
    "L",
    "truncated",
    "tokens",
    "attention",
    "triggers",
    "entropy_steps",
    "forwards",
    "jvps",
    "backwards",
    "components",
    "seconds",
    "error",
}


@pytest.fixture
def loads(monkeypatch, testbed_pipe):
    """Serve the module's pipeline instead of building one per scan; records the requests."""
    calls = []

    def load(model, device, dtype, options=None):
        calls.append((model, str(device), str(dtype)))
        return testbed_pipe

    monkeypatch.setattr(scan, "load_pipeline", load)
    return calls


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return p


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def same_result(a: dict, b: dict) -> bool:
    """Records equal up to timing, and floats up to batch-composition rounding."""
    for key in RECORD_KEYS - {"seconds"}:
        x, y = a[key], b[key]
        if key == "score" and x is not None and y is not None:
            if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6):
                return False
        elif key == "attention" and x is not None and y is not None:
            if not all(math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6) for u, v in zip(x, y)):
                return False
        elif key != "triggers" and x != y:
            return False
    return True


def test_scan_end_to_end(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "res" / "results.jsonl"
    assert run("scan", prompt_file, "--out", out, "--batch-size", 2, "--seed", 5) == 0
    recs = read(out)
    assert [r["id"] for r in recs] == list(range(len(NON_BLANK)))  # blank lines do not count
    assert [r["prompt"] for r in recs] == NON_BLANK  # stripped
    assert loads == [("testbed", "cpu", "torch.float32")]  # the default
    shipped = model_calibration("testbed")  # the bundled model's calibration file is the default
    layer = json.loads(shipped.read_text())["layer"]
    for r in recs:
        assert set(r) == RECORD_KEYS
        assert r["seed"] == 5 + r["id"]
        assert r["error"] is None and math.isfinite(r["score"])
        assert r["metric"] == "E" and r["model"] == "testbed" and r["dtype"] == "float32"
        assert r["settings"]["layer"] == layer and r["settings"]["num_inference_steps"] == 50
        assert len(r["tokens"]) == 77 and len(r["attention"]) == 77
        assert r["tokens"][0] == "<|startoftext|>" and r["tokens"][r["L"] - 1] == "<|endoftext|>"
        assert r["forwards"] == 1 and r["truncated"] is False and r["entropy_steps"] is None
        assert r["triggers"] and all(0 < pos < r["L"] - 1 for pos, _, _ in r["triggers"])
        assert r["seconds"] > 0
    assert recs[0]["L"] == 7  # "a photo of a cat"
    assert "5 prompt(s) scored" in capsys.readouterr().out


@pytest.mark.parametrize(
    "metric, extra, forwards",
    [
        ("D", ["--steps", 3], 6),
        ("wen", ["--steps", 2], 2),
        ("carlini", ["--steps", 2, "--n", 2], 8),
        ("anisotropy", [], 4),
        ("sharpness", [], 2),
        ("nemo", ["--n", 3, "--height", 128, "--width", 128], 3),
    ],
)
def test_scan_other_metrics(tmp_path, prompt_file, loads, metric, extra, forwards):
    out = tmp_path / "r.jsonl"
    assert run("scan", prompt_file, "--out", out, "--metric", metric, "--limit", 2, *extra) == 0
    recs = read(out)
    assert [r["id"] for r in recs] == [0, 1]  # --limit: the first prompts only
    assert all(r["error"] is None and r["forwards"] == forwards for r in recs)
    if metric == "D":
        assert recs[0]["entropy_steps"]["steps"] == [0, 1, 2]
        assert len(recs[0]["entropy_steps"]["entropy"]) == 3
    else:
        assert recs[0]["attention"] is None and recs[0]["triggers"] == []


def test_scan_with_latents_file_or_generators_equals_seeded_scan(
    tmp_path, prompt_file, loads, testbed_pipe
):
    from attnmem.detect import initial_latents
    from attnmem.scan import ScanOptions, run_scan

    seeded = tmp_path / "seeded.jsonl"
    assert run("scan", prompt_file, "--out", seeded, "--metric", "wen", "--n", 2, "--seed", 3) == 0
    ref = read(seeded)
    n_prompts = len(NON_BLANK)
    x, _ = initial_latents(testbed_pipe, n_prompts, 2, seeds=range(3, 3 + n_prompts))
    torch.save(x.view(n_prompts, 2, *x.shape[1:]), tmp_path / "lat.pt")
    by_file = tmp_path / "file.jsonl"
    args = ["--metric", "wen", "--n", 2, "--batch-size", 2, "--latents", tmp_path / "lat.pt"]
    assert run("scan", prompt_file, "--out", by_file, *args) == 0
    got = read(by_file)
    assert all(r["noise"].startswith("latents sha256:") for r in got)
    for a, b in zip(got, ref):
        assert math.isclose(a["score"], b["score"], rel_tol=1e-5)
    # a resumed scan must use the same noise
    assert run("scan", prompt_file, "--out", by_file, "--metric", "wen", "--n", 2, "--resume") == 1
    # one generator per prompt id, from Python; never consumed (the batch retry sees the same)
    gens = [torch.Generator().manual_seed(1000 * (3 + i)) for i in range(n_prompts)]
    opts = ScanOptions(prompt_file, tmp_path / "gen.jsonl", metric="wen", n=1, batch_size=3)
    run_scan(opts, testbed_pipe, generator=gens)
    ref1 = tmp_path / "seeded1.jsonl"
    assert run("scan", prompt_file, "--out", ref1, "--metric", "wen", "--seed", 3) == 0
    for a, b in zip(read(tmp_path / "gen.jsonl"), read(ref1)):
        assert a["noise"] == "generator" and math.isclose(a["score"], b["score"], rel_tol=1e-5)
    with pytest.raises(ScanError, match="do not fit 5 prompts x 1"):
        run_scan(ScanOptions(prompt_file, tmp_path / "bad.jsonl"), testbed_pipe, latents=x)


def test_option_reaches_the_detector(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "r.jsonl"
    argv = ["--metric", "wen", "--steps", 3, "--option", "end=2", "--limit", 1]
    assert run("scan", prompt_file, "--out", out, *argv) == 0
    rec = read(out)[0]
    assert rec["settings"]["end"] == 2 and rec["forwards"] == 4
    assert run("scan", prompt_file, "--out", tmp_path / "x.jsonl", "--option", "nope=1") == 1
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("scan", prompt_file, "--out", tmp_path / "y.jsonl", "--option", "novalue")


def test_metric_rejects_option_it_cannot_use(tmp_path, prompt_file, loads, capsys):
    assert (
        run("scan", prompt_file, "--out", tmp_path / "r.jsonl", "--metric", "D", "--layer", 2) == 1
    )
    assert "layer" in capsys.readouterr().err


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path, prompt_file, loads, capsys):
    ref = tmp_path / "ref.jsonl"
    assert run("scan", prompt_file, "--out", ref, "--batch-size", 2) == 0
    reference = read(ref)

    # A run killed while writing id 3: ids 0-2 on disk, id 3's line cut short.
    out = tmp_path / "out.jsonl"
    done = [dict(r, seconds=-1.0) for r in reference[:3]]  # -1 marks "not recomputed"
    partial = json.dumps(reference[3])[:57]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + partial, encoding="utf-8")

    assert run("scan", prompt_file, "--out", out, "--batch-size", 2) == 1
    assert "--resume" in capsys.readouterr().err  # no silent overwrite

    assert run("scan", prompt_file, "--out", out, "--batch-size", 2, "--resume") == 0
    assert "2 prompt(s) scored, 3 already done" in capsys.readouterr().out
    recs = read(out)  # every line parses: the partial line was cut off
    assert [r["id"] for r in recs] == list(range(len(NON_BLANK)))
    assert [r["seconds"] for r in recs[:3]] == [-1.0] * 3
    assert all(same_result(a, b) for a, b in zip(recs, reference))

    # Nothing left to do: a second resume changes nothing.
    assert run("scan", prompt_file, "--out", out, "--batch-size", 2, "--resume") == 0
    assert read(out) == recs


def test_resume_refuses_other_runs(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "out.jsonl"
    assert run("scan", prompt_file, "--out", out, "--limit", 2) == 0
    assert run("scan", prompt_file, "--out", out, "--resume", "--seed", 1) == 1
    assert "seed" in capsys.readouterr().err
    assert run("scan", prompt_file, "--out", out, "--resume", "--steps", 10) == 1
    assert "settings" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("something else\nentirely\n", encoding="utf-8")
    assert run("scan", other, "--out", out, "--resume") == 1
    assert "not that line of this prompt file" in capsys.readouterr().err


def test_failing_prompt_is_recorded_and_the_rest_continue(
    tmp_path, prompt_file, loads, monkeypatch, capsys
):
    from attnmem import detect

    real = detect.make_detector

    def make(name, pipe, **options):
        det = real(name, pipe, **options)
        score_batch = det.score_batch

        def flaky(prompts, seeds):
            if any("Podcast" in p for p in prompts):
                raise RuntimeError("boom on the podcast")
            return score_batch(prompts, seeds)

        det.score_batch = flaky
        return det

    monkeypatch.setattr(detect, "make_detector", make)
    out = tmp_path / "out.jsonl"
    assert run("scan", prompt_file, "--out", out, "--batch-size", 3) == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "failed ids: 1" in captured.err
    recs = read(out)
    assert [r["id"] for r in recs] == list(range(len(NON_BLANK)))
    bad = recs[1]
    assert bad["error"] == "RuntimeError: boom on the podcast" and bad["score"] is None
    assert bad["seed"] == 1 and bad["prompt"] == NON_BLANK[1]
    assert all(r["error"] is None and r["score"] is not None for r in recs if r["id"] != 1)

    # Fixed: --resume retries exactly the failed prompt and leaves one record per id.
    monkeypatch.setattr(detect, "make_detector", real)
    assert run("scan", prompt_file, "--out", out, "--batch-size", 3, "--resume") == 0
    assert "1 prompt(s) scored, 4 already done, 0 failed" in capsys.readouterr().out
    fixed = read(out)
    assert [r["id"] for r in fixed] == list(range(len(NON_BLANK)))
    assert fixed[1]["error"] is None and fixed[1]["score"] is not None
    assert fixed[0] == recs[0]


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_input_errors_are_clear(tmp_path, loads, capsys):
    out = tmp_path / "out.jsonl"

    bad = tmp_path / "latin.txt"
    data = "caf\u00e9 ok\n".encode() + b"na\xefve prompt\n"
    bad.write_bytes(data)
    assert run("scan", bad, "--out", out) == 1
    err = _error(capsys)
    assert (
        str(bad) in err
        and f"byte offset {data.index(0xEF)}" in err
        and "line 2" in err
        and "--encoding" in err
    )
    assert scan.read_prompts(bad, "latin-1")[1] == "na\u00efve prompt"

    for content in (b"", b"\n  \n\t\n"):
        empty = tmp_path / "empty.txt"
        empty.write_bytes(content)
        assert run("scan", empty, "--out", out) == 1
        assert f"{empty}: no prompts" in _error(capsys)

    assert run("scan", tmp_path / "missing.txt", "--out", out) == 1
    assert "cannot read prompt file" in _error(capsys)

    good = tmp_path / "good.txt"
    good.write_bytes(b"\xef\xbb\xbfa photo of a cat\r\na dog\r\n")  # BOM, CRLF
    assert scan.read_prompts(good) == ["a photo of a cat", "a dog"]

    out.write_text("{}\n", encoding="utf-8")
    assert run("scan", good, "--out", out) == 1
    assert "already exists and is not empty" in _error(capsys)
    assert run("scan", good, "--out", tmp_path) == 1
    assert "is a folder" in _error(capsys)

    assert (
        run("scan", good, "--out", tmp_path / "x.jsonl", "--dtype", "fp16", "--device", "cpu") == 1
    )
    assert "fp16 is not supported on CPU" in _error(capsys)
    assert not loads  # every error came before loading a model

    with pytest.raises(SystemExit) as exc:
        run("scan", good, "--out", tmp_path / "y.jsonl", "--batch-size", 0)
    assert exc.value.code == 2


def test_damaged_output_is_named(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0}\nnot json\n{"id": 1}\n', encoding="utf-8")
    assert run("scan", prompt_file, "--out", out, "--resume") == 1
    assert "line 2: not a JSON record" in capsys.readouterr().err


def test_model_argument(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n", encoding="utf-8")
    assert run("scan", prompts, "--out", tmp_path / "a.jsonl", "--model", tmp_path / "nowhere") == 1
    assert "no such folder" in capsys.readouterr().err
    assert run("scan", prompts, "--out", tmp_path / "a.jsonl", "--model", tmp_path) == 1
    assert "no model_index.json" in capsys.readouterr().err

    # A saved pipeline folder loads offline through DiffusionPipeline.from_pretrained.
    folder = tmp_path / "tiny"
    tiny_sd1_pipeline().save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "b.jsonl"
    assert run("scan", prompts, "--out", out, "--model", folder) == 0
    via_folder = read(out)[0]
    out2 = tmp_path / "c.jsonl"
    assert run("scan", prompts, "--out", out2, "--model", "tiny-sd1") == 0
    builtin = read(out2)[0]
    assert via_folder["model"] == str(folder) and builtin["model"] == "tiny-sd1"
    assert via_folder["score"] == builtin["score"]

    # The default is the bundled testbed model: the same scores as its folder.
    from attnmem.pipelines import BUNDLED_MODELS

    out3, out4 = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    assert run("scan", prompts, "--out", out3) == 0
    assert run("scan", prompts, "--out", out4, "--model", BUNDLED_MODELS["testbed"]) == 0
    default, bundled = read(out3)[0], read(out4)[0]
    assert default["model"] == "testbed" and default["score"] == bundled["score"]
    assert default["score"] != builtin["score"]


def test_help_names_the_default_model_and_the_random_ones(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "attnmem", "scan", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "Default: testbed" in text and "RANDOM-WEIGHT models for demonstration only" in text
    assert "blank lines are skipped" in text and "--resume" in text
