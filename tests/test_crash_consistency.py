"""``kill -9`` of ``deltainf demo`` and ``deltainf evaluate`` at a random point, then a rerun in the same
folder: the same results as an uninterrupted run, and no stray file.

Each test runs its command three times (uninterrupted, killed, rerun) in subprocesses: 1-3 minutes on a
loaded 2-core machine, hence ``slow``. The kill lands at a seeded random point between 10 % and 80 % of the
uninterrupted run's time after its folder was marked running.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltainf import _files

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# what legitimately differs between two runs of the same command: clocks, dates, the machine, paths
_VOLATILE = re.compile(r"tim(e|ing)|utc|^environment$|^files$|^argv$")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltainf", *args, "--no-progress", "--quiet"]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # a loaded 2-core machine stalls multi-threaded OpenMP regions
    return env


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=environment(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_until_running(out: Path, proc: subprocess.Popen) -> float:
    """The time at which ``out/run.json`` says the run started (an earlier run's record does not count)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = _files.run_status(out)
        if status is not None and status.get("status") == "running":
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before marking {out} running: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"{out} was never marked running")


def run_to_end(argv: list[str], out: Path) -> float:
    """Run the command; returns its seconds from the running mark to the end."""
    proc = start(argv)
    marked = wait_until_running(out, proc)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return time.monotonic() - marked


def kill_at_random_point(argv: list[str], out: Path, body_s: float, seed: int) -> float:
    """Start the command and ``kill -9`` it a seeded random time after it marked ``out`` running; returns the
    delay. Should the run finish first (a quieter machine), or be killed after it marked ``out`` complete (while
    the interpreter shuts down), it is retried with a shorter delay."""
    rng = random.Random(seed)
    fraction = rng.uniform(0.1, 0.8)
    for _ in range(4):
        proc = start(argv)
        wait_until_running(out, proc)
        delay = fraction * body_s
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            if _files.run_status(out)["status"] == "running":
                return delay
        else:
            proc.stderr.close()
        fraction /= 2
    raise AssertionError("the run always finished before the kill")


def numbers(obj):
    """A result JSON without the entries that legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items() if not _VOLATILE.search(k)}
    if isinstance(obj, list):
        return [numbers(v) for v in obj]
    return obj


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = _files.read_tensors(a, "file")[0], _files.read_tensors(b, "file")[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def leave_orphans(folder: Path, names: list[str]) -> None:
    """What a run killed mid-write leaves: temporary files (and a finished earlier run's record)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("left by a killed run")


def test_kill_demo_then_rerun(tmp_path):
    argv = ["demo", "--seed", "0", "--points", "2", "--n-transforms", "10"]
    clean_out, killed_out = tmp_path / "uninterrupted", tmp_path / "killed"
    body_s = run_to_end(command(*argv, "--out", str(clean_out)), clean_out)
    # the folder held a finished run of another seed, and orphans of a killed write
    orphans = [".report.json.0badf00d.tmp", ".scores-q8x1.npy", "victim.safetensors.tmp"]
    leave_orphans(killed_out, orphans)
    (killed_out / "run.json").write_text(json.dumps({"status": "complete", "command": "demo", "seed": 1}))
    delay = kill_at_random_point(command(*argv, "--out", str(killed_out)), killed_out, body_s, seed=10)
    status = _files.run_status(killed_out)
    assert (status["status"], status["seed"]) == ("running", 0), (delay, status)  # says: incomplete, seed 0
    assert not set(orphans) & set(os.listdir(killed_out))  # removed when the killed run started

    run_to_end(command(*argv, "--out", str(killed_out)), killed_out)
    assert files(killed_out) == files(clean_out) == ["report.json", "report.png", "run.json",
                                                     "unlearned.safetensors", "victim.safetensors"]
    assert _files.run_status(killed_out)["status"] == "complete"
    a, b = (json.loads((o / "report.json").read_text()) for o in (clean_out, killed_out))
    assert numbers(a) == numbers(b) and a["results"]["detection"]["flagged"] > 0
    for name in ("victim.safetensors", "unlearned.safetensors"):
        assert same_tensors(clean_out / name, killed_out / name), name


def test_kill_evaluate_then_rerun(tmp_path):
    argv = ["evaluate", "--dataset", "digits", "--attacks", "badnet", "--seeds", "1", "--detectors",
            "delta-influence", "--unlearn", "exact"]
    clean_out, killed_out = tmp_path / "uninterrupted", tmp_path / "killed"
    body_s = run_to_end(command(*argv, "--out", str(clean_out)), clean_out)
    leave_orphans(killed_out, ["cells/.badnet-seed0.json.0badf00d.tmp", "clean/.seed0.safetensors.12345678.tmp",
                               "cells/badnet-seed0/.victim.safetensors.00000000.tmp", ".results.json.abcdef01.tmp",
                               "RESULTS.md.tmp"])
    delay = kill_at_random_point(command(*argv, "--out", str(killed_out)), killed_out, body_s, seed=20)
    assert _files.run_status(killed_out)["status"] == "running", delay

    run_to_end(command(*argv, "--out", str(killed_out)), killed_out)
    expected = ["RESULTS.md", "cells/badnet-seed0.json", "cells/badnet-seed0/poison.json",
                "cells/badnet-seed0/poison.safetensors", "cells/badnet-seed0/run.json",
                "cells/badnet-seed0/victim.safetensors", "clean/seed0.safetensors", "results.json", "results.png",
                "run.json"]
    assert files(killed_out) == files(clean_out) == expected
    assert _files.run_status(killed_out)["status"] == "complete"
    a, b = (json.loads((o / "results.json").read_text()) for o in (clean_out, killed_out))
    assert numbers(a) == numbers(b) and a["cells"][0]["status"] == "ok"
    for name in ("cells/badnet-seed0/victim.safetensors", "clean/seed0.safetensors"):
        assert same_tensors(clean_out / name, killed_out / name), name


def test_kill_detect_then_rerun_resumes(tmp_path):
    """``deltainf detect`` killed in its fit or score passes: the rerun resumes from the saved fit and the stored
    partitions (``out/passes``) and ends with the results of an uninterrupted run, ``out/passes`` removed."""
    from deltainf.data import load_digits_dataset
    from deltainf.train import TrainConfig, save_checkpoint, train_model

    model = train_model(load_digits_dataset("train"), TrainConfig.digits(epochs=2, progress=False))
    save_checkpoint(model, tmp_path / "model.safetensors", meta={"dataset": "digits"})
    argv = ["detect", "--checkpoint", str(tmp_path / "model.safetensors"), "--dataset", "digits", "--test-index",
            "0", "5", "--n-transforms", "10", "--partition-size", "300"]
    clean_out, killed_out = tmp_path / "uninterrupted", tmp_path / "killed"
    body_s = run_to_end(command(*argv, "--out", str(clean_out)), clean_out)
    delay = kill_at_random_point(command(*argv, "--out", str(killed_out)), killed_out, body_s, seed=30)
    assert _files.run_status(killed_out)["status"] == "running", delay

    run_to_end(command(*argv, "--out", str(killed_out)), killed_out)
    assert files(killed_out) == files(clean_out)
    assert not (killed_out / "passes").exists()
    assert _files.run_status(killed_out)["status"] == "complete"
    for name in ("flagged.json", "report.json"):
        a, b = (json.loads((o / name).read_text()) for o in (clean_out, killed_out))
        assert numbers(a) == numbers(b), name
    assert same_tensors(clean_out / "ekfac.safetensors", killed_out / "ekfac.safetensors")
