"""Shared fixtures: the reference checkpoints beside the repo and tiny engines built from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def reference_path(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (CI lays shared/ beside the repo)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> None:
    # Golden data was recorded single-threaded; it also keeps tests predictable on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llada_dir() -> Path:
    return reference_path("llada-tiny")


@pytest.fixture(scope="session")
def dream_dir() -> Path:
    return reference_path("dream-tiny")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return reference_path("golden")
