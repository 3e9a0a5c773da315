"""Validation protocol of the attnmem testbed (third model), fixed and committed before its
training run; training probes are disclosed in the model card (``attnmem/data/testbed/README.md``),
which repeats this protocol.

    python -m research.testbed.validate --model DIR --part attention   # per-layer attention, all sets
    python -m research.testbed.validate --model DIR --part calibrate   # the metric-E layer from CAL
    python -m research.testbed.validate --model DIR --part detect      # every detector on EVAL
    python -m research.testbed.validate --model DIR --part generate    # memorization and mitigation
    python -m research.testbed.validate --model DIR --part report      # merge, tables, verdicts

Each part writes ``<out>.<part>.json``; ``report`` merges them into ``<out>`` (raw results, the
summary and the verdicts, each part naming machine, torch and commit) and ``<out>.md``. Two
checkpoints of the same run are validated with this whole protocol and both are reported: the
final EMA weights (step 10 000, the candidate bundled model) and the EMA weights of step 6 000.
Amendment (after the step-6 000 results, before any result of the final weights): the run's
training state was lost after step 9 400, so the final weights are those of its continuation from
the exported step-6 000 EMA weights (``research.testbed.train --continue-from``: steps 6 000-10 000
on the same batches and learning-rate schedule, fresh AdamW moments). Nothing else changes.

Sets (all from ``research/testbed/data.py``, seed 20240311; no rare "trigger" tokens are added to any
caption: memorized and novel captions come from one generator and one vocabulary, so nothing but
exposure tells them apart):
  MEM      = the 100 memorized items, 5 dose groups of 20 (group g sampled with weight 2**g);
  CAL_POS  = dose groups 0-2 (60 items)       CAL_NEG  = 200 training negatives, each seen once
             by both checkpoints (the first captioned negative slot of steps 0, 30, ..., 5970);
  EVAL_POS = dose groups 3-4 (40 items)       EVAL_NEG = held-out captions 0-199 (never trained);
  MEM_MIT  = memorized items 80-91 (12 of the top dose group); NEG_MIT = held-out 0-11;
  PROBE    = held-out 200-219 (training probes only); DEMO = memorized 84-99 + held-out 384-399.
With 40 vs 200 prompts the standard error of an AUROC is <= 0.05 (about 0.05 at 0.5, 0.03 at 0.9).

1. Attention at the first step (t = 981 of the 50-step DDIM schedule; conditional pass, one
   seed per prompt = its index in the set), for MEM, CAL_NEG and EVAL_NEG: per layer the
   pixel/head-averaged mass on BOS, prompt tokens (attribute words / other words), EOS and
   summary (padding) tokens, whether BOS is the largest position, and the entropy E.
2. Calibration (``attnmem.calibrate``, the library feature, applied to CAL only): for each of the
   11 cross-attention layers, the AUROC of metric E (step 0; higher = memorized, the paper's
   direction; no sign flip) of CAL_POS vs CAL_NEG; the chosen layer is the one with the largest
   AUROC, and among layers within 0.01 of it the earliest in execution order (the cheapest early
   exit). The result is the calibration file the detectors, ``attnmem scan`` and ``make demo``
   use. EVAL is never seen by the calibration.
3. Detection on EVAL (positives EVAL_POS, negatives EVAL_NEG), one generation seed per prompt,
   guidance 7.5, each detector with its documented defaults: metric E at the calibrated layer
   (through the calibration file, early exit) and at the library's default layer (the 4th
   cross-attention); D (10 DDIM steps, last 2); Wen n = 1 and n = 4 (step 0 of 50); Carlini
   n = 4 (10 DDIM steps, 4x4 tiles); every further registered detector with its defaults.
   AUROC with a 95 % interval (bootstrap, positives and negatives resampled separately, 2000
   resamples, seed 0); TPR at 1 % FPR under both conventions. Controls: the prompt length L, and
   E at the calibrated layer of the untrained model (same construction, ``--tag init``).
4. Generation, 10 DDIM steps, seed j of prompt i = 1000 i + j:
   a. memorization rate of all of MEM at guidance 3, 5, 7.5 (2 seeds each): a generation counts
      as memorized when, among its training image and 15 "twins" (same attributes, fresh
      details, never trained), the training image is the nearest (L2); chance 1/16. Also the
      Pearson correlation with the training image.
   b. caption following on NEG_MIT (16 seeds): ``data.classify`` accuracy per attribute (chance
      colour 1/8, shape 1/3, position 1/5), the classifier on the true images as the ceiling.
   c. mitigation (``attnmem.Mitigation``, default summary-token mask) with c1 = 1.25 and 1.5 at
      guidance 7.5 and c1 = 1.25 at guidance 3, paired with the unmitigated output of the same
      seed (16 seeds): on MEM_MIT the change of the memorization rate and of the correlation
      with the training image; on NEG_MIT the correlation of mitigated with unmitigated outputs
      and the caption-following accuracy. 95 % intervals: bootstrap over prompts (2000, seed 0).
   d. the field's mitigators at guidance 7.5, measured as in c. (same seeds, paired with the
      same unmitigated outputs): Jain et al.'s static and dynamic guidance delay
      (``cfg-delay:mode=static``, ``cfg-delay:mode=dynamic``) and Wen et al.'s prompt-embedding
      optimisation (``prompt-opt``), each with its documented defaults. (Added to the protocol
      while the third model trained, before any validation result of it existed; no verdict
      depends on it.)

Verdicts, thresholds fixed in advance (the model card reports each as met / not met, with its
interval):
  - BOS sink: on EVAL_NEG at step 0, BOS is the largest of the 77 positions (for most prompts)
    in >= 8 of the 11 layers, and its mean mass over layers is >= 0.5;
  - memorization: the top dose group's rate at guidance 7.5 >= 0.6; NEG_MIT's rate <= 0.1; dose
    response: the rate of dose groups 3-4 exceeds that of groups 0-1 by >= 0.3 (guidance 7.5);
  - attention signature: at the calibrated layer EVAL_POS puts less mass on BOS than EVAL_NEG,
    and E at that layer (early exit) separates EVAL with AUROC >= 0.9, at least 0.1 above both
    controls;
  - first-step Wen: Wen n = 1 at step 0 separates EVAL with AUROC >= 0.8;
  - mitigation: with c1 = 1.25 at guidance 7.5 the memorization rate of MEM_MIT drops (95 %
    interval of the change below 0) while NEG_MIT outputs keep correlation >= 0.8 with their
    unmitigated outputs (mean);
  - caption following: NEG_MIT attribute accuracy above chance on all three attributes;
  - demo: ``make demo`` (metric E with the bundled calibration file, 16 memorized and 16
    held-out DEMO captions) prints an AUROC >= 0.85.
Which model is bundled, fixed in advance: the final checkpoint, unless it meets fewer of these
verdicts than the earlier checkpoint (then the earlier one); the second model (commit 775dc1e)
stays the default only if the new one meets none of BOS sink, attention signature, first-step
Wen and demo.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.machine import describe
from research.testbed import data

SEED = data.SEED
TRAIN = {"batch_size": 32, "p_mem": 0.35, "p_drop": 0.1}  # the run the sets refer to
N_EVAL_NEG = 200
CAL_NEG_STEPS = range(0, 6000, 30)
E_STEPS = 50  # E and Wen read the first step of this schedule (t = 981)
N_TWINS = 15
GUIDANCES = (3.0, 5.0, 7.5)
MIT_CONFIGS = ((7.5, (1.25, 1.5)), (3.0, (1.25,)))
FIELD_MITIGATORS = ("cfg-delay:mode=static", "cfg-delay:mode=dynamic", "prompt-opt")  # at 7.5
MEM_SEEDS = 2
MIT_SEEDS = 16
GEN_STEPS = 10
BOOT = 2000
BATCH = 40
RESULTS = Path("research/testbed/results/testbed_validation.json")
PARTS = ("attention", "attention_init", "calibrate", "detect", "generate", "demo")
ATTR_WORDS = (
    set(data.FG)
    | set(data.SHAPES)
    | {w for ps in data.POS_PHRASES.values() for p in ps for w in p.split()}
)


def calibration_negatives() -> list[data.Item]:
    """CAL_NEG: the first captioned negative of training steps 0, 30, ..., 5970."""
    out = []
    for step in CAL_NEG_STEPS:
        plan = data.batch_plan(SEED, step, TRAIN["batch_size"], TRAIN["p_mem"], TRAIN["p_drop"])
        idx = next(i for kind, i, drop in plan if kind == "negative" and not drop)
        out.append(data.negative_item(SEED, idx))
    return out


def sets() -> dict[str, list]:
    """The protocol's sets, each a list of (item, seed): the seed is the item's index in MEM,
    CAL_NEG or EVAL_NEG."""
    mem = [(m, m.index) for m in data.memorized_items(SEED)]
    held = [(h, h.index) for h in data.heldout_items(SEED)]
    return {
        "mem": mem,
        "cal_pos": [(m, s) for m, s in mem if m.dose_group <= 2],
        "cal_neg": [(n, k) for k, n in enumerate(calibration_negatives())],
        "eval_pos": [(m, s) for m, s in mem if m.dose_group >= 3],
        "eval_neg": held[:N_EVAL_NEG],
        "mem_mit": mem[80:92],
        "neg_mit": held[:12],
    }


def load(model: str, device: str = "cpu"):
    from attnmem.pipelines import load_pipeline

    return load_pipeline(model, torch.device(device), torch.float32)


def _check_training(model: str) -> None:
    """The sets refer to the stream of the run described by TRAIN: refuse another run's model."""
    info = json.loads((Path(model) / "training.json").read_text())
    got = {k: info.get(k) for k in TRAIN}
    if got != TRAIN:
        raise SystemExit(f"{model} was trained with {got}; this protocol's sets need {TRAIN}")


# -- 1. attention -------------------------------------------------------------------------------
def _step0_record(pipe, prompts, seeds):
    from attnmem.detect import generators
    from attnmem.patching import patch, run_unet_until
    from attnmem.record import RecordSpec

    with patch(pipe, record=RecordSpec(steps=(0,))) as h:
        run_unet_until(
            h,
            None,
            lambda: pipe(
                prompts,
                generator=generators(seeds),
                num_inference_steps=E_STEPS,
                guidance_scale=1.0,
                output_type="latent",
            ),
            step=0,
        )
        return h.record.to("cpu")


def attention_part(pipe, S) -> dict:
    out = {}
    for name in ("mem", "cal_neg", "eval_neg"):
        items = S[name]
        recs = []
        for b in range(0, len(items), BATCH):
            chunk = items[b : b + BATCH]
            recs.append(_step0_record(pipe, [it.caption for it, _ in chunk], [s for _, s in chunk]))
        layers = recs[0].order
        L = torch.cat([r.lengths for r in recs])
        toks = sum((r.tokens for r in recs), [])
        per_layer = {}
        for li, layer in enumerate(layers):
            a = torch.cat([r.mean_attention(steps=0, layers=layer) for r in recs])  # (n, 77)
            ent = torch.cat([r.entropy(steps=0, layers=layer) for r in recs])
            q = {
                k: [] for k in ("bos", "attribute_tokens", "other_prompt_tokens", "eos", "summary")
            }
            for i in range(len(a)):
                Li = int(L[i])
                is_attr = torch.tensor(
                    [t.strip().lower() in ATTR_WORDS for t in toks[i][1 : Li - 1]], dtype=torch.bool
                )
                prompt = a[i, 1 : Li - 1]
                q["bos"].append(float(a[i, 0]))
                q["attribute_tokens"].append(float(prompt[is_attr].sum()) if len(prompt) else 0.0)
                q["other_prompt_tokens"].append(
                    float(prompt[~is_attr].sum()) if len(prompt) else 0.0
                )
                q["eos"].append(float(a[i, Li - 1]))
                q["summary"].append(float(a[i, Li:].sum()))
            per_layer[layer] = {
                "index": li,
                "entropy": ent.tolist(),
                "bos_is_max": [bool(a[i].argmax() == 0) for i in range(len(a))],
                **q,
            }
        out[name] = {"layers": layers, "per_layer": per_layer, "L": L.tolist()}
    out["mem_dose_group"] = [m.dose_group for m, _ in S["mem"]]
    return out


# -- 2. calibration -----------------------------------------------------------------------------
def calibrate_part(pipe, S, model: str) -> dict:
    from attnmem.detect import calibrate

    items = S["cal_pos"] + S["cal_neg"]
    cal = calibrate(
        pipe,
        [it.caption for it, _ in items],
        [1] * len(S["cal_pos"]) + [0] * len(S["cal_neg"]),
        seeds=[s for _, s in items],
        num_inference_steps=E_STEPS,
        batch_size=BATCH,
        model=model,
    )
    return {"calibration": asdict(cal)}


# -- 3. detection -------------------------------------------------------------------------------
def detector_specs(calibration: Path) -> dict[str, tuple[str, dict]]:
    """The protocol's detectors: key -> (registry name, options). Keys name the generations
    (``wen_n4``) as ``bench/quality.py`` looks them up; "E" is metric E as a user of the
    bundled testbed gets it (its calibration file)."""
    from attnmem.detect import METRICS

    specs = {
        "E": ("E", dict(num_inference_steps=E_STEPS, calibration=calibration)),
        "E (default layer)": ("E", dict(num_inference_steps=E_STEPS)),
        "D": ("D", dict(num_inference_steps=GEN_STEPS, last=2)),
        "wen_n1": ("wen", dict(num_inference_steps=E_STEPS, n=1)),
        "wen_n4": ("wen", dict(num_inference_steps=E_STEPS, n=4)),
        "carlini_n4": ("carlini", dict(num_inference_steps=GEN_STEPS, n=4)),
    }
    for name, cls in METRICS.items():
        if name not in ("E", "D", "wen", "carlini"):  # every further detector, its defaults
            n = cls.__dataclass_fields__["n"].default if "n" in cls.__dataclass_fields__ else None
            specs[name if n is None else f"{name}_n{n}"] = (name, {})
    if "sharpness" in METRICS:  # its paper's second setting
        specs["sharpness_n4"] = ("sharpness", dict(n=4))
    return specs


def _write_partial(path: Path, obj: dict) -> None:
    """Write a part's results so far: next to ``path``, then renamed over it, so a run killed
    mid-write leaves the previous partial file, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def detect_part(pipe, S, calibration: Path, partial: Path | None = None, model: str = "") -> dict:
    """Every detector on EVAL. With ``partial``, the results so far are written there after each
    detector, and a rerun after an interruption continues from them (same model and labels)."""
    from attnmem.detect import make_detector

    items = S["eval_pos"] + S["eval_neg"]
    prompts, seeds = [it.caption for it, _ in items], [s for _, s in items]
    out = {
        "labels": [1] * len(S["eval_pos"]) + [0] * len(S["eval_neg"]),
        "dose_group": [m.dose_group for m, _ in S["eval_pos"]] + [-1] * len(S["eval_neg"]),
        "scores": {},
        "settings": {},
        "seconds": {},
    }
    if partial is not None and partial.exists():
        done = json.loads(partial.read_text())
        same = (done.get("partial_of"), done["labels"], done["dose_group"])
        if same == (model, out["labels"], out["dose_group"]):
            out = done
            print(f"detect: continuing after {', '.join(done['scores'])}", flush=True)
    for key, (metric, opts) in detector_specs(calibration).items():
        if key in out["scores"]:
            continue
        det = make_detector(metric, pipe, **opts)
        t0 = time.time()
        scores = []
        for b in range(0, len(prompts), BATCH):
            scores += [
                r["score"] for r in det.score_batch(prompts[b : b + BATCH], seeds[b : b + BATCH])
            ]
        out["scores"][key] = scores
        out["settings"][key] = json.loads(json.dumps(det.settings(), default=str))
        out["seconds"][key] = round(time.time() - t0, 1)
        print(f"detect {key}: {out['seconds'][key]} s", flush=True)
        if partial is not None:
            _write_partial(partial, {**out, "partial_of": model})
    out.pop("partial_of", None)
    return out


# -- 4. generation ------------------------------------------------------------------------------
def _generate(pipe, prompts, seeds, guidance, mitigation=None, batch=64) -> np.ndarray:
    """(len(prompts), 3, 32, 32) in [-1, 1]; prompt i uses seeds[i]. ``mitigation``: a
    ``Mitigation`` or a mitigator spec string (``attnmem.mitigate.apply``)."""
    from attnmem.mitigate import apply
    from attnmem.patching import patch

    imgs = []
    for b in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[b : b + batch]]
        kw = dict(
            num_inference_steps=GEN_STEPS, guidance_scale=guidance, output_type="np", generator=gens
        )
        if mitigation is None:
            x = pipe(prompts[b : b + batch], **kw).images
        elif isinstance(mitigation, str):
            with apply(pipe, mitigation):
                x = pipe(prompts[b : b + batch], **kw).images
        else:
            with patch(pipe, record=False, mitigate=mitigation):
                x = pipe(prompts[b : b + batch], **kw).images
        imgs.append(np.asarray(x).transpose(0, 3, 1, 2) * 2 - 1)
    return np.concatenate(imgs).astype(np.float32)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)


def _nearest_is_own(gen: np.ndarray, own: np.ndarray, twins: np.ndarray) -> np.ndarray:
    d_own = ((gen - own) ** 2).reshape(len(gen), -1).sum(1)
    d_tw = ((gen[:, None] - twins) ** 2).reshape(len(gen), twins.shape[1], -1).sum(2).min(1)
    return d_own < d_tw


def _expand(items, n_seeds):
    """Prompt i of ``items`` with seeds 1000 i + j, j < n_seeds (i = the index in ``items``)."""
    prompts = [it.caption for it in items for _ in range(n_seeds)]
    seeds = [1000 * k + j for k in range(len(items)) for j in range(n_seeds)]
    return prompts, seeds


def _targets(items, n_seeds):
    own = np.stack([data.item_image(SEED, it) for it in items])
    twins = np.stack([data.twin_images(SEED, it, N_TWINS) for it in items])
    return np.repeat(own, n_seeds, 0), np.repeat(twins, n_seeds, 0)


def _attr_acc(imgs, items, n_seeds):
    pred = data.classify(imgs)
    truth = [it.attrs for it in items for _ in range(n_seeds)]
    hit = np.array([[p[k] == t[k] for k in range(3)] for p, t in zip(pred, truth)], float)
    return hit  # (n, 3): colour, shape, position


def generate_part(pipe, S, partial: Path | None = None, model: str = "") -> dict:
    """Memorization, caption following and mitigation. With ``partial``, the results so far
    are written there after each setting, and a rerun after an interruption continues from them
    (same model); the unmitigated images a mitigated setting is paired with are regenerated
    when they are not in memory (same seeds, so the same images)."""
    from attnmem.mitigate import Mitigation

    mem = [it for it, _ in S["mem"]]
    mem_mit, neg_mit = [it for it, _ in S["mem_mit"]], [it for it, _ in S["neg_mit"]]
    out = {"mem_all": {}, "mit": {}}
    if partial is not None and partial.exists():
        done = json.loads(partial.read_text())
        if done.get("partial_of") == model:
            out = {"mem_all": done["mem_all"], "mit": done["mit"]}
            print(
                f"generate: continuing after {', '.join([*out['mem_all'], *out['mit']])}",
                flush=True,
            )

    def save() -> None:
        if partial is not None:
            _write_partial(partial, {**out, "partial_of": model})

    # a. all memorized items, MEM_SEEDS seeds, plain
    own_a, tw_a = _targets(mem, MEM_SEEDS)
    p_a, s_a = _expand(mem, MEM_SEEDS)
    for g in GUIDANCES:
        if str(g) in out["mem_all"]:
            continue
        t0 = time.time()
        x = _generate(pipe, p_a, s_a, g)
        out["mem_all"][str(g)] = {
            "corr": _corr(x, own_a).tolist(),
            "nearest_own": _nearest_is_own(x, own_a, tw_a).tolist(),
            "dose_group": [it.dose_group for it in mem for _ in range(MEM_SEEDS)],
        }
        save()
        print(f"mem_all g={g}: {time.time() - t0:.0f} s", flush=True)
    # b/c. paired mitigation on MEM_MIT and NEG_MIT, MIT_SEEDS seeds
    items = mem_mit + neg_mit
    prompts, seeds = _expand(items, MIT_SEEDS)
    own, tw = _targets(items, MIT_SEEDS)
    n_mem = len(mem_mit) * MIT_SEEDS
    truth_acc = _attr_acc(np.stack([data.item_image(SEED, it) for it in neg_mit]), neg_mit, 1)
    configs = [(g, [None, *(Mitigation(bos_scale=c1) for c1 in c1s)]) for g, c1s in MIT_CONFIGS]
    configs[0][1].extend(FIELD_MITIGATORS)  # guidance 7.5
    for g, mits in configs:
        base = None
        for mit in mits:
            setting = (
                "none" if mit is None else mit if isinstance(mit, str) else f"c1_{mit.bos_scale}"
            )
            key = f"g{g}_{setting}"
            if key in out["mit"]:
                continue
            if mit is not None and base is None:  # the unmitigated images, regenerated
                base = _generate(pipe, prompts, seeds, g)
            t0 = time.time()
            x = _generate(pipe, prompts, seeds, g, mit)
            rec = {
                "corr_train": _corr(x, own).tolist(),
                "nearest_own": _nearest_is_own(x, own, tw).tolist(),
                "attr_hit": _attr_acc(x[n_mem:], neg_mit, MIT_SEEDS).tolist(),
            }
            if mit is None:
                base = x
            else:
                rec["corr_vs_plain"] = _corr(x, base).tolist()
            out["mit"][key] = rec
            save()
            print(f"mit {key}: {time.time() - t0:.0f} s", flush=True)
    out["classifier_on_true_images"] = truth_acc.mean(0).tolist()
    out["n_mem_rows"] = n_mem
    out["prompt_of_row"] = [k for k in range(len(items)) for _ in range(MIT_SEEDS)]
    return out


# -- 5. the demo --------------------------------------------------------------------------------
def demo_part(model: str, calibration: Path) -> dict:
    """What ``make demo`` prints: metric E (calibrated) on the bundled prompt file."""
    from attnmem.evaluate import auroc
    from attnmem.scan import ScanOptions, run_scan

    root = Path(__file__).resolve().parents[2] / "attnmem" / "data"
    labels = [int(x) for x in (root / "testbed_labels.txt").read_text().split()]
    prompts = (root / "testbed_prompts.txt").read_text().splitlines()
    if list(zip(prompts, labels)) != data.demo_prompts():
        raise SystemExit(
            "attnmem/data/testbed_prompts.txt / testbed_labels.txt are not the DEMO set of "
            "research/testbed/data.py: run `python -m research.testbed.data` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.jsonl"
        run_scan(
            ScanOptions(
                prompts=root / "testbed_prompts.txt",
                out=out,
                model=model,
                calibration=calibration,
                progress=False,
            )
        )
        recs = [json.loads(x) for x in out.read_text().splitlines()]
    scores = [r["score"] for r in sorted(recs, key=lambda r: r["id"])]
    return {"scores": scores, "labels": labels, "auroc": auroc(scores, labels)}


# -- report -------------------------------------------------------------------------------------
def _boot_ci(values: np.ndarray, groups: np.ndarray, n: int = BOOT) -> list[float]:
    """Mean and 95 % bootstrap interval, resampling whole groups (prompts)."""
    rng = np.random.default_rng(0)
    ug = np.unique(groups)
    means = np.array([values[groups == g].mean() for g in ug])
    boots = rng.choice(means, size=(n, len(means)), replace=True).mean(1)
    return [
        float(values.mean()),
        float(np.percentile(boots, 2.5)),
        float(np.percentile(boots, 97.5)),
    ]


def auroc_ci(scores, labels, n: int = BOOT) -> tuple[list[float], float]:
    """AUROC with its 95 % bootstrap interval (positives and negatives resampled separately)
    and the bootstrap standard error."""
    from attnmem.evaluate import auroc

    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(0)
    ones, zeros = np.ones(len(pos), int), np.zeros(len(neg), int)
    boots = np.array(
        [
            auroc(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))], np.r_[ones, zeros])
            for _ in range(n)
        ]
    )
    a = auroc(s, y)
    return [a, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))], float(
        boots.std()
    )


QUANTITIES = ("bos", "attribute_tokens", "other_prompt_tokens", "eos", "summary", "entropy")


def report(res: dict) -> tuple[dict, str]:
    from attnmem.evaluate import tpr_at_fpr

    summary: dict = {}
    lines: list[str] = []
    f3 = lambda c: f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"  # noqa: E731
    if "attention" in res:
        A = res["attention"]
        layers = A["mem"]["layers"]
        dg = np.array(A["mem_dose_group"])
        split = {"eval": (dg >= 3, "eval_neg"), "cal": (dg <= 2, "cal_neg")}
        summary["attention_step0"] = {}
        for name, (rows, neg) in split.items():
            summary["attention_step0"][name] = {
                ly: {
                    k: {
                        "pos": float(np.mean(np.array(A["mem"]["per_layer"][ly][k])[rows])),
                        "neg": float(np.mean(A[neg]["per_layer"][ly][k])),
                    }
                    for k in QUANTITIES
                }
                for ly in layers
            }
        neg = A["eval_neg"]["per_layer"]
        summary["bos_sink"] = {
            "layers": len(layers),
            "layers_bos_max": sum(float(np.mean(neg[ly]["bos_is_max"])) > 0.5 for ly in layers),
            "mean_mass": float(np.mean([np.mean(neg[ly]["bos"]) for ly in layers])),
            "per_layer": [float(np.mean(neg[ly]["bos"])) for ly in layers],
        }
        lines += [
            "### Attention at the first step (t = 981), mean over prompts: EVAL_POS / EVAL_NEG",
            "",
            "| # | layer | BOS | attribute words | other words | EOS | summary (padding) | entropy | BOS largest (EVAL_NEG) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for li, ly in enumerate(layers):
            row = summary["attention_step0"]["eval"][ly]
            cells = [f"{row[k]['pos']:.3f} / {row[k]['neg']:.3f}" for k in QUANTITIES]
            short = ly.replace(".transformer_blocks.0.attn2", "")
            lines.append(
                f"| {li} | {short} | "
                + " | ".join(cells)
                + f" | {np.mean(neg[ly]['bos_is_max']):.2f} |"
            )
        if "attention_init" in res:
            A0 = res["attention_init"]
            summary["bos_mass_untrained"] = [
                float(np.mean(A0["eval_neg"]["per_layer"][ly]["bos"])) for ly in layers
            ]
            lines.append(
                "\nBOS mass of the untrained model on EVAL_NEG, per layer: "
                + ", ".join(f"{v:.2f}" for v in summary["bos_mass_untrained"])
            )
        lines.append("")
    if "calibrate" in res:
        C = res["calibrate"]["calibration"]
        summary["calibration"] = {
            "layer": C["layer"],
            "index": C["layer_index"],
            "auroc": C["auroc"],
        }
        lines += [
            f"### Calibration on CAL ({C['n_memorized']} memorized of dose groups 0-2 vs "
            f"{C['n_normal']} training negatives): chosen layer {C['layer_index']}, {C['layer']}",
            "",
            "| # | layer | AUROC of E on CAL |",
            "|---|---|---|",
        ]
        lines += [
            f"| {i} | {ly.replace('.transformer_blocks.0.attn2', '')} | {a:.3f} |"
            for i, (ly, a) in enumerate(C["auroc"].items())
        ]
        lines.append("")
    if "detect" in res:
        Dt = res["detect"]
        y = np.array(Dt["labels"])
        scores = dict(Dt["scores"])
        if "attention" in res:
            A = res["attention"]
            pos_rows = np.array(A["mem_dose_group"]) >= 3
            for li, ly in enumerate(A["mem"]["layers"]):
                scores[f"E at layer {li} (attention part)"] = (
                    list(np.array(A["mem"]["per_layer"][ly]["entropy"])[pos_rows])
                    + A["eval_neg"]["per_layer"][ly]["entropy"]
                )
            scores["control: prompt length L"] = (
                list(np.array(A["mem"]["L"])[pos_rows]) + A["eval_neg"]["L"]
            )
            if "attention_init" in res and "calibration" in summary:
                A0, ly = res["attention_init"], summary["calibration"]["layer"]
                scores["control: E of the untrained model (calibrated layer)"] = (
                    list(np.array(A0["mem"]["per_layer"][ly]["entropy"])[pos_rows])
                    + A0["eval_neg"]["per_layer"][ly]["entropy"]
                )
        det = {}
        lines += [
            f"### Detection on EVAL: {int(y.sum())} memorized (dose groups 3-4) vs "
            f"{int((y == 0).sum())} held-out captions",
            "",
            "| detector | AUROC [95 % CI] | SE | TPR@1%FPR (nearest) | TPR@1%FPR (below) | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for key, s in scores.items():
            s = np.asarray(s, float)
            ci, se = auroc_ci(s, y)
            det[key] = {
                "auroc": ci,
                "se": se,
                "tpr@1%_nearest": tpr_at_fpr(s, y, 0.01, "nearest"),
                "tpr@1%_below": tpr_at_fpr(s, y, 0.01, "below"),
                "seconds": Dt["seconds"].get(key),
            }
            sec = Dt["seconds"].get(key, "")
            lines.append(
                f"| {key} | {f3(ci)} | {se:.3f} | {det[key]['tpr@1%_nearest']:.3f} | "
                f"{det[key]['tpr@1%_below']:.3f} | {sec} |"
            )
        summary["detection"] = det
        lines.append("")
    if "generate" in res:
        G = res["generate"]
        lines += [
            f"### Memorization rate by dose group (all 100 memorized, {MEM_SEEDS} seeds; 10 DDIM steps; chance 1/16 = 0.062)",
            "",
            "| guidance | " + " | ".join(f"dose {g}" for g in range(data.DOSE_GROUPS)) + " |",
            "|---|" + "---|" * data.DOSE_GROUPS,
        ]
        summary["memorization_rate"] = {}
        for g, rec in G["mem_all"].items():
            dg = np.array(rec["dose_group"])
            no = np.array(rec["nearest_own"], float)
            co = np.array(rec["corr"])
            per = [
                [float(no[dg == k].mean()), float(co[dg == k].mean())]
                for k in range(data.DOSE_GROUPS)
            ]
            summary["memorization_rate"][g] = per
            lines.append(f"| {g} | " + " | ".join(f"{a:.2f} (r {b:.2f})" for a, b in per) + " |")
        lines.append("")
        n_mem = G["n_mem_rows"]
        pr = np.array(G["prompt_of_row"])
        lines += [
            "### Mitigation (12 memorized prompts of the top dose group, 12 held-out captions, 16 paired seeds, 10 DDIM steps; mean [95 % CI, bootstrap over prompts])",
            "",
            "| guidance | setting | MEM: memorization rate (change) | MEM: r with training image (change) | NEG: r with unmitigated | NEG: attribute accuracy (colour/shape/position) |",
            "|---|---|---|---|---|---|",
        ]
        summary["mitigation"] = {}
        for key, rec in G["mit"].items():
            no = np.array(rec["nearest_own"], float)
            ct = np.array(rec["corr_train"])
            hit = np.array(rec["attr_hit"])
            row = {
                "mem_rate": _boot_ci(no[:n_mem], pr[:n_mem]),
                "mem_corr_train": _boot_ci(ct[:n_mem], pr[:n_mem]),
                "neg_attr_acc": hit.mean(0).tolist(),
                "neg_rate": _boot_ci(no[n_mem:], pr[n_mem:]),
            }
            if "corr_vs_plain" in rec:
                cv = np.array(rec["corr_vs_plain"])
                base = G["mit"][key.split("_", 1)[0] + "_none"]
                row["neg_corr_vs_plain"] = _boot_ci(cv[n_mem:], pr[n_mem:])
                dr = no[:n_mem] - np.array(base["nearest_own"], float)[:n_mem]
                row["mem_delta_rate"] = _boot_ci(dr, pr[:n_mem])
                dc = ct[:n_mem] - np.array(base["corr_train"])[:n_mem]
                row["mem_delta_corr_train"] = _boot_ci(dc, pr[:n_mem])
            summary["mitigation"][key] = row
            g, setting = key.split("_", 1)
            delta = lambda k, row=row: f" (Δ {f3(row[k])})" if k in row else ""  # noqa: E731
            lines.append(
                f"| {g[1:]} | {setting} | {f3(row['mem_rate'])}{delta('mem_delta_rate')} | "
                f"{f3(row['mem_corr_train'])}{delta('mem_delta_corr_train')} | "
                + (f3(row["neg_corr_vs_plain"]) if "neg_corr_vs_plain" in row else "1 (itself)")
                + f" | {'/'.join(f'{v:.2f}' for v in row['neg_attr_acc'])} |"
            )
        lines.append(
            "\nAttribute classifier on the true images of NEG_MIT (ceiling): "
            + "/".join(f"{v:.2f}" for v in G["classifier_on_true_images"])
            + "; chance 0.12/0.33/0.20."
        )
        summary["classifier_on_true_images"] = G["classifier_on_true_images"]
    if "demo" in res:
        summary["demo_auroc"] = res["demo"]["auroc"]
        lines.append(f"\n`make demo` on the bundled prompts: AUROC {res['demo']['auroc']:.3f}")
    if {"attention", "attention_init", "calibrate", "detect", "generate"} <= set(res):
        v = verdicts(summary)
        summary["verdicts"] = v
        lines += [
            "",
            "### Verdicts (thresholds fixed in advance)",
            "",
            "| verdict | measured | met |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {r['measured']} | {'yes' if r['met'] else '**no**'} |" for k, r in v.items()
        ]
    return summary, "\n".join(lines)


def verdicts(summary: dict) -> dict:
    """The protocol's verdicts, computed from the report's summary with the fixed thresholds."""
    out = {}
    rate = summary["memorization_rate"]["7.5"]  # per dose group: [rate, r]
    top = rate[data.DOSE_GROUPS - 1][0]
    neg_rate = summary["mitigation"]["g7.5_none"]["neg_rate"][0]
    dose = np.mean([rate[3][0], rate[4][0]]) - np.mean([rate[0][0], rate[1][0]])
    out["memorization"] = {
        "measured": f"top dose group {top:.2f} at guidance 7.5; NEG_MIT {neg_rate:.2f}; "
        f"groups 3-4 minus groups 0-1: {dose:+.2f}",
        "met": top >= 0.6 and neg_rate <= 0.1 and dose >= 0.3,
    }
    sink = summary["bos_sink"]
    out["BOS sink"] = {
        "measured": f"BOS the largest position in {sink['layers_bos_max']} of {sink['layers']} "
        f"layers; mean BOS mass {sink['mean_mass']:.2f}",
        "met": sink["layers_bos_max"] >= 8 and sink["mean_mass"] >= 0.5,
    }
    det = summary["detection"]
    cal = summary["calibration"]["layer"]
    bos = summary["attention_step0"]["eval"][cal]["bos"]
    e = det["E"]
    ctrl = [det[k]["auroc"][0] for k in CONTROLS if k in det]
    out["attention signature"] = {
        "measured": f"calibrated layer {cal}: BOS mass EVAL_POS {bos['pos']:.3f} vs EVAL_NEG "
        f"{bos['neg']:.3f}; E AUROC {_ci(e['auroc'])} (controls "
        + ", ".join(f"{c:.3f}" for c in ctrl)
        + ")",
        "met": bos["pos"] < bos["neg"]
        and e["auroc"][0] >= 0.9
        and len(ctrl) == len(CONTROLS)
        and all(e["auroc"][0] >= c + 0.1 for c in ctrl),
    }
    w = det["wen_n1"]["auroc"]
    out["first-step Wen"] = {"measured": f"Wen n = 1 AUROC {_ci(w)}", "met": w[0] >= 0.8}
    m = summary["mitigation"]["g7.5_c1_1.25"]
    out["mitigation"] = {
        "measured": f"MEM_MIT change of memorization rate {_ci(m['mem_delta_rate'])}; NEG_MIT r "
        f"with unmitigated {_ci(m['neg_corr_vs_plain'])}",
        "met": m["mem_delta_rate"][2] < 0 and m["neg_corr_vs_plain"][0] >= 0.8,
    }
    acc = summary["mitigation"]["g7.5_none"]["neg_attr_acc"]
    chance = (1 / len(data.FG), 1 / len(data.SHAPES), 1 / len(data.POSITIONS))
    out["caption following"] = {
        "measured": "colour/shape/position " + "/".join(f"{a:.2f}" for a in acc),
        "met": all(a > c for a, c in zip(acc, chance)),
    }
    if "demo_auroc" in summary:
        out["demo"] = {
            "measured": f"make demo AUROC {summary['demo_auroc']:.3f}",
            "met": summary["demo_auroc"] >= 0.85,
        }
    for v in out.values():
        v["met"] = bool(v["met"])  # numpy comparisons give numpy booleans
    return out


CONTROLS = ("control: prompt length L", "control: E of the untrained model (calibrated layer)")


def _ci(c: list[float]) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="attnmem testbed validation")
    ap.add_argument("--model", default="attnmem/data/testbed")
    ap.add_argument(
        "--part",
        required=True,
        choices=["attention", "calibrate", "detect", "generate", "demo", "report"],
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="metric E's calibration file (default: the one the calibrate part wrote next to --out)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--tag", default="", help="suffix of the part's file (init: the untrained model)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = args.calibration or args.out.with_suffix(".calibration.json")
    if args.part == "report":
        res = {}
        for part in PARTS:
            p = args.out.with_suffix(f".{part}.json")
            if p.exists():
                res[part] = json.loads(p.read_text())
        summary, table = report(res)
        runs = {p: r["machine"] for p, r in res.items() if "machine" in r}
        table += "\n\n" + "\n".join(
            f"- {p}: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
            f"torch {m['torch']}, commit {m['commit']}, {m['date']}, model {res[p]['model']}"
            for p, m in runs.items()
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"protocol": __doc__, "summary": summary, "raw": res}) + "\n"
        )
        args.out.with_suffix(".md").write_text(table + "\n")
        print(table)
        return
    S = sets()
    t0 = time.time()
    if args.part == "demo":
        res = demo_part(args.model, calibration)
    else:
        _check_training(args.model)
        pipe = load(args.model)
        if args.part == "attention":
            res = attention_part(pipe, S)
        elif args.part == "calibrate":
            res = calibrate_part(pipe, S, args.model)
            from attnmem.detect import Calibration

            Calibration(**res["calibration"]).save(calibration)
        elif args.part == "detect":
            partial = args.out.with_suffix(
                f".detect{'_' + args.tag if args.tag else ''}.partial.json"
            )
            partial.parent.mkdir(parents=True, exist_ok=True)
            res = detect_part(pipe, S, calibration, partial, args.model)
        else:
            partial = args.out.with_suffix(".generate.partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            res = generate_part(pipe, S, partial, args.model)
    res["wall_s"] = round(time.time() - t0, 1)
    res["model"] = args.model
    res["torch_threads"] = args.threads
    res["machine"] = describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    args.out.with_suffix(f".{args.part}{tag}.json").write_text(json.dumps(res) + "\n")
    args.out.with_suffix(f".{args.part}{tag}.partial.json").unlink(missing_ok=True)
    print(f"{args.part}: {res['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
