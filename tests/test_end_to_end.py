"""Δ-Influence end to end on the bundled digits, with the library's defaults: the BadNet story (the
README's main job) finds the poisons and retraining removes the backdoor; on a model trained on clean
data it flags few examples. The frequency-trigger story and more seeds are in docs/RESULTS.md (slow)."""
import json

import pytest

from deltainf import stories
from deltainf.data import load_digits_dataset, make_loader
from deltainf.delta import DEFAULT_N_POINTS, DeltaInfluence
from deltainf.influence import EKFAC
from deltainf.train import TrainConfig, predict, train_model

pytestmark = pytest.mark.usefixtures("one_thread")


def check_story(r):
    d = r["detection"]
    print(f"\n{r['attack']} seed {r['seed']}: flagged {d['flagged']}, recall {d['recall']:.4f}, FPR {d['fpr']:.4f}; "
          f"poison success {r['before']['poison_success']:.4f} -> {r['after_exact_unlearning']['poison_success']:.4f} "
          f"(clean model {r['clean_model']['poison_success']:.4f}); accuracy "
          f"{r['after_exact_unlearning']['clean_accuracy']:.4f} (clean model {r['clean_model']['clean_accuracy']:.4f})")
    assert r["before"]["poison_success"] >= 0.9  # the attack works
    assert d["recall"] >= 0.95 and d["fpr"] <= 0.05
    after, clean = r["after_exact_unlearning"], r["clean_model"]
    assert after["poison_success"] <= clean["poison_success"] + 0.02
    assert after["clean_accuracy"] >= clean["clean_accuracy"] - 0.02


def test_badnet_story_finds_and_removes_the_poisons(tmp_path):
    r = stories.demo(attack="badnet", out=tmp_path, seed=0, progress=False)
    assert len(r["affected_test_indices"]) == DEFAULT_N_POINTS
    check_story(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.png", "run.json",
                                                           "unlearned.safetensors", "victim.safetensors"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["status"], run["command"], run["seed"]) == ("complete", "demo", 0)


@pytest.mark.slow
@pytest.mark.parametrize("attack,seed", [
    ("badnet", 0), ("badnet", 1), ("badnet", 2), ("frequency", 0), ("frequency", 1), ("frequency", 2),
])
def test_story_three_seeds(tmp_path, attack, seed):
    check_story(stories.demo(attack=attack, out=tmp_path, seed=seed, progress=False))


def test_clean_model_answers_no_poison(capsys):
    """On a model trained without any poison, the test images it gets wrong (natural errors) are traced
    the same way: the answer must be 'no coherent poison set found'."""
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    model = train_model(train, TrainConfig.digits(seed=0, progress=False))
    pred = predict(model, test)
    wrong = (pred != test.labels).nonzero().flatten()[:DEFAULT_N_POINTS]
    assert wrong.numel() >= 1, "the clean model makes no test error to trace"
    loader = make_loader(train, batch_size=256, shuffle=False)
    ekfac = EKFAC(model, progress=False).fit(loader)
    res = DeltaInfluence(ekfac).detect(loader, test.images[wrong], pred[wrong], reference=test)
    with capsys.disabled():
        print(f"\nclean model: {wrong.numel()} misclassified test point(s) traced: {res.verdict}")
    assert not res.found and res.flagged.numel() == 0
