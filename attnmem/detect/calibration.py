"""Per-model calibration of metric E: which cross-attention layer to read (docs/method.md §4).

The paper reads metric E at the 4th cross-attention layer of SD1.x, where its signature is
strongest; attnmem keeps that default for SD1.x / SD2.x. Another model (a fine-tune, another
architecture, attnmem's bundled testbed) can show the signature in another layer. A calibration
measures, on prompts labelled memorized (1) or not (0), the AUROC of metric E at every
cross-attention layer, and chooses one layer by a rule fixed here, before any result:

    **the layer with the largest AUROC** (higher entropy = memorized, the paper's direction:
    a layer where memorized prompts have *lower* entropy is not chosen by flipping the sign);
    **among the layers within** ``tolerance`` **(0.01) of it, the earliest in execution order**
    (the cheapest early exit).

E is read at step index 0 (the noisiest timestep), from one generation per prompt with the
same seeds a scan uses (prompt i: ``base_seed + i``), on the conditional rows only: exactly
what :class:`attnmem.detect.EntropyE` computes with early exit, for all layers in one UNet pass.
The step is not searched (E at a later step needs the denoising loop up to it, so it would no
longer be the cheap detector); :attr:`Calibration.step` records it.

The result is a small JSON file (:meth:`Calibration.save`) that ``EntropyE(calibration=...)``,
``make_detector("E", pipe, calibration=...)`` and ``attnmem scan --calibration FILE`` accept;
a model folder holding :data:`CALIBRATION_FILE` is scanned with it by default (the bundled
testbed ships one). Calibrate on prompts disjoint from those you then evaluate on: the chosen
layer's calibration AUROC is optimistic by construction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attnmem.detect.base import generators
from attnmem.errors import CalibrationError
from attnmem.patching import patch, run_unet_until
from attnmem.record import RecordSpec

__all__ = [
    "CALIBRATION_FILE",
    "RULE",
    "Calibration",
    "calibrate",
    "choose_layer",
    "layer_entropies",
]

CALIBRATION_FILE = "attnmem_calibration.json"  # looked for in a model folder by attnmem scan
RULE = (
    "largest AUROC of metric E (step 0, higher = memorized); among layers within the tolerance "
    "of it, the earliest in execution order"
)
_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """A per-model choice of the metric-E layer, with the evidence it was made on.

    layer / layer_index: the chosen cross-attention module name and its index in execution
    order; step: the step index E is read at (0); auroc: layer name -> calibration AUROC, in
    execution order; n_memorized / n_normal: the labelled prompts used; the remaining fields
    are the settings the entropies were measured with.
    """

    layer: str
    layer_index: int
    auroc: dict[str, float]
    n_memorized: int
    n_normal: int
    step: int = 0
    tolerance: float = 0.01
    num_inference_steps: int = 50
    base_seed: int | None = 0
    model: str | None = None
    rule: str = RULE
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON (creating the folder); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": _VERSION, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file; :class:`CalibrationError` naming the file and the problem."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CalibrationError(
                f"cannot read calibration file {path}: {e.strerror or e}"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path}: not a JSON calibration file ({e})") from None
        if not isinstance(obj, dict) or obj.get("version") != _VERSION:
            raise CalibrationError(
                f"{path}: not an attnmem calibration file (version {_VERSION} expected)"
            )
        obj.pop("version")
        try:
            cal = cls(**obj)
        except TypeError as e:
            raise CalibrationError(f"{path}: {e}") from None
        if not isinstance(cal.layer, str) or cal.layer not in cal.auroc:
            raise CalibrationError(f"{path}: the chosen layer {cal.layer!r} has no AUROC entry")
        return cal


def choose_layer(aurocs: Sequence[float], tolerance: float = 0.01) -> int:
    """The rule: index of the largest AUROC, or of the earliest layer within ``tolerance`` of it.

    NaN AUROCs (a layer without statistics) are never chosen."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    finite = [a for a in aurocs if math.isfinite(a)]
    if not finite:
        raise ValueError("no layer has a finite AUROC")
    best = max(finite)
    return next(i for i, a in enumerate(aurocs) if math.isfinite(a) and a >= best - tolerance)


def layer_entropies(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 50,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[str], Any]:
    """Metric E of every cross-attention layer: (layer names in execution order, a tensor of
    shape (n_layers, n_prompts)). One conditional UNet pass per batch, stopped after step 0."""
    import torch
    from tqdm import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    layers: list[str] | None = None
    cols = []
    for b in tqdm(
        range(0, len(prompts), batch_size),
        desc="calibration",
        unit="batch",
        disable=not progress,
    ):
        chunk, chunk_seeds = list(prompts[b : b + batch_size]), list(seeds[b : b + batch_size])
        with patch(pipe, record=RecordSpec(steps=(0,))) as handle:
            run_unet_until(
                handle,
                None,
                lambda chunk=chunk, chunk_seeds=chunk_seeds: pipe(
                    chunk,
                    generator=generators(chunk_seeds),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=1.0,  # the conditional rows only, as E's early exit
                    output_type="latent",
                ),
                step=0,
            )
            rec = handle.record.to("cpu")
        if layers is None:
            layers = list(rec.order)
        cols.append(torch.stack([rec.entropy(steps=0, layers=ly) for ly in layers]))
    assert layers is not None
    return layers, torch.cat(cols, dim=1)


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    labels: Sequence[int],
    *,
    seeds: Sequence[int] | None = None,
    base_seed: int | None = 0,
    num_inference_steps: int = 50,
    batch_size: int = 16,
    tolerance: float = 0.01,
    model: str | None = None,
    progress: bool = False,
) -> Calibration:
    """Choose the metric-E layer of ``pipe`` from labelled prompts (1 = memorized, 0 = not).

    ``seeds`` default to ``base_seed + i`` for prompt i, as in ``attnmem scan`` (explicit
    ``seeds`` are recorded as ``base_seed=None``). Raises
    :class:`CalibrationError` when the labels do not fit the prompts or hold one class only.
    """
    from attnmem.evaluate import auroc

    prompts, labels = list(prompts), [int(y) for y in labels]
    if len(labels) != len(prompts):
        raise CalibrationError(f"got {len(prompts)} prompts but {len(labels)} labels")
    if set(labels) - {0, 1}:
        raise CalibrationError("labels must be 0 (not memorized) or 1 (memorized)")
    n_pos = sum(labels)
    if n_pos == 0 or n_pos == len(labels):
        raise CalibrationError(
            "calibration needs memorized (1) and not-memorized (0) prompts; "
            f"got {n_pos} memorized of {len(labels)}"
        )
    if seeds is None:
        seeds = [base_seed + i for i in range(len(prompts))]
    else:
        base_seed = None
    layers, ent = layer_entropies(
        pipe,
        prompts,
        seeds,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
        progress=progress,
    )
    scores = [auroc(ent[i].numpy(), labels) for i in range(len(layers))]
    k = choose_layer(scores, tolerance)
    return Calibration(
        layer=layers[k],
        layer_index=k,
        auroc={ly: round(float(a), 6) for ly, a in zip(layers, scores)},
        n_memorized=n_pos,
        n_normal=len(labels) - n_pos,
        tolerance=tolerance,
        num_inference_steps=num_inference_steps,
        base_seed=base_seed,
        model=model,
    )
