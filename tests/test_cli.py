"""The command line: argument parsing, clear errors (exit status 2, a message naming the argument), and
`deltainf detect` end to end on a checkpoint it did not train."""
import json

import pytest

from deltainf import cli
from deltainf.data import load_digits_dataset
from deltainf.train import TrainConfig, save_checkpoint, train_model

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
                                          "--test-index", "4", "9"])
    assert args.test_index == [4, 9]


@pytest.mark.parametrize("argv", [
    ["demo", "--attack", "blend"],
    ["demo", "--combine", "some"],
    ["demo", "--threshold", "low"],
    ["detect", "--dataset", "digits"],  # --checkpoint is required
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_errors_name_the_argument(tmp_path, capsys):
    assert cli.main(["detect", "--checkpoint", str(tmp_path / "none.safetensors"), "--dataset", "digits",
                     "--test-index", "0", "--out", str(tmp_path)]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    assert cli.main(["demo", "--dataset", "cifar10:/no/such/folder", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "CIFAR root directory not found: '/no/such/folder'" in capsys.readouterr().err


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
    assert (out / "ekfac.safetensors").exists()  # the fit is saved for reuse...
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "0", "5",
                     "--n-transforms", "6", "--factors", str(out / "ekfac.safetensors"),
                     "--out", str(tmp_path / "again"), "--no-progress"]) == 0  # ...and reused: the same flags
    assert json.loads((tmp_path / "again" / "flagged.json").read_text())["flagged"] == flagged
    assert cli.main(["detect", "--checkpoint", str(ckpt), "--dataset", "digits", "--test-index", "100000",
                     "--out", str(out), "--no-progress"]) == 2
    assert "--test-index must be in [0, 360)" in capsys.readouterr().err
