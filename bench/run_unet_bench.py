"""`make bench` (UNet part): detection and mitigation speed on the SD1.x UNet architecture
(860 M parameters, random weights, 64x64 latents; fp32 on CPU, fp16 on GPU), per prompt.

Cases are verified against their reference paths first (bench/unet_cases.py), then timed in
interleaved rounds (every case once per round) so slow drift of the machine hits all cases
alike; medians over rounds. Writes bench/results/unet_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.machine import describe, header_lines
from bench.quality import quality_lines
from bench.unet_cases import Cases, build_unet

HERE = Path(__file__).resolve().parent

STEPS = 50


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def render(payload: dict) -> list[str]:
    """The markdown table of a results payload, with the testbed quality tables after it."""
    u = payload["unet"]
    dtype = u["dtype"].replace("torch.", "")
    lines = [
        f"### Detection and mitigation cost per prompt, SD1.x UNet ({u['parameters'] / 1e6:.0f} M parameters, random weights, "
        f"{u['latent']}x{u['latent']} latents, {dtype}, {payload.get('prompts_per_batch', 1)} prompt(s) per batch)",
        "",
        *header_lines(payload["machine"]),
        "",
        "| method | UNet rows per prompt | cost (plain CFG steps) | how |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {r['method']} | {r['unet_rows_per_prompt']} | {r['plain_steps']:.3f} | {r['how']} |"
        for r in payload["rows"]
    ]
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for name, t in payload["targets"].items():
        ratio = "no measurable attnmem overhead" if t["ratio"] is None else f"{t['ratio']:.3f}x"
        lines.append(f"| {name} | {ratio} | {'yes' if t['met'] else 'no'} |")
    lines += [
        "",
        f"Median of {payload['rounds']} interleaved rounds; each case verified against its reference path first. "
        "Costs are ratios to the plain SDPA CFG step measured in the same run (absolute seconds are in the JSON).",
        "",
        *quality_lines(),
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--size", choices=["sd1", "tiny"], default="sd1", help="UNet size (tiny: a smoke run)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--prompts", type=int, default=1, help="prompts per batch (costs are per prompt)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=None, help="file stem (default unet_<device>)")
    ap.add_argument(
        "--render", type=Path, default=None, help="only re-render the markdown of this results JSON"
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        args.render.with_suffix(".md").write_text(
            "\n".join(render(json.loads(args.render.read_text())))
        )
        return 0
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    t0 = time.perf_counter()
    unet = build_unet(args.size, dtype=dtype, device=args.device)
    n_params = sum(p.numel() for p in unet.parameters())
    cases = Cases(unet, prompts=args.prompts)
    checks = cases.verify(atol=2e-2 if dtype == torch.float16 else 1e-3)
    print(f"verified: {checks}", flush=True)

    fns = cases.timed()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):
        for name, fn in fns.items():
            _sync(args.device)
            t = time.perf_counter()
            fn()
            _sync(args.device)
            times[name].append(time.perf_counter() - t)
            print(f"round {r} {name}: {times[name][-1]:.3f} s", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    unit = med["plain"]
    rel = {k: v / unit for k, v in med.items()}

    # rows: (method, UNet row-passes per prompt, cost in plain CFG steps, how it was obtained)
    rows = [
        ("plain SDPA CFG step (the unit)", "2", 1.0, "measured"),
        (
            "attnmem statistics on, CFG step (metric E inside a normal step)",
            "2",
            rel["attnmem_stats"],
            "measured",
        ),
        (
            "official-style statistics (explicit softmax, maps to host)",
            "2",
            rel["official_stats"],
            "measured",
        ),
        (
            "attnmem metric E, early exit (cond row only)",
            "1, stopped after 4 of 16 attn2",
            rel["e_early_exit"],
            "measured",
        ),
        ("Wen et al. step 0, n = 1", "2", 1.0, "= plain CFG step (+ a norm)"),
        ("Wen et al. step 0, n = 4", "8", rel["wen_n4"], "measured"),
        (
            f"attnmem metric D ({STEPS} steps, statistics on)",
            str(2 * STEPS),
            STEPS * rel["attnmem_stats"],
            f"{STEPS} x measured step",
        ),
        (
            f"Wen et al. all {STEPS} steps, n = 1",
            str(2 * STEPS),
            float(STEPS),
            f"{STEPS} x plain step",
        ),
        (
            f"Carlini-style, n = 4 generations of {STEPS} steps (VAE decode not counted)",
            str(8 * STEPS),
            4.0 * STEPS,
            f"4 x {STEPS} x plain step",
        ),
        (
            "mitigated step, attnmem (bos_scale = 1.25, padding mask)",
            "2",
            rel["attnmem_mitigated"],
            "measured",
        ),
        (
            "mitigated step, official-style explicit attention",
            "2",
            rel["official_mitigated"],
            "measured",
        ),
    ]
    over_attnmem = rel["attnmem_stats"] - 1.0
    over_official = rel["official_stats"] - 1.0
    targets = {
        "early-exit E >= 4x faster than Wen n=1 at step 0": {
            "ratio": 1.0 / rel["e_early_exit"],
            "met": 1.0 / rel["e_early_exit"] >= 4,
        },
        f"statistics-on step <= {'1.02' if args.device == 'cuda' else '1.03'}x plain step": {
            "ratio": rel["attnmem_stats"],
            "met": rel["attnmem_stats"] <= (1.02 if args.device == "cuda" else 1.03),
        },
        "attnmem statistics >= 2x cheaper than official-style (overhead over plain step)": {
            "ratio": (over_official / over_attnmem) if over_attnmem > 0 else None,
            "attnmem_overhead": over_attnmem,
            "official_overhead": over_official,
            "met": over_attnmem <= 0
            and over_official > 0
            or (over_attnmem > 0 and over_official / over_attnmem >= 2),
        },
        "mitigated step <= 1.03x plain step": {
            "ratio": rel["attnmem_mitigated"],
            "met": rel["attnmem_mitigated"] <= 1.03,
        },
    }
    machine = describe()
    payload = {
        "machine": machine,
        "unet": {
            "size": args.size,
            "parameters": n_params,
            "dtype": str(dtype),
            "latent": unet.config.sample_size,
        },
        "rounds": args.rounds,
        "prompts_per_batch": args.prompts,
        "seconds": times,
        "median_seconds": med,
        "relative_to_plain_step": rel,
        "rows": [
            {"method": m, "unet_rows_per_prompt": f, "plain_steps": c, "how": h}
            for m, f, c, h in rows
        ],
        "targets": targets,
        "verification": checks,
        "wall_seconds": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"unet_{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")

    lines = render(payload)
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
