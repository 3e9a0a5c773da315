"""attnmem's exceptions: one hierarchy, so a caller (the command line) catches them once.

Each is a problem the user can fix, and its message says what and where:

- :class:`AttnmemError`: the base.
- :class:`ScanError`: a scan's inputs or options (prompt file, ``--out``, ``--resume`` of a
  different run, an option the metric does not take).
- :class:`ResultsError`: a results file that is damaged or not written by ``attnmem scan``.
- :class:`PipelineError`: a model that cannot be loaded, or a device / dtype it cannot use.
- :class:`ReportError`: a report's inputs (no results, labels that do not fit).
- :class:`CalibrationError`: a calibration's inputs or a damaged calibration file.
- :class:`PatchRemovedError`: attnmem's processors were replaced after patching (attention
  slicing, xformers); also a ``RuntimeError``.

Invalid arguments to the op, to :class:`attnmem.Mitigation` or to a detector raise
``ValueError`` as PyTorch and diffusers do.
"""

from __future__ import annotations

__all__ = [
    "AttnmemError",
    "ScanError",
    "ResultsError",
    "PipelineError",
    "ReportError",
    "CalibrationError",
    "PatchRemovedError",
]


class AttnmemError(Exception):
    """Base of the errors attnmem raises for problems the user can fix."""


class ScanError(AttnmemError):
    """A problem with a scan's inputs or options (bad prompt file, existing output, option)."""


class ResultsError(AttnmemError):
    """A results file that cannot be read as attnmem scan results."""


class PipelineError(AttnmemError):
    """A model that cannot be loaded, or a device or dtype it cannot run on."""


class ReportError(AttnmemError):
    """A problem with the report's inputs (missing file, labels that do not fit)."""


class CalibrationError(AttnmemError):
    """A calibration that cannot be made (labels) or read (file)."""


class PatchRemovedError(AttnmemError, RuntimeError):
    """attnmem's processors were replaced after patching (attention slicing, xformers, ...)."""
