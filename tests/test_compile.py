"""The compiled decode step (`--compile`): each family's cached forward compiles with no graph
break (fullgraph=True raises on one), matches its eager forward at two bucket shapes, gives the
same greedy tokens through `Engine.step()`, and compiles at most once per padded bucket.

Backend "aot_eager": dynamo traces the same graph inductor would (a graph break fails the
same way) without inductor's C++ builds, which take minutes per graph on a 2-core runner.
Models are the reference tiny checkpoints (the embedded one for the masked family) cut to one
layer (an MoE one for LLaDA2; a sliding and a full one for DiffusionGemma): tracing time grows
with depth, and every graph here stays within a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from marble.families.diffusion_gemma.compiled import CompiledDecode
from marble.families.diffusion_gemma.runner import UniformRunner
from marble.families.masked.compiled import CompiledCached
from marble.families.masked.model import CachedPart
from marble.model.compiled_block_causal import CompiledSlots
from marble.model.compiled_forward import LENGTH_FLOOR, bucket, shape_bound
from marble.model.default import CHECKPOINT_DIR
from marble.model.kv_slots import SlotBatch, SlotGroups, SlotStore
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.family import family_for_config
from marble.scheduler.sampling_params import SamplingParams
from marble.server import cli
from marble.server.lifecycle import build_engine
from marble.server.settings import Settings

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
BACKEND = "aot_eager"
# Compiled against eager, float32: the largest difference measured here is 1.2e-5 (on
# DiffusionGemma's logits, up to 30 in size; padded shapes pick other CPU kernels); 5e-4
# leaves a margin of 40.
TOLERANCE = 5e-4
# Layers kept per family: (checkpoint, layer indices).
CUT = {
    "masked": (CHECKPOINT_DIR, [0]),
    "sdar": (REFERENCE / "sdar-tiny", [0]),
    "llada2": (REFERENCE / "llada2-tiny", [1]),  # an MoE layer
    "diffusion_gemma": (REFERENCE / "diffusiongemma-tiny", [1, 2]),  # sliding, full
}
PARAMS = {
    "masked": dict(max_tokens=16, block_length=8, steps=16, cache="dual"),
    "sdar": dict(max_tokens=12, block_length=4, steps=4),
    "llada2": dict(max_tokens=16, block_length=8, threshold=0.9),
    "diffusion_gemma": dict(max_tokens=16, block_length=16, steps=4),
}


def _cut(family: str, keep: list[int] | None = None) -> tuple[nn.Module, Path]:
    path, layers = CUT[family]
    keep = layers if keep is None else keep
    if not (path / "config.json").exists():
        pytest.skip(f"reference checkpoint {path} is absent")
    found = family_for_config(json.loads((path / "config.json").read_text()))
    model = found.load(path, "cpu", torch.float32, False)
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    return model.eval(), path


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _close(compiled: torch.Tensor, eager: torch.Tensor) -> None:
    assert compiled.shape == eager.shape
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, atol=TOLERANCE, rtol=TOLERANCE)


def test_buckets_are_powers_of_two_and_bounded() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, LENGTH_FLOOR) == LENGTH_FLOOR and bucket(17, LENGTH_FLOOR) == 32
    # Batch 1..16: 5 buckets; lengths 16..256: 5 buckets each.
    assert shape_bound(16, (256,)) == 25
    assert shape_bound(16, (256, 256), variants=2) == 250


@torch.inference_mode()
def test_masked_cached_forward_matches_eager() -> None:
    model, _ = _cut("masked")
    compiled = CompiledCached(model, BACKEND)
    heads, dim = model.cfg.n_kv_heads, model.cfg.head_dim
    torch.manual_seed(0)
    before = _graphs()
    # Whole storages: 1 and 4 slots of 40 and 70 columns, the last a sink no row reads;
    # queries padded to 16 and 32.
    for b, q, keys in ((1, 9, 40), (4, 20, 70)):
        ids = torch.randint(0, model.cfg.vocab_size, (b, q))
        positions = torch.arange(q).expand(b, q) + 5
        cache = [(torch.randn(b, heads, keys, dim), torch.randn(b, heads, keys, dim))] * 2
        mask = torch.ones(b, keys, dtype=torch.bool)
        mask[:, -1] = False
        mask[0, -3:] = False
        gather = torch.arange(8).expand(b, 8)
        copies = [(k.clone(), v.clone()) for k, v in cache]  # eager writes its queries in place
        eager_part = CachedPart(slice(None), copies, mask)
        eager = model.forward_cached(ids, positions, [eager_part], positions, gather, False)
        part = CachedPart(slice(None), cache, mask)
        _close(compiled(ids, positions, part, positions, gather), eager)
    assert compiled.forward.compiles == 2 == _graphs() - before


@pytest.mark.parametrize("family", ["sdar", "llada2"])
@torch.inference_mode()
def test_block_causal_slot_forward_matches_eager(family: str) -> None:
    model, _ = _cut(family)
    compiled = CompiledSlots(model, BACKEND, model.cfg.max_position_embeddings)
    cpu = torch.device("cpu")
    shape = (len(model.layers), model.kv_heads, model.head_dim)
    store = SlotStore(*shape, cpu, torch.float32, capacity=64)
    torch.manual_seed(0)
    lengths = {"a": 5, "b": 9, "c": 12}  # cached positions per row, written eagerly first
    for key, n in lengths.items():
        cache = store.add(key, 40)
        ids = torch.randint(0, 200, (1, n))
        batch = SlotGroups.whole(store.batch([key], [0], [n], n))
        model.forward_slots(ids, torch.arange(n)[None], batch, torch.tensor([4]))
        cache.advance(n)
    before = _graphs()
    for keys, width in ((["a"], 4), (["a", "b", "c"], 8)):  # batch buckets 1 and 4
        starts = [lengths[k] for k in keys]
        ids = torch.randint(0, 200, (len(keys), width))
        positions = torch.tensor(starts)[:, None] + torch.arange(width)
        sizes = torch.full((len(keys),), 4)
        eager = model.forward_slots(
            ids,
            positions,
            SlotGroups.whole(store.batch(keys, starts, [width] * len(keys), width)),
            sizes,
        )
        batch = store.batch(keys, starts, [width] * len(keys), width)
        _close(compiled(ids, positions, batch, sizes), eager)
    assert compiled.forward.compiles == 2 == _graphs() - before


@torch.inference_mode()
def test_diffusion_gemma_decode_matches_eager() -> None:
    model, _ = _cut("diffusion_gemma")
    compiled = CompiledDecode(model, BACKEND)
    stores = UniformRunner(model).stores  # one per layer kind, as the runner keeps them
    length, vocab = model.cfg.canvas_length, model.cfg.vocab_size

    def slots(keys: list[str], starts: list[int], width: int) -> dict[bool, SlotGroups]:
        widths = [width] * len(keys)
        return {kind: s.batch(keys, starts, widths, width) for kind, s in stores.items()}

    def one_store(groups: dict[bool, SlotGroups]) -> dict[bool, SlotBatch]:
        """Each kind's one part: what a compiled forward reads."""
        assert all(len(g.parts) == 1 for g in groups.values())
        return {kind: g.parts[0][1] for kind, g in groups.items()}

    torch.manual_seed(0)
    lengths = {"a": 5, "b": 30}  # the second outgrows the sliding window
    for key, n in lengths.items():
        for store in stores.values():
            store.add(key, 64)
        model.encode_slots(
            torch.randint(0, vocab, (1, n)), torch.arange(n)[None], slots([key], [0], n)
        )
    before = _graphs()
    for keys, conditioned in ((["a"], False), (["a", "b"], True)):
        starts = [lengths[k] for k in keys]
        canvas = torch.randint(0, vocab, (len(keys), length))
        positions = torch.tensor(starts)[:, None] + torch.arange(length)
        cond = torch.randn(len(keys), length, vocab) if conditioned else None
        mask = torch.tensor([True, False][: len(keys)]) if conditioned else None
        eager = model.decode(canvas, positions, slots(keys, starts, length), cond, mask)
        batches = one_store(slots(keys, starts, length))  # both rows in one store
        _close(compiled(canvas, positions, batches, cond, mask), eager)
    assert compiled.forward.compiles == 2 == _graphs() - before


def _drain(engine: Engine, params: SamplingParams, prompts: list[str]) -> list[list[int]]:
    """Run the prompts, one more joining each step (batch sizes 1, 2, 3, then fewer as they
    finish), -> each one's final tokens."""
    waiting = list(prompts)
    ids: list[str] = []
    done: dict[str, list[int]] = {}
    for _ in range(500):
        if waiting:
            ids.append(engine.add(engine.make_request(waiting.pop(0), params)).request_id)
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out.error
                done[out.request_id] = out.tokens
    return [done[i] for i in ids]


@pytest.mark.parametrize("family", list(CUT))
def test_engine_compiled_gives_eager_tokens_within_the_bound(family: str) -> None:
    params = SamplingParams(temperature=0.0, seed=1, ignore_eos=True, **PARAMS[family])
    prompts = ["def add(a, b):", "Once upon a time", "The capital of France is"]
    runs = []
    for backend in (False, BACKEND):
        # One layer through the engine: its decisions, not its depth, are under test.
        model, path = _cut(family, CUT[family][1][-1:])
        engine = Engine(model, TextTokenizer(path), compile=backend)
        before = _graphs()
        runs.append(_drain(engine, params, prompts))
    compiled = engine.first.compiled
    assert compiled is not None
    assert runs[1] == runs[0]
    # One compile per padded signature, none hidden (dynamo's own count agrees); batches of
    # 1, 2 and 3 rows padded to powers of two; within the stated bound, and here at most 3
    # compiles per batch bucket and slot store read (the run's other dimensions: window, slots
    # read, or self-conditioning on and off, reach at most 3 buckets together).
    assert compiled.compiles == _graphs() - before
    batches = {sig[0][0][0][0] for sig in compiled.signatures}
    stores = {_storages(key) for _, key in compiled.signatures}
    assert len(batches) >= 2 and batches <= {1, 2, 4}
    assert compiled.compiles <= min(compiled.bound, 3 * len(batches) * len(stores))


def _storages(key: tuple | None) -> tuple | None:
    """The storage shapes a compiled call's key names (`padded_slots.slot_key`, one per
    layer kind for DiffusionGemma; none for the masked family, whose storages are its
    tensors)."""
    if key is None:
        return None
    return key[2] if isinstance(key[0], int) else tuple(part[2] for part in key)


def test_the_masked_compiled_step_reads_its_slot_storage_in_place() -> None:
    """Every key and value tensor the compiled cached forward gets is a slot store's own
    storage, not a padded copy of it."""
    model, path = _cut("masked", CUT["masked"][1])
    engine = Engine(model, TextTokenizer(path), compile=BACKEND)
    runner = engine.first.runner
    compiled = runner._compiled
    forward, calls = compiled.forward, []

    def recording(*args, **kwargs):
        stores = runner.stores.stores.values()
        held = {(t.data_ptr(), t.shape) for s in stores for t in s.keys + s.values}
        given = {(t.data_ptr(), t.shape) for t in args[2] + args[3]}  # keys, values per layer
        calls.append(given <= held)
        return forward(*args, **kwargs)

    compiled.forward = recording
    params = SamplingParams(temperature=0.0, seed=1, ignore_eos=True, **PARAMS["masked"])
    _drain(engine, params, ["def add(a, b):", "Once upon a time", "The capital of France"])
    assert calls and all(calls)


@pytest.mark.parametrize("family", ["sdar", "diffusion_gemma"])
def test_compiled_rows_copy_cached_prompt_blocks_and_decode_as_eager(family: str) -> None:
    """A compiled forward's shapes do not vary with what rows share: its rows take the
    prefix cache's blocks as a copy into their slots, and decode as the eager ones that
    read them in place."""
    params = SamplingParams(temperature=0.0, seed=1, ignore_eos=True, **PARAMS[family])
    system = "You are a careful assistant who answers briefly. " * 8
    prompts = [system + "Name a fruit.", system + "Count to three."]
    runs, cached, starts = [], [], []
    for backend in (False, BACKEND):
        model, path = _cut(family, CUT[family][1][-1:])
        engine = Engine(model, TextTokenizer(path), compile=backend)
        runner, tokens = engine.first.runner, []
        for prompt in prompts:  # one after the other: the second finds the first's blocks
            request = engine.add(engine.make_request(prompt, params))
            outs = engine.step()
            starts.append(runner.rows[request.request_id].cache.start)  # where its slot starts
            while engine.has_unfinished():
                outs += engine.step()
            tokens.append(outs[-1].tokens)
            cached.append(outs[0].extras["prompt_cached"])
        runs.append(tokens)
    assert runs[1] == runs[0]
    assert starts == [0, cached[1], 0, 0]  # eager reads the blocks in place; compiled copies
    assert cached[0] == cached[2] == 0 and cached[1] == cached[3] > 0


def test_compile_flag_reaches_every_served_model() -> None:
    parser = cli._parser()
    assert cli.settings_from_args(parser.parse_args(["serve", "--compile"])).compile
    assert not cli.settings_from_args(parser.parse_args(["serve"])).compile  # off by default
    # Compiling is lazy (at a bucket's first call): building the engine compiles nothing.
    engine = build_engine(Settings(compile=True, also_serve=[CHECKPOINT_DIR]))
    served = list(engine.models.values())
    assert len(served) == 2
    assert all(m.compiled is not None and m.compiled.compiles == 0 for m in served)
