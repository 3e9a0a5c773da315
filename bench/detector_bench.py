"""`make bench` (harness part): every registered detector and every mitigator on one SD1.x-shaped
pipeline (the SD1.x UNet, 860 M parameters, random weights, 64x64 latents; an SD1-sized CLIP
text encoder; a tiny VAE), per prompt, against one plain CFG UNet call measured in the same
interleaved rounds.

    python -m bench.detector_bench                   # the table: bench/results/detectors_<device>.*
    python -m bench.detector_bench --size tiny --rounds 1 --out DIR    # smoke run (tests)
    python -m bench.detector_bench --requality       # refresh the quality columns only

``--requality`` rereads the committed timing JSON and fills its quality columns again from the
current testbed validation (after the testbed is revalidated), without timing anything.

Detectors whose cost is a few UNet calls are timed end to end (``score_batch``: text encoding,
noise, every UNet pass, the statistic); the ones that run whole denoising loops (metric D, Wen
et al. over 50 steps, Carlini-style) are given as their measured per-step case times the number
of steps ("derived"). UNet calls per prompt are the results' own counts: forward sample-passes,
JVP passes and backward passes. Mitigators are timed on a ``--gen-steps``-step generation against
the plain generation of the same steps; their extra UNet passes come from their reports. The
quality columns (AUROC, TPR at 1 % FPR under both conventions; mitigation effect) are read from the
testbed validation (:mod:`bench.quality`), not computed here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import attnmem
from bench.machine import describe, header_lines
from bench.quality import detector_quality, mitigation_quality

HERE = Path(__file__).resolve().parent

# (row label, metric, options, derived from another row: (row label, factor) or None)
DETECTORS: list[tuple[str, str, dict[str, Any], tuple[str, float] | None]] = [
    ("E, early exit", "E", {}, None),
    ("Wen et al., step 0, n = 1", "wen", {"n": 1}, None),
    ("Wen et al., step 0, n = 4", "wen", {"n": 4}, None),
    ("anisotropy, n = 1", "anisotropy", {"n": 1}, None),
    ("anisotropy, n = 4", "anisotropy", {"n": 4}, None),
    ("sharpness, n = 1", "sharpness", {"n": 1}, None),
    ("sharpness, n = 4", "sharpness", {"n": 4}, None),
    ("nemo, n = 10", "nemo", {"n": 10}, None),
    ("E inside a CFG step (statistics on)", "E", {"early_exit": False}, None),
    ("D, 50 steps", "D", {}, ("E inside a CFG step (statistics on)", 50)),
    (
        "Wen et al., 50 steps, n = 4 (their default)",
        "wen",
        {"n": 4, "end": 50},
        ("Wen et al., step 0, n = 4", 50),
    ),
    ("Carlini-style, n = 4 (VAE decode not counted)", "carlini", {"n": 4}, ("plain", 200)),
]
MITIGATORS: list[tuple[str, str]] = [
    ("Ren et al. c1 = 1.25 + summary mask", "attention:bos_scale=1.25"),
    ("Jain et al. static delay (tau 500)", "cfg-delay:mode=static"),
    ("Jain et al. dynamic delay", "cfg-delay:mode=dynamic"),
    ("Wen et al. prompt optimisation (target 3)", "prompt-opt"),
]
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def build_pipeline(size: str, dtype: torch.dtype, device: str) -> Any:
    """The SD1.x UNet with random weights in a pipeline (``tiny``: attnmem's tiny SD1 pipeline)."""
    from attnmem.testing import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    if size == "sd1":
        from transformers import CLIPTextConfig, CLIPTextModel

        from bench.unet_cases import build_unet

        pipe.unet = build_unet("sd1", dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe.text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    bos_token_id=49406,
                    eos_token_id=49407,
                    pad_token_id=49407,
                )
            ).eval()
        pipe.vae_scale_factor = 8  # SD's latent size from SD's image size (the VAE is not run)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_call(pipe: Any, prompts: int) -> Any:
    c = pipe.unet.config
    p = next(pipe.unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * prompts, c.in_channels, c.sample_size, c.sample_size, generator=g).to(p)
    e = torch.randn(2 * prompts, 77, c.cross_attention_dim, generator=g).to(p)
    t = torch.tensor([981], device=p.device)

    @torch.inference_mode()
    def plain():
        return pipe.unet(x, t, encoder_hidden_states=e).sample

    return plain


def render(payload: dict) -> list[str]:
    u = payload["pipeline"]
    lines = [
        f"### Detectors and mitigators per prompt, {u['unet']} ({u['parameters'] / 1e6:.0f} M parameters, "
        f"random weights, {u['latent']}x{u['latent']} latents, {u['dtype']}, {payload['prompts']} prompt(s) per batch)",
        "",
        *header_lines(payload["machine"]),
        "",
        "| detector | UNet passes per prompt (forward / JVP / backward) | time per prompt (plain CFG UNet calls) | how | AUROC | TPR@1% FPR (nearest / below) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in payload["detectors"]:
        q = r["quality"]
        auroc = "–" if q is None else q["auroc_text"]
        tpr = "–" if q is None else f"{q['tpr_nearest']:.3f} / {q['tpr_below']:.3f}"
        passes = f"{r['forwards']} / {r['jvps']} / {r['backwards']}"
        lines.append(
            f"| {r['label']} | {passes} | {r['relative']:.3f} | {r['how']} | {auroc} | {tpr} |"
        )
    lines += [
        "",
        f"| mitigator | extra UNet passes per prompt (forward / backward) | time of a {payload['gen_steps']}-step generation (plain = 1) | effect on the testbed |",
        "|---|---|---:|---|",
    ]
    for r in payload["mitigators"]:
        lines.append(
            f"| {r['label']} | {r['extra_forwards']:g} / {r['extra_backwards']:g} | {r['relative']:.3f} | {r['effect'] or '–'} |"
        )
    e = payload["headline"]
    lines += [
        "",
        f"Medians of {payload['rounds']} interleaved rounds; the unit is one plain CFG UNet call "
        "(2 rows per prompt) measured in the same rounds (absolute seconds are in the JSON).",
        f"Metric E (early exit) is {e['vs_anisotropy']:.2f}x cheaper per prompt than anisotropy "
        f"(n = 1; target >= 8x) and {e['vs_wen_n1']:.2f}x cheaper than Wen et al. n = 1 (target >= 4x).",
        "",
    ]
    return lines


def requality(path: Path) -> int:
    """Refill the quality columns of the result at ``path`` (and its table) from the current
    testbed validation; the timings are left as measured."""
    if not path.exists():
        print(f"no benchmark result at {path}: run python -m bench.detector_bench first")
        return 1
    payload = json.loads(path.read_text())
    for r in payload["detectors"]:
        r["quality"] = detector_quality(r["metric"], r["options"])
    for r in payload["mitigators"]:
        r["effect"] = mitigation_quality(r["spec"])
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = render(payload)
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=["sd1", "tiny"], default="sd1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--prompts", type=int, default=1, help="prompts per batch (costs are per prompt)"
    )
    ap.add_argument("--gen-steps", type=int, default=4, help="steps of the mitigators' generations")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=None, help="file stem (default detectors_<device>)")
    ap.add_argument(
        "--requality",
        action="store_true",
        help="only refill the quality columns of an existing result from the testbed validation",
    )
    args = ap.parse_args(argv)
    stem = args.name or f"detectors_{args.device}"
    if args.requality:
        return requality(args.out / f"{stem}.json")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    t_start = time.perf_counter()
    pipe = build_pipeline(args.size, dtype, args.device)
    prompts = [PROMPT] * args.prompts
    seeds = list(range(args.prompts))
    size_kw = {"height": 128, "width": 128} if args.size == "tiny" else {}  # nemo's MS-SSIM window

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    cases: dict[str, Any] = {"plain": _plain_call(pipe, args.prompts)}
    made: dict[str, Any] = {}
    for label, metric, options, derived in DETECTORS:
        if derived is None:
            opts = {**options, **(size_kw if metric == "nemo" else {})}
            det = attnmem.make_detector(metric, pipe, **opts)
            made[label] = det
            cases[label] = lambda det=det: det.score_batch(prompts, seeds)

    def generate(spec: str | None):
        def run():
            kw = dict(num_inference_steps=args.gen_steps, output_type="latent")
            kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
            if spec is None:
                return pipe(prompts, **kw), None
            with attnmem.mitigate.apply(pipe, spec) as h:
                return pipe(prompts, **kw), h

        return run

    cases["generation, plain"] = generate(None)
    for label, spec in MITIGATORS:
        cases[f"generation, {label}"] = generate(spec)

    last: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            last[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name}: {times[name][-1]:.3f} s", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    unit = med["plain"]  # one CFG UNet call for all prompts of the batch

    rows = []
    per_prompt = {}
    for label, metric, options, derived in DETECTORS:
        if derived is None:
            res = last[label][0]
            rel = med[label] / unit
            passes = (res["forwards"], res["jvps"], res["backwards"])
            how = "measured"
        else:
            base, factor = derived
            rel = factor * (med[base] / unit if base != "plain" else 1.0)
            n = 1 if metric == "D" else options.get("n", 1)
            passes = (2 * n * 50, 0, 0)  # 50 CFG steps on n generations
            how = f"derived: {factor:g} x {'plain CFG call' if base == 'plain' else base}"
        per_prompt[label] = rel
        rows.append(
            {
                "label": label,
                "metric": metric,
                "options": options,
                "forwards": passes[0],
                "jvps": passes[1],
                "backwards": passes[2],
                "relative": rel,
                "how": how,
                "quality": detector_quality(metric, options),
            }
        )
    mit_rows = []
    plain_gen = med["generation, plain"]
    for label, spec in MITIGATORS:
        _, handle = last[f"generation, {label}"]
        reports = getattr(handle, "calls", None) or [{}]
        prompt_reports = reports[-1].get("prompts", [])
        fwd = sum(p["forwards"] for p in prompt_reports) / max(1, len(prompts))
        bwd = sum(p["backwards"] for p in prompt_reports) / max(1, len(prompts))
        mit_rows.append(
            {
                "label": label,
                "spec": spec,
                "extra_forwards": fwd,
                "extra_backwards": bwd,
                "relative": med[f"generation, {label}"] / plain_gen,
                "effect": mitigation_quality(spec),
            }
        )
    payload = {
        "machine": describe(),
        "pipeline": {
            "unet": "SD1.x UNet" if args.size == "sd1" else "tiny SD1-shaped UNet",
            "parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "latent": pipe.unet.config.sample_size,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "rounds": args.rounds,
        "prompts": args.prompts,
        "gen_steps": args.gen_steps,
        "seconds": times,
        "median_seconds": med,
        "detectors": rows,
        "mitigators": mit_rows,
        "headline": {
            "vs_anisotropy": per_prompt["anisotropy, n = 1"] / per_prompt["E, early exit"],
            "vs_wen_n1": per_prompt["Wen et al., step 0, n = 1"] / per_prompt["E, early exit"],
        },
        "wall_seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = render(payload)
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
