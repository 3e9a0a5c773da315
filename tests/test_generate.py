"""``attnmem generate``: plain and mitigated images from the same starting noise, side by side,
with their similarity; resumable like scan; and ``attnmem report --generated`` showing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import attnmem
from attnmem import cli, generate
from attnmem.detect import generators
from attnmem.errors import ScanError
from attnmem.testing import tiny_sd1_pipeline

PROMPTS = ["a photo of a cat", "a dog on the beach", "an old map of the sea"]
STEPS = 2


@pytest.fixture(scope="module")
def shared_pipe():
    return tiny_sd1_pipeline()


@pytest.fixture
def loads(monkeypatch, shared_pipe):
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **kw: shared_pipe)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return p


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.float64) / 255


def test_pairs_come_from_the_same_noise_and_the_numbers_match(
    tmp_path, prompt_file, loads, shared_pipe, capsys
):
    out = tmp_path / "gen"
    args = ["generate", prompt_file, "--out", out, "--steps", STEPS, "--seed", 4, "--n", 2]
    assert run(*args, "--mitigate", "c1=2.0,mask=padding", "--batch-size", 2, "-q") == 0
    assert "3 prompt(s) generated" in capsys.readouterr().out
    recs = read(out / "generate.jsonl")
    assert [r["id"] for r in recs] == [0, 1, 2]
    m = attnmem.Mitigation(bos_scale=2.0, mask="padding")
    assert recs[0]["mitigation"]["bos_scale"] == 2.0 and recs[0]["mitigation"]["spec"].startswith(
        "c1"
    )
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, output_type="np")
    for r in recs:
        seeds = [4 + r["id"]]
        plain = shared_pipe([r["prompt"]], generator=generators(seeds, 2), **kw).images
        with attnmem.patch(shared_pipe, record=False, mitigate=m):
            mitigated = shared_pipe([r["prompt"]], generator=generators(seeds, 2), **kw).images
        grid = png(out / r["image"])
        h, w = plain.shape[1:3]
        for j in range(2):
            top = j * (h + 4)
            np.testing.assert_allclose(grid[top : top + h, :w], plain[j], atol=1 / 255 + 1e-6)
            np.testing.assert_allclose(
                grid[top : top + h, w + 4 :], mitigated[j], atol=1 / 255 + 1e-6
            )
            want = generate.similarity(plain[j], mitigated[j])
            assert r["similarity"][j]["pixel_r"] == pytest.approx(want["pixel_r"], abs=1e-9)
            assert r["similarity"][j]["rms"] == pytest.approx(want["rms"], abs=1e-9)
        assert r["rms"] > 0  # the mitigation changed the images


def test_similarity_is_pearson_r_and_rms():
    rng = np.random.default_rng(0)
    a = rng.random((8, 8, 3))
    assert generate.similarity(a, a) == {"pixel_r": pytest.approx(1.0), "rms": 0.0}
    b = 1 - a
    assert generate.similarity(a, b)["pixel_r"] == pytest.approx(-1.0)
    assert generate.similarity(a, np.full_like(a, 0.5))["pixel_r"] is None  # constant image
    c = rng.random((8, 8, 3))
    assert generate.similarity(a, c)["pixel_r"] == pytest.approx(
        np.corrcoef(a.ravel(), c.ravel())[0, 1]
    )


def test_generate_resumes_like_scan(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "gen"
    args = ["generate", prompt_file, "--out", out, "--steps", STEPS, "-q", "--batch-size", 1]
    assert run(*args, "--limit", 1) == 0
    first = read(out / "generate.jsonl")
    assert run(*args) == 1
    assert "--resume" in capsys.readouterr().err
    assert run(*args, "--resume") == 0
    assert "2 prompt(s) generated, 1 already done" in capsys.readouterr().out
    recs = read(out / "generate.jsonl")
    assert [r["id"] for r in recs] == [0, 1, 2] and recs[0] == first[0]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
    assert run("status", out) == 0
    assert "no job is running; 3 prompts have a record, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("c1=nan", "bos_scale must be a finite number"),
        ("bos_scal=1.2", "it takes"),
        ("mask=everything", "mask must be"),
        ("nonsense:x=1", "unknown mitigation 'nonsense'"),
    ],
)
def test_bad_mitigation_is_refused_before_loading(tmp_path, prompt_file, spec, message, capsys):
    assert run("generate", prompt_file, "--out", tmp_path / "g", "--mitigate", spec) == 1
    assert message in capsys.readouterr().err


def test_mitigation_specs():
    assert generate.parse_mitigation("bos_scale=1.5") == attnmem.Mitigation(bos_scale=1.5)
    assert generate.parse_mitigation("c1=1.5,mask=none") == attnmem.Mitigation(1.5, mask="none")
    assert generate.parse_mitigation("") == attnmem.Mitigation()
    assert type(generate.parse_mitigation("cfg-delay")).__name__ == "GuidanceDelay"


def test_output_that_is_a_file_is_refused(tmp_path, prompt_file):
    f = tmp_path / "file"
    f.write_text("", encoding="utf-8")
    with pytest.raises(ScanError, match="is a file"):
        generate.run_generate(generate.GenerateOptions(prompts=prompt_file, out=f))


def test_report_shows_the_generated_images_of_the_top_prompts(
    tmp_path, prompt_file, loads, capsys, monkeypatch, testbed_pipe
):
    from attnmem import scan

    # scan's default model is the bundled testbed, whose shipped calibration names its layers
    monkeypatch.setattr(scan, "load_pipeline", lambda *a, **kw: testbed_pipe)
    res, gen = tmp_path / "r.jsonl", tmp_path / "gen"
    assert run("scan", prompt_file, "--out", res, "--steps", STEPS, "-q") == 0
    assert run("generate", prompt_file, "--out", gen, "--steps", STEPS, "-q", "--limit", 2) == 0
    assert run("report", res, "-o", tmp_path / "rep", "--generated", gen) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text(encoding="utf-8"))
    shown = {t["prompt"]: t["generated"] for t in summary["top"]}
    assert shown[PROMPTS[0]]["image"].endswith("000000.png") and shown[PROMPTS[2]] is None
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Generated images of the top prompts" in page
    assert page.count("plain and mitigated images of prompt") == 2
    assert run("report", res, "-o", tmp_path / "rep2", "--generated", tmp_path) == 1
    assert "no generate.jsonl" in capsys.readouterr().err
