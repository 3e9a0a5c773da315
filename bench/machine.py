"""Who measured: machine, torch version and commit, recorded with every benchmark number."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe() -> dict:
    from attnmem import _ext

    info = _ext.build_info()
    d = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "attnmem_cpu_path": info.get("cpu_simd_runtime", "reference (no _C)"),
    }
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d


def header_lines(m: dict) -> list[str]:
    dev = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"
    return [
        f"- machine: {dev}",
        f"- torch {m['torch']}, python {m['python']}, attnmem CPU path: {m['attnmem_cpu_path']}",
        f"- commit {m['commit']}, {m['date']}",
    ]
