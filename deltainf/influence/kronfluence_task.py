"""A kronfluence ``Task`` with deltainf's EK-FAC conventions, so both libraries compute the same thing.

deltainf's EK-FAC sums the cross-entropy over a batch (labels drawn from the model's softmax for the
true Fisher) and measures a query by its negative margin. Pass
``KronfluenceTask()`` to ``kronfluence.analyzer.prepare_model`` / ``Analyzer`` to compare scores with
:class:`deltainf.EKFAC` or to hand a model to kronfluence with the same definitions. Batches are
``(x, y)`` or ``(x, y, index)``. Needs the optional ``kronfluence`` package (imported lazily).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltainf.influence._batches import negative_margin

try:
    from kronfluence.task import Task as _Task
except ImportError as err:  # pragma: no cover - exercised only without kronfluence
    raise ImportError("deltainf.influence.kronfluence_task needs the `kronfluence` package "
                      "(pip install kronfluence)") from err

__all__ = ["KronfluenceTask"]


class KronfluenceTask(_Task):
    """Summed cross-entropy training loss (sampled labels when kronfluence asks for the true Fisher)
    and the negative-margin measurement of the query label."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch[0], batch[1]
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        return negative_margin(model(batch[0]), batch[1]).sum()
