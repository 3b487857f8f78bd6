"""Host syncs per engine step are bounded by a constant: one step of every family, at 1 and 4
rows and at its tiny depth and twice it, reads back from the device the same (one transfer of
the step's decisions), and copies to it no more with depth or rows; rows reading cached
prompt blocks in place (cascade attention) read back no more than rows that read none.

What `count_syncs` counts: every operation that, on a CUDA device, makes the host wait for the
device (each such wait stalls the launch queue, so on a GPU its cost is a whole pipeline drain):
- device -> host reads, caught as Python calls (torch function mode, since on a CPU tensor
  several never reach the dispatcher): `Tensor.tolist`, `item`, `cpu`, `numpy`, `__array__`,
  `__bool__`, `__int__`, `__float__`, `__index__`, `__complex__`, `__contains__`;
- aten operators whose output shape or value the host must read (torch dispatch mode):
  `_local_scalar_dense` (a scalar read not made by the calls above), `nonzero`,
  `masked_select`, `unique*`, `bincount`, `is_nonzero`, `equal`, `allclose`,
  `repeat_interleave.Tensor` without `output_size`, and `index` / `index_put` with a boolean
  index (the mask becomes `nonzero` inside);
- host -> device copies of Python data (`torch.tensor` / `torch.as_tensor` from lists and
  scalars): an unpinned copy is made synchronous by torch (`memcpy_and_sync`). Counted apart
  as `h2d:`, since on this CPU-only machine the tensors never leave the host.
A read nested inside a counted call (`__bool__` reading `_local_scalar_dense`) counts once.
Not seen: indexing by a Python list (its index tensor is made and copied in C++).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.family import family_for_config
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig
from marble.scheduler.served_model import load_defaults
from tests.conftest import REFERENCE

aten = torch.ops.aten

HOST_READS = {
    "tolist",
    "item",
    "cpu",
    "numpy",
    "__array__",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "__contains__",
}
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero.out,
    aten.masked_select.default,
    aten.bincount.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
}
INDEXING_OPS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
H2D = "h2d:tensor"


class _State:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.inside = 0  # > 0 while a counted host read runs


class _Reads(TorchFunctionMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.state.events[name] += 1
            self.state.inside += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.state.inside -= 1
        if name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor):
            self.state.events[H2D] += 1
        return func(*args, **kwargs)


def _bool_index(indices: list) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices
    )


class _Ops(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self.state.inside:
            name = func.overloadpacket.__name__
            if func in SYNCING_OPS:
                self.state.events[name] += 1
            elif func in INDEXING_OPS and _bool_index(list(args[1])):
                self.state.events[f"{name}[bool]"] += 1
            elif func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self.state.events[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_syncs() -> Iterator[Counter[str]]:
    """The host syncs (see the module docstring) made inside the block, by operation."""
    state = _State()
    with _Reads(state), _Ops(state):
        yield state.events


def test_the_counter_counts_each_syncing_operation_once_and_device_work_not_at_all():
    x = torch.arange(6)
    with count_syncs() as device_only:
        y = (x * 2).masked_fill(x > 3, 0).argsort()
        torch.repeat_interleave(x, x, output_size=15)
        y[torch.tensor([1, 2])] = 0  # one H2D, an integer index: no read
    assert device_only == Counter({H2D: 1})
    with count_syncs() as reads:
        x.tolist()
        x[0].item()
        bool((x > 2).any())
        int(x.max())
        x[x > 2]
        x.nonzero()
        torch.repeat_interleave(x, x)
        assert 3 in x
    assert set(reads) == {
        "tolist",
        "item",
        "__bool__",
        "__int__",
        "index[bool]",
        "nonzero",
        "repeat_interleave",
        "__contains__",
    }
    assert all(n == 1 for n in reads.values())


# A setting per family that reaches its step's branches: sampled draws, top-k/top-p, the
# family's commit rules (verify, editing, entropy confidence, greedy refinement).
CASES = {
    "llada": (
        "llada-tiny",
        dict(
            max_tokens=32,
            block_length=8,
            steps=32,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            cache="dual",
            verify_threshold=0.3,
            seed=1,
        ),
    ),
    "dream": (
        "dream-tiny",
        dict(
            max_tokens=32,
            block_length=8,
            steps=32,
            temperature=0.7,
            top_p=0.9,
            remasking="entropy",
            cache="prefix",
            seed=1,
        ),
    ),
    "llada2": (
        "llada2-tiny",
        dict(
            max_tokens=32,
            block_length=8,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            threshold=0.95,
            editing_threshold=0.5,
            seed=1,
        ),
    ),
    "sdar": (
        "sdar-tiny",
        dict(max_tokens=32, block_length=8, steps=8, temperature=0.7, top_k=40, top_p=0.9, seed=1),
    ),
    "diffusion_gemma": ("diffusiongemma-tiny", dict(max_tokens=32, steps=8, seed=1)),
    "diffusion_gemma_greedy": (
        "diffusiongemma-tiny",
        dict(max_tokens=32, steps=8, temperature=0.0, seed=1),
    ),
}
WARM_UP = 2  # steps before the counted one: past the first forward, into cached steps
MAX_READS = 1  # one step's decisions for the whole batch come back in one transfer


def _engine(folder: Path, deeper: bool) -> Engine:
    family = family_for_config(json.loads((folder / "config.json").read_text()))
    model = family.load(folder, "cpu", torch.float32, False)
    if deeper:  # twice the layers: copies of its own, so the step takes the same path
        model.layers.extend([copy.deepcopy(layer) for layer in model.layers])
    tokenizer = TextTokenizer(folder)
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=16, max_batch_tokens=1 << 20))
    engine.first.defaults = load_defaults(folder, family)
    return engine


# A prompt head of 64 tokens: whole blocks of every block-causal case, two pages of
# DiffusionGemma's prefix cache.
SHARED_HEAD = list(range(40, 104))


def step_syncs(family: str, rows: int, deeper: bool, shared: bool = False) -> Counter[str]:
    """The host syncs of one engine step of `rows` like requests, after the warm-up;
    `shared`: their prompts start with SHARED_HEAD, which the prefix cache holds, read in
    place beside their slots."""
    folder, fields = CASES[family]
    path = REFERENCE / folder
    if not path.exists():
        pytest.skip(f"reference data {path} is absent")
    engine = _engine(path, deeper)
    params = SamplingParams.from_dict({**engine.served().defaults.to_dict(), **fields})
    head = SHARED_HEAD if shared else []
    if shared:
        engine.add(engine.make_request(head + [5, 6, 7], params))
        while engine.has_unfinished():
            engine.step()
    for i in range(rows):
        engine.add(engine.make_request(head + list(range(10 + i, 22 + i)), params))
    for _ in range(WARM_UP):
        engine.step()
    with count_syncs() as events:
        outputs = engine.step()
    assert len(outputs) == rows and not any(o.finished for o in outputs)
    return events


def _reads(events: Counter[str]) -> Counter[str]:
    return Counter({op: n for op, n in events.items() if op != H2D})


@pytest.mark.parametrize("family", list(CASES))
def test_host_syncs_per_step_do_not_grow_with_rows_or_depth(family: str):
    """Reads back from the device: the same at 1 and 4 rows, at 1x and 2x depth, and at
    most MAX_READS (the step's one transfer of its decisions). Host-to-device copies: the
    same at 1x and 2x depth and at 2 and 4 rows (a row alone skips the stacking of cached
    rows, so 1 row may take a different, fixed set)."""
    counts = {
        (rows, deeper): step_syncs(family, rows, deeper)
        for rows, deeper in ((1, False), (4, False), (1, True), (4, True), (2, False))
    }
    where = {key: f"{key[0]} rows, {'2x' if key[1] else '1x'} depth" for key in counts}
    base = _reads(counts[(1, False)])
    for key, events in counts.items():
        assert _reads(events) == base, (
            f"{family}: reads back differ ({where[key]} against 1 row, 1x): "
            f"{dict(_reads(events))} against {dict(base)}"
        )
    assert sum(base.values()) <= MAX_READS, f"{family}: more than one read: {dict(base)}"
    h2d = {key: events[H2D] for key, events in counts.items()}
    assert h2d[(1, True)] == h2d[(1, False)] and h2d[(4, True)] == h2d[(4, False)], (
        f"{family}: host-to-device copies grow with depth: {h2d}"
    )
    assert h2d[(2, False)] == h2d[(4, False)], f"{family}: copies grow with rows: {h2d}"


@pytest.mark.parametrize("family", ["llada2", "sdar", "diffusion_gemma"])
def test_reading_shared_prompt_blocks_in_place_adds_no_host_sync(family: str):
    """Rows that read cached prompt blocks beside their slots read back from the device what
    rows that read none do, and copy to it no more with depth or rows."""
    counts = {
        (rows, deeper): step_syncs(family, rows, deeper, shared=True)
        for rows, deeper in ((1, False), (1, True), (2, False), (4, False))
    }
    base = _reads(step_syncs(family, 1, False))
    assert all(_reads(events) == base for events in counts.values()), counts
    h2d = {key: events[H2D] for key, events in counts.items()}
    assert h2d[(1, True)] == h2d[(1, False)] and h2d[(2, False)] == h2d[(4, False)], h2d
