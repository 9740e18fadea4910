"""The command line: argument parsing, clear errors (exit status 2, a message naming the argument), and
`deltainf detect` end to end on a checkpoint it did not train."""
import json

import numpy as np
import pytest
import torch

import file_damage
from deltainf import cli
from deltainf.data import load_digits_dataset
from deltainf.train import TrainConfig, predict, save_checkpoint, train_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parser_defaults_and_options():
    args = cli.build_parser().parse_args(["demo"])
    assert args.attack == "badnet" and args.dataset == "digits" and args.points is None and args.combine is None
    args = cli.build_parser().parse_args(["demo", "--attack", "frequency", "--points", "3", "--combine", "majority",
                                          "--tolerance", "5", "--threshold", "auto"])
    assert (args.attack, args.points, args.combine, args.tolerance, args.threshold) == ("frequency", 3, "majority", 5,
                                                                                       "auto")
    assert cli.build_parser().parse_args(["demo", "--combine", "2"]).combine == 2
    args = cli.build_parser().parse_args(["detect", "--checkpoint", "m.safetensors", "--dataset", "digits",
                                          "--test-index", "4", "9", "--boundary", "coherence"])
    assert args.test_index == [4, 9] and args.boundary == "coherence"


def test_retrace_reaches_demo_and_detect(monkeypatch):
    from deltainf import stories

    seen = {}
    monkeypatch.setattr(stories, "demo", lambda **kw: seen.setdefault("demo", kw["retrace"]))
    monkeypatch.setattr(stories, "detect", lambda **kw: seen.setdefault("detect", kw["retrace"]))
    assert cli.main(["demo", "--retrace", "0", "--no-progress"]) == 0
    assert cli.main(["detect", "--dataset", "digits", "--test-index", "0", "--retrace", "4", "--no-progress"]) == 0
    assert seen == {"demo": 0, "detect": 4}
    assert cli.build_parser().parse_args(["demo"]).retrace is None  # the library's default


def test_demo_and_evaluate_take_an_image_size(monkeypatch, tmp_path, capsys):
    """An image folder of several image sizes needs a size; demo and evaluate had no --image-size to give one
    (their error asked for it)."""
    import deltainf.data
    from deltainf import stories

    asked = []

    def spec(dataset, **kwargs):
        asked.append(kwargs.get("size"))
        raise ValueError("read")

    monkeypatch.setattr(stories, "parse_dataset_spec", spec)
    monkeypatch.setattr(deltainf.data, "parse_dataset_spec", spec)
    for command in (["demo"], ["evaluate", "--attacks", "badnet", "--seeds", "1"]):
        assert cli.main(command + ["--image-size", "24", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert "--dataset: read" in capsys.readouterr().err
    assert asked == [24, 24]


def test_version(capsys):
    from deltainf.version import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"deltainf {__version__}\n"


@pytest.mark.parametrize("argv", [
    ["demo", "--attack", "blend"],
    ["demo", "--combine", "some"],
    ["demo", "--threshold", "low"],
    ["demo", "--fdr", "1.5"],
    ["demo", "--n-transforms", "0"],
    ["demo", "--boundary", "widest"],
    ["demo", "--retrace", "-1"],
    ["detect", "--dataset", "digits", "--retrace", "some"],
    ["detect", "--checkpoint", "m.safetensors"],  # --dataset is required
    ["detect", "--dataset", "digits", "--image-size", "4"],
    ["demo", "--seed", str(2 ** 32)],  # scikit-learn's split refused it after the argument checks
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and err.count("\n") == 1  # one line, as every other failure (not argparse's usage)


def test_errors_name_the_argument(tmp_path, capsys):
    assert cli.main(["detect", "--checkpoint", str(tmp_path / "none.safetensors"), "--dataset", "digits",
                     "--test-index", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint: checkpoint '" in err and "none.safetensors': no such file" in err
    assert cli.main(["demo", "--dataset", "cifar10:/no/such/folder", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "CIFAR root directory not found: '/no/such/folder'" in capsys.readouterr().err
    # the detector's settings are checked before anything is trained or fitted, naming the flag
    for extra, message in ((["--tolerance", "99", "--n-transforms", "5"], "--tolerance: "),
                           (["--points", "3", "--combine", "5"], "--combine: 5 must be between 1 and the number of "
                                                                  "affected points (3)"),
                           (["--threshold", "nan"], "--threshold: "),
                           (["--tolerance", "5", "--fdr", "0.05"], "--fdr: a fixed --tolerance decides without")):
        assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"] + extra) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()
    assert cli.main(["evaluate", "--attacks", "badnet,nope", "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    assert "error: --attacks: unknown attack ['nope']" in capsys.readouterr().err
    assert cli.main(["evaluate", "--detectors", "", "--unlearn", "", "--out", str(tmp_path / "ev")]) == 2
    assert "error: --detectors, --unlearn: nothing to evaluate" in capsys.readouterr().err
    for dataset in ("nope", "imagefolder:/no/such/folder"):
        assert cli.main(["evaluate", "--dataset", dataset, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("deltainf evaluate: error: --dataset: ") and err.count("\n") == 1, err
    # every command checks its --out before any work (output_folder, tests/test_files.py): a file there
    (tmp_path / "afile").write_text("x")
    for command in (["demo"], ["evaluate", "--attacks", "badnet", "--seeds", "1"],
                    ["detect", "--checkpoint", "m.safetensors", "--dataset", "digits", "--test-index", "0"]):
        assert cli.main(command + ["--out", str(tmp_path / "afile"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--out: '{tmp_path / 'afile'}' exists and is not a folder" in err and err.count("\n") == 1
    # a folder where the command writes one of its files: refused before any work, not a raw IsADirectoryError
    # when the results are written
    for command, taken in ((["demo"], "report.json"), (["evaluate", "--attacks", "badnet", "--seeds", "1"],
                                                         "results.json"),
                           (["detect", "--checkpoint", "m.safetensors", "--dataset", "digits", "--test-index", "0"],
                            "flagged.json")):
        out = tmp_path / f"taken-{command[0]}"
        (out / taken).mkdir(parents=True)
        assert cli.main(command + ["--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--out: '{out / taken}' is a folder, where the run writes its {taken}" in err, err
        assert err.count("\n") == 1
    # bench writes a file: a folder or a device there is refused before the benchmarks run (they ran for minutes,
    # then the write failed or replaced the device)
    for there, said in ((tmp_path, "is a folder, not a file"), ("/dev/null", "exists and is not a regular file")):
        assert cli.main(["bench", "--quick", "--out", str(there)]) == 2
        err = capsys.readouterr().err
        assert f"--out: '{there}' {said}" in err and err.count("\n") == 1 and "###" not in err


def test_detect_on_a_user_checkpoint(tmp_path, capsys):
    train = load_digits_dataset("train")
    model = train_model(train, TrainConfig.digits(epochs=2, progress=False))
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(model, ckpt, meta={"dataset": "digits"})
    out = tmp_path / "detect"
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5",
                     "--n-transforms", "6", "--out", str(out), "--no-progress"]) == 0
    flagged = json.loads((out / "flagged.json").read_text())["flagged"]
    report = json.loads((out / "report.json").read_text())
    assert all(0 <= i < len(train) for i in flagged)
    assert report["detection"]["n_points"] == 2 and report["detection"]["n_transforms"] == 6
    # the settings as used (the class count and the controls resolved), as the result holds them; they were the
    # detector's as configured (num_classes null, no controls)
    assert report["settings"] == report["detection"]["settings"] and report["settings"]["num_classes"] == 10
    assert (out / "ekfac.safetensors").exists()  # the fit is saved for reuse...
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5",
                     "--n-transforms", "6", "--factors", str(out / "ekfac.safetensors"),
                     "--out", str(tmp_path / "again"), "--no-progress"]) == 0  # ...and reused: the same flags
    assert json.loads((tmp_path / "again" / "flagged.json").read_text())["flagged"] == flagged
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    # a damaged factor file or checkpoint is refused, naming the flag and the file, before any work
    factors = tmp_path / "flipped-ekfac.safetensors"
    factors.write_bytes((out / "ekfac.safetensors").read_bytes())
    lam = next(k for k in file_damage.read(factors)[0] if k.endswith("/lam"))
    file_damage.flip_bit(factors, 8 * file_damage.tensor_start(factors, lam))  # a plausible value, but not the fit
    reuse = ["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5", "--n-transforms",
             "6", "--factors", str(factors), "--out", str(tmp_path / "flipped"), "--no-progress"]
    assert cli.main(reuse) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--factors: factor file '" in err and "its content does not match its recorded " \
        "hash" in err and not (tmp_path / "flipped").exists()
    assert cli.main(reuse + ["--no-verify"]) == 0  # the explicit opt-out, for huge files
    flipped_ckpt = tmp_path / "flipped-model.safetensors"
    flipped_ckpt.write_bytes(ckpt.read_bytes())
    file_damage.flip_bit(flipped_ckpt, 8 * file_damage.header_span(ckpt)[1] + 77)
    assert cli.main(["detect", "--checkpoint", str(flipped_ckpt), "--dataset", "digits", "--test-index", "0",
                     "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltainf detect: error: --checkpoint: checkpoint '") and "flipped-model.safetensors': " \
        "its content does not match its recorded hash" in err
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "100000",
                     "--out", str(out), "--no-progress"]) == 2
    assert "--test-index must be in [0, 360)" in capsys.readouterr().err
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--image-size", "32",
                     "--test-index", "0", "--out", str(out), "--no-progress"]) == 2
    assert "--image-size: the images are 32 px but the model was made for 16 px" in capsys.readouterr().err
    # a label the model does not predict is refused before the fit, naming the flag
    predicted = int(predict(model, load_digits_dataset("test").images[:1])[0])
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "--label",
                     str((predicted + 1) % 10), "--out", str(tmp_path / "label"), "--no-progress"]) == 2
    assert f"--label: the model predicts [{predicted}]" in capsys.readouterr().err
    assert not (tmp_path / "label").exists()
    # an interrupted run resumes from its saved fit only when it was fitted on the same data as this one
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "interrupted"}))
    capsys.readouterr()
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5",
                     "--n-transforms", "6", "--input-norm", "0:1", "--out", str(out)]) == 0
    assert "EK-FAC tracks" in capsys.readouterr().out  # refitted: another input normalisation than the saved fit's
    # ... and only with the same weights behind the same --checkpoint path (a file replaced since: refitted)
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "status": "failed"}))
    with torch.no_grad():
        next(model.parameters()).mul_(1.001)
    save_checkpoint(model, ckpt, meta={"dataset": "digits"})
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5",
                     "--n-transforms", "6", "--input-norm", "0:1", "--out", str(out)]) == 0
    assert "EK-FAC tracks" in capsys.readouterr().out
    # the folder's own files only: a user's files beside them, in passes/ too, stay; an empty --out is refused
    (out / "passes").mkdir()
    (out / "passes" / "notes.txt").write_text("mine")
    (out / "draft.txt").write_text("mine")
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0",
                     "--n-transforms", "6", "--out", str(out), "--no-progress"]) == 0
    assert (out / "passes" / "notes.txt").read_text() == "mine" and (out / "draft.txt").read_text() == "mine"
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0",
                     "--out", ""]) == 2
    assert "--out: expected a folder path, got ''" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# the user's own architecture and data


def write_image_folder(root, split, images, labels):
    """root/split/<label>/<index>.png (so the folder's order is label, then position)."""
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels.tolist())):
        folder = root / split / str(lab)
        folder.mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(folder / f"{i:05d}.png")


def folder_positions(labels):
    """Position in the image-folder dataset of each original index (folders sorted by label)."""
    order = sorted(range(len(labels)), key=lambda i: (str(int(labels[i])), i))
    pos = [0] * len(labels)
    for p, i in enumerate(order):
        pos[i] = p
    return pos


def test_an_attack_recipe_that_does_not_fit_the_classes_is_refused_first(tmp_path, capsys):
    """demo and evaluate on a 3-class image folder: BadNet's recipe (8 -> 5) failed after the clean model was
    trained, naming an internal parameter (target_class)."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        write_image_folder(tmp_path / "data", split, torch.rand(9, 3, 16, 16, generator=g), torch.arange(9) % 3)
    said = "--dataset: the badnet recipe poisons toward class 5 from class(es) 8, and the data have 3 classes"
    for command in (["demo"], ["evaluate", "--attacks", "badnet", "--seeds", "1"]):
        assert cli.main(command + ["--dataset", f"imagefolder:{tmp_path / 'data'}", "--out", str(tmp_path / "o"),
                                   "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and not list((tmp_path / "o").glob("**/*.safetensors"))


def test_detect_on_a_user_factory_and_an_image_folder(tmp_path, capsys):
    """`--model package.module:factory` + a safetensors state dict + an image folder of 16 px images: the data
    are read at their own size (not Imagenette's 160 px), which is said, since the model records no size, and the
    poisons are found."""
    from safetensors.torch import save_file

    from deltainf.attacks import DIGITS_BADNET, badnet_attack
    from deltainf.delta import pick_affected_points

    import user_models

    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    poison = badnet_attack(train, test, seed=0, **DIGITS_BADNET)
    write_image_folder(tmp_path / "data", "train", poison.train.images, poison.train.labels)
    write_image_folder(tmp_path / "data", "val", test.images, test.labels)
    model = user_models.train(user_models.plain_cnn(), poison.train.images, poison.train.labels, epochs=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    points = pick_affected_points(model, poison.triggered_test, poison.target_class, count=5)
    torch.save(points.x, tmp_path / "affected.pt")
    out = tmp_path / "out"
    assert cli.main(["detect", "--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "weights.safetensors"),
                     "--dataset", f"imagefolder:{tmp_path / 'data'}", "--affected", str(tmp_path / "affected.pt"),
                     "--out", str(out), "--no-progress"]) == 0
    assert "--image-size not given and the model records none: the images of --dataset are loaded at 16 px" in \
        capsys.readouterr().out
    result = json.loads((out / "flagged.json").read_text())
    pos = folder_positions(poison.train.labels)
    poisons = {pos[i] for i in poison.poison_indices.tolist()}
    flagged = set(result["flagged"])
    file_at = {pos[i]: f"train/{int(lab)}/{i:05d}.png" for i, lab in enumerate(poison.train.labels)}
    assert result["flagged_files"] == [file_at[p] for p in result["flagged"]]  # the flagged examples by file
    assert result["found"] and len(flagged & poisons) >= 0.9 * len(poisons)
    assert len(flagged - poisons) <= 0.05 * len(train)
    report = json.loads((out / "report.json").read_text())
    # the 5 affected inputs, then the group's members traced again with them (up to 10 points)
    traced = report["settings"].get("retraced", [])
    assert report["results"]["test_accuracy"] > 0.9 and report["detection"]["n_points"] == 5 + len(traced) <= 10
    assert set(traced) <= flagged


def test_detect_rerun_on_changed_data_starts_afresh(tmp_path, monkeypatch, capsys):
    """A run interrupted during its fit, then run again in the same --out after one training image changed: the
    earlier run's partitions were refused on every rerun ("computed on other data ... remove the folder"), naming
    checkpoint_dir; they belong to another run, which is not resumed, so they are cleared."""
    from safetensors.torch import save_file

    from deltainf.influence import _partitions

    import user_models

    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    write_image_folder(tmp_path / "data", "train", train.images, train.labels)
    write_image_folder(tmp_path / "data", "val", test.images, test.labels)
    model = user_models.train(user_models.plain_cnn(), train.images, train.labels, epochs=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    argv = ["detect", "--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "w.safetensors"),
            "--dataset", f"imagefolder:{tmp_path / 'data'}", "--image-size", "16", "--test-index", "0",
            "--n-transforms", "6", "--partition-size", "400", "--out", str(tmp_path / "out"), "--no-progress"]
    save = _partitions.PartitionStore.save
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(self, *args, **kwargs)

    monkeypatch.setattr(_partitions.PartitionStore, "save", interrupted)
    assert cli.main(argv) == 130
    monkeypatch.setattr(_partitions.PartitionStore, "save", save)
    assert any(p.name.startswith("covariance-") for p in (tmp_path / "out" / "passes").iterdir())
    first = sorted((tmp_path / "data" / "train" / "0").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (16, 16), (255, 255, 255)).save(first)
    capsys.readouterr()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert not (tmp_path / "out" / "passes").exists()


def test_detect_into_a_finished_run_folder(tmp_path, monkeypatch, caplog):
    """A second run into the --out of a finished one: said (its results are replaced), and the earlier run's saved
    fit is not this run's. Killed before its own fit was saved, the rerun of the second command resumed from the
    first run's fit (same weights, other data: fitted on another input normalisation) without a word."""
    import logging

    from deltainf import EKFAC, DeltaInfluence

    train = load_digits_dataset("train")
    model = train_model(train, TrainConfig.digits(epochs=2, progress=False))
    save_checkpoint(model, tmp_path / "m.safetensors", meta={"dataset": "digits"})
    out = tmp_path / "out"
    argv = ["detect", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "digits", "--test-index", "0",
            "--n-transforms", "4", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    first_fit = (out / "ekfac.safetensors").read_bytes()
    fit = EKFAC.fit

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(EKFAC, "fit", killed)
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(argv + ["--input-norm", "0:1"]) == 130
    assert f"--out {str(out)!r}: replacing the finished detect run" in caplog.text
    assert not (out / "ekfac.safetensors").exists()  # the first run's fit belongs to other data
    # the first run's results were left beside the stopped run's run.json, read as the second's
    assert not {"flagged.json", "report.json", "report.png"} & {p.name for p in out.iterdir()}
    monkeypatch.setattr(EKFAC, "fit", fit)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(argv + ["--input-norm", "0:1"]) == 0
    assert "resuming" not in caplog.text and "replacing" not in caplog.text  # an interrupted run is resumed
    assert (out / "ekfac.safetensors").read_bytes() != first_fit
    # the earlier fit passed as --factors into the folder it lives in is read, not removed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(argv + ["--input-norm", "0:1", "--factors", str(out / "ekfac.safetensors")]) == 0
    assert "replacing the finished detect run" in caplog.text and (out / "ekfac.safetensors").exists()
    # stopped after its fit was saved, the run resumes however its paths are spelled (./m.safetensors, from another
    # folder: it refitted without a word)
    monkeypatch.setattr(DeltaInfluence, "detect", killed)
    assert cli.main(argv) == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    respelled = ["m.safetensors" if a == str(tmp_path / "m.safetensors") else a for a in argv]
    assert respelled != argv
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(respelled) == 0
    assert "resuming the interrupted run" in caplog.text
    # a saved fit damaged on disk stopped every rerun ("does not match its recorded hash"): it is fitted again
    resumed = json.loads((out / "flagged.json").read_text())
    monkeypatch.setattr(DeltaInfluence, "detect", killed)
    assert cli.main(argv) == 130
    monkeypatch.undo()
    saved = bytearray((out / "ekfac.safetensors").read_bytes())
    saved[-5] ^= 0x10
    (out / "ekfac.safetensors").write_bytes(bytes(saved))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(argv) == 0
    assert "the saved fit" in caplog.text and "it is removed, and the fit redone" in caplog.text
    assert json.loads((out / "flagged.json").read_text())["flagged"] == resumed["flagged"]
    # a run's own checkpoint among the results it replaces (a demo's victim) is its input, not a result to remove
    victim = out / "victim.safetensors"
    victim.write_bytes((tmp_path / "m.safetensors").read_bytes())
    assert cli.main(argv[:2] + [str(victim)] + argv[3:]) == 0
    assert victim.is_file()


def test_detect_splits_digits_as_the_checkpoint_was_trained(tmp_path, caplog):
    """--seed 1 on a checkpoint trained on the seed-0 split: the held-out inputs stay those of seed 0 (they became
    292 of the model's own training images), and the rest follows --seed."""
    import logging

    train, test = load_digits_dataset("train", seed=0), load_digits_dataset("test", seed=0)
    model = train_model(train, TrainConfig.digits(epochs=2, progress=False))
    save_checkpoint(model, tmp_path / "m.safetensors", meta={"dataset": "digits", "seed": 0})
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(["detect", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "digits",
                         "--test-index", "0", "--n-transforms", "4", "--seed", "1", "--out", str(tmp_path / "o"),
                         "--no-progress"]) == 0
    assert "split as when the --checkpoint was trained (seed 0); --seed 1 seeds the rest" in caplog.text
    accuracy = float((predict(model, test.images) == test.labels).float().mean())
    assert json.loads((tmp_path / "o" / "report.json").read_text())["results"]["test_accuracy"] == accuracy
    assert "poisoned by" not in caplog.text
    # the demo's victim traced over the clean split, which holds none of its poisons: "no poison" without a word
    save_checkpoint(model, tmp_path / "v.safetensors", meta={"dataset": "digits", "seed": 0, "attack": "badnet"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltainf"):
        assert cli.main(["detect", "--checkpoint", str(tmp_path / "v.safetensors"), "--dataset", "digits",
                         "--test-index", "0", "--n-transforms", "4", "--out", str(tmp_path / "o2"),
                         "--no-progress"]) == 0
    assert ("--checkpoint: the model was trained on digits poisoned by badnet (deltainf demo); --dataset digits is "
            "the clean training set, which holds none of its poisons") in caplog.text


def test_detect_on_an_exported_program(tmp_path, capsys):
    """A torch.export file: its linear and convolution calls become layers EK-FAC can hook."""
    import user_models

    train = load_digits_dataset("train")
    model = user_models.train(user_models.plain_cnn(), train.images, train.labels, epochs=3).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (train.images[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    out = tmp_path / "out"
    assert cli.main(["detect", "--model", str(tmp_path / "model.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--n-transforms", "6", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["ekfac_coverage"]["tracked_params"] == sum(p.numel() for p in model.parameters())
    assert "verdict" in json.loads((out / "flagged.json").read_text())
    (tmp_path / "damaged.pt2").write_bytes((tmp_path / "model.pt2").read_bytes()[:4000])
    assert cli.main(["detect", "--model", str(tmp_path / "damaged.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err  # one line: torch's logged traceback of the file is not shown
    assert "--model: " in err and "is not a torch.export program file" in err and err.count("\n") == 1, err
    static = torch.export.export(model, (train.images[:2],))  # a fixed batch of 2
    torch.export.save(static, tmp_path / "static.pt2")
    assert cli.main(["detect", "--model", str(tmp_path / "static.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--out", str(tmp_path / "o3"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltainf detect: error: --model: ") and "takes batches of exactly 2 examples" in err and \
        "export it with a dynamic batch dimension without an upper bound" in err, err
    # bounded at 64: passed the one-batch check, then failed inside the fit naming train_loader
    bounded = torch.export.export(model, (train.images[:2],), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    torch.export.save(bounded, tmp_path / "bounded.pt2")
    assert cli.main(["detect", "--model", str(tmp_path / "bounded.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--out", str(tmp_path / "o4"), "--no-progress"]) == 2
    assert "takes batches of at most 64 examples" in capsys.readouterr().err
    # exported in training mode, the program keeps dropout and batch statistics, whatever eval() is called later:
    # a run found a poison set of 67 with 16 poisons where the same model in eval mode found 24 of 24 in 28
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.Dropout(0.2), torch.nn.Linear(4 * 14 * 14, 10)).train()
    training = torch.export.export(with_bn, (train.images[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(training, tmp_path / "training.pt2")
    assert cli.main(["detect", "--model", str(tmp_path / "training.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--out", str(tmp_path / "o5"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--model: " in err and "was exported in training mode (batch_norm, dropout" in err and \
        "export model.eval()" in err, err
    four = user_models.plain_cnn(in_channels=4).eval()  # was blamed on --dataset ("channels must be 1 or 3")
    torch.export.save(torch.export.export(four, (torch.rand(2, 4, 16, 16),), dynamic_shapes=({0: batch},)),
                      tmp_path / "four.pt2")
    assert cli.main(["detect", "--model", str(tmp_path / "four.pt2"), "--dataset", "digits", "--test-index", "3",
                     "--out", str(tmp_path / "o6"), "--no-progress"]) == 2
    assert "--model: it takes images of 4 channels, and --dataset reads images with 1 or 3" in capsys.readouterr().err


def test_an_exported_same_padding_convolution_is_tracked(tmp_path):
    """torch.export writes a padding="same" convolution as aten.conv2d.padding: restored as an nn.Conv2d like the
    others (it was left out of EK-FAC without a word, and the flagged set differed from the module's)."""
    from deltainf.models.user import load_exported

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same"), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.rand(5, 3, 8, 8)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "same.pt2")
    restored = load_exported(tmp_path / "same.pt2")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in restored.modules()) == 1
    # a batch norm without running statistics uses batch statistics in eval mode too: not a training-mode export
    free = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
    torch.export.save(torch.export.export(free, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      tmp_path / "free.pt2")
    assert sum(isinstance(m, torch.nn.Linear) for m in load_exported(tmp_path / "free.pt2").modules()) == 1
    torch.testing.assert_close(restored(x), model(x))


def test_bad_user_inputs_name_the_flag(tmp_path, capsys):
    from safetensors.torch import save_file

    import user_models

    model = user_models.plain_cnn()
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    good = tmp_path / "w.safetensors"
    save_file(weights, good)
    nan = dict(weights)
    nan["0.weight"] = torch.full_like(nan["0.weight"], float("nan"))
    save_file(nan, tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04 corrupt")
    torch.save(torch.rand(3, 8, 8), tmp_path / "small.pt")
    (tmp_path / "afile").write_text("x")
    save_file({f"module.{k}": v for k, v in weights.items()}, tmp_path / "prefixed.safetensors")  # DataParallel's
    wide = user_models.plain_cnn(num_classes=12)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, tmp_path / "wide.safetensors")
    base = ["detect", "--dataset", "digits", "--no-progress"]
    cases = [
        (["--model", "no_such_module_xyz:f", "--checkpoint", str(good), "--test-index", "0"],
         "--model: cannot import module 'no_such_module_xyz'"),
        (["--model", "user_models:nope", "--checkpoint", str(good), "--test-index", "0"],
         "--model: module 'user_models' has no attribute 'nope'"),
        (["--model", "user_models", "--checkpoint", str(good), "--test-index", "0"], "--model: expected 'package.module:factory'"),
        (["--model", "user_models:plain_cnn", "--test-index", "0"], "--checkpoint: required"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "nan.safetensors"), "--test-index", "0"],
         "--checkpoint: weight '0.weight' holds NaN or infinite values"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "junk.safetensors"), "--test-index", "0"],
         "--checkpoint: "),
        (["--model", "user_models:plain_cnn", "--model-kwargs", "{bad", "--checkpoint", str(good), "--test-index", "0"],
         "--model-kwargs: expected a JSON object"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "wide.safetensors"), "--test-index", "0"],
         "--checkpoint: "),
        (["--model", "user_models:plain_cnn", "--model-kwargs", '{"num_classes": 12}', "--checkpoint",
          str(tmp_path / "wide.safetensors"), "--test-index", "0"], "--dataset has 10 classes but the model gives 12"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(good), "--test-index", "0", "--out",
          str(tmp_path / "afile")], "--out: "),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(good), "--test-index", "0", "--input-norm", "0.5"],
         "--input-norm: expected 'MEAN[,MEAN...]:STD[,STD...]'"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(good), "--test-index", "0", "--image-size",
          "100000"], "--image-size: expected an int in [8, 8192], got 100000"),  # was a 39 TiB MemoryError
        (["--model", "user_models:plain_cnn_bfloat16", "--checkpoint", str(good), "--test-index", "0"],
         "--model: its parameters are bfloat16, where EK-FAC on the CPU needs float32 or float64"),
        (["--model", "user_models:plain_cnn_softmax", "--checkpoint", str(good), "--test-index", "0"],
         "--model must return logits, but returns probabilities for --dataset images"),
        (["--model", "user_models:plain_cnn_of_width", "--checkpoint", str(good), "--test-index", "0"],
         "(its arguments go in --model-kwargs as a JSON object)"),
        (["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "prefixed.safetensors"), "--test-index",
          "0"], "(its keys carry the prefix 'module.': save the unwrapped model's state_dict)"),
        # checked first, before the model and the data are loaded
        (["--model", "no_such_module_xyz:f", "--checkpoint", str(good)], "give exactly one of --affected FILE or "
                                                                          "--test-index I"),
        (["--model", "no_such_module_xyz:f", "--checkpoint", str(good), "--affected", str(tmp_path)],
         "--affected: a folder: "),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    # a model that does not fit the data is caught before any work: an untrained one is at chance level
    assert cli.main(base + ["--model", "user_models:plain_cnn", "--checkpoint", str(good), "--test-index", "0",
                            "--out", str(tmp_path / "o")]) == 2
    assert "--dataset: the model classifies only" in capsys.readouterr().err
    train = load_digits_dataset("train")
    trained = user_models.train(user_models.plain_cnn(), train.images, train.labels, epochs=3)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "t.safetensors")
    torch.save(train.images[:2] * 255, tmp_path / "scale255.pt")  # floats on a 0-255 scale: flagged 105 for 64
    torch.save(train.images[:0], tmp_path / "none.pt")  # failed after the fit, naming test_x
    np.save(tmp_path / "standardised.npy", ((train.images[:2] - 0.5) / 0.2).numpy())
    for affected, message in ((tmp_path / "junk.pt", "--affected: cannot read"),
                              (tmp_path / "standardised.npy", "but the --dataset images are in [0, 1]; pass the images "
                                                              "as they are before any normalisation"),
                              (tmp_path / "small.pt", "--affected: the images have shape (3, 8, 8)"),
                              (tmp_path / "scale255.pt", "but the --dataset images are in [0, 1] (0-255 values: "
                                                         "divide them by 255"),
                              (tmp_path / "none.pt", "none.pt' holds no image (shape (0, 3, 16, 16))")):
        assert cli.main(base + ["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "t.safetensors"),
                                "--affected", str(affected), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # a second run in an --out folder another run holds fails at once, naming --out (both wrote its files before)
    import subprocess
    import sys

    (tmp_path / "held").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(120)"),
        str(tmp_path / "held" / ".lock-rank0")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(base + ["--model", "user_models:plain_cnn", "--checkpoint", str(tmp_path / "t.safetensors"),
                                "--test-index", "0", "--out", str(tmp_path / "held")]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"--out {str(tmp_path / 'held')!r} is in use by another run (process 4242)" in err, err


def test_demo_and_evaluate_hold_their_out_folder_and_demo_starts_clean(tmp_path, monkeypatch, capsys):
    """Two demo or evaluate runs in one --out wrote each other's files (evaluate removed the other's temporaries as
    stale); a demo stopped over a finished one left its victim beside the earlier run's report."""
    import subprocess
    import sys

    from deltainf import stories

    held = tmp_path / "held"
    held.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(120)"),
        str(held / ".lock-rank0")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["demo"], ["evaluate", "--attacks", "badnet", "--seeds", "1"]):
            assert cli.main(command + ["--out", str(held), "--no-progress"]) == 2
            assert f"--out {str(held)!r} is in use by another run (process 4242)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("report.json", "report.png", "unlearned.safetensors", "flagged.json", "ekfac.safetensors",
                 "mine.txt"):  # a demo's, and a detect's
        (out / name).write_text("an earlier run's")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    (out / "passes").mkdir()
    (out / "passes" / "lambda-0123456789abcdef-000000.safetensors").write_text("a detect run's partition")
    monkeypatch.setattr(stories, "_demo_story", stopped)
    assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "run.json"]


def test_a_sigterm_pending_under_the_parents_mask_is_answered(monkeypatch):
    """A SIGTERM that arrived while the parent blocked it is delivered when the command unblocks it: that happened
    before main's error boundary, and the signal escaped main as a traceback, the handler left installed."""
    import signal
    import threading

    was = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # pending on this thread (others may not block it)
        monkeypatch.setattr(cli, "_command", lambda args: cli.EXIT_OK)
        assert cli.main(["demo"]) == cli.EXIT_TERMINATED
        assert signal.getsignal(signal.SIGTERM) == handler
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the parent's mask, as it was
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, was)


def test_a_sigterm_whose_exception_python_ignored_still_stops_the_run(monkeypatch):
    """The handler's exception, raised inside a weakref callback of the import system (whose exceptions Python
    ignores: "Exception ignored in: <function _get_module_lock.<locals>.cb>"), was lost, and the demo went on to its
    end with exit 0 (seen in the test below). The signal is sent again from outside such code."""
    import time
    import weakref

    class Held:
        pass

    def command(args):
        held = Held()
        watch = weakref.ref(held, lambda ref: cli._on_sigterm(None, None))  # the handler, in an ignored callback
        del held
        assert watch() is None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the run going on
            time.sleep(0.01)
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "_command", command)
    assert cli.main(["demo"]) == cli.EXIT_TERMINATED


def test_a_sigterm_that_a_library_swallowed_still_stops_the_run(monkeypatch):
    """A handler's exception caught and dropped where it was raised (a library's catch-all, or C code that
    clears the error) left the run going on to its end, exit 0 and no word: seen once in three full test runs
    under load (the test below, its parent blocking SIGTERM). The signal comes again until the command answers."""
    import signal
    import time

    ends = []

    def command(args):
        try:
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, its exception dropped
        except BaseException:  # noqa: BLE001 - the library that swallows it
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the run going on
            time.sleep(0.01)
        ends.append("the run's end")
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "_command", command)
    started = time.monotonic()
    assert cli.main(["demo"]) == cli.EXIT_TERMINATED and not ends
    assert time.monotonic() - started < 5
    time.sleep(1)  # no signal sent after the answer: the default action would have killed pytest


def test_a_second_sigterm_lets_the_stop_finish():
    """The signal sent again (or by the user twice) while the run already stops for the first one is not raised
    inside its cleanup (an except or finally block handling the first, or an error raised there)."""
    try:
        raise cli._Terminated()
    except KeyboardInterrupt:
        assert cli._on_sigterm(None, None) is None
        try:
            raise OSError("a cleanup step failed")
        except OSError:
            assert cli._on_sigterm(None, None) is None
    with pytest.raises(cli._Terminated):
        cli._on_sigterm(None, None)


@pytest.mark.parametrize("blocked_by_parent", [False, True])
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, blocked_by_parent):
    """SIGTERM (a scheduler's stop) ended the run with no word, its folder still marked running. A parent that
    blocks SIGTERM (a job runner did, in CI) passes the blocked mask on: the run went on to its end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    run = subprocess.Popen([sys.executable, "-m", "deltainf", "demo", "--out", str(out), "--no-progress"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
                           if blocked_by_parent else None)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.json").exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 143 and err.strip().endswith("deltainf demo: terminated"), err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_a_factory_that_builds_on_the_meta_device(tmp_path, recwarn):
    """A factory that builds without memory (torch.device("meta"), as for large models) gets the checkpoint's
    weights: load_state_dict into meta tensors copied nothing (with a warning per tensor) and the run failed on
    the first forward pass."""
    from safetensors.torch import save_file

    from deltainf import stories

    import user_models

    model = user_models.plain_cnn()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    built, _ = stories._user_model("user_models:plain_cnn_on_meta", None, str(tmp_path / "w.safetensors"))
    assert built.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(built.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(built(x), model.eval()(x)) and not [w for w in recwarn if "meta" in str(w.message)]


def test_quiet_verbose_and_tqdm_disable(monkeypatch, capsys):
    from deltainf._util import log, progress_bar

    args = cli.build_parser().parse_args(["demo", "--quiet"])
    assert args.quiet and not args.verbose
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--quiet", "--verbose"])
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3), True).disable
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_bar(range(3), True).disable and progress_bar(range(3), False).disable
    from deltainf._util import log_to_console
    import logging

    log_to_console(logging.WARNING)
    log.info("hidden")
    log.warning("shown")
    out = capsys.readouterr().out
    assert "shown" in out and "hidden" not in out
    log_to_console(logging.INFO)


# --------------------------------------------------------------------------------------------------------
# the error boundary


@pytest.mark.parametrize("error, code, line", [
    (ValueError("--points: expected 3\nmore detail"), 2, "deltainf demo: error: --points: expected 3"),
    (FileNotFoundError("no such file: 'x'"), 2, "deltainf demo: error: no such file: 'x'"),
    (RuntimeError("kernel failed\ndetails"), 1,
     "deltainf demo: error: RuntimeError: kernel failed (--debug shows the traceback)"),
    (KeyError("lam"), 1, "deltainf demo: error: KeyError: 'lam' (--debug shows the traceback)"),
    (FloatingPointError("non-finite loss"), 1,
     "deltainf demo: error: FloatingPointError: non-finite loss (--debug shows the traceback)"),
    (KeyboardInterrupt(), 130, "deltainf demo: interrupted"),
])
def test_every_failure_is_one_line_and_an_exit_status(monkeypatch, capsys, error, code, line):
    """2 for bad input, 1 for a failure inside the run, 130 for Ctrl-C; one line on stderr each."""
    from deltainf import stories

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(stories, "demo", fail)
    assert cli.main(["demo", "--no-progress"]) == code
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("argv", [["--debug", "demo", "--no-progress"], ["demo", "--debug", "--no-progress"]])
def test_debug_shows_the_traceback(monkeypatch, capsys, argv):
    from deltainf import stories

    def fail(**kwargs):
        raise RuntimeError("deep inside")

    monkeypatch.setattr(stories, "demo", fail)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "in fail" in err
    assert err.rstrip().endswith("deltainf demo: error: RuntimeError: deep inside")
    assert cli.build_parser().parse_args(argv).debug and not cli.build_parser().parse_args(["demo"]).debug


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_error_every_rank_raised_is_reported_by_rank_0_alone(monkeypatch, capsys, rank, printed):
    """Under torchrun an error gathered from one rank is raised on every rank: rank 0 prints it, once for the
    run; an error of one rank alone is printed where it happened."""
    from deltainf import _dist, stories

    def fail_together(**kwargs):
        _dist.raise_any([None, ("OSError", "partition 3 unreadable")], None)

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(stories, "demo", fail_together)
    assert cli.main(["demo", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("deltainf demo: error: OSError: rank 1: partition 3 unreadable (--debug shows the traceback)\n"
                   if printed else "")

    def fail_alone(**kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stories, "demo", fail_alone)
    assert cli.main(["demo", "--no-progress"]) == 1
    assert "disk full" in capsys.readouterr().err


def test_detect_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m deltainf detect ...` (gloo): the passes are shared between the ranks,
    rank 0 writes the results, and they are those of one process."""
    import os
    import subprocess
    import sys

    train = load_digits_dataset("train")
    model = train_model(train, TrainConfig.digits(epochs=2, progress=False))
    save_checkpoint(model, tmp_path / "model.safetensors", meta={"dataset": "digits"})
    args = ["detect", "--checkpoint", str(tmp_path / "model.safetensors"), "--dataset", "digits", "--test-index",
            "0", "5", "--n-transforms", "6", "--partition-size", "500", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "deltainf", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "flagged.json").read_text())
    two = json.loads((tmp_path / "two" / "flagged.json").read_text())
    assert two == one
    # the same factors bit for bit (safetensors orders its header differently from one process to the next)
    from safetensors import safe_open

    files = [safe_open(str(tmp_path / run / "ekfac.safetensors"), "pt") for run in ("one", "two")]
    assert files[0].metadata() == files[1].metadata()
    assert set(files[0].keys()) == set(files[1].keys())
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "run.json").read_text())["status"] == "complete"


def test_an_image_size_the_model_was_not_made_for_is_refused_before_the_data_are_read(tmp_path, monkeypatch,
                                                                                           capsys):
    """The whole image folder was decoded before --image-size was checked against the model's recorded size."""
    from deltainf import stories

    model = train_model(load_digits_dataset("train"), TrainConfig.digits(epochs=1, progress=False))
    save_checkpoint(model, tmp_path / "m.safetensors", meta={"dataset": "digits"})
    monkeypatch.setattr(stories, "parse_dataset_spec", lambda *a, **k: pytest.fail("the data were read first"))
    assert cli.main(["detect", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", "digits",
                     "--image-size", "12", "--test-index", "0", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--image-size: the images are 12 px but the model was made for 16 px" in capsys.readouterr().err


def test_ranks_given_another_out_or_setting_stop_together(tmp_path):
    """Under torchrun rank 0 writes the results: another --out or --fdr on rank 1 was ignored without a word."""
    import os
    import subprocess
    import sys

    train = load_digits_dataset("train")
    model = train_model(train, TrainConfig.digits(epochs=1, progress=False))
    save_checkpoint(model, tmp_path / "model.safetensors", meta={"dataset": "digits"})
    script = tmp_path / "per_rank.py"
    script.write_text(
        "import os, sys\nfrom deltainf import cli\n"
        "rank1 = os.environ['RANK'] == '1'\n"
        "extra = {'out': ['--out', sys.argv[2] + ('-rank1' if rank1 else '')],\n"
        "         'fdr': ['--out', sys.argv[2]] + (['--fdr', '0.1'] if rank1 else [])}[sys.argv[1]]\n"
        f"sys.exit(cli.main(['detect', '--checkpoint', {str(tmp_path / 'model.safetensors')!r}, '--dataset', 'digits', "
        "'--test-index', '0', '--n-transforms', '4', '--no-progress', *extra]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for differs, named in (("out", "--out"), ("fdr", "fdr")):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(script), differs, str(tmp_path / differs)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode != 0, done.stderr[-2000:]
        assert f"{named}: under torchrun every rank must" in done.stderr and "(rank 1 differs from rank 0)" in \
            done.stderr, done.stderr[-2000:]
        assert not (tmp_path / differs / "flagged.json").exists()


def test_demo_says_which_flags_gave_an_attack_that_did_not_take(tmp_path, capsys, monkeypatch):
    """A victim that did not learn the backdoor (--dataset synthetic:10) ended in the library's message, which names
    no flag."""
    import deltainf.delta

    def none_taken(*args, **kwargs):
        raise ValueError("the model classifies none of the 3 triggered test inputs as target 5")

    monkeypatch.setattr(deltainf.delta, "pick_affected_points", none_taken)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --attack badnet: it did not take on --dataset digits (poison success " in err
    assert err.count("\n") == 1


def test_warnings_are_one_line_of_the_command(monkeypatch, capsys):
    """A library warning reached the console as Python prints it: its source file, line and code line."""
    import warnings

    from deltainf import stories

    monkeypatch.setattr(stories, "demo", lambda **kwargs: warnings.warn("controls: something to know", stacklevel=2))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["demo"]) == 0
    assert capsys.readouterr().err == "deltainf demo: warning: controls: something to know\n"


def test_demo_combine_checked_against_the_points_found(tmp_path, capsys, monkeypatch):
    """--combine passes the check against --points, but the victim sends only two triggered inputs to the target:
    the error names --combine before the EK-FAC fit, not a DeltaInfluence parameter after it."""
    import deltainf.delta
    from deltainf.influence import EKFAC

    real = deltainf.delta.pick_affected_points
    monkeypatch.setattr(deltainf.delta, "pick_affected_points", lambda *a, **k: real(*a, **{**k, "count": 2}))
    monkeypatch.setattr(EKFAC, "fit", lambda *a, **k: pytest.fail("fitted before --combine was checked"))
    assert cli.main(["demo", "--points", "3", "--combine", "3", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "--combine: 3 is more than the 2 triggered test input(s) the victim sends to the target" in err
    assert err.count("\n") == 1
    # fewer points than --points asked for is said (the demo traced what there was without a word)
    assert "--points 3: the victim sends 2 triggered test input(s) to the target; tracing those" in captured.out
