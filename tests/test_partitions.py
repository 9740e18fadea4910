"""Partitioned passes: results independent of the torchrun world size, resumable after kill -9.

The end-to-end cases run tests/partition_run.py (fit, score, Δ-Influence vote on a small synthetic task) in
child processes: plainly, under ``torchrun --nproc-per-node 2`` (gloo), and killed with SIGKILL at a batch
of the lambda or the score pass, then rerun.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltainf import EKFAC
from user_models import loader_stopping_at
from deltainf.influence._linalg import CovAccumulator
from deltainf.influence._partitions import PartitionStore, run_partitioned

SCRIPT = Path(__file__).with_name("partition_run.py")
ROOT = SCRIPT.parents[1]
BATCHES = 13  # partition_run: 200 examples in batches of 16
# loader reads before the passes: fit reads the first batch to find the layers seen per example and twice more to
# check that the loader repeats itself; score reads it twice for that check
FIT_PROBES, SCORE_PROBES = 3, 2


def _run(out: Path, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
                "--standalone"] if torchrun else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(SCRIPT), str(out), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _results(out: Path):
    return load_file(out / "factors.safetensors"), torch.load(out / "scores.pt"), \
        json.loads((out / "forwards.json").read_text())


def _same(a: Path, b: Path) -> None:
    fa, sa, _ = _results(a)
    fb, sb, _ = _results(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    assert torch.equal(sa["scores"], sb["scores"])
    assert torch.equal(sa["votes"], sb["votes"])
    assert sa["flagged"].tolist() == sb["flagged"].tolist()
    assert sa["verdict"] == sb["verdict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    done = _run(out)
    assert done.returncode == 0, done.stderr
    _, s, _ = _results(out)
    assert len(s["flagged"]) > 0  # the comparisons below compare a real flagged set
    return out


def test_torchrun_two_ranks_equal_one_process_bit_for_bit(uninterrupted, tmp_path):
    done = _run(tmp_path, torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(uninterrupted, tmp_path)
    _, _, forwards = _results(tmp_path)
    assert forwards["world"] == 2
    # the training batches are shared: each rank runs about half of the three passes (plus the queries)
    assert all(calls < 3 * BATCHES for calls in forwards["forward_calls"]), forwards


@pytest.mark.parametrize("differs, named", [("data", "train_loader"), ("shorter", "train_loader"),
                                             ("queries", "query_x"), ("damping", "settings"),
                                             ("partition", "partition_size"), ("tolerance", "tolerance"),
                                             ("scorefile", "out"), ("nocheckpoint", "checkpoint_dir")])
def test_ranks_that_disagree_stop_together_naming_what_differs(tmp_path, differs, named):
    """Rank 1 reads other examples, fewer examples, scores other queries, or has another damping or partition size:
    every rank stops with one error naming what differs, instead of merging unrelated sums (scores 85 % off; rank 1's
    partitions scored with its own damping) or waiting for the other forever. Another decision setting on rank 1
    (tolerance) gave each rank its own flagged set; a score file on one rank only waited forever; a checkpoint
    folder on one rank only paired the ranks' exchanges wrongly (an AttributeError, a ValueError)."""
    extra = ("--checkpoint", str(tmp_path / "ck")) if differs == "nocheckpoint" else ()
    done = _run(tmp_path, "--rank1", differs, *extra, torchrun=2)
    assert done.returncode != 0
    assert f"ValueError: {named}: under torchrun every rank must" in done.stderr
    assert "(rank 1 differs from rank 0)" in done.stderr
    assert not (tmp_path / "scores.pt").exists()


_RANK0_ALONE = """
import sys, torch, torch.distributed as dist
import deltainf
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,))),
                                     batch_size=8)
wrapped = torch.nn.parallel.DistributedDataParallel(model)  # as the training script has it, on every rank
if dist.get_rank() == 0:
    with deltainf.one_process():
        ek = deltainf.EKFAC(wrapped, progress=False, partition_size=8).fit(loader)
        torch.save(ek.score(torch.randn(2, 6), torch.tensor([0, 1]), loader), sys.argv[1])
dist.barrier()
del wrapped  # DDP's reducer before its process group (left to the interpreter's exit, a rank aborted at times)
dist.destroy_process_group()
# and still, once in about 20 runs, rank 1 (which never ran deltainf) aborted in the interpreter's teardown of
# torch's gloo objects ("terminate called without an active exception"): this job ends here, its work done
sys.stdout.flush(); sys.stderr.flush()
import os; os._exit(0)
"""


def test_one_rank_of_a_job_runs_deltainf_alone(tmp_path):
    """A training job under torchrun that evaluates on rank 0 only: inside one_process() rank 0 runs the passes
    alone (it waited for rank 1 to join them, which sat in the job's own barrier: gloo's 30-minute timeout), and a
    DistributedDataParallel model is read through (DDP broadcasts its buffers in every forward, another wait)."""
    script = tmp_path / "alone.py"
    script.write_text(_RANK0_ALONE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           str(script), str(tmp_path / "scores.pt")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "scores.pt").shape == (2, 40)


def test_an_error_on_one_rank_stops_every_rank_with_it(tmp_path):
    """Rank 1's model raises in its own partition: rank 0 raises the same error at the next exchange of results,
    instead of waiting in it until gloo's timeout (30 minutes)."""
    done = _run(tmp_path, "--rank1", "fails", torchrun=2)
    assert done.returncode != 0
    failed = "model: the forward pass failed on the train_loader batch of shape (16, 1, 8, 8) (rank 1's model failed"
    assert f"[rank1]: ValueError: {failed}" in done.stderr  # its own error
    assert f"[rank0]: ValueError: rank 1: {failed}" in done.stderr  # the same, on the rank that was waiting for it
    assert not (tmp_path / "scores.pt").exists()


def test_a_loader_that_fails_on_one_rank_is_named_on_every_rank(tmp_path):
    """Rank 1's loader raises (a file only its machine lacks): rank 0 got gloo's "Connection reset by peer" when
    rank 1 ended, not rank 1's error."""
    done = _run(tmp_path, "--rank1", "loader", torchrun=2)
    assert done.returncode != 0
    assert "[rank1]: OSError: rank 1's loader failed on purpose" in done.stderr
    assert "[rank0]: OSError: rank 1: rank 1's loader failed on purpose" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "scores.pt").exists()


def test_an_eigendecomposition_that_fails_on_one_rank_stops_every_rank(tmp_path):
    done = _run(tmp_path, "--rank1", "eigen", torchrun=2)
    assert done.returncode != 0
    assert "[rank1]: RuntimeError: rank 1's eigendecomposition failed on purpose" in done.stderr
    assert "[rank0]: RuntimeError: rank 1: rank 1's eigendecomposition failed on purpose" in done.stderr, \
        done.stderr[-3000:]


def test_a_damaged_partition_file_is_recomputed_by_its_rank(uninterrupted, tmp_path):
    """A partition damaged on disk stopped every rerun (named on every rank): its rank says so, removes it and
    computes it again; the results are the uninterrupted run's."""
    ck = tmp_path / "checkpoint"
    killed = _run(tmp_path / "out", "--checkpoint", str(ck), "--kill-at", str(FIT_PROBES + BATCHES + 5))
    assert killed.returncode == -9
    damaged = next(ck.glob("covariance-*-000001.safetensors"))  # rank 1's under two ranks
    damaged.write_bytes(damaged.read_bytes()[:-7])
    done = _run(tmp_path / "out", "--checkpoint", str(ck), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint file {str(damaged)!r}" in done.stderr and "it is removed and recomputed" in done.stderr
    _same(uninterrupted, tmp_path / "out")


def test_a_checkpoint_folder_per_rank_is_emptied_by_its_rank(uninterrupted, tmp_path):
    """Each rank on its own disk: every rank removes its partitions when a pass completes (rank 0 removed only its
    own, and rank 1's stayed)."""
    done = _run(tmp_path / "out", "--checkpoint", str(tmp_path / "ck{rank}"), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    _same(uninterrupted, tmp_path / "out")
    for rank in (0, 1):  # the folders the run created are removed once empty
        assert not (tmp_path / f"ck{rank}").exists()


def test_true_fisher_labels_do_not_depend_on_the_rank_layout(tmp_path):
    # the sampled labels are a function of (seed, dataset position), whichever rank draws them
    one, two = _run(tmp_path / "one", "--fisher", "true"), _run(tmp_path / "two", "--fisher", "true", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    _same(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("kill_at, phase", [(FIT_PROBES + BATCHES + 5, "lambda"),
                                            (FIT_PROBES + 2 * BATCHES + SCORE_PROBES + 5, "score")])
def test_kill9_then_rerun_resumes_with_identical_results(uninterrupted, tmp_path, kill_at, phase):
    ck = tmp_path / "checkpoint"
    killed = _run(tmp_path / "out", "--checkpoint", str(ck), "--kill-at", str(kill_at))
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in ck.iterdir())
    assert any(name.startswith(f"{phase}-") for name in left), left
    done = _run(tmp_path / "out", "--checkpoint", str(ck))
    assert done.returncode == 0, done.stderr[-3000:]
    _same(uninterrupted, tmp_path / "out")
    _, _, plain = _results(uninterrupted)
    _, _, resumed = _results(tmp_path / "out")
    assert resumed["forward_calls"][0] < plain["forward_calls"][0]  # finished partitions were not recomputed
    assert list(ck.iterdir()) == []  # completed passes remove their partial results, temporary files included


def test_a_run_on_other_data_is_refused(tmp_path):
    ck = tmp_path / "checkpoint"
    killed = _run(tmp_path / "out", "--checkpoint", str(ck), "--kill-at", str(FIT_PROBES + BATCHES + 5))
    assert killed.returncode == -9
    other = _run(tmp_path / "out", "--checkpoint", str(ck), "--data-seed", "1")
    assert other.returncode == 1
    assert "checkpoint_dir" in other.stderr and "other data" in other.stderr


def test_partitions_of_other_data_are_refused(tmp_path):
    """Data that differ after the first batch: the same run key, and a partition computed on the earlier data is
    refused, never mixed in."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = torch.nn.Linear(6, 3)
    with pytest.raises(KeyboardInterrupt):
        EKFAC(model, progress=False, checkpoint_dir=tmp_path, partition_size=8).fit(loader_stopping_at(x, y, 6))
    x2 = x.clone()
    x2[8:] += 1.0
    with pytest.raises(ValueError, match="checkpoint_dir .* partition 1 of the covariance pass was computed on other "
                                         "data"):
        EKFAC(model, progress=False, checkpoint_dir=tmp_path, partition_size=8).fit(loader_stopping_at(x2, y, None))


# ------------------------------------------------------------------------------ in-process pieces

def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` as rank 0 until its stdin closes."""
    code = ("import sys\nfrom deltainf.influence._partitions import folder_lock\n"
            "with folder_lock(sys.argv[1], 0, 1):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline() == "held\n"
    return holder


def _small_fit(folder: Path) -> EKFAC:
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    return EKFAC(torch.nn.Linear(6, 3), progress=False, checkpoint_dir=folder).fit(loader)


def test_a_checkpoint_folder_serves_one_run_at_a_time(tmp_path):
    """A second run in a folder another process is using fails at once, naming checkpoint_dir (it failed with "no
    such file" once the first run removed the partitions it was resuming from); the lock goes with its holder."""
    folder = tmp_path / "ck"
    holder = _holder(folder)
    try:
        with pytest.raises(ValueError, match=rf"^checkpoint_dir '{tmp_path}/ck' is in use by another run \(process "
                                             rf"{holder.pid}\)"):
            _small_fit(folder)
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    # released, its lock file removed, and the folder the run created with it
    assert _small_fit(folder).factors and not folder.exists()


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    folder = tmp_path / "ck"
    holder = _holder(folder)
    holder.kill()
    holder.wait()
    assert [p.name for p in folder.iterdir()] == [".lock-rank0"]  # left by kill -9, but no longer locked
    assert _small_fit(folder).factors and list(folder.iterdir()) == []  # a folder it did not create is kept


def test_lock_files_of_ranks_a_resumed_run_lacks_are_removed(tmp_path):
    """A run of two ranks killed, resumed by one process: rank 1's lock file stayed for good (and the folder with
    it). Rank 0 removes the lock files of ranks beyond the run's once nobody holds them."""
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / ".lock-rank1").write_text("4242")  # left by a killed rank 1: no process holds it
    (folder / ".lock-rankx").write_text("not a rank's")
    assert _small_fit(folder).factors and [p.name for p in folder.iterdir()] == [".lock-rankx"]


def _batches(sizes):
    pos = 0
    for b in sizes:
        yield torch.zeros(b, 1), torch.zeros(b, dtype=torch.int64), torch.arange(pos, pos + b), pos
        pos += b


@pytest.mark.parametrize("sizes, size, layout", [
    ([16] * 7, 48, [[0, 1, 2], [3, 4, 5], [6]]),
    ([16] * 4, 10, [[0], [1], [2], [3]]),  # batches larger than a partition: still numbered 0, 1, 2, ...
    ([5, 30, 5, 5], 20, [[0, 1], [2, 3]]),
])
def test_partition_layout(sizes, size, layout):
    seen = []
    run_partitioned(_batches(sizes), kind="t", size=size, rank=0, world=1, store=None, new=list,
                    work=lambda s, x, y, idx: s + [int(idx[0])], pack=lambda s: s, unpack=lambda s: s,
                    merge=seen.append)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert seen == [[starts[i] for i in part] for part in layout]


def test_merge_matches_one_accumulator_and_survives_packing():
    torch.manual_seed(0)
    chunks = [torch.randn(6, 5 + k % 3, dtype=torch.float64) for k in range(6)]  # (dim, m) column blocks
    for keep in (True, False):
        whole = CovAccumulator(6, True, keep_rows=keep)
        merged = CovAccumulator(6, True, keep_rows=keep)
        for c in chunks:
            whole.add(c)
            part = CovAccumulator(6, True, keep_rows=keep)
            part.add(c)
            packed = CovAccumulator.unpack(part.pack("f"), "f", 6, True, keep, "cpu")
            merged.merge(packed)
        assert merged.n == whole.n
        torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)


def test_merge_keeps_rows_while_they_fit():
    acc = CovAccumulator(10, False, keep_rows=True)
    for _ in range(2):
        part = CovAccumulator(10, False, keep_rows=True)
        part.add(torch.randn(10, 3))
        acc.merge(part)
    assert acc.has_rows and acc.n == 6
    big = CovAccumulator(10, False, keep_rows=True)
    big.add(torch.randn(10, 8))
    acc.merge(big)
    assert not acc.has_rows and acc.n == 14


def test_partition_size_changes_results_only_at_round_off():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = torch.utils.data.TensorDataset(torch.randn(90, 6), torch.randint(0, 3, (90,)))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    qx, qy = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    one = EKFAC(model, progress=False).fit(loader).score(qx, qy, loader)
    many = EKFAC(model, progress=False, partition_size=20).fit(loader).score(qx, qy, loader)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_partition_size_is_checked(bad):
    with pytest.raises(ValueError, match="partition_size"):
        EKFAC(torch.nn.Linear(3, 2), partition_size=bad)


def test_store_refuses_a_partition_of_other_data(tmp_path):
    store = PartitionStore(tmp_path, "k" * 64)
    store.save("covariance", 3, {"a": torch.ones(2)}, "digest-1")
    assert torch.equal(store.load("covariance", 3, "digest-1")["a"], torch.ones(2))
    with pytest.raises(ValueError, match="checkpoint_dir .*partition 3 of the covariance pass"):
        store.load("covariance", 3, "digest-2")
    store.clear()
    assert list(tmp_path.iterdir()) == []


def test_a_torchrun_worker_ends_with_its_launcher(tmp_path):
    """torchrun starts its workers in sessions of their own: a launcher killed with kill -9 left them waiting for
    their peers until gloo's 30-minute timeout. A worker now gets SIGTERM when its launcher (its parent) dies."""
    import signal
    import time

    child = ("import sys, time\nfrom deltainf import _dist\n_dist._end_with_launcher()\nprint('ready', flush=True)\n"
             "time.sleep(120)\n")
    parent = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\nprint(p.pid, flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "test"}
    launcher = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == "ready"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/status") as f:
                return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not alive(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone, "the worker outlived its launcher"


@pytest.mark.parametrize("blocked_by_parent", [False, True])
def test_a_worker_whose_launcher_died_first_ends_at_once(tmp_path, blocked_by_parent):
    """A launcher killed before its worker asked to end with it (before deltainf's first pass, or while Python was
    starting) left the worker reparented and waiting (seen for over 9 minutes): it now ends as soon as it asks. The
    CLI asks at its start. A job runner that blocks SIGTERM passes the blocked mask on: the signal was never seen."""
    import signal
    import time

    seen = tmp_path / "parent.txt"
    child = ("import os, sys, time\ntime.sleep(1.5)\nfrom deltainf import _dist\n"
             f"open({str(seen)!r}, 'w').write(str(os.getppid()))\n_dist._end_with_launcher()\ntime.sleep(120)\n")
    parent = ("import signal, subprocess, sys\n"
              f"if {blocked_by_parent}: signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.DEVNULL)\n"
              "print(p.pid, flush=True)\n")  # and exits at once
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "test"}
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=env, timeout=60)
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not os.path.exists(f"/proc/{worker}")
    if not gone:
        os.kill(worker, signal.SIGKILL)
    if seen.exists() and seen.read_text() != "1":
        pytest.skip(f"orphans are adopted by a subreaper here (process {seen.read_text()}), not by init")
    assert gone, "the worker outlived its launcher"


def test_a_stale_eigendecomposition_is_named_by_its_layer(tmp_path):
    """The eigen pass stores one file per layer, but a stale one was called "partition 0 of the eigen pass", as if
    it were part of the data."""
    store = PartitionStore(tmp_path, "k" * 16)
    store.save("eigen", 2, {"q": torch.eye(2)}, "old data")
    with pytest.raises(ValueError, match="layer 2's eigendecomposition was computed on other data"):
        store.load("eigen", 2, "new data")
    store.save("lambda", 2, {"q": torch.eye(2)}, "old data")
    with pytest.raises(ValueError, match="partition 2 of the lambda pass was computed on other data"):
        store.load("lambda", 2, "new data")


def test_a_damaged_partition_is_recomputed(tmp_path):
    """A partition file damaged on disk (a flipped bit, a copy cut short) stopped every rerun ("not a readable
    safetensors file", naming no way out): it is removed, with a warning, and recomputed."""
    store = PartitionStore(tmp_path, "k" * 16)
    store.save("lambda", 0, {"q": torch.eye(2)}, "data")
    assert store.has("lambda", 0) and torch.equal(store.load("lambda", 0, "data")["q"], torch.eye(2))
    path = store.path("lambda", 0)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.warns(UserWarning, match="checkpoint_dir .*: checkpoint file .* it is removed and recomputed"):
        assert not store.has("lambda", 0)
    assert not path.exists()
