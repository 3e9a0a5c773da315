"""The job machinery shared by ``attnmem scan`` and ``attnmem generate``: one writer per output
(two real processes), the merged file verified before success, ``attnmem status``, a full
disk, and progress on a terminal, in a log file and under ``--quiet``."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnmem import cli, console, jobs, results, scan
from attnmem.errors import ScanError

PROMPTS = [f"a photo of prompt number {i}" for i in range(6)]

# A scan whose detector waits for the file GO before every batch but the first: it holds its
# output open while the test starts a second scan on it.
SLOW_SCAN = """
import sys, time, pathlib
from attnmem import cli, detect
go = pathlib.Path(sys.argv[1])
real = detect.make_detector
def make(name, pipe, **kw):
    det = real(name, pipe, **kw)
    score, calls = det.score_batch, [0]
    def slow(prompts, seeds):
        calls[0] += 1
        while calls[0] > 1 and not go.exists():
            time.sleep(0.05)
        return score(prompts, seeds)
    det.score_batch = slow
    return det
detect.make_detector = make
sys.exit(cli.main(sys.argv[2:]))
"""


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture
def loads(monkeypatch, testbed_pipe):
    monkeypatch.setattr(
        scan, "load_pipeline", lambda model, device, dtype, options=None: testbed_pipe
    )


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return p


def _python(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_second_scan_on_a_running_output_is_refused_and_nothing_is_lost(tmp_path, prompt_file):
    out, go = tmp_path / "results.jsonl", tmp_path / "GO"
    args = ["scan", str(prompt_file), "--model", "tiny-sd1", "--out", str(out)]
    first = _python("-c", SLOW_SCAN, str(go), *args, "--batch-size", "2", "--quiet")
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 2):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first scan wrote nothing in time"
            time.sleep(0.1)

        # A second scan (the --resume a user starts in another terminal) stops at once.
        second = _python("-m", "attnmem", *args, "--resume")
        _, err = second.communicate(timeout=240)
        assert second.returncode == 1
        assert f"is being written by another attnmem scan (pid {first.pid}" in err
        assert "attnmem status" in err

        # attnmem status reads the running job without disturbing it.
        status = _python("-m", "attnmem", "status", str(out))
        text, _ = status.communicate(timeout=240)
        assert status.returncode == 0
        assert f"attnmem scan is running (pid {first.pid}" in text
        assert "2 of 6 prompts have a record, 0 failed" in text
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [r["id"] for r in read(out)] == list(range(len(PROMPTS)))
    assert all(r["error"] is None for r in read(out))
    assert not results.lock_path(out).exists()


def test_records_lost_behind_the_jobs_back_fail_the_job(tmp_path, prompt_file, loads, monkeypatch):
    from attnmem import detect

    out = tmp_path / "results.jsonl"
    real = detect.make_detector

    def make(name, pipe, **options):
        det = real(name, pipe, **options)
        score_batch, calls = det.score_batch, [0]

        def rewritten(prompts, seeds):
            calls[0] += 1
            if calls[0] == 2:  # another writer replaces the file, as a merge of its own does
                other = tmp_path / "other.jsonl"
                other.write_text("", encoding="utf-8")
                os.replace(other, out)
            return score_batch(prompts, seeds)

        det.score_batch = rewritten
        return det

    monkeypatch.setattr(detect, "make_detector", make)
    opts = scan.ScanOptions(prompts=prompt_file, out=out, batch_size=2, progress=False)
    with pytest.raises(ScanError, match=r"lost records while this job ran.*no record for ids 0, 1"):
        scan.run_scan(opts)


def test_stale_lock_of_a_killed_job_is_taken_over(tmp_path, prompt_file, loads, capsys):
    out = tmp_path / "results.jsonl"
    results.lock_path(out).write_text('{"command": "scan", "pid": 1}\n', encoding="utf-8")
    assert run("status", out) == 1
    assert "no such results file, and no job is writing it" in capsys.readouterr().out
    assert run("scan", prompt_file, "--out", out, "--limit", 2, "--quiet") == 0
    assert not results.lock_path(out).exists()
    assert run("status", out) == 0
    assert "no job is running; 2 prompts have a record, 0 failed" in capsys.readouterr().out


def test_lock_refuses_a_second_holder_in_one_process(tmp_path):
    out = tmp_path / "r.jsonl"
    a = results.OutputLock(out, {"command": "scan", "pid": 123, "host": "h", "started": "t"})
    a.acquire()
    try:
        assert results.lock_holder(out)["pid"] == 123
        with pytest.raises(ScanError, match=r"another attnmem scan \(pid 123 on h, started t\)"):
            results.OutputLock(out, {}).acquire(wait=0.1)
    finally:
        a.release()
    assert results.lock_holder(out) is None
    b = results.OutputLock(out, {})
    b.acquire()
    b.release()


def test_unwritable_output_is_refused_before_loading(tmp_path, prompt_file, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(scan, "load_pipeline", lambda *a: loaded.append(a))
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    assert run("scan", prompt_file, "--out", blocker / "r.jsonl") == 1
    assert "cannot create the folder" in capsys.readouterr().err
    # /sys refuses new files even to root: the lock file cannot be created there.
    assert run("scan", prompt_file, "--out", "/sys/attnmem-results.jsonl") == 1
    assert "cannot create attnmem-results.jsonl.lock in /sys: Permission denied" in (
        capsys.readouterr().err
    )
    assert not loaded


def test_full_disk_is_one_clear_error_and_keeps_what_was_written(
    tmp_path, prompt_file, loads, monkeypatch, capsys
):
    out = tmp_path / "r.jsonl"
    real, calls = results.append_records, [0]

    def append(f, recs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, recs)

    monkeypatch.setattr(results, "append_records", append)
    assert run("scan", prompt_file, "--out", out, "--batch-size", 2, "--quiet") == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "--resume" in err and "Traceback" not in err
    assert [r["id"] for r in read(out)] == [0, 1]
    monkeypatch.setattr(results, "append_records", real)
    assert run("scan", prompt_file, "--out", out, "--batch-size", 2, "--resume", "-q") == 0
    assert [r["id"] for r in read(out)] == list(range(len(PROMPTS)))


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
def test_progress_without_a_terminal_prints_plain_lines():
    stream = io.StringIO()
    p = console.Progress(4, "attnmem scan", interval=0.0, stream=stream)
    p.step(3, 50)
    p.update(2, failed=1)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("attnmem scan: 0/4 prompts, current batch at step 3/50, 0:00:00")
    assert lines[1].startswith("attnmem scan: 2/4 prompts, 1 failed, 0:00:00 elapsed, ~")
    assert lines[2].startswith("attnmem scan: 2/4 prompts, 1 failed, 0:00:00 elapsed")
    assert "\r" not in stream.getvalue()  # no bar redraws in a log file

    quiet = io.StringIO()
    p = console.Progress(4, "x", enabled=False, interval=0.0, stream=quiet)
    p.step(1, 2)
    p.update(4)
    p.close()
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_shows_the_step_inside_the_batch():
    stream = io.StringIO()
    p = console.Progress(4, "attnmem scan", stream=stream, tty=True)
    p.step(7, 50)
    assert "step 7/50" in stream.getvalue() and "0/4" in stream.getvalue()
    p.update(4)
    p.close()
    assert "4/4" in stream.getvalue()


def test_scan_reports_each_denoising_step_of_a_batch(
    tmp_path, prompt_file, loads, monkeypatch, capsys
):
    class Every(console.Progress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, interval=0.0)

    monkeypatch.setattr(jobs, "Progress", Every)
    out = tmp_path / "r.jsonl"
    assert run("scan", prompt_file, "--out", out, "--metric", "D", "--steps", 3, "--limit", 2) == 0
    err = capsys.readouterr().err  # not a terminal: plain lines
    for k in (1, 2, 3):
        assert f"attnmem scan: 0/2 prompts, current batch at step {k}/3" in err
    assert "attnmem scan: 2/2 prompts" in err

    out2 = tmp_path / "q.jsonl"
    assert run("scan", prompt_file, "--out", out2, "--limit", 2, "--quiet") == 0
    assert capsys.readouterr().err == ""


def test_quiet_restores_the_libraries_afterwards(tmp_path, prompt_file, loads):
    from diffusers.utils import logging as dlog

    before = dlog.get_verbosity()
    assert run("scan", prompt_file, "--out", tmp_path / "r.jsonl", "--limit", 1, "-q") == 0
    assert dlog.get_verbosity() == before


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--guidance", "nan", "must be a finite number in [0, 100], got nan"),
        ("--guidance", "-1", "in [0, 100]"),
        ("--height", "0", "must be an integer in [8, 4096], got 0"),
        ("--width", "100000", "must be an integer in [8, 4096], got 100000"),
        ("--steps", "0", "must be an integer in [1, 1000]"),
        ("--steps", "5000", "must be an integer in [1, 1000]"),
        ("--seed", "-1", "must be an integer in [0, 1000000000000000]"),
        ("--batch-size", "x", "must be an integer >= 1, got 'x'"),
    ],
)
def test_out_of_range_options_are_refused_naming_the_range(tmp_path, option, value, says, capsys):
    with pytest.raises(SystemExit) as exc:
        run("scan", tmp_path / "p.txt", "--out", tmp_path / "r.jsonl", option, value)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_records_never_hold_non_standard_nan(tmp_path):
    import math

    import numpy as np

    result = {"score": 1.0, "attention": [0.5, math.nan, math.inf], "forwards": 1}
    result["entropy_steps"] = {"steps": [0], "entropy": np.array([np.nan])}
    rec = results.make_record(0, "p", 0, {"metric": "E"}, result, 0.1)
    line = results.dumps(rec)
    assert "NaN" not in line and "Infinity" not in line

    def strict(name):
        raise ValueError(name)

    parsed = json.loads(line, parse_constant=strict)  # a strict parser accepts it
    assert parsed["attention"] == [0.5, None, None] and parsed["entropy_steps"]["entropy"] == [None]
    bad = results.make_record(1, "p", 1, {}, dict(result, score=math.nan), 0.1)
    assert bad["error"].startswith("the detector returned a non-finite score")
    assert "NaN" not in results.dumps(bad)
