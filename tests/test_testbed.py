"""The committed testbed model (attnmem/data/testbed) and the scripts that build it
(research/testbed/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quality import RESULTS, VALIDATION, bundled_validation
from research.testbed import data

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "attnmem" / "data" / "testbed"
# every merged validation (not its part files): the final weights' and each snapshot's
VALIDATIONS = sorted(p for p in RESULTS.glob("testbed_validation*.json") if "." not in p.stem)


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
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20


def test_testbed_loads_offline_in_fp32_and_generates(pipe):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from attnmem.testing import describe

    with safe_open(MODEL / "text_encoder" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # stored half
    plain = DiffusionPipeline.from_pretrained(str(MODEL), use_safetensors=True)
    assert plain.text_encoder.dtype == plain.unet.dtype == torch.float32  # loads in fp32

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


def test_testbed_ships_its_calibration_and_scan_uses_it(pipe):
    from attnmem.detect import CALIBRATION_FILE, Calibration, make_detector
    from attnmem.pipelines import model_calibration
    from attnmem.testing import describe

    path = model_calibration("testbed")
    assert path == MODEL / CALIBRATION_FILE
    cal = Calibration.load(path)
    names = [layer.name for layer in describe(pipe)]
    assert list(cal.auroc) == names and names[cal.layer_index] == cal.layer
    det = make_detector("E", pipe, calibration=path)
    res = det.score_batch([m.caption for m in data.memorized_items()[:2]], [0, 1])
    assert len(res) == 2 and all(np.isfinite(r["score"]) for r in res)
    assert len(res[0]["attention"]) == 77 and det.settings()["layer"] == cal.layer


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
    assert len(mem) == 100 and len(held) == data.N_HELDOUT and not mem & held
    assert [sum(m.dose_group == g for m in data.memorized_items()) for g in range(5)] == [20] * 5
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


def _bos_logits(unet, te, ids, x, t):
    """Every attn2's pre-softmax logits of key 0, from its own to_q / to_k on norm2's output
    (hooks on the modules, independent of the sink code): a list of (B, heads, Nq) tensors."""
    out, hooks = [], []
    with torch.no_grad():
        cond = te(ids).last_hidden_state
    for block in unet.modules():
        if getattr(block, "attn2", None) is None or not hasattr(block, "norm2"):
            continue
        attn = block.attn2

        def hook(mod, args, kwargs, attn=attn):
            q = attn.to_q(args[0])
            k = attn.to_k(kwargs["encoder_hidden_states"][:, :1])
            d = q.shape[-1] // attn.heads
            q = q.view(*q.shape[:2], attn.heads, d)
            k = k.view(k.shape[0], attn.heads, d)
            out.append(torch.einsum("bnhd,bhd->bhn", q, k) * d**-0.5)

        hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        unet(x, t, cond)
    for h in hooks:
        h.remove()
    return out


def test_constant_sink_holds_the_bos_logit_for_every_query_through_training():
    from research.testbed import train

    torch.manual_seed(0)
    unet, te = train.build_unet(), train.build_text_encoder().eval()
    sink = train.ConstantSink(unet, te)
    ids = torch.randint(0, 49407, (2, 77))
    ids[:, 0] = train.BOS_ID
    probe = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    for _ in range(3):
        cond = te(ids).last_hidden_state
        loss = unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), cond).sample.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sink.apply()
    logits = _bos_logits(unet, te, ids, *probe)
    assert len(logits) == 11
    for lg in logits:  # exactly the constant, for every image, head and query
        torch.testing.assert_close(lg, torch.full_like(lg, train.SINK_LOGIT), atol=1e-4, rtol=0)
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert any("to_k" in k for k in changed) and any("to_q" in k for k in changed)
    # a model that already satisfies the constraints is left as it is
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    train.ConstantSink(unet, te)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-5, rtol=1e-5)
    # the spike dimension is BOS's alone: other tokens' outputs barely overlap with BOS's
    with torch.no_grad():
        h = te(ids).last_hidden_state[0]
    u = h[0] / h[0].norm()
    assert float((h[1:] @ u).abs().max()) < 0.5 * float(h[1:].norm(dim=1).min())


def test_ema_and_learning_rate_schedule():
    from research.testbed import train

    lin = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = train.EMA(lin, decay=0.5)
    expect = torch.zeros(1, 2)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
        d = min(0.5, (1 + ema.updates) / (10 + ema.updates))
        expect = d * expect + (1 - d) * value
    out = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(out)
    torch.testing.assert_close(out.weight, expect)
    lr = [train.learning_rate(s, 1000, 1.0, warmup=10) for s in range(1000)]
    assert lr[0] == 0.1 and lr[9] == 1.0 and lr[699] == 1.0  # warm-up, then constant
    assert lr[700] == 1.0 and 0.1 < lr[850] < 1.0 and abs(lr[999] - 0.1) < 1e-4  # cosine
    assert all(a >= b for a, b in zip(lr[700:], lr[701:]))


def test_text_cache_equals_encoding_each_caption():
    from attnmem.tokenizer import clip_tokenizer
    from research.testbed import train

    torch.manual_seed(0)
    te, tok = train.build_text_encoder().eval(), clip_tokenizer("sd1")
    cache = train.TextCache(te, tok, ["", "a red circle"])
    caps = ["a blue square", "", "a red circle", "a blue square"]
    got = cache(caps)
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = te(ids.input_ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_train_smoke_resume_in_chunks_and_snapshots(tmp_path):
    from diffusers import DiffusionPipeline

    from research.testbed import train

    out, work = tmp_path / "model", tmp_path / "work"
    common = ["--out", str(out), "--workdir", str(work), "--batch-size", "2", "--threads", "1"]
    common += ["--steps", "4", "--snapshots", "2"]
    train.main([*common, "--stop-at", "3"])
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 3
    assert (work / "ema_2.pt").exists() and not out.exists()  # a chunk does not export
    train.main(common)  # resumes at step 3, exports the EMA weights
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and len(state["losses"]) == 4 and state["ema"]["updates"] == 4
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 4 and len(info["memorized_exposures"]) == 100
    p = DiffusionPipeline.from_pretrained(str(out), use_safetensors=True)
    assert p.unet.config.sample_size == 32 and p.text_encoder.dtype == torch.float32
    shadow = state["ema"]["shadow"]
    for k, v in p.unet.state_dict().items():
        torch.testing.assert_close(v, shadow[k])  # the exported weights are the EMA's
    train.main([*common, "--export-snapshot", "2", "--out", str(tmp_path / "snap")])
    snap = json.loads((tmp_path / "snap" / "training.json").read_text())
    assert snap["steps"] == 2 and snap["snapshot_of_run"] == 4 and snap["samples"] == 4
    seen, with_caption = data.exposures(data.SEED, 2, 2, snap["p_mem"], snap["p_drop"])
    assert snap["memorized_exposures"] == seen.tolist()  # of the snapshot's 2 steps, not 4
    assert snap["memorized_exposures_with_caption"] == with_caption.tolist()
    with pytest.raises(SystemExit, match="seed"):  # the snapshot is described by the run's settings
        train.main([*common, "--export-snapshot", "2", "--out", str(tmp_path / "x"), "--seed", "1"])


def test_train_continues_from_an_exported_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    from attnmem.tokenizer import clip_tokenizer
    from research.testbed import train

    first = tmp_path / "first"
    small = ["--batch-size", "2", "--threads", "1", "--snapshots", ""]
    train.main(["--out", str(first), "--workdir", str(tmp_path / "w1"), "--steps", "2", *small])
    work, out = tmp_path / "w2", tmp_path / "cont"
    args = ["--out", str(out), "--workdir", str(work), "--steps", "4", *small]
    with pytest.raises(ValueError, match="seed"):
        train.main([*args, "--continue-from", str(first), "--seed", "1"])
    train.main([*args, "--continue-from", str(first)])
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and len(state["losses"]) == 2 and state["ema"]["updates"] == 4
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 4 and info["continued_from"]["step"] == 2
    # the first continued step is step 2's batch on the folder's weights (loss before the update)
    unet = UNet2DConditionModel.from_pretrained(first / "unet", use_safetensors=True).train()
    torch.manual_seed(data.SEED)  # the run's text encoder: built after the UNet, seeded
    train.build_unet()
    te, tok = train.build_text_encoder().eval(), clip_tokenizer("sd1")
    captions, _, noise, t, xt = train.noised_batch(
        data.SEED, 2, 2, 0.35, 0.1, 0.1, train.alphas_cumprod()
    )
    with torch.no_grad():
        pred = unet(xt, t, train.encode_captions(te, tok, captions)).sample
    expected = float(torch.nn.functional.mse_loss(pred, noise))
    assert state["losses"][0] == pytest.approx(expected, rel=1e-4)


def test_the_bundled_checkpoint_has_its_validation_committed(tmp_path):
    assert VALIDATION.is_file() and VALIDATION in VALIDATIONS
    info = json.loads((MODEL / "training.json").read_text())
    raw = json.loads(VALIDATION.read_text())["raw"]
    assert all(
        Path(raw[part]["model"]).name in ("final", f"step{info['steps']}")
        for part in ("attention", "detect", "generate")
    )
    (tmp_path / "training.json").write_text(json.dumps({"steps": 6000, "snapshot_of_run": 10000}))
    assert bundled_validation(tmp_path).name == "testbed_validation_step6000.json"
    (tmp_path / "training.json").write_text(json.dumps({"steps": 10000}))
    assert bundled_validation(tmp_path).name == "testbed_validation.json"


@pytest.mark.parametrize("path", VALIDATIONS, ids=lambda p: p.stem)
def test_committed_verdicts_are_recomputed_from_the_raw_results(path):
    from research.testbed import validate

    committed = json.loads(path.read_text())
    summary, table = validate.report(committed["raw"])
    assert json.loads(json.dumps(summary)) == committed["summary"]  # verdicts included
    assert path.with_suffix(".md").read_text().startswith(table)


def test_validation_verdicts_apply_the_fixed_thresholds(tmp_path):
    import copy

    from research.testbed import validate

    summary = json.loads(VALIDATION.read_text())["summary"]  # = report(raw): tested above

    def met(s):
        return {k: v["met"] for k, v in validate.verdicts(s).items()}

    s = copy.deepcopy(summary)
    rate = s["memorization_rate"]["7.5"]
    for g, r in enumerate((0.1, 0.2, 0.4, 0.5, 0.6)):
        rate[g][0] = r
    s["mitigation"]["g7.5_none"]["neg_rate"][0] = 0.1
    assert met(s)["memorization"]  # 0.6 top, 0.1 held-out, 0.55 - 0.15 = 0.4: bounds inclusive
    rate[4][0] = 0.59
    assert not met(s)["memorization"]
    rate[4][0], rate[3][0], rate[0][0] = 0.6, 0.3, 0.15  # dose response 0.45 - 0.175 < 0.3
    assert not met(s)["memorization"]

    s = copy.deepcopy(summary)
    s["bos_sink"].update(layers_bos_max=8, mean_mass=0.5)
    assert met(s)["BOS sink"]
    s["bos_sink"]["layers_bos_max"] = 7
    assert not met(s)["BOS sink"]

    s = copy.deepcopy(summary)
    cal = s["calibration"]["layer"]
    s["attention_step0"]["eval"][cal]["bos"] = {"pos": 0.2, "neg": 0.5}
    s["detection"]["E"]["auroc"] = [0.9, 0.85, 0.95]
    for k in validate.CONTROLS:
        s["detection"][k]["auroc"] = [0.8, 0.7, 0.9]
    assert met(s)["attention signature"]
    s["detection"][validate.CONTROLS[0]]["auroc"][0] = 0.85  # E not 0.1 above a control
    assert not met(s)["attention signature"]

    s = copy.deepcopy(summary)
    s["detection"]["wen_n1"]["auroc"][0] = 0.8
    assert met(s)["first-step Wen"]
    s["detection"]["wen_n1"]["auroc"][0] = 0.79
    assert not met(s)["first-step Wen"]

    s = copy.deepcopy(summary)
    m = s["mitigation"]["g7.5_c1_1.25"]
    m["mem_delta_rate"], m["neg_corr_vs_plain"] = [-0.3, -0.5, -0.01], [0.8, 0.7, 0.9]
    assert met(s)["mitigation"]
    m["mem_delta_rate"][2] = 0.0  # the interval must lie below 0
    assert not met(s)["mitigation"]

    s = copy.deepcopy(summary)
    s["mitigation"]["g7.5_none"]["neg_attr_acc"] = [0.5, 1 / 3, 0.9]  # shape exactly at chance
    assert not met(s)["caption following"]

    s = copy.deepcopy(summary)
    s["demo_auroc"] = 0.85
    assert met(s)["demo"]
    s["demo_auroc"] = 0.84
    assert not met(s)["demo"]

    # bench/quality.py's header names the verdicts that are met and not met
    from bench.quality import quality_lines

    header = quality_lines(VALIDATION)[2]
    v = summary["verdicts"]
    met_names = [k for k, r in v.items() if r["met"]]
    assert ", ".join(met_names) in header
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"summary": dict(summary, verdicts={})}))
    assert "no verdicts" in quality_lines(path)[2]


def test_validation_reports_the_field_mitigators_like_c1():
    """A field mitigator's generations (key g<guidance>_<spec>) are summarised against the same
    unmitigated outputs as c1, and bench/quality.py finds them by spec."""
    import copy

    from research.testbed import validate

    raw = copy.deepcopy(json.loads(VALIDATION.read_text())["raw"])
    mit = raw["generate"]["mit"]
    for spec in validate.FIELD_MITIGATORS:
        assert f"g7.5_{spec}" in mit  # the protocol's generate part ran them
    mit["g7.5_prompt-opt"] = copy.deepcopy(mit["g7.5_c1_1.25"])
    summary, table = validate.report(raw)
    got, ref = summary["mitigation"]["g7.5_prompt-opt"], summary["mitigation"]["g7.5_c1_1.25"]
    assert got == ref and "mem_delta_rate" in got and "neg_corr_vs_plain" in got
    assert "| 7.5 | prompt-opt |" in table


def test_validation_detect_part_continues_after_an_interruption(tmp_path, monkeypatch):
    import attnmem.detect
    from research.testbed import validate

    S = {k: v[:3] for k, v in validate.sets().items()}
    keys = list(validate.detector_specs(tmp_path / "cal.json"))
    calls, fail_at = [], {keys[2]}

    class Fake:
        def __init__(self, key):
            self.key = key

        def score_batch(self, prompts, seeds):
            calls.append(self.key)
            if self.key in fail_at:
                raise KeyboardInterrupt
            return [{"score": float(s)} for s in seeds]

        def settings(self):
            return {"key": self.key}

    specs = validate.detector_specs(tmp_path / "cal.json")
    by_spec = {(m, json.dumps(o, default=str)): k for k, (m, o) in specs.items()}
    monkeypatch.setattr(
        attnmem.detect,
        "make_detector",
        lambda m, pipe, **o: Fake(by_spec[(m, json.dumps(o, default=str))]),
    )
    partial = tmp_path / "v.detect.partial.json"
    with pytest.raises(KeyboardInterrupt):
        validate.detect_part(None, S, tmp_path / "cal.json", partial, "model-a")
    assert calls == keys[:3] and list(json.loads(partial.read_text())["scores"]) == keys[:2]
    calls.clear(), fail_at.clear()
    out = validate.detect_part(None, S, tmp_path / "cal.json", partial, "model-a")
    assert calls == keys[2:] and list(out["scores"]) == keys and "partial_of" not in out
    calls.clear()
    validate.detect_part(None, S, tmp_path / "cal.json", partial, "model-b")  # another model
    assert calls == keys


def test_validation_generate_part_continues_after_an_interruption(tmp_path, monkeypatch):
    from research.testbed import validate

    S = {k: v[:2] for k, v in validate.sets().items()}
    calls, fail_at = [], [None]

    def fake_generate(pipe, prompts, seeds, guidance, mitigation=None):
        name = "none" if mitigation is None else str(getattr(mitigation, "bos_scale", mitigation))
        calls.append((guidance, name))
        if len(calls) == fail_at[0]:
            raise KeyboardInterrupt
        rng = np.random.default_rng([int(guidance * 10), sum(map(ord, name)), *map(int, seeds)])
        return rng.uniform(-1, 1, (len(prompts), 3, data.SIZE, data.SIZE)).astype(np.float32)

    monkeypatch.setattr(validate, "_generate", fake_generate)
    full = validate.generate_part(None, S)
    n_settings = len(full["mem_all"]) + len(full["mit"])
    assert len(calls) == n_settings  # one generation per setting when nothing is interrupted

    partial = tmp_path / "v.generate.partial.json"
    stop = len(validate.GUIDANCES) + 3  # inside guidance 7.5's mitigators, after its "none"
    calls.clear(), fail_at.__setitem__(0, stop)
    with pytest.raises(KeyboardInterrupt):
        validate.generate_part(None, S, partial, "model-a")
    kept = json.loads(partial.read_text())
    assert len(kept["mem_all"]) + len(kept["mit"]) == stop - 1
    calls.clear(), fail_at.__setitem__(0, None)
    out = validate.generate_part(None, S, partial, "model-a")
    assert calls[0] == (7.5, "none")  # the unmitigated images are regenerated for pairing
    assert len(calls) == n_settings - (stop - 1) + 1
    assert json.loads(json.dumps(out)) == json.loads(json.dumps(full))  # same as uninterrupted
    calls.clear()
    validate.generate_part(None, S, partial, "model-b")  # another model: from the start
    assert len(calls) == n_settings


def test_validation_partial_files_are_replaced_whole(tmp_path, monkeypatch):
    import os

    from research.testbed import validate

    path = tmp_path / "v.detect.partial.json"
    validate._write_partial(path, {"scores": {"E": [1.0]}})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between writing and renaming
        validate._write_partial(path, {"scores": {"E": [1.0], "D": [2.0]}})
    assert json.loads(path.read_text()) == {"scores": {"E": [1.0]}}  # the previous file, whole


def test_validation_sets_follow_the_protocol():
    from research.testbed import validate

    S = validate.sets()
    sizes = {k: len(v) for k, v in S.items()}
    assert sizes == {
        "mem": 100,
        "cal_pos": 60,
        "cal_neg": 200,
        "eval_pos": 40,
        "eval_neg": 200,
        "mem_mit": 12,
        "neg_mit": 12,
    }
    caps = {k: {it.caption for it, _ in v} for k, v in S.items()}
    assert not caps["cal_pos"] & caps["eval_pos"] and not caps["cal_neg"] & caps["eval_neg"]
    assert not (caps["cal_pos"] | caps["eval_pos"]) & (caps["cal_neg"] | caps["eval_neg"])
    demo = {p for p, _ in data.demo_prompts()}
    assert not demo & caps["eval_neg"] and not demo & caps["cal_neg"]
    # the calibration negatives were in the training stream (captioned) before step 6000
    seen = set()
    for step in validate.CAL_NEG_STEPS:
        for kind, idx, drop in data.batch_plan(data.SEED, step, 32, 0.35, 0.1):
            if kind == "negative" and not drop:
                seen.add(data.negative_item(data.SEED, idx).caption)
    assert caps["cal_neg"] <= seen and max(validate.CAL_NEG_STEPS) < 6000
