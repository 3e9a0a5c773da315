"""Training-time filters demonstrated: continue training the committed testbed three ways, then
evaluate.

    python -m research.testbed.finetune_filters --steps 150 --threads 2

Runs (same seed, same data stream, same number of steps, same optimizer settings):
  (a) ``none``:    plain epsilon-MSE, loss = per_sample.mean();
  (b) ``entropy``: attnmem.EntropyFilter(unet) on the metric-E layer (the model folder's
                   calibrated layer, attnmem_calibration.json, when it has one; else index 3),
                   threshold RunningZScore(z=3.0, buckets=5, min_count=32): the library default
                   z, with fewer buckets and a smaller min_count so the running statistics fill
                   within a run of ~150 steps x 32 samples (default min_count=64, buckets=10 would
                   also act, but later); loss = (w * per_sample).mean();
  (c) ``wen``:     attnmem.WenFilter(unet), the same threshold type, empty-prompt embeddings
                   from the *current* text encoder (recomputed each step, no grad).

Training continues ``research/testbed/train.py`` exactly where it stopped (its stream from the step in
the model's training.json on: fresh never-seen negatives, the same memorized items, 10 % empty
captions), with its loss (epsilon target, offset noise 0.1), AdamW(lr 5e-4, betas (0.9, 0.99),
wd 0), gradient clipping at 1.0, the model's own share of memorized samples and its
constant BOS sink (training.json; the text encoder is frozen). The committed folder has no
optimizer state, so AdamW starts fresh; a 20-step linear warmup (train.py: 100 steps from
scratch) keeps the first updates of a fresh Adam small. The evaluated weights are the last
step's (no moving average over a run this short).

Per run we record the fraction dropped per step, who was dropped (memorized items vs
negatives, and empty-caption samples, from ``data.batch_plan``), and the wall time per step
(time.perf_counter around the compute, batch construction excluded since it is identical).

Evaluation (the same for the starting model and the three runs, paired seeds):
  - memorization: the 40 memorized prompts of dose groups 3 and 4, 4 seeds each
    (seed 1000 i + j as in validate.py), 10 DDIM steps, guidance 7.5; memorized = the training
    image is nearer (L2) than all 15 twins (chance 1/16); Pearson r with the training image;
  - quality on held-out negatives 220-235 (never trained; the validation uses 0-199 and
    200-219 were training probes, the demo file 384-399): denoising loss (8 fixed (t, noise) draws per item, generator seed 0,
    same offset noise as training) and attribute accuracy of generations (2 seeds, 10 DDIM
    steps, guidance 7.5) by data.classify.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import attnmem
from attnmem.train import RunningZScore, WenFilter
from bench.machine import git_commit
from research.testbed import data
from research.testbed import validate as V
from research.testbed.train import ConstantSink, alphas_cumprod, encode_captions, noised_batch

SEED = data.SEED
BATCH = 32
LR = 5e-4
WARMUP = 20
P_DROP, OFFSET = 0.1, 0.1
MEM_GROUPS = (3, 4)
MEM_SEEDS = 4
NEG_IDS = range(220, 236)
NEG_SEEDS = 2
LOSS_DRAWS = 8
GUIDANCE = 7.5


def make_threshold():
    return RunningZScore(z=3.0, buckets=5, min_count=32)


def entropy_layer(model: str) -> str | int:
    """The metric-E layer of the model: its calibrated one, else the library default (3)."""
    from attnmem.pipelines import model_calibration

    path = model_calibration(model)
    return attnmem.Calibration.load(path).layer if path is not None else 3


def train_run(pipe, mode: str, steps: int, log, info: dict, layer: str | int) -> dict:
    """Continue training as ``research/testbed/train.py`` did for this model (``info`` = its
    training.json): from its last step, with its share of memorized samples and its sink."""
    unet, te = pipe.unet, pipe.text_encoder
    sink = ConstantSink(unet, te)  # re-imposes what the model already satisfies
    p_mem = info["p_mem"]
    unet.train()
    te.requires_grad_(False)
    alphas = alphas_cumprod()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.99))
    filt = None
    if mode == "entropy":
        filt = attnmem.EntropyFilter(unet, layers=layer, threshold=make_threshold())
    elif mode == "wen":
        filt = WenFilter(unet, threshold=make_threshold())
    rec = {
        "dropped": [],
        "dropped_mem": 0,
        "dropped_neg": 0,
        "dropped_empty_caption": 0,
        "n_mem": 0,
        "n_neg": 0,
        "n_empty_caption": 0,
        "step_s": [],
        "loss": [],
        "score": [],  # per sample: (filter value, is memorized, empty caption, timestep)
    }
    for i in range(steps):
        step = info["steps"] + i
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (i + 1) / WARMUP)
        plan = data.batch_plan(SEED, step, BATCH, p_mem, P_DROP)
        captions, _, noise, t, xt = noised_batch(SEED, step, BATCH, p_mem, P_DROP, OFFSET, alphas)

        t0 = time.perf_counter()
        cond = encode_captions(pipe.text_encoder, pipe.tokenizer, captions)
        pred = unet(xt, t, cond).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if mode == "entropy":
            w = filt.weights(t)
        elif mode == "wen":
            empty = encode_captions(pipe.text_encoder, pipe.tokenizer, [""])
            w = filt.weights(xt, t, pred, empty)
        else:
            w = torch.ones_like(per_sample)
        loss = (w * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sink.apply()
        rec["step_s"].append(time.perf_counter() - t0)

        drop = (w == 0).tolist()
        if filt is not None:
            for v, (kind, _, e), tt in zip(filt.last.values.tolist(), plan, t.tolist()):
                rec["score"].append((v, kind == "memorized", e, tt))
        rec["dropped"].append(float(np.mean(drop)))
        rec["loss"].append(float(per_sample.mean()))
        for (kind, _, empty_cap), d in zip(plan, drop):
            rec["n_mem" if kind == "memorized" else "n_neg"] += 1
            rec["n_empty_caption"] += empty_cap
            if d:
                rec["dropped_mem" if kind == "memorized" else "dropped_neg"] += 1
                rec["dropped_empty_caption"] += empty_cap
        if i % 25 == 0 or i == steps - 1:
            log(
                f"[{mode}] step {i}/{steps} loss {np.mean(rec['loss'][-25:]):.4f} "
                f"dropped {np.mean(rec['dropped'][-25:]):.3f} {rec['step_s'][-1]:.2f} s/step"
            )
    if filt is not None:
        filt.remove()
    unet.eval()
    te.eval()
    return rec


def evaluate(pipe) -> dict:
    mem = [m for m in data.memorized_items(SEED) if m.dose_group in MEM_GROUPS]
    prompts, seeds = V._expand(mem, MEM_SEEDS)
    own, tw = V._targets(mem, MEM_SEEDS)
    x = V._generate(pipe, prompts, seeds, GUIDANCE)
    out = {
        "mem_corr": V._corr(x, own).tolist(),
        "mem_nearest_own": V._nearest_is_own(x, own, tw).tolist(),
        "mem_prompt_of_row": [k for k in range(len(mem)) for _ in range(MEM_SEEDS)],
    }
    held = [data.heldout_items(SEED)[i] for i in NEG_IDS]
    np_, ns = V._expand(held, NEG_SEEDS)
    xn = V._generate(pipe, np_, ns, GUIDANCE)
    out["neg_attr_hit"] = V._attr_acc(xn, held, NEG_SEEDS).tolist()
    # held-out denoising loss, fixed draws
    alphas = alphas_cumprod()
    x0 = torch.from_numpy(np.stack([data.item_image(SEED, h) for h in held]))
    x0 = x0.repeat_interleave(LOSS_DRAWS, 0)
    caps = [h.caption for h in held for _ in range(LOSS_DRAWS)]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (len(x0),), generator=gen)
    noise = noise + OFFSET * torch.randn(len(x0), 3, 1, 1, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        pred = pipe.unet(xt, t, encode_captions(pipe.text_encoder, pipe.tokenizer, caps)).sample
    per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    out["neg_loss_per_item"] = per.view(len(held), LOSS_DRAWS).mean(1).tolist()
    return out


def summarize(ev: dict, base: dict | None) -> dict:
    pr = np.array(ev["mem_prompt_of_row"])
    no = np.array(ev["mem_nearest_own"], float)
    co = np.array(ev["mem_corr"])
    hit = np.array(ev["neg_attr_hit"])
    s = {
        "mem_rate": V._boot_ci(no, pr),
        "mem_corr": V._boot_ci(co, pr),
        "neg_loss": float(np.mean(ev["neg_loss_per_item"])),
        "neg_attr_acc": hit.mean(0).tolist(),
        "neg_attr_all": float(hit.all(1).mean()),
    }
    if base is not None:
        s["delta_mem_rate_vs_none"] = V._boot_ci(no - np.array(base["mem_nearest_own"], float), pr)
        s["delta_mem_corr_vs_none"] = V._boot_ci(co - np.array(base["mem_corr"]), pr)
        dl = np.array(ev["neg_loss_per_item"]) - np.array(base["neg_loss_per_item"])
        s["delta_neg_loss_vs_none"] = V._boot_ci(dl, np.arange(len(dl)))
    return s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="attnmem/data/testbed")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="none,entropy,wen")
    ap.add_argument(
        "--out", type=Path, default=Path("research/testbed/results/finetune_filters.json")
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    T0 = time.time()

    def log(msg):
        print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)

    res: dict = {"runs": {}, "eval": {}}
    info = json.loads((Path(args.model) / "training.json").read_text())
    layer = entropy_layer(args.model)
    pipe = V.load(args.model)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    res["eval"]["start"] = evaluate(pipe)
    log("evaluated the starting model")
    for mode in args.modes.split(","):
        torch.manual_seed(SEED)
        pipe = V.load(args.model)
        res["runs"][mode] = train_run(pipe, mode, args.steps, log, info, layer)
        res["eval"][mode] = evaluate(pipe)
        log(f"evaluated {mode}")

    base = res["eval"].get("none")
    summary = {}
    for key, ev in res["eval"].items():
        summary[key] = summarize(ev, base if key not in ("none", "start") else None)
    t_none = None
    for mode, r in res["runs"].items():
        st = np.array(r["step_s"][5:])  # skip warm-up steps
        s = summary[mode]
        s["dropped_mean"] = float(np.mean(r["dropped"]))
        nd = r["dropped_mem"] + r["dropped_neg"]
        s["dropped_total"] = nd
        s["dropped_share_memorized"] = r["dropped_mem"] / nd if nd else None
        s["dropped_share_empty_caption"] = r["dropped_empty_caption"] / nd if nd else None
        s["drop_rate_memorized"] = r["dropped_mem"] / r["n_mem"]
        s["drop_rate_negative"] = r["dropped_neg"] / r["n_neg"]
        s["step_s_mean"] = float(st.mean())
        s["step_s_median"] = float(np.median(st))
        s["train_loss_last50"] = float(np.mean(r["loss"][-50:]))
        if r["score"]:
            from attnmem.evaluate import auroc

            sc = np.array(r["score"], float)
            cap = sc[:, 2] == 0  # captioned samples only (empty captions are not memorization)
            # AUROC of the filter's own training-time score, memorized (positive) vs negative
            s["train_score_auroc_mem_vs_neg"] = auroc(sc[cap, 0], sc[cap, 1].astype(int))
        if mode == "none":
            t_none = s
    for mode in res["runs"]:
        if t_none is not None:
            summary[mode]["step_time_ratio_mean"] = (
                summary[mode]["step_s_mean"] / t_none["step_s_mean"]
            )
            summary[mode]["step_time_ratio_median"] = (
                summary[mode]["step_s_median"] / t_none["step_s_median"]
            )

    settings = {
        "model": args.model,
        "start_step": info["steps"],
        "steps": args.steps,
        "batch_size": BATCH,
        "lr": LR,
        "warmup_steps": WARMUP,
        "optimizer": "AdamW(betas=(0.9, 0.99), wd=0), fresh state; grad clip 1.0",
        "text_encoder": info["text_encoder"] + " (as research/testbed/train.py)",
        "bos_sink": info["bos_sink"] + " (as research/testbed/train.py)",
        "p_mem": info["p_mem"],
        "p_drop": P_DROP,
        "offset_noise": OFFSET,
        "threshold": "RunningZScore(z=3.0, buckets=5, min_count=32) for both filters",
        "entropy_filter_layer": layer,
        "wen_empty_embeddings": "current text encoder, recomputed each step (no grad)",
        "eval_mem": f"memorized dose groups {MEM_GROUPS}, {MEM_SEEDS} seeds, 10 DDIM steps, g={GUIDANCE}",
        "eval_neg": f"held-out {NEG_IDS.start}-{NEG_IDS.stop - 1}, {NEG_SEEDS} seeds for attributes, "
        f"{LOSS_DRAWS} fixed draws for the loss",
        "seed": SEED,
        "torch_threads": args.threads,
    }
    out = {
        "protocol": __doc__,
        "settings": settings,
        "summary": summary,
        "raw": res,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "wall_s": round(time.time() - T0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out) + "\n")
    md = table(summary, settings, out)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


def table(summary: dict, settings: dict, out: dict) -> str:
    f = lambda c: f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"  # noqa: E731
    lines = [
        f"### Fine-tuning the testbed {settings['steps']} more steps (batch {settings['batch_size']}) "
        "with and without training filters",
        "",
        f"Memorization: the prompts of dose groups {MEM_GROUPS[0]}-{MEM_GROUPS[-1]}, {MEM_SEEDS} "
        "paired seeds, 10 DDIM steps, guidance 7.5 (chance 1/16). Quality: held-out negatives "
        f"{NEG_IDS.start}-{NEG_IDS.stop - 1}. Mean [95 % CI, bootstrap over prompts].",
        "",
        "| model | dropped / step | dropped that are memorized | drop rate mem / neg | s / step (ratio to none) "
        "| MEM memorization rate | MEM corr with training image | Δ rate vs none | held-out loss "
        "| attribute acc (colour/shape/position) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        if "dropped_mean" in s:
            share = s["dropped_share_memorized"]
            cells = [
                f"{s['dropped_mean']:.3f}",
                "-" if share is None else f"{share:.2f} (of {s['dropped_total']})",
                f"{s['drop_rate_memorized']:.3f} / {s['drop_rate_negative']:.3f}",
                f"{s['step_s_mean']:.2f} ({s.get('step_time_ratio_mean', 1):.3f})",
            ]
        else:
            cells = ["-", "-", "-", "-"]
        d = s.get("delta_mem_rate_vs_none")
        cells += [
            f(s["mem_rate"]),
            f(s["mem_corr"]),
            "-" if d is None else f(d),
            f"{s['neg_loss']:.4f}",
            "/".join(f"{v:.2f}" for v in s["neg_attr_acc"]),
        ]
        name = "start (committed model)" if key == "start" else key
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    au = {
        k: s["train_score_auroc_mem_vs_neg"]
        for k, s in summary.items()
        if "train_score_auroc_mem_vs_neg" in s
    }
    if au:
        lines.append(
            "\nAUROC of each filter's own training-time score (entropy / Wen's ||eps_c - eps_0||), "
            "memorized vs negative samples, captioned samples of all steps: "
            + ", ".join(f"{k} {v:.3f}" for k, v in au.items())
            + "."
        )
    lines.append(
        f"\ntorch {out['torch']}, {settings['torch_threads']} threads, {out['machine']['platform']}, "
        f"commit {out['git_commit']}, wall {out['wall_s']:.0f} s. Step time: mean of steps 6+ "
        "(perf_counter around text encoder + UNet forward, filter, backward, optimizer)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
