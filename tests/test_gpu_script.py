"""`benchmarks/gpu.py` spends a scarce GPU machine's minutes: a shape that raises must not cost
the other shapes their figures, and a batch whose requests failed prints what failed instead of
figures; its compiled row (run last) reports the same way. Checked in its `--smoke` mode
(tiny widths, CPU). Its parity run passes `--device` to pytest and prints each failure, and
`gpu_machine.sh` runs it from a copy of the checkout without the server's packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

pytestmark = pytest.mark.skipif(
    not (REFERENCE / "sdar-tiny").exists(), reason=f"reference data {REFERENCE} is absent"
)


def _gpu(code: str) -> str:
    """`code` (Python, `gpu` the imported module) in a fresh interpreter at the repository
    root, since gpu.py imports its benchmark neighbours as top-level modules; returns stdout
    after checking it exited 0."""
    script = f"import sys\nsys.path.insert(0, {str(REPO / 'benchmarks')!r})\nimport gpu\n{code}"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _run(patch: str) -> str:
    """gpu.py's main on llada-8b then sdar-8b in --smoke, after `patch`."""
    argv = ["gpu.py", "--smoke", "--shapes", "llada-8b,sdar-8b", "--batches", "1", "--no-parity"]
    return _gpu(f"{patch}\nsys.argv = {argv!r}\ngpu.main()")


def _section(out: str, shape: str) -> str:
    return out.split(f"\n== {shape}")[1].split("\n== ")[0]


def test_a_shape_that_raises_leaves_the_next_shape_its_figures():
    out = _run(
        textwrap.dedent(
            """
            def broken(layers, smoke):
                raise RuntimeError("no kernel for this shape")
            gpu.SHAPES["llada-8b"].build = broken
            """
        )
    )
    failed = _section(out, "llada-8b")
    assert "failed: RuntimeError: no kernel for this shape" in failed
    assert "in broken" in failed  # where it was raised
    figures = _section(out, "sdar-8b")
    row = [line.split() for line in figures.splitlines() if line.split()[:1] == ["1"]]
    assert row and float(row[0][1]) > 0  # batch 1: tokens/s
    # The compiled row builds the first shape too: it says so, and the run still ends.
    assert "== --compile failed: RuntimeError: no kernel for this shape" in out
    assert "(the run took" in out


def test_a_batch_whose_requests_failed_says_so_instead_of_figures():
    # NaN weights: every step's logits are NaN, which the engine answers with an error.
    out = _run(
        textwrap.dedent(
            """
            real = gpu.init_random
            def nan_weights(model, seed):
                real(model, seed)
                for p in model.parameters():
                    p.data.fill_(float("nan"))
            gpu.init_random = nan_weights
            """
        )
    )
    for shape in ("llada-8b", "sdar-8b"):
        lines = [line for line in _section(out, shape).splitlines() if line.startswith("  1 ")]
        assert lines and "requests failed:" in lines[0], _section(out, shape)
    compiled = out.split("\n--compile")[1].splitlines()
    assert compiled[1].startswith("  B 1: ") and "requests failed:" in compiled[1], compiled


def _parity(device: str, tests: list[str]) -> str:
    return _gpu(f"gpu.run_parity({device!r}, 120, {tests!r})")


def test_the_parity_run_names_its_device_and_each_failure(tmp_path: Path):
    tests = ["tests/families/sdar/test_sdar_parity.py"]
    passed = _parity("cpu", tests).splitlines()
    assert passed[-2] == f"parity tests on cpu ({tests[0]}):"
    assert passed[-1].startswith("  exit 0: ") and " passed" in passed[-1]
    # A device this machine lacks reaches the tests, which refuse it: a usage error, printed.
    refused = _parity("bogus", tests)
    assert "exit 4" in refused and "--device bogus" in refused
    # A failure's line whole, however long: the tensor and its delta are the point.
    message = "dec1_sc hidden 3, the canvas after the prompt: max |delta| 1.00e-03 (rule 1e-4)"
    failing = tmp_path / "test_failing_parity.py"
    failing.write_text(
        f"def test_logits():\n    assert 1e-3 <= 1e-4, {message!r}\n\n"
        "def test_hidden():\n    pass\n"
    )
    out = _parity("cpu", ["tests/families/sdar/test_sdar_parity.py", str(failing)])
    assert "exit 1: " in out and "1 failed" in out
    assert f"::test_logits - AssertionError: {message}\n" in out


SERVER_PACKAGES = ("fastapi", "uvicorn", "sse_starlette", "starlette", "pydantic")


def test_the_machine_wrapper_runs_gpu_py_from_a_copy_without_the_servers_packages(tmp_path):
    """benchmarks/gpu_machine.sh on a copy of the checkout with no ../shared beside it, the
    server's packages refused at import (the GPU machine's image lacks them): it installs
    Marble from the copy, links the reference data given, and gpu.py runs."""
    checkout = tmp_path / "work" / "repo"
    checkout.mkdir(parents=True)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode:
        pytest.skip("copies the checkout's tracked files: needs a git checkout")
    tracked = listed.stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    refuse = tmp_path / "refuse"
    refuse.mkdir()
    (refuse / "sitecustomize.py").write_text(
        "import sys\n\n\nclass Refuse:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_PACKAGES!r}:\n"
        "            raise ImportError(f'not on the GPU machine: {name}')\n\n\n"
        "sys.meta_path.insert(0, Refuse())\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(refuse),
        "OUT": str(out),
    }
    args = ["--smoke", "--shapes", "sdar-8b", "--batches", "1", "--compile-layers", "0"]
    done = subprocess.run(
        ["bash", "benchmarks/gpu_machine.sh", str(REFERENCE), *args, "--no-parity"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "work" / "shared" / "reference").resolve() == REFERENCE.resolve()
    figures = _section(done.stdout, "sdar-8b")
    row = [line.split() for line in figures.splitlines() if line.split()[:1] == ["1"]]
    assert row and float(row[0][1]) > 0, done.stdout[-3000:]
    assert (out / "gpu.txt").read_text() in done.stdout


def test_diffusion_gemma_cut_to_any_depth_ends_with_a_full_attention_layer():
    """transformers forces a sliding last layer to full attention, so a depth whose last
    layer is sliding gives its model other tensors than Marble's (session 35 saw the side by
    side fail so at 2 layers); the real 30 layers keep their pattern."""
    out = _gpu(
        "import json\n"
        "depths = [gpu._gemma_raw(n, smoke=True) for n in range(1, 31)]\n"
        "depths.append(gpu._gemma_raw(30, smoke=False))\n"
        "print(json.dumps([raw['text_config']['layer_types'] for raw in depths]))"
    )
    *cut, real = json.loads(out)
    for layers, types in enumerate(cut, start=1):
        assert len(types) == layers and types[-1] == "full_attention", layers
        assert set(types[-6:-1]) <= {"sliding_attention"}, layers
    assert [i for i, t in enumerate(real) if t == "full_attention"] == [5, 11, 17, 23, 29]
