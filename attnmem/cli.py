"""``attnmem`` command line: ``scan`` scores a prompt file, ``report`` plots the results.

Thin on purpose: argument parsing and printing only; the work is in :mod:`attnmem.scan` and
:mod:`attnmem.report`, which library users can call directly. The scan's defaults come from
:class:`attnmem.scan.ScanOptions` and the metrics from :data:`attnmem.detect.METRICS`; every
:class:`attnmem.errors.AttnmemError` is reported as one line and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "main",
    "build_parser",
    "common_parser",
    "add_loading_arguments",
    "load_options",
    "int_in",
    "float_in",
]

_DESCRIPTION = """\
Detect memorization in Stable Diffusion from cross-attention statistics (Ren et al., ECCV 2024).

  attnmem scan PROMPTS.txt --model PATH_OR_ID --out results.jsonl
  attnmem report results.jsonl --labels labels.txt -o report/
  attnmem calibrate PROMPTS.txt --labels labels.txt --model PATH_OR_ID --out calibration.json

Several processes: torchrun --nproc-per-node N -m attnmem scan ... (same arguments).
"""

_SCAN_DESCRIPTION = """\
Score every prompt of PROMPTS (one per line, UTF-8; blank lines are skipped and the prompt id
is the index among the non-blank lines, from 0) and append one JSON record per prompt to OUT.
Prompt id i uses the seed SEED + i. Records are flushed to disk after every batch: an
interrupted scan continues with --resume, which skips prompts already scored and retries the
failed ones. A prompt that fails is recorded with its error and the scan goes on (exit status
1 at the end). Under torchrun each process scores a share and rank 0 merges the result.
"""

_GENERATE_DESCRIPTION = """\
Generate every prompt of PROMPTS twice from the same starting noise (the seeds attnmem scan
uses): once plainly, once with the mitigation. OUT/images/ID.png shows them side by side (one
row per image, plain left, mitigated right); OUT/generate.jsonl holds one record per prompt
with the image's path and how alike the pair is (pixel correlation pixel_r and RMS difference;
no download needed). Resumable and shardable like attnmem scan (--resume, torchrun).
"""

_MODEL_HELP = (
    "a local diffusers pipeline folder or a hub id (loaded with use_safetensors=True and "
    "trust_remote_code=False), or a built-in name: testbed, tiny-sd1, tiny-sd2, tiny-sdxl. "
    "Default: testbed, attnmem's bundled 32x32 model trained on synthetic captions of which 40 "
    "are memorized (prompts of its own style: attnmem/data/testbed_prompts.txt; model card: "
    "attnmem/data/testbed/README.md). tiny-sd1, tiny-sd2 and tiny-sdxl are tiny RANDOM-WEIGHT "
    "models for demonstration only: their scores say nothing about memorization."
)


def _layer(value: str) -> str | int:
    """A layer index in execution order (e.g. 3, -1) or a module name."""
    try:
        return int(value)
    except ValueError:
        return value


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound); the error names the
    valid range."""
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {value!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be an integer in {rng}, got {n}")
        return n

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi]; NaN and infinities are refused."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a number in [{lo:g}, {hi:g}], got {value!r}"
            ) from None
        if not math.isfinite(x) or not lo <= x <= hi:
            raise argparse.ArgumentTypeError(
                f"must be a finite number in [{lo:g}, {hi:g}], got {value}"
            )
        return x

    parse.__name__ = "number"
    return parse


# Valid ranges of the generation options (shared by every command that generates).
MAX_STEPS = 1000  # SD's schedulers have 1000 training timesteps
MAX_GUIDANCE = 100.0
MIN_SIZE, MAX_SIZE = 8, 4096  # pixels; the pipeline's VAE factor is checked once it is loaded
MAX_SEED = 10**15  # generation seeds are 1000 * seed + j, and must fit torch's 64-bit seed

_positive = int_in(1)


def add_loading_arguments(p: argparse.ArgumentParser) -> None:
    """diffusers' loading conventions (attnmem.pipelines.LoadOptions), for every command that
    loads a model; :func:`load_options` reads them back."""
    g = p.add_argument_group("loading the model (diffusers' conventions)")
    g.add_argument("--variant", default=None, help="weight variant, e.g. fp16 (*.fp16.safetensors)")
    g.add_argument("--revision", default=None, help="hub branch, tag or commit")
    g.add_argument(
        "--local-files-only",
        action="store_true",
        help="never contact the hub: local folders and the hub cache only",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH",
        help="a LoRA adapter (file or folder) to load on the model (repeatable; needs peft): "
        "does my fine-tune memorize?",
    )
    g.add_argument(
        "--config",
        default=None,
        metavar="FOLDER_OR_ID",
        help="for a single-file .safetensors --model: the diffusers folder or hub id of the same "
        "architecture whose configs it uses (default: diffusers' choice, from the hub)",
    )


def load_options(args: argparse.Namespace) -> Any:
    from attnmem.pipelines import LoadOptions

    return LoadOptions(
        variant=args.variant,
        revision=args.revision,
        local_files_only=args.local_files_only,
        lora=tuple(args.lora),
        config=args.config,
    )


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand takes (``parents=[common_parser()]``): ``-q/--quiet``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress, no warnings; diffusers and transformers print errors only",
    )
    return common


def _option(value: str) -> tuple[str, object]:
    """KEY=VALUE; the value is read as JSON when it parses (numbers, true/false, null)."""
    import json

    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def _add_job_arguments(p: argparse.ArgumentParser, d: dict[str, Any], job: str) -> None:
    """The arguments every job over a prompt file takes (scan, generate): model and loading,
    batching, generation settings, resume; ``d`` holds the job's defaults."""
    p.add_argument("--model", default=d["model"], help=_MODEL_HELP)
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=d["batch_size"],
        help=f"prompts per batch ({d['batch_size']})",
    )
    p.add_argument(
        "--steps",
        type=int_in(1, MAX_STEPS),
        default=d["steps"],
        help=f"num_inference_steps of the scheduler, 1-{MAX_STEPS} ({d['steps']})",
    )
    p.add_argument(
        "--guidance",
        type=float_in(0.0, MAX_GUIDANCE),
        default=d["guidance"],
        help=f"guidance scale, 0-{MAX_GUIDANCE:g} ({d['guidance']}; <= 1: no guidance)",
    )
    p.add_argument(
        "--seed",
        type=int_in(0, MAX_SEED),
        default=d["seed"],
        help=f"base seed: prompt id i uses SEED + i, its generation j the CPU generator "
        f"seeded 1000 (SEED + i) + j ({d['seed']})",
    )
    p.add_argument(
        "--device",
        default=d["device"],
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16", "bf16"],
        default=d["dtype"],
        help="auto: fp16 on a GPU (CUDA, MPS), fp32 on CPU",
    )
    p.add_argument(
        "--height",
        type=int_in(MIN_SIZE, MAX_SIZE),
        default=d["height"],
        help=f"image height in pixels, {MIN_SIZE}-{MAX_SIZE} (model default)",
    )
    p.add_argument(
        "--width",
        type=int_in(MIN_SIZE, MAX_SIZE),
        default=d["width"],
        help=f"image width in pixels, {MIN_SIZE}-{MAX_SIZE} (model default)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted {job} of OUT: skip finished ids, retry failed ones",
    )
    p.add_argument(
        "--limit", type=_positive, default=d["limit"], help="only the first LIMIT prompts"
    )
    p.add_argument(
        "--encoding",
        default=d["encoding"],
        help=f"encoding of the prompt file ({d['encoding']}; a BOM is ignored)",
    )
    add_loading_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``attnmem`` argument parser (also used to render ``--help`` in the docs)."""
    from attnmem import __version__
    from attnmem.detect import CALIBRATION_FILE, METRICS
    from attnmem.scan import ScanOptions

    d = {f.name: f.default for f in dataclasses.fields(ScanOptions)}

    parser = argparse.ArgumentParser(
        prog="attnmem",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"attnmem {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{scan,generate,report,status,calibrate}"
    )
    common = common_parser()

    scan = sub.add_parser(
        "scan",
        parents=[common],
        help="score a prompt file with a detection metric",
        description=_SCAN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("prompts", type=Path, metavar="PROMPTS", help="prompt file, one per line")
    scan.add_argument("--out", "-o", type=Path, required=True, help="results file (JSON lines)")
    scan.add_argument(
        "--metric",
        choices=list(METRICS),
        default=d["metric"],
        help="; ".join(f"{name}: {cls.summary}" for name, cls in METRICS.items())
        + f" (default {d['metric']})",
    )
    scan.add_argument(
        "--layer",
        type=_layer,
        default=d["layer"],
        help="metric E: cross-attention layer, index in execution order or module name "
        "(default: the layer of the model folder's calibration file if it has one, else 3: the "
        "4th, down_blocks.1.attentions.1 on SD1.x)",
    )
    scan.add_argument(
        "--calibration",
        type=Path,
        default=d["calibration"],
        metavar="FILE",
        help="metric E: read the layer chosen by `attnmem calibrate` from FILE (default: the "
        f"model folder's {CALIBRATION_FILE} if it has one and --layer is not given, e.g. the "
        "bundled testbed)",
    )
    scan.add_argument(
        "--n",
        type=_positive,
        default=d["n"],
        help="generations per prompt of wen, carlini, anisotropy, sharpness, nemo (default: "
        "wen, anisotropy, sharpness 1; carlini 4; nemo 10)",
    )
    scan.add_argument(
        "--option",
        dest="options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further option of the metric, by its name in attnmem.detect (repeatable), "
        "e.g. --option end=50 for wen over all steps, --option gamma_cos=0.1 for anisotropy",
    )
    scan.add_argument(
        "--latents",
        type=Path,
        default=d["latents"],
        help="starting noise instead of the seeds: a torch.save file of one tensor "
        "(prompts, n, C, h, w) or (prompts x n, C, h, w), indexed by prompt id",
    )
    _add_job_arguments(scan, d, "scan")
    scan.set_defaults(func=_scan)

    from attnmem.generate import GenerateOptions

    g = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}
    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="plain and mitigated images side by side, with their similarity",
        description=_GENERATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompts", type=Path, metavar="PROMPTS", help="prompt file, one per line")
    gen.add_argument(
        "--out", "-o", type=Path, required=True, help="output folder (images/ + generate.jsonl)"
    )
    gen.add_argument(
        "--mitigate",
        default=g["mitigate"],
        metavar="SPEC",
        help="the mitigation: bos_scale=C1[,mask=padding|padding+eos|none][,uncond=official|"
        "unmasked] for Ren et al.'s (c1=C1 is accepted: the paper's name), or NAME[:key=value,"
        f"...] with NAME one of attention, cfg-delay, prompt-opt (default {g['mitigate']})",
    )
    gen.add_argument(
        "--n", type=int_in(1, 64), default=g["n"], help=f"images per prompt ({g['n']})"
    )
    _add_job_arguments(gen, g, "generate")
    gen.set_defaults(func=_generate)

    report = sub.add_parser(
        "report",
        parents=[common],
        help="plots, an HTML page and summary.json from scan results",
        description="Write score histograms, the ROC curve with AUROC and TPR at 1/3/5/10% FPR "
        "(with --labels), per-token attention of the top prompts and entropy over steps "
        "(metric D) as PNGs, one self-contained report.html and summary.json.",
    )
    report.add_argument(
        "results",
        type=Path,
        nargs="+",
        help="results file written by attnmem scan; several (with --labels): detectors side by "
        "side (compare.png: ROC curves on one plot, cost against AUROC; one report per file)",
    )
    report.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="1 = memorized, 0 = not: one per non-blank prompt line, or 'id,label' lines, "
        "or JSON (a list, or an object id -> label)",
    )
    report.add_argument("-o", "--out", type=Path, default=Path("report"), help="folder (report/)")
    report.add_argument(
        "--top", type=_positive, default=10, help="prompts in the ranked table (10)"
    )
    report.add_argument(
        "--generated",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder written by attnmem generate: show the plain and mitigated images of the "
        "top prompts it holds (matched by prompt text)",
    )
    report.set_defaults(func=_report)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="progress of a running (or finished) scan, read without disturbing it",
        description="Say whether a job is writing OUT (its command, pid, host, start time), "
        "and how many prompts have a record (and how many of those failed). Reads only; safe "
        "while the job runs.",
    )
    status.add_argument("out", type=Path, metavar="OUT", help="the results file of the job")
    status.set_defaults(func=_status)

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="choose metric E's layer for a model from labelled prompts",
        description="Measure the AUROC of metric E (step 0) at every cross-attention layer on "
        "labelled prompts and choose the layer with the largest AUROC (among the layers within "
        "--tolerance of it, the earliest: the cheapest early exit). Writes a JSON file that "
        "`attnmem scan --calibration` reads; a model folder holding it as "
        f"{CALIBRATION_FILE} is scanned with it by default. Calibrate on prompts disjoint "
        "from those you evaluate on: the chosen layer's AUROC here is optimistic.",
    )
    cal.add_argument("prompts", type=Path, metavar="PROMPTS", help="prompt file, one per line")
    cal.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="1 = memorized, 0 = not, one per prompt (the formats of attnmem report)",
    )
    cal.add_argument("--out", "-o", type=Path, required=True, help="calibration file (JSON)")
    cal.add_argument("--model", default=d["model"], help=_MODEL_HELP)
    cal.add_argument(
        "--steps",
        type=int_in(1, MAX_STEPS),
        default=d["steps"],
        help=f"num_inference_steps; E reads its first step ({d['steps']})",
    )
    cal.add_argument(
        "--seed",
        type=int_in(0, MAX_SEED),
        default=d["seed"],
        help=f"base seed: prompt id i uses SEED + i, as in attnmem scan ({d['seed']})",
    )
    cal.add_argument("--batch-size", type=_positive, default=16, help="prompts per batch (16)")
    cal.add_argument(
        "--tolerance",
        type=float_in(0.0, 1.0),
        default=0.01,
        help="layers within this AUROC of the best count as tied (0.01)",
    )
    cal.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:N, mps")
    cal.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default=d["dtype"], help="auto"
    )
    add_loading_arguments(cal)
    cal.set_defaults(func=_calibrate)
    return parser


def _ids(ids: list[int], n: int = 10) -> str:
    return ", ".join(map(str, ids[:n])) + (" ..." if len(ids) > n else "")


def _scan(args: argparse.Namespace) -> int:
    from attnmem.scan import ScanOptions, calibration_for, run_scan

    # Every ScanOptions field but ``progress`` and ``load`` is an argument of the same name.
    names = [f.name for f in dataclasses.fields(ScanOptions) if f.name not in ("progress", "load")]
    values = {name: getattr(args, name) for name in names}
    values["options"] = dict(args.options)
    opts = ScanOptions(**values, progress=not args.quiet, load=load_options(args))
    s = run_scan(opts)
    if s.rank != 0:
        return 1 if s.failed else 0
    calibration = calibration_for(opts)
    if calibration is not None:
        print(f"attnmem scan: metric E read the layer chosen in {calibration}")
    print(
        f"attnmem scan: {s.done} prompt(s) scored, {s.skipped} already done, "
        f"{len(s.failed)} failed -> {s.out}"
    )
    cut = [r["id"] for r in s.records if r.get("truncated")]
    if cut:
        print(
            f"attnmem scan: {len(cut)} prompt(s) longer than 75 word-pieces were truncated to 77 "
            f"tokens (ids {_ids(cut)}): the model sees only their first 75; their records say "
            "truncated: true",
            file=sys.stderr,
        )
    if s.failed:
        shown = _ids(s.failed)
        print(
            f"attnmem scan: failed ids: {shown} (errors are in their records; "
            "rerun with --resume to retry them)",
            file=sys.stderr,
        )
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    from attnmem.generate import GenerateOptions, run_generate

    names = [f.name for f in dataclasses.fields(GenerateOptions)]
    values = {n: getattr(args, n) for n in names if n not in ("progress", "load")}
    opts = GenerateOptions(**values, progress=not args.quiet, load=load_options(args))
    s = run_generate(opts)
    if s.rank != 0:
        return 1 if s.failed else 0
    rs = [r["pixel_r"] for r in s.records if r.get("pixel_r") is not None]
    mean = f"; mean pixel correlation plain vs mitigated {sum(rs) / len(rs):.3f}" if rs else ""
    print(
        f"attnmem generate: {s.done} prompt(s) generated, {s.skipped} already done, "
        f"{len(s.failed)} failed -> {opts.out}{mean}"
    )
    if s.failed:
        print(
            f"attnmem generate: failed ids: {_ids(s.failed)} (errors are in their records; "
            "rerun with --resume to retry them)",
            file=sys.stderr,
        )
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from attnmem.errors import ReportError
    from attnmem.report import compare_reports, make_report

    if len(args.results) > 1:
        if args.labels is None:
            raise ReportError("comparing several results files needs --labels")
        cmp = compare_reports(args.results, args.out, labels=args.labels, top=args.top)
        for d in cmp["detectors"]:
            print(
                f"{d['metric']:<12} AUROC {d['auroc']:.4f}  TPR@1% {d['tpr@1%']['nearest']:.2f}/"
                f"{d['tpr@1%']['below']:.2f}  {d['seconds_per_prompt']:.3g} s/prompt  {d['results']}"
            )
        print(f"report: {args.out / 'compare.png'}")
        return 0
    (args.results,) = args.results
    rep = make_report(
        args.results, args.out, labels=args.labels, top=args.top, generated=args.generated
    )
    s = rep.summary
    ev = s["evaluation"]
    head = f"{s['n_scored']} prompts scored with metric {s['metric']} on {s['model']}"
    if s["n_failed"]:
        head += f" ({s['n_failed']} failed)"
    print(head)
    if s["demo_model"]:
        print(
            "note: random-weight demonstration model: these scores say nothing about memorization"
        )
    if ev is not None:
        t = ev["tpr_at_fpr"]
        fprs = "/".join(f"{float(k) * 100:g}%" for k in t["nearest"])
        print(
            f"AUROC {ev['auroc']:.4f} ({ev['n_pos']} memorized, {ev['n_neg']} not; ties count half)"
        )
        for conv, how in (
            ("nearest", "nearest ROC point (Ren et al.'s code)"),
            ("below", "last ROC point with FPR strictly below (Wen et al.'s code)"),
        ):
            vals = "/".join(f"{t[conv][k]:.2f}" for k in t[conv])
            print(f"TPR at {fprs} FPR, {how}: {vals}")
        low = ev.get("fpr_below_resolution") or []
        if low:
            shown = ", ".join(f"{float(k) * 100:g}%" for k in low)
            print(
                f"warning: only {ev['n_neg']} non-memorized prompts, so the FPR moves in steps of "
                f"{100 / ev['n_neg']:.3g}%: TPR at {shown} FPR can only count thresholds above "
                "every negative; more negatives are needed to measure it"
            )
    elif s.get("evaluation_skipped"):
        print(f"no AUROC: {s['evaluation_skipped']}")
    print()
    print(f"{'rank':>4}  {'id':>5}  {'score':>10}  {'label':<13}  prompt")
    for t in s["top"]:
        label = {1: "memorized", 0: "not", None: ""}[t["label"]]
        prompt = t["prompt"] if len(t["prompt"]) <= 70 else t["prompt"][:69] + "…"
        print(f"{t['rank']:>4}  {t['id']:>5}  {t['score']:>10.4f}  {label:<13}  {prompt}")
    print()
    print(f"report: {rep.html}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from attnmem import results

    out = args.out
    if out.is_dir():  # attnmem generate's folder
        from attnmem.generate import RESULTS_NAME

        out = out / RESULTS_NAME
    holder = results.lock_holder(out)
    best = results.best_records([out, *results.part_files(out)])
    failed = sum(1 for r in best.values() if r.get("error") is not None)
    if holder is not None:
        who = f"attnmem {holder.get('command', 'job')} is running"
        if holder.get("pid"):
            who += f" (pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
            who += f", {holder['processes']} processes)" if holder.get("processes", 1) > 1 else ")"
        total = holder.get("total")
        print(
            f"{out}: {who}: {len(best)}{f' of {total}' if total else ''} prompts have a record, {failed} failed"
        )
        return 0
    if not best and not out.exists():
        print(f"{out}: no such results file, and no job is writing it")
        return 1
    print(f"{out}: no job is running; {len(best)} prompts have a record, {failed} failed")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from attnmem.detect import calibrate
    from attnmem.errors import CalibrationError
    from attnmem.jobs import read_prompts
    from attnmem.pipelines import load_pipeline, resolve_device, resolve_dtype
    from attnmem.report import read_labels

    prompts = read_prompts(args.prompts)
    by_id = read_labels(args.labels)
    if sorted(by_id) != list(range(len(prompts))):
        missing = [i for i in range(len(prompts)) if i not in by_id]
        raise CalibrationError(
            f"{args.labels} has {len(by_id)} labels for {len(prompts)} prompts in {args.prompts}"
            + (f" (no label for id {missing[0]})" if missing else "")
        )
    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, device, resolve_dtype(args.dtype, device), load_options(args))
    cal = calibrate(
        pipe,
        prompts,
        [by_id[i] for i in range(len(prompts))],
        base_seed=args.seed,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        tolerance=args.tolerance,
        model=args.model,
        progress=not args.quiet,
    )
    print(f"{'#':>3}  {'AUROC':>6}  layer")
    for i, (layer, a) in enumerate(cal.auroc.items()):
        mark = "  <- chosen" if i == cal.layer_index else ""
        print(f"{i:>3}  {a:6.3f}  {layer}{mark}")
    print(f"{cal.n_memorized} memorized, {cal.n_normal} not; written to {cal.save(args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnmem`` command; returns the exit status (0 ok, 1 error or failed prompts,
    2 bad usage)."""
    from attnmem import console
    from attnmem.errors import AttnmemError

    parser = build_parser()
    args = parser.parse_args(argv)
    console.silence_library_noise()
    try:
        with console.quiet() if args.quiet else contextlib.nullcontext():
            return args.func(args)
    except AttnmemError as e:
        print(f"attnmem {args.command}: error: {e}", file=sys.stderr)
        return 1
