"""The committed testbed model (attnmem/data/testbed) and the scripts that build it
(research/testbed/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from research.testbed import data

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "attnmem" / "data" / "testbed"
VALIDATION = ROOT / "research" / "testbed" / "results" / "testbed_validation.json"


@pytest.fixture(scope="module")
def pipe():
    from attnmem.pipelines import load_pipeline

    if not (MODEL / "model_index.json").is_file():
        pytest.fail(f"the testbed model is missing: {MODEL}")
    return load_pipeline(str(MODEL), torch.device("cpu"), torch.float32)


def test_testbed_folder_is_safetensors_only_and_small():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "text_encoder", "vae"}
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_testbed_loads_offline_and_generates(pipe):
    from attnmem.testing import describe

    layers = describe(pipe)
    assert len(layers) == 11
    assert layers[3].name == "down_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    out = pipe(
        ["a red circle on the left on a navy background", "a blue square"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()


def test_testbed_vae_is_identity(pipe):
    x = torch.from_numpy(data.memorized_images()[:2])
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        y = pipe.vae.decode(z).sample
    assert (z - x).abs().max() < 1e-4
    assert (y - x).abs().max() < 1e-4


def test_testbed_metric_e_runs(pipe):
    from attnmem.detect import make_detector

    det = make_detector("E", pipe, num_inference_steps=50)
    res = det.score_batch([m.caption for m in data.memorized_items()[:2]], [0, 1])
    assert len(res) == 2 and all(np.isfinite(r["score"]) for r in res)
    assert len(res[0]["attention"]) == 77


def test_bundled_prompts_match_the_dataset():
    prompts = (ROOT / "attnmem/data/testbed_prompts.txt").read_text().split("\n")
    labels = (ROOT / "attnmem/data/testbed_labels.txt").read_text().split("\n")
    prompts, labels = [p for p in prompts if p], [int(v) for v in labels if v]
    assert len(prompts) == len(labels) and set(labels) == {0, 1}
    assert list(zip(prompts, labels)) == data.demo_prompts()  # `python -m research.testbed.data`
    mem = {m.caption for m in data.memorized_items()}
    held = {h.caption for h in data.heldout_items()}
    for p, y in zip(prompts, labels):
        assert (p in mem) if y else (p in held)


def test_data_is_deterministic_and_groups_are_disjoint():
    a = data.training_batch(data.SEED, 7, 6)
    b = data.training_batch(data.SEED, 7, 6)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[1].shape == (6, 3, 32, 32) and a[1].min() >= -1 and a[1].max() <= 1
    c = data.training_batch(data.SEED + 1, 7, 6)
    assert not np.array_equal(a[1], c[1])
    mem = {m.caption for m in data.memorized_items()}
    held = {h.caption for h in data.heldout_items()}
    assert len(mem) == 40 and len(held) == data.N_HELDOUT and not mem & held
    negs = {data.negative_item(data.SEED, i).caption for i in range(300)}
    assert not negs & (mem | held)
    assert len(negs) == 300  # every training negative is unique
    seen, _ = data.exposures(data.SEED, 20, 16)
    assert seen.sum() > 0


def test_attribute_classifier_reads_templates_and_detailed_images():
    combos, tpl = data.templates()
    assert data.classify(tpl) == combos
    # the true images have random backgrounds, jitter and clutter: the classifier must read the
    # object, not the background (nearest-template matching gets most of these wrong)
    held = data.heldout_items()[:120]
    pred = data.classify(np.stack([data.item_image(data.SEED, h) for h in held]))
    acc = np.mean([[p[k] == h.attrs[k] for k in range(3)] for p, h in zip(pred, held)], 0)
    assert (acc >= 0.9).all(), acc


def test_backgrounds_are_details_not_caption():
    item = data.heldout_items()[0]
    own, twins = data.item_image(data.SEED, item), data.twin_images(data.SEED, item, 4)
    # same caption attributes, different backgrounds: the twins differ from the image a lot
    outside = 1 - data._shape_mask(item.shape, *data.POSITIONS[item.position], 16.0)
    diff = np.abs(twins - own[None]).mean(1) * outside[None]
    assert (diff.sum((1, 2)) / outside.sum() > 0.1).all()


def test_held_sink_keeps_the_bos_key_and_query_component(tmp_path):
    from research.testbed import train

    torch.manual_seed(0)
    unet, te = train.build_unet(), train.build_text_encoder()
    train.seed_bos_sink(unet, te)
    held = train.HeldSink(unet, te)
    before = [attn.to_k.weight.detach().clone() for attn, *_ in held.items]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    ids = torch.randint(0, 49407, (2, 77))
    ids[:, 0] = train.BOS_ID
    for _ in range(3):
        cond = te(ids).last_hidden_state
        loss = unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), cond).sample.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        held.apply()
    for (attn, u, k0, khat, r0, d), wk in zip(held.items, before):
        assert not torch.allclose(attn.to_k.weight, wk)  # the other directions train
        assert torch.allclose(attn.to_k.weight @ u, k0, atol=1e-5)
        for i in range(attn.heads):
            assert torch.allclose(khat[i] @ attn.to_q.weight[i * d : (i + 1) * d], r0[i], atol=1e-5)
    # the spike dimension is BOS's alone: other tokens' outputs barely overlap with BOS's
    h = te(ids).last_hidden_state[0]
    u = held.items[0][1]
    assert float((h[1:] @ u).abs().max()) < 0.5 * float(h[1:].norm(dim=1).min())


def test_train_smoke_and_resume(tmp_path):
    from research.testbed import train

    out, work = tmp_path / "model", tmp_path / "work"
    common = ["--out", str(out), "--workdir", str(work), "--batch-size", "2", "--threads", "1"]
    train.main(["--steps", "3", *common])
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 3
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and len(info["memorized_exposures"]) == 40
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(str(out), use_safetensors=True)
    assert p.unet.config.sample_size == 32
    train.main(["--steps", "4", *common])  # resumes at step 3
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and len(state["losses"]) == 4


def test_validation_verdicts_apply_the_fixed_thresholds(tmp_path):
    import copy

    from research.testbed import validate

    committed = json.loads(VALIDATION.read_text())
    raw = committed["raw"]
    summary, _ = validate.report(raw)
    assert summary["verdicts"] == committed["summary"]["verdicts"]  # the report reproduces

    def met(res, s):
        return {k: v["met"] for k, v in validate.verdicts(res, s).items()}

    s = copy.deepcopy(summary)
    s["memorization_rate"]["7.5"][-1][0] = 0.5
    s["mitigation"]["g7.5_none"]["neg_rate"][0] = 0.15
    assert met(raw, s)["memorization"]  # both bounds inclusive
    s["memorization_rate"]["7.5"][-1][0] = 0.49
    assert not met(raw, s)["memorization"]

    res = copy.deepcopy(raw)
    layers = res["attention"]["neg"]["layers"]
    for k, ly in enumerate(layers):  # BOS the largest in 6 of 11 layers, mean mass 0.31
        per = res["attention"]["neg"]["per_layer"][ly]
        n = len(per["bos"])
        per["bos"], per["bos_is_max"] = [0.31] * n, [k < 6] * n
    assert met(res, summary)["BOS sink"]
    res["attention"]["neg"]["per_layer"][layers[0]]["bos_is_max"] = [False] * n
    assert not met(res, summary)["BOS sink"]

    s = copy.deepcopy(summary)
    s["detection"]["E"]["auroc"] = 0.9
    s["attention_step0"][layers[3]]["bos"] = {"mem": 0.2, "neg": 0.5}
    assert met(raw, s)["attention signature"]
    s["detection"]["control: prompt length L"]["auroc"] = 0.85  # E not 0.1 above a control
    assert not met(raw, s)["attention signature"]

    s = copy.deepcopy(summary)
    s["mitigation"]["g7.5_c1_1.25"]["neg_corr_vs_plain"][0] = 0.95
    assert met(raw, s)["mitigation"]  # the committed CI is below 0
    s["mitigation"]["g7.5_c1_1.25"]["mem_delta_corr_train"][2] = 0.01
    assert not met(raw, s)["mitigation"]

    s = copy.deepcopy(summary)
    s["mitigation"]["g7.5_none"]["neg_attr_acc"] = [0.5, 1 / 3, 0.9]  # shape exactly at chance
    assert not met(raw, s)["caption following"]

    # bench/quality.py's header names the verdicts that are met and not met
    from bench.quality import quality_lines

    header = quality_lines(VALIDATION)[2]
    assert "Verdicts met: memorization, caption following" in header
    assert "not met: BOS sink, attention signature, mitigation" in header
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"summary": dict(summary, verdicts={})}))
    assert "no verdicts" in quality_lines(path)[2]
