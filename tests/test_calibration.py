"""Per-model calibration of metric E's layer: the rule, the measurement against metric E itself
(early exit, one layer at a time), the file, and how the detector, ``attnmem scan`` and
``attnmem calibrate`` use it. Tiny random-weight SD1 pipeline, CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnmem import cli, scan
from attnmem.detect import Calibration, EntropyE, calibrate, choose_layer, make_detector
from attnmem.detect.calibration import layer_entropies
from attnmem.errors import CalibrationError, ScanError
from attnmem.evaluate import auroc
from attnmem.testing import tiny_sd1_pipeline

PROMPTS = [
    "a photo of a cat",
    "The No Limits Business Woman Podcast",
    "Aretha Franklin Files $10 Million Suit",
    "A serene beach at sunrise",
    "an oil painting of a lighthouse in a storm, dramatic light",
    "red",
    "Living in the Light with Ann Graham Lotz",
    "a bowl of fruit on a wooden table, studio photo, 4k",
]
SEEDS = list(range(len(PROMPTS)))
LAYER = 2  # the synthetic labels make this layer a perfect detector


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def labels(pipe):
    """Labels from metric E itself at layer 2: its upper half is 'memorized'."""
    e = [r["score"] for r in EntropyE(pipe, layer=LAYER).score_batch(PROMPTS, SEEDS)]
    median = sorted(e)[len(e) // 2]
    return [int(x >= median) for x in e]


def test_rule_picks_the_largest_auroc_or_the_earliest_within_the_tolerance():
    assert choose_layer([0.6, 0.85, 0.9, 0.895, 0.7]) == 2
    assert choose_layer([0.6, 0.895, 0.9, 0.7]) == 1  # earlier and within 0.01: cheaper exit
    assert choose_layer([0.6, 0.895, 0.9, 0.7], tolerance=0.0) == 2
    assert choose_layer([math.nan, 0.4, 0.3]) == 1  # a layer without a finite AUROC never
    assert choose_layer([0.3, 0.2]) == 0  # no sign flip: the largest, even below 0.5
    with pytest.raises(ValueError, match="tolerance"):
        choose_layer([0.5], tolerance=-1)
    with pytest.raises(ValueError, match="finite"):
        choose_layer([math.nan])


def test_layer_entropies_equal_metric_e_with_early_exit_at_each_layer(pipe):
    layers, ent = layer_entropies(pipe, PROMPTS, SEEDS, batch_size=3)
    assert len(layers) == ent.shape[0] == 11 and ent.shape[1] == len(PROMPTS)  # tiny SD1
    for k in (0, 3, 10):
        early = [r["score"] for r in EntropyE(pipe, layer=k).score_batch(PROMPTS, SEEDS)]
        torch.testing.assert_close(ent[k], torch.tensor(early), rtol=1e-5, atol=1e-5)
        by_name = [
            r["score"] for r in EntropyE(pipe, layer=layers[k]).score_batch(PROMPTS[:2], SEEDS[:2])
        ]
        torch.testing.assert_close(ent[k, :2], torch.tensor(by_name), rtol=1e-5, atol=1e-5)


def test_calibration_chooses_by_the_rule_on_a_fixed_synthetic_case(pipe, labels):
    cal = calibrate(pipe, PROMPTS, labels, seeds=SEEDS, batch_size=4)
    _, ent = layer_entropies(pipe, PROMPTS, SEEDS)
    expected = [auroc(ent[k].numpy(), labels) for k in range(ent.shape[0])]
    assert list(cal.auroc.values()) == pytest.approx(expected, abs=1e-6)
    assert cal.auroc[list(cal.auroc)[LAYER]] == 1.0
    assert cal.layer_index == choose_layer(expected) <= LAYER
    assert cal.layer == list(cal.auroc)[cal.layer_index]
    assert (cal.n_memorized, cal.n_normal, cal.step, cal.base_seed) == (4, 4, 0, None)
    again = calibrate(pipe, PROMPTS, labels, seeds=SEEDS, batch_size=8)
    assert again.layer == cal.layer  # batch size does not change the choice


def test_calibration_refuses_labels_that_do_not_fit(pipe):
    with pytest.raises(CalibrationError, match="2 labels"):
        calibrate(pipe, PROMPTS[:3], [0, 1])
    with pytest.raises(CalibrationError, match="memorized"):
        calibrate(pipe, PROMPTS[:3], [1, 1, 1])
    with pytest.raises(CalibrationError, match="0 .* or 1"):
        calibrate(pipe, PROMPTS[:3], [0, 1, 2])


def test_file_round_trip_and_errors(tmp_path):
    cal = Calibration(
        layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        layer_index=5,
        auroc={"a": 0.5, "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 0.9},
        n_memorized=3,
        n_normal=4,
        model="tiny-sd1",
    )
    path = cal.save(tmp_path / "sub" / "cal.json")
    assert Calibration.load(path) == cal
    assert json.loads(path.read_text())["version"] == 1
    with pytest.raises(CalibrationError, match="cannot read"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CalibrationError, match="not a JSON"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"layer": "a"}))
    with pytest.raises(CalibrationError, match="version"):
        Calibration.load(tmp_path / "old.json")
    obj = json.loads(path.read_text()) | {"layer": "elsewhere"}
    (tmp_path / "odd.json").write_text(json.dumps(obj))
    with pytest.raises(CalibrationError, match="no AUROC entry"):
        Calibration.load(tmp_path / "odd.json")


def _calibration_file(tmp_path, pipe, k: int):
    layers, _ = layer_entropies(pipe, PROMPTS[:1], SEEDS[:1])
    cal = Calibration(
        layer=layers[k], layer_index=k, auroc=dict.fromkeys(layers, 0.5), n_memorized=1, n_normal=1
    )
    return cal, cal.save(tmp_path / "attnmem_calibration.json")


def test_metric_e_reads_the_calibrated_layer(tmp_path, pipe):
    cal, path = _calibration_file(tmp_path, pipe, 7)
    expected = EntropyE(pipe, layer=7).score_batch(PROMPTS[:2], SEEDS[:2])
    for c in (cal, path, str(path)):
        det = make_detector("E", pipe, calibration=c)
        assert det.layer == cal.layer and det.settings()["layer"] == cal.layer
        got = det.score_batch(PROMPTS[:2], SEEDS[:2])
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected])
    assert EntropyE(pipe, layer=7, calibration=cal).layer == cal.layer  # the same layer
    with pytest.raises(ValueError, match="contradicts"):
        EntropyE(pipe, layer=3, calibration=cal)
    assert EntropyE(pipe).layer == 3  # no calibration: the paper's layer


def test_scan_uses_the_model_folders_calibration_unless_told_otherwise(tmp_path, pipe, monkeypatch):
    folder = tmp_path / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    cal, path = _calibration_file(folder, pipe, 7)
    monkeypatch.setattr(scan, "load_pipeline", lambda *a: pipe)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")

    def run(name, **kw):
        opts = scan.ScanOptions(
            prompts=prompts, out=tmp_path / f"{name}.jsonl", model=str(folder), progress=False, **kw
        )
        scan.run_scan(opts)
        recs = [json.loads(x) for x in opts.out.read_text().splitlines()]
        return scan.calibration_for(opts), recs

    used, recs = run("default")
    assert used == path and {r["settings"]["layer"] for r in recs} == {cal.layer}
    used, recs = run("layer", layer=2)
    assert used is None and {r["settings"]["layer"] for r in recs} == {2}
    other = Calibration(**{**cal.__dict__, "layer": list(cal.auroc)[4], "layer_index": 4})
    _, recs = run("explicit", calibration=other.save(tmp_path / "other.json"))
    assert {r["settings"]["layer"] for r in recs} == {other.layer}
    with pytest.raises(ScanError, match="metric E"):
        run("wen", metric="wen", calibration=path)
    (tmp_path / "broken.json").write_text("{")
    monkeypatch.setattr(scan, "load_pipeline", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(CalibrationError, match="broken.json"):
        run("broken", calibration=tmp_path / "broken.json")


def test_cli_calibrate_writes_the_file_scan_accepts(tmp_path, capsys, monkeypatch, pipe, labels):
    monkeypatch.setattr("attnmem.pipelines.load_pipeline", lambda *a: pipe)
    prompts, lab = tmp_path / "p.txt", tmp_path / "y.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    lab.write_text("".join(f"{y}\n" for y in labels))
    out = tmp_path / "cal.json"
    argv = ["calibrate", str(prompts), "--labels", str(lab), "--model", "tiny-sd1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    cal = Calibration.load(out)
    assert cal.model == "tiny-sd1" and cal.base_seed == 0 and cal.n_memorized == 4
    shown = capsys.readouterr().out
    assert f"{cal.layer}  <- chosen" in shown
    lab.write_text("1\n0\n")
    assert cli.main([*argv, "--out", str(tmp_path / "x.json")]) == 1
    assert "2 labels for 8 prompts" in capsys.readouterr().err
