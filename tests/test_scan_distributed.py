"""``attnmem scan`` under torchrun: 2 CPU processes over gloo give the same records as one
process, and a sharded ``--resume`` completes an interrupted run. Plus the file-level rules
(partial last line, merge, batch blocks) that make this work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnmem import jobs, results, scan

PROMPTS = [
    "The No Limits Business Woman Podcast",
    "Mothers influence on her young hippo",
    "",
    "Talks on the Precepts and Buddhist Ethics",
    "A serene beach at sunrise",
    "A tranquil bamboo forest",
    "Insights with Laura Powers",
    "A lively carnival at night",
]
N = sum(1 for p in PROMPTS if p)
ARGS = ["--metric", "E", "--batch-size", "2", "--seed", "3"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# accelerate launch: its multi-process launcher is torchrun's, which sets the same variables.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
ACCELERATE += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
ACCELERATE += ["--dynamo_backend", "no"]


def torchrun(*argv: str, cwd: Path, cmd: list[str] = TORCHRUN) -> subprocess.CompletedProcess:
    # One thread per process, as torchrun's default: CPU matmuls may round differently with
    # another thread count, and the comparison below is exact.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [*cmd, "-m", "attnmem", "scan", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One process, one thread: the records the sharded runs must reproduce."""
    folder = tmp_path_factory.mktemp("ref")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = folder / "ref.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = scan.ScanOptions(prompts=prompts, out=out, batch_size=2, seed=3, progress=False)
        assert not scan.run_scan(opts).failed
    finally:
        torch.set_num_threads(threads)
    return prompts, read(out)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, reference):
    prompts, ref = reference
    out = tmp_path / "results.jsonl"
    res = torchrun(str(prompts), "--out", str(out), *ARGS, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{N} prompt(s) scored" in res.stdout  # counted over both ranks
    assert without_timing(read(out)) == without_timing(ref)  # field by field, bit for bit
    assert not results.part_files(out)  # merged, parts removed


@pytest.mark.slow
def test_accelerate_launch_works_like_torchrun(tmp_path, reference):
    pytest.importorskip("accelerate")  # a test dependency ([test] extra)
    prompts, ref = reference
    out = tmp_path / "results.jsonl"
    res = torchrun(str(prompts), "--out", str(out), *ARGS, cwd=tmp_path, cmd=ACCELERATE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{N} prompt(s) scored" in res.stdout
    assert without_timing(read(out)) == without_timing(ref)


@pytest.mark.slow
def test_sharded_resume_completes_an_interrupted_run(tmp_path, reference):
    prompts, ref = reference
    out = tmp_path / "results.jsonl"
    # A 2-process run killed mid-way: rank 0 finished block 0 (ids 0, 1), rank 1 was writing
    # id 2 of block 1 when it died.
    results.part_path(out, 0, 2).write_text(
        "".join(json.dumps(r) + "\n" for r in ref[:2]), encoding="utf-8"
    )
    results.part_path(out, 1, 2).write_text(json.dumps(ref[2])[:40], encoding="utf-8")

    opts = scan.ScanOptions(prompts=prompts, out=out, batch_size=2, seed=3, progress=False)
    with pytest.raises(scan.ScanError, match="--resume"):  # parts are never overwritten
        scan.run_scan(opts)

    res = torchrun(str(prompts), "--out", str(out), *ARGS, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{N - 2} prompt(s) scored, 2 already done" in res.stdout
    assert without_timing(read(out)) == without_timing(ref)
    assert not results.part_files(out)


def test_batches_are_id_blocks():
    # Ids 1 and 4 already done: the others keep their block (and so their batch-mates).
    assert jobs._batches([0, 2, 3, 5, 6, 7, 8], 3) == [[0, 2], [3, 5], [6, 7, 8]]


def test_partial_last_line_is_ignored_and_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}\n{"id": 2, "pro')
    records, end = results.read_records(path)
    assert [r["id"] for r in records] == [0, 1] and end == len(b'{"id": 0}\n{"id": 1}\n')
    results.cut_partial_line(path)
    assert path.read_bytes() == b'{"id": 0}\n{"id": 1}\n'


def test_merge_keeps_one_record_per_id(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(
        json.dumps({"id": 2, "error": None, "v": "ok"})
        + "\n"
        + json.dumps({"id": 0, "error": "first failure", "v": "bad"})
        + "\n",
        encoding="utf-8",
    )
    results.part_path(out, 0, 2).write_text(
        json.dumps({"id": 0, "error": None, "v": "retried"})
        + "\n"
        + json.dumps({"id": 2, "error": "later failure", "v": "bad"})
        + "\n",
        encoding="utf-8",
    )
    results.part_path(out, 1, 2).write_text(
        json.dumps({"id": 1, "error": "old"}) + "\n" + json.dumps({"id": 1, "error": "new"}) + "\n",
        encoding="utf-8",
    )
    merged = results.merge_results(out)
    assert [(r["id"], r.get("v"), r["error"]) for r in merged] == [
        (0, "retried", None),  # a success beats a failure, whatever the order
        (1, None, "new"),  # between failures, the latest
        (2, "ok", None),
    ]
    assert read(out) == merged and not results.part_files(out)
