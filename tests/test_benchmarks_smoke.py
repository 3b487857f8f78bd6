"""Every benchmark README names still runs: each script once, at tiny sizes (tiny models, a few
tokens, one round), as README's reader would start it, exiting 0 and printing its figures. The
figures themselves are not checked (speed belongs to the scripts). Scripts that need what CI
lacks (a peer's virtualenv, schemathesis) are skipped with the reason."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from marble.model.default import CHECKPOINT_DIR

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
LLADA_TINY = str(REFERENCE / "llada-tiny")
PEER_PYTHON = os.environ.get("MARBLE_PEER_PYTHON")  # a venv's python with dlmserve installed


def _missing_reference() -> str | None:
    if not (REFERENCE / "llada-tiny").exists():
        return f"reference data {REFERENCE} is absent (expected ../shared beside the repo)"
    return None


def _missing_embedded() -> str | None:
    if not (CHECKPOINT_DIR / "config.json").exists():
        return "the embedded default model has no checkpoint"
    return _missing_reference()


# (case id, script, arguments, why it cannot run here or None)
CASES = [
    (
        "serve",
        "serve.py",
        ["--model", LLADA_TINY, "--clients", "1,2", "--requests-per-client", "1"]
        + ["--max-tokens", "8", "--steps", "4", "--block-length", "8", "--repeats", "1"]
        + ["--threads", "1", "--port", "0"],
        _missing_reference(),
    ),
    (
        "engine",
        "engine.py",
        ["--model", LLADA_TINY, "--max-tokens", "8", "--block-length", "8"]
        + ["--batch-sizes", "1,2", "--threads", "1"],
        _missing_reference(),
    ),
    (
        "cache",
        "cache.py",
        ["--models", "tiny", "--rules", "threshold", "--gens", "8", "--gens-long", "8"]
        + ["--batches", "1", "--threads", "1"],
        None,
    ),
    (
        "step_profile",
        "step_profile.py",
        ["--model", "tiny", "--batches", "1", "--gen", "8", "--steps", "2", "--threads", "1"],
        None,
    ),
    (
        "mixed_lengths",
        "mixed_lengths.py",
        ["--model", "tiny", "--repeats", "1", "--threads", "1"],
        None,
    ),
    (
        "remasking",
        "remasking.py",
        ["--prompts", "1", "--rounds", "1", "--max-tokens", "8", "--drafts", "0.5"]
        + ["--verify", "1.0", "--threads", "1"],
        _missing_embedded(),
    ),
    (
        "diffusion_gemma",
        "diffusion_gemma.py",
        ["--batches", "1", "--layers", "1", "--hidden", "64", "--vocab", "512", "--canvas", "16"]
        + ["--threads", "1"],
        None,
    ),
    (
        "prefix_cache",
        "prefix_cache.py",
        ["--requests", "3", "--system-tokens", "64", "--layers", "1", "--hidden", "64"]
        + ["--max-tokens", "8", "--block-length", "8", "--threads", "1"],
        _missing_reference(),
    ),
    (
        "gpu",
        "gpu.py",
        ["--smoke"],  # tiny widths on the CPU; the full run needs a GPU
        _missing_reference(),
    ),
    (
        "listeners",
        "listeners.py",
        ["--model", LLADA_TINY, "--listeners", "4", "--generations", "1", "--max-tokens", "8"]
        + ["--seconds", "1", "--health-calls", "10", "--torch-threads", "1"],
        _missing_reference(),
    ),
    (
        "peers",
        "peers.py",
        ["--peer-python", str(PEER_PYTHON), "--clients", "1", "--max-tokens", "8"]
        + ["--block-length", "8", "--repeats", "1"],
        None if PEER_PYTHON else "needs MARBLE_PEER_PYTHON: a venv's python with dlmserve",
    ),
    (
        "fuzz_api-hostile",
        "fuzz_api.py",
        ["--cases", "0", "--model", LLADA_TINY, "--max-wall", "5"],
        _missing_reference(),
    ),
    (
        "fuzz_api-generated",
        "fuzz_api.py",
        ["--cases", "5", "--model", LLADA_TINY, "--max-wall", "10"],
        _missing_reference()
        or (None if importlib.util.find_spec("schemathesis") else "needs schemathesis"),
    ),
    (
        "hostile_bodies",
        "hostile_bodies.py",
        ["--model", LLADA_TINY, "--rounds", "1"],
        _missing_reference(),
    ),
    (
        "idle_sockets",
        "idle_sockets.py",
        ["--model", LLADA_TINY, "--sockets", "50", "--seconds", "1", "--completions", "1"],
        _missing_reference(),
    ),
    (
        "fairness",
        "fairness.py",
        ["--repeats", "1", "--cap", "2"],
        _missing_reference(),
    ),
    (
        "cold_temperature",
        "cold_temperature.py",
        ["--temperatures", "1e-5", "--seeds", "1", "--max-tokens", "8"],
        _missing_reference(),
    ),
    (
        "stream_digest",
        "stream_digest.py",
        ["--out", "{tmp}", "--model", LLADA_TINY],
        _missing_reference(),
    ),
    (
        "kv_copies",
        "kv_copies.py",
        ["--batch", "2", "--prompt", "40", "--gen", "64", "--block", "16", "--layers", "2"]
        + ["--hidden", "64", "--heads", "4", "--warmup", "2", "--steps", "1", "--threads", "1"],
        _missing_reference(),
    ),
    ("experts", "experts.py", ["--tokens", "4", "--reps", "1", "--threads", "1"], None),
    (
        "compile",
        "compile.py",
        ["--backend", "aot_eager", "--models", "sdar-tiny", "--batch-sizes", "1"]
        + ["--max-tokens", "4", "--repeats", "1", "--threads", "1"],
        _missing_reference(),
    ),
    (
        "structured",
        "structured.py",
        ["--models", "embedded,llada2-tiny", "--groups", "Glaiveai2K,Github_trivial"]
        + ["--limit", "1", "--max-tokens", "64", "--batch", "2", "--threads", "1"],
        _missing_embedded(),
    ),
]


def test_every_benchmark_readme_names_is_smoked() -> None:
    named = set(re.findall(r"benchmarks/(\w+\.py)", (REPO / "README.md").read_text()))
    assert named, "README names no benchmark: the pattern above is stale"
    assert named <= {script for _, script, _, _ in CASES}


@pytest.mark.parametrize("script,args,skip", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_benchmark_runs_at_tiny_sizes(
    script: str, args: list[str], skip: str | None, tmp_path: Path
) -> None:
    if skip:
        pytest.skip(skip)
    argv = [a.replace("{tmp}", str(tmp_path / "out")) for a in args]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert re.search(r"\d", done.stdout), f"{script} printed no figures:\n{done.stdout[-2000:]}"
