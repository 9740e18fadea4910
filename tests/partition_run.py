"""One EK-FAC fit, score pass and Δ-Influence vote on a small synthetic task, as a script, for the tests of
torchrun runs and of resuming (tests/test_partitions.py).

    python tests/partition_run.py OUT [--checkpoint DIR] [--kill-at N] [--data-seed S] [--fisher true]
    torchrun --nproc-per-node 2 tests/partition_run.py OUT ... \
        [--rank1 data|shorter|queries|fails|eigen|damping|partition|tolerance|scorefile|nocheckpoint|loader]

Rank 0 writes OUT/factors.safetensors, OUT/scores.pt (scores, votes, flagged) and OUT/forwards.json (how many
training batches each rank ran through the model). ``--kill-at N`` sends SIGKILL to this process when the
loader is about to yield its N-th batch over all passes (covariance, lambda, score). ``--rank1`` makes rank 1 read
other data (another data seed), fewer examples, or score other queries than rank 0 (a user's mistake under torchrun),
or makes rank 1's model raise in the covariance pass or its eigendecomposition fail (an error on one rank only).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

N_TRAIN, BATCH, PARTITION, CLASSES = 200, 16, 48, 4
FIT_PROBES = 3  # forward passes of fit before its covariance pass


class KillingLoader:
    """A DataLoader that kills its own process (SIGKILL, no cleanup) before yielding batch ``kill_at``, or raises
    before yielding batch ``fail_at``."""

    def __init__(self, loader, kill_at: int | None, fail_at: int | None = None):
        self.loader, self.kill_at, self.fail_at, self.count = loader, kill_at, fail_at, 0
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.kill_at is not None and self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail_at is not None and self.count == self.fail_at:
                raise OSError("rank 1's loader failed on purpose")
            self.count += 1
            yield batch


def task(data_seed: int):
    g = torch.Generator().manual_seed(data_seed)
    x = torch.rand(N_TRAIN, 1, 8, 8, generator=g)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    torch.manual_seed(0)
    # a depthwise convolution too: its block-diagonal factor goes through the ranks' partitions like the others
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    return model.eval(), torch.utils.data.TensorDataset(x, y)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--checkpoint")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--fisher", default="empirical")
    ap.add_argument("--rank1", choices=("data", "shorter", "queries", "fails", "eigen", "damping", "partition",
                                        "tolerance", "scorefile", "nocheckpoint", "loader"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the same arithmetic in every process
    from deltainf import DeltaInfluence, EKFAC, _dist

    differs = args.rank1 if os.environ.get("RANK") == "1" else None
    model, train = task(args.data_seed + (differs == "data"))
    if differs == "shorter":
        train = torch.utils.data.TensorDataset(*(t[:N_TRAIN - BATCH] for t in train.tensors))
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    if differs == "eigen":
        from deltainf.influence._linalg import CovAccumulator

        def eigen(*args, **kwargs):
            raise RuntimeError("rank 1's eigendecomposition failed on purpose")
        CovAccumulator.eigen = eigen
    if differs == "fails":
        def fail(*_):
            if forwards[0] == FIT_PROBES + 2:  # inside rank 1's first partition of the covariance pass
                raise RuntimeError("rank 1's model failed on purpose")
        model.register_forward_hook(fail)
    loader = KillingLoader(torch.utils.data.DataLoader(train, batch_size=BATCH), args.kill_at,
                           fail_at=FIT_PROBES + 3 if differs == "loader" else None)
    checkpoint = args.checkpoint and args.checkpoint.format(rank=os.environ.get("RANK", "0"))  # "{rank}": per rank
    checkpoint = None if differs == "nocheckpoint" else checkpoint
    ekfac = EKFAC(model, progress=False, checkpoint_dir=checkpoint, fisher=args.fisher, seed=5,
                  partition_size=PARTITION * (2 if differs == "partition" else 1),
                  damping=1e-3 if differs == "damping" else 1e-8)
    ekfac.fit(loader)
    g = torch.Generator().manual_seed(1)
    query_x = torch.rand(3, 1, 8, 8, generator=g) + (0.01 if differs == "queries" else 0.0)
    with torch.no_grad():
        query_y = model(query_x).argmax(1)
    scores = ekfac.score(query_x, query_y, loader, **({"out": Path(args.out) / "rank1.npy"}
                                                      if differs == "scorefile" else {}))
    fit_and_score = forwards[0]
    detection = DeltaInfluence(ekfac, model=model, n_transforms=12, n_controls=0, check_prediction=False,
                               tolerance=4 if differs == "tolerance" else 3, progress=False).detect(loader, query_x,
                                                                                                   query_y)
    rank, world = _dist.group()
    counts = _dist.all_gather(fit_and_score, world)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ekfac.save(out / "factors.safetensors")
        torch.save({"scores": scores.clone(), "votes": detection.votes, "flagged": detection.flagged,
                    "verdict": detection.verdict}, out / "scores.pt")
        (out / "forwards.json").write_text(json.dumps({"world": world, "forward_calls": counts}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
