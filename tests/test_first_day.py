"""What a new user meets first: what every command prints (no library noise, no echo of long
prompts, one line per fact), truncation recorded by every metric, and the README's promises
about ``record.entropy`` and ``score_batch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attnmem
from attnmem.testing import tiny_sd1_pipeline

LONG = " ".join(["word"] * 10_000)  # far over 75 word-pieces


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_a_scan_prints_no_library_noise_and_counts_truncation(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a photo of a cat\n{LONG}\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "attnmem", "scan", str(prompts), "--model", "tiny-sd1"]
        + ["--out", str(out), "--metric", "wen", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "torchvision" not in err  # transformers' image-processor fallback notice
    assert "The following part of your input was truncated" not in err  # diffusers' echo
    assert "Token indices sequence length" not in err
    assert "word word" not in err and len(err) < 2000  # the prompt is never echoed
    assert "1 prompt(s) longer than 75 word-pieces were truncated to 77 tokens (ids 1)" in err
    assert [(r["L"], r["truncated"]) for r in read(out)] == [(7, False), (77, True)]


@pytest.mark.parametrize("metric, options", [("wen", {}), ("carlini", {"n": 2}), ("D", {})])
def test_every_metric_records_truncation(pipe, metric, options):
    det = attnmem.make_detector(metric, pipe, num_inference_steps=2, **options)
    res = det.score_batch(["a photo of a cat", LONG], seeds=[0, 1])
    assert [(r["L"], r["truncated"]) for r in res] == [(7, False), (77, True)]


def test_truncation_warning_names_the_callers_line(pipe):
    with attnmem.patch(pipe), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe([LONG], num_inference_steps=1, output_type="latent")
    ours = [w for w in caught if "truncated to L = 77" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__


def test_entropy_of_one_step_is_one_value_per_image(pipe):
    with attnmem.patch(pipe) as handle:
        pipe(["a photo of a cat", "a dog"], num_inference_steps=2, output_type="latent")
    rec = handle.record
    assert rec.entropy(steps=0, layers=3).shape == (2,)  # as the README prints it
    assert rec.entropy(steps=[0], layers=3).shape == (1, 2)
    assert rec.entropy().shape == (2, 2)
    torch.testing.assert_close(rec.entropy(steps=1), rec.entropy(steps=[1])[0])
    assert rec.partial_entropy(steps=0).shape == (2,)


def test_score_batch_takes_a_single_prompt_as_one_prompt(pipe):
    det = attnmem.make_detector("E", pipe, num_inference_steps=2)
    one = det.score_batch("a photo of a cat", seeds=0)
    assert len(one) == 1
    assert one[0]["score"] == det.score_batch(["a photo of a cat"], seeds=[0])[0]["score"]
    with pytest.raises(ValueError, match="got 1 prompts but 2 seeds"):
        det.score_batch("a photo of a cat", seeds=[0, 1])
