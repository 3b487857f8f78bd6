"""Shared fixtures: the tiny reference checkpoints that sit beside the repository
(`../shared/reference/`), located from the repository root, and the device the parity tests
build their models on (`--device`; `benchmarks/gpu.py` runs them with `--device cuda`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="where the parity tests (test_*parity.py) build their models and golden tensors, "
        "e.g. cuda: that device's kernels held to the goldens (default: cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--device")
    try:  # a device this machine lacks stops the run before any test
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError) as exc:
        raise pytest.UsageError(f"--device {name}: {exc}") from exc


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The parity tests' device (`--device`)."""
    return torch.device(request.config.getoption("--device"))


def _reference(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (expected ../shared beside the repo)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> None:
    # Golden data was recorded single-threaded; it also keeps tests predictable on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llada_dir() -> Path:
    """LLaDA-layout tiny checkpoint with a tokenizer and a chat template."""
    return _reference("llada-tiny")


@pytest.fixture(scope="session")
def llada_tiny_path(llada_dir: Path) -> Path:
    return llada_dir


@pytest.fixture(scope="session")
def dream_dir() -> Path:
    return _reference("dream-tiny")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _reference("golden")


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio only (the server's event loop)."""
    return "asyncio"
