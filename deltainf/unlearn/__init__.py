"""Corrective unlearning of a flagged training subset.

Every method: ``get_unlearner(name, **settings).unlearn(model, train_dataset, forget_indices) -> new model``
(the input model is never modified). Loaders are shuffled and no method selects a checkpoint on test data. The
result depends on the method's ``seed`` alone: torch's global RNG (a model's dropout) is seeded from it inside the
call and the caller's stream is restored after. The inputs are cast to the model's dtype (a float64 model trains in
float64). An empty forget set (Δ-Influence found no poison set): gradient ascent and SSD return an unchanged copy;
SCRUB and Bad Teacher still run their steps on the retained data (distillation from the model itself), and exact
retraining and fine-tuning retrain, as they would with anything to forget.

>>> eu = get_unlearner("exact_retrain", config=TrainConfig.digits())   # doctest: +SKIP
>>> clean_model = eu.unlearn(victim, train, flagged)                   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, Type

from deltainf._registry import lookup
from deltainf.unlearn.bad_teacher import BadTeacher, bad_teacher_loss
from deltainf.unlearn.base import IndexSubset, Unlearner, kd_loss
from deltainf.unlearn.gradient_ascent import GradientAscent
from deltainf.unlearn.retrain import ExactRetrain, FineTune
from deltainf.unlearn.scrub import SCRUB
from deltainf.unlearn.ssd import SSD, parameter_importance

UNLEARNERS: Dict[str, Type[Unlearner]] = {
    "exact_retrain": ExactRetrain,
    "finetune": FineTune,
    "gradient_ascent": GradientAscent,
    "ssd": SSD,
    "scrub": SCRUB,
    "bad_teacher": BadTeacher,
}
_ALIASES = {"eu": "exact_retrain", "retrain": "exact_retrain", "exact": "exact_retrain",
            "cf": "finetune", "fine_tune": "finetune", "catastrophic_forgetting": "finetune",
            "ga": "gradient_ascent", "neggrad": "gradient_ascent", "badt": "bad_teacher"}


def get_unlearner(name: str, **kwargs) -> Unlearner:
    """Instantiate an unlearning method by registry name (or alias), forwarding ``kwargs``.

    Names: ``exact_retrain`` (eu, retrain), ``finetune`` (cf), ``gradient_ascent`` (ga, neggrad), ``ssd``,
    ``scrub``, ``bad_teacher`` (badt). Raises ValueError for unknown names.
    """
    return lookup(name, UNLEARNERS, _ALIASES, "unlearning method")(**kwargs)


__all__ = ["BadTeacher", "ExactRetrain", "FineTune", "GradientAscent", "IndexSubset", "SCRUB", "SSD", "UNLEARNERS",
           "Unlearner", "bad_teacher_loss", "get_unlearner", "kd_loss", "parameter_importance"]
