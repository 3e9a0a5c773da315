"""What attnmem's commands print while they work, and what ``--quiet`` silences.

- :class:`Progress`: a job's progress. On a terminal, a tqdm bar over the job's items (prompts)
  whose postfix shows the denoising step inside the current batch, so a long batch (metric D,
  carlini, generate) does not sit at 0 % for minutes; when the stream is not a terminal (a log
  file, CI, ``nohup``), one plain line every ``interval`` seconds and one at the end.
- :func:`count_unet_calls`: calls a function after every UNet forward of a pipeline, which is
  how a job learns the step inside a batch without the detector's help.
- :func:`silence_library_noise`: drops messages of diffusers and transformers that every
  command would print and that say nothing to an attnmem user: transformers' "requires
  torchvision, falling back to the PIL image processor" (attnmem processes no images with it),
  and the tokenizers' echo of a truncated prompt (attnmem records truncation per prompt and
  counts it at the end instead of printing up to megabytes of prompt text).
- :func:`quiet`: ``--quiet``: diffusers and transformers log errors only, their progress bars
  are off, and Python warnings are not shown; attnmem's own progress is off too (the caller
  passes ``enabled=False``). Errors are still printed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

__all__ = ["Progress", "count_unet_calls", "silence_library_noise", "quiet"]

# Substrings of library log messages that silence_library_noise drops.
_NOISE = (
    "requires torchvision (not installed); falling back to",  # transformers' image processors
    "Token indices sequence length is longer than the specified maximum",  # tokenizers
    "The following part of your input was truncated because CLIP",  # diffusers' pipelines
)


def _format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Progress of a job over ``total`` items (see the module docstring).

    ``update(n)`` counts finished items, ``step(k, of)`` reports step k of the current batch
    (``of`` may be None when unknown), ``close()`` ends it (also as a context manager).
    ``enabled=False`` prints nothing. ``stream`` defaults to stderr; ``tty`` overrides the
    terminal detection.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "prompt",
        enabled: bool = True,
        interval: float = 30.0,
        stream: IO[str] | None = None,
        tty: bool | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", bool)())
        self.done = 0
        self.failed = 0
        self._step: tuple[int, int | None] | None = None
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True
            )

    def _postfix(self) -> str:
        parts = []
        if self._step is not None:
            k, of = self._step
            parts.append(f"step {k}/{of}" if of else f"step {k}")
        if self.failed:
            parts.append(f"failed {self.failed}")
        return ", ".join(parts)

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._start
        msg = f"{self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.failed:
            msg += f", {self.failed} failed"
        if self._step is not None and not final:
            k, of = self._step
            msg += f", current batch at step {k}" + (f"/{of}" if of else "")
        msg += f", {_format_seconds(elapsed)} elapsed"
        if not final and 0 < self.done < self.total:
            msg += f", ~{_format_seconds(elapsed / self.done * (self.total - self.done))} left"
        print(msg, file=self.stream, flush=True)
        self._last = time.monotonic()

    def _tick(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def update(self, n: int, failed: int = 0) -> None:
        """``n`` more items finished, ``failed`` of them with an error."""
        self.done += n
        self.failed += failed
        self._step = None
        if self._bar is not None:
            self._bar.update(n)
        self._tick()

    def step(self, k: int, of: int | None = None) -> None:
        """The current batch is at step ``k`` (of ``of``)."""
        self._step = (k, of)
        self._tick()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()
            self._bar = None
        elif self.done or self.total:
            self._line(final=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def count_unet_calls(pipe: Any, callback: Callable[[int], None]) -> Iterator[Callable[[], None]]:
    """Call ``callback(k)`` after the k-th UNet forward of ``pipe`` (k from 1); yields a function
    that restarts the count (call it at the start of every batch)."""
    count = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        count[0] += 1
        callback(count[0])

    def restart() -> None:
        count[0] = 0

    unet = getattr(pipe, "unet", None)
    handle = unet.register_forward_hook(hook) if unet is not None else None
    try:
        yield restart
    finally:
        if handle is not None:
            handle.remove()


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(s in message for s in _NOISE)


_FILTER = _DropNoise()


def silence_library_noise() -> None:
    """Drop the library messages listed in the module docstring (idempotent). The filter sits
    on the libraries' root loggers and on their handlers, so messages of every submodule that
    propagate to them are covered."""
    for name in ("diffusers", "transformers"):
        root = logging.getLogger(name)
        if name == "diffusers":
            with contextlib.suppress(ImportError):
                from diffusers.utils import logging as dlog

                dlog.get_logger("diffusers")  # makes diffusers attach its handler now
        else:
            with contextlib.suppress(ImportError):
                from transformers.utils import logging as tlog

                tlog.get_logger("transformers")
        for target in (root, *root.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """``--quiet``: within this block diffusers and transformers log errors only and show no
    progress bars, and Python warnings are not shown; everything is restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib, _, _ in was:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, level, bars in was:
                lib.set_verbosity(level)
                if bars:
                    lib.enable_progress_bar()
