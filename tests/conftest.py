"""Shared fixtures: the tiny reference checkpoints that sit beside the repository
(`../shared/reference/`), located from the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


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
