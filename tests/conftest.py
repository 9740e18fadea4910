"""Shared fixtures for the kernel tests.

Nothing here touches CUDA at import time: whether a GPU and the CUDA kernels exist is decided when a
test is set up, so importing the suite on a CPU-only box (or under `-m "not cuda"`) never initialises
CUDA. Tests that need a GPU carry the `cuda` marker (declared in pyproject.toml) and are skipped
without one; the `device` fixture marks its CUDA parameters with it automatically.
"""

from __future__ import annotations

import pytest
import torch

import deltainf


def cuda_available() -> bool:
    """A GPU is visible and the extension was built with its CUDA kernels."""
    return torch.cuda.is_available() and deltainf.has_cuda_kernels()


def available_devices() -> list[str]:
    """["cpu"], plus "cuda" with a GPU and CUDA kernels, plus "cuda:1" with two or more GPUs."""
    devices = ["cpu"]
    if cuda_available():
        devices.append("cuda")
        if torch.cuda.device_count() >= 2:
            devices.append("cuda:1")
    return devices


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Evaluated per test at setup, never at import or collection.
    if item.get_closest_marker("cuda") is not None and not cuda_available():
        pytest.skip("needs a CUDA GPU and deltainf built with CUDA kernels")


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """The devices this machine can run the kernels on."""
    return available_devices()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
        pytest.param("cuda:1", marks=pytest.mark.cuda),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """One device per test; CUDA parameters carry the `cuda` marker and skip where unavailable."""
    if request.param not in available_devices():
        pytest.skip(f"device {request.param} is not available")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-model training, restoring the setting afterwards.

    The models are tiny (a 16x16 digits epoch is ~0.2 s either way), but on a busy 2-core machine two
    OpenMP threads contending with other processes made a 3 s training take over 60 s. Modules opt
    in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The bundled digits, (train, test) with the default split: read once per test session (ImageDatasets
    are never modified in place, so sharing them is safe)."""
    from deltainf.data import load_digits_dataset

    return load_digits_dataset("train"), load_digits_dataset("test")


@pytest.fixture(scope="module")
def clean_model(digits, one_thread):
    """A SmallCNN trained on clean digits: the surrogate of the attacks that need one (6 epochs, ~98 %)."""
    from deltainf.train import TrainConfig, train_model

    return train_model(digits[0], TrainConfig.digits(epochs=6, progress=False))


@pytest.fixture
def disk_full_on_save(monkeypatch):
    """safetensors' ``save_file`` writes half a file and fails, as on a full disk: a save under test must
    leave the previous file intact and no temporary file behind."""
    import safetensors.torch as st

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", half_written)
