"""One command for a GPU machine: every family at a real checkpoint's widths, in bf16, through
`Engine.step()`, with the figures that say whether the step is bound by HBM or by the host.

Shapes: LLaDA-8B (masked), LLaDA2.0-mini (16B-A1.4B MoE), DiffusionGemma-26B-A4B and SDAR-8B,
random weights made on the GPU (built on the meta device, `to_empty` on the card, then small
normal values: nothing is read from disk or the network, nothing materialises on the host).
Batch 1, 8 and 32, 256 generated tokens, each request seeded, EOS ignored, every sampling field
printed. Depth is cut where the weights would not leave room for the KV cache and the logits
(or with `--layers N`); the output says so and gives per-layer figures. First the parity
tests, their models on the card (pytest --device cuda); after the shapes, where `transformers`
has DiffusionGemma natively, its `generate` on the same weights; and last (an overrunning
compile costs only itself) the first shape's step under `--compile` (torch.compile, CUDA
graphs on a GPU) against eager, at `--compile-layers` depth. `--budget-s` (default 540) skips
what is left, with a note, so the whole run ends in 10 minutes.

    python benchmarks/gpu.py                  # on the GPU machine: every shape, ~5-9 min
    python benchmarks/gpu.py --shapes llada-8b,gemma-26b-a4b --batches 1,8 --layers 8
    python benchmarks/gpu.py --smoke          # CPU, tiny widths, < 1 min: the script still runs
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefix_cache import run as prefix_run
from same_work import scheduler_config
from torch import nn

from marble.families.diffusion_gemma.config import DiffusionGemmaConfig
from marble.families.diffusion_gemma.loader import map_name as gemma_name
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.families.llada2.config import LLaDA2Config
from marble.families.llada2.model import LLaDA2
from marble.families.masked.config import ModelConfig
from marble.families.masked.model import Denoiser
from marble.families.sdar.config import SDARConfig
from marble.families.sdar.model import SDAR
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.served_model import load_defaults

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
PARITY_TESTS = [
    "tests/test_parity.py",
    "tests/test_llada2_parity.py",
    "tests/test_diffusion_gemma_parity.py",
    "tests/families/sdar/test_sdar_parity.py",
]
PARITY_FAILURES_SHOWN = 12
PARITY_SECONDS = 150  # on CPU they take ~10 s; CUDA's start and first kernels add some
PROMPT = list(range(200, 232))  # 32 ordinary ids in every reference tokenizer
# Model methods timed inside a step (the outermost call of each: nested calls are inside it);
# every family's entry points start so (forward, forward_cached, forward_slots, encode,
# decode, ...). A call of a head method alone is not a forward.
BODY_PREFIXES = ("forward", "encode", "decode")
HEAD_CALLS = ("project", "head")
# Peak HBM bandwidth in TB/s by device name (first match wins; PCIe before the plain name).
PEAK_TBS = (
    (("H100", "PCIE"), 2.0),
    (("H100",), 3.35),
    (("H200",), 4.8),
    (("A100", "80GB"), 2.0),
)

LEGEND = """\
  B         requests in flight together (seeds 0..B-1, all start at once, EOS ignored)
  tok/s     generated tokens / seconds inside Engine.step() (each step ends with a device
            sync); a row cut at the budget counts the tokens generated until then
  tok/fwd   generated tokens per row-forward (forwards of every kind the engine counted)
  step ms   median wall time of one Engine.step() with every row in it
  fwd ms    median time of that step's model calls (the outermost forward*, encode*,
            decode*, project and head calls), timed with CUDA events inside the step, so
            launch gaps inside the forward count but the step's own host work does not
  step/fwd  step ms / fwd ms: what the engine adds to the model (target <= 1.2)
  ms/layer  fwd ms / layers built: the per-layer figure when depth is cut
  GB/fwd    bytes one forward reads: the weights (input embedding table left out unless it is
            also the head; MoE experts scaled by the share a forward's tokens reach under
            uniform routing, 1-(1-k/E)^T) plus the KV cache the running rows hold
  TB/s      GB/fwd / fwd time: the HBM bandwidth the forward reaches
  %peak     TB/s over the card's peak (H100 SXM 3.35, H100 PCIe 2.0, H200 4.8, A100 80GB 2.0)
  peak GB   torch.cuda.max_memory_allocated over the row (weights, KV, logits, scratch)"""


# ---------------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    name: str
    real_layers: int
    tokenizer: Path  # reference folder whose tokenizer (and serving defaults) are borrowed
    build: Callable[[int, bool], nn.Module]  # (layers, smoke) -> model on the meta device
    tied_head: bool = False  # the input embedding table is also the LM head
    moe: tuple[int, int] | None = None  # (experts, experts per token)
    params: Callable[[SamplingParams, int, bool], SamplingParams] = lambda p, gen, smoke: p


def _raw(folder: str) -> dict[str, Any]:
    return json.loads((REFERENCE / folder / "config.json").read_text())


def _llada_8b(layers: int, smoke: bool) -> nn.Module:
    tiny = _raw("llada-tiny")
    widths = (
        dict(vocab_size=1024, d_model=64, n_heads=4, n_kv_heads=4, mlp_hidden=192)
        if smoke
        else dict(vocab_size=126464, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden=12288)
    )
    cfg = ModelConfig(
        arch="llada",
        n_layers=layers,
        rope_theta=500000.0,
        max_seq_len=4096,
        mask_token_id=tiny["mask_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
        **widths,
    )
    return Denoiser(cfg)


def _llada2_mini(layers: int, smoke: bool) -> nn.Module:
    raw = _raw("llada2-tiny")
    if smoke:
        raw.update(vocab_size=1024, num_hidden_layers=layers)
    else:
        raw.update(
            vocab_size=157184,
            hidden_size=2048,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            rotary_dim=64,
            intermediate_size=5120,
            moe_intermediate_size=512,
            num_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            max_position_embeddings=32768,
        )
    return LLaDA2(LLaDA2Config.from_json_dict(raw))


def _gemma_raw(layers: int, smoke: bool) -> dict[str, Any]:
    raw = _raw("diffusiongemma-tiny")
    text = raw["text_config"]
    # Five sliding layers to a full one, counted from the last, which is full at any depth (as
    # in the real 30, and as transformers requires: it forces a sliding last layer to full).
    types = [
        "full_attention" if (layers - 1 - i) % 6 == 0 else "sliding_attention"
        for i in range(layers)
    ]
    text.update(num_hidden_layers=layers, layer_types=types)
    if smoke:
        raw["canvas_length"] = 16
        return raw
    text.update(
        vocab_size=262144,
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        num_global_key_value_heads=2,
        global_head_dim=512,
        num_experts=128,
        top_k_experts=8,
        sliding_window=1024,
        max_position_embeddings=262144,
    )
    raw["canvas_length"] = 256
    return raw


def _gemma_26b(layers: int, smoke: bool) -> nn.Module:
    return DiffusionGemma(DiffusionGemmaConfig.from_json_dict(_gemma_raw(layers, smoke)))


def _sdar_8b(layers: int, smoke: bool) -> nn.Module:
    raw = _raw("sdar-tiny")
    raw.update(num_hidden_layers=layers)
    if not smoke:
        raw.update(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=32768,
        )
    return SDAR(SDARConfig.from_json_dict(raw))


def _masked_params(p: SamplingParams, gen: int, smoke: bool) -> SamplingParams:
    block = 16 if smoke else 32
    return p.replace(
        steps=gen // 2,  # two tokens per forward: a fixed step count, same work every run
        block_length=block,
        threshold=None,
        remasking="low_confidence",
        temperature=0.0,
        cache="dual",
    )


def _block_params(p: SamplingParams, gen: int, smoke: bool) -> SamplingParams:
    return p.replace(block_length=min(p.block_length or gen, gen))


def _gemma_params(p: SamplingParams, gen: int, smoke: bool) -> SamplingParams:
    # The real sampler settings (48 steps, t 0.8 -> 0.4); the tiny checkpoint's 8 in smoke.
    return p.replace(steps=8 if smoke else 48, block_length=gen)


SHAPES = {
    "llada-8b": Shape("llada-8b", 32, REFERENCE / "llada-tiny", _llada_8b, params=_masked_params),
    "llada2-mini": Shape(
        "llada2-mini",
        20,
        REFERENCE / "llada2-tiny",
        _llada2_mini,
        moe=(256, 8),
        params=_block_params,
    ),
    "gemma-26b-a4b": Shape(
        "gemma-26b-a4b",
        30,
        REFERENCE / "diffusiongemma-tiny",
        _gemma_26b,
        tied_head=True,
        moe=(128, 8),
        params=_gemma_params,
    ),
    "sdar-8b": Shape("sdar-8b", 36, REFERENCE / "sdar-tiny", _sdar_8b, params=_block_params),
}


# ------------------------------------------------------------------------------ weights
def init_random(model: nn.Module, seed: int) -> None:
    """Small normal weights (std 1/sqrt(fan-in)), norms and scales 1, other vectors 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in name or "scale" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            b.fill_(1.0 if "scalar" in name else 0.0)


def build_on(shape: Shape, layers: int, smoke: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """The model built on the meta device, then given storage on `device` and filled there."""
    with torch.device("meta"):
        model = shape.build(layers, smoke).to(dtype)
    model = model.to_empty(device=device)
    init_random(model, seed=0)
    return model.eval()


def fitting_layers(shape: Shape, smoke: bool, dtype: torch.dtype, free_bytes: int) -> int:
    """Real depth, or the most layers whose weights take at most 55% of `free_bytes` (the rest
    holds the KV cache, batch-32 logits and scratch)."""
    with torch.device("meta"):
        one = shape.build(1, smoke).to(dtype)
        two = shape.build(2, smoke).to(dtype)
    size_one, size_two = _param_bytes(one), _param_bytes(two)
    per_layer, rest = size_two - size_one, 2 * size_one - size_two
    room = int(0.55 * free_bytes) - rest
    return max(1, min(shape.real_layers, room // max(per_layer, 1)))


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class WeightBytes:
    dense: int  # read whole by every forward
    experts: int  # routed experts of every layer, read in the share a forward's tokens reach

    def per_forward(self, tokens: float, moe: tuple[int, int] | None) -> float:
        if not moe or not self.experts:
            return float(self.dense + self.experts)
        experts, k = moe
        reached = 1.0 - (1.0 - k / experts) ** max(tokens, 1.0)
        return self.dense + reached * self.experts


def weight_bytes(model: nn.Module, tied_head: bool) -> WeightBytes:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    dense = experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if id(p) in embeddings and not tied_head:
            continue  # an input table: a forward reads only its prompt's rows
        if ".experts." in name:
            experts += size
        else:
            dense += size
    return WeightBytes(dense, experts)


# ------------------------------------------------------------------------------- timing
class CallTimer:
    """Times the model's outermost forward-like calls inside each step (CUDA events on CUDA,
    so the step itself is not synced by the timing)."""

    def __init__(self, model: nn.Module, cuda: bool) -> None:
        self.cuda = cuda
        self.depth = 0
        self.spans: list[tuple[Any, Any]] = []
        self.body_calls = 0
        for name in dir(type(model)):
            body = name.startswith(BODY_PREFIXES)
            own = getattr(type(model), name)
            if not (body or name in HEAD_CALLS) or not callable(own):
                continue
            if own is getattr(nn.Module, name, None):
                continue  # nn.Module's own (a model without `forward`)
            setattr(model, name, self._wrap(getattr(model, name), body))

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _wrap(self, fn: Callable[..., Any], body: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            start = self._mark() if self.depth == 1 else None
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if start is not None:
                    self.spans.append((start, self._mark()))
                    self.body_calls += body

        return timed

    def take(self) -> tuple[float, int]:
        """Seconds of model calls since the last take (after a sync), and the body calls."""
        if self.cuda:
            seconds = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            seconds = sum(b - a for a, b in self.spans)
        calls = self.body_calls
        self.spans.clear()
        self.body_calls = 0
        return seconds, calls


@dataclass
class Row:
    batch: int
    tokens: int = 0
    row_forwards: int = 0
    seconds: float = 0.0
    steps: list[float] = field(default_factory=list)
    forwards: list[float] = field(default_factory=list)
    bytes_read: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    cut: bool = False  # stopped at the time budget
    errors: list[str] = field(default_factory=list)  # what failed requests said


def drain(engine: Engine) -> None:
    """Abort every request and take the step that retires them."""
    for request_id in list(engine.requests):
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_batch(
    engine: Engine,
    timer: CallTimer,
    params: SamplingParams,
    batch: int,
    weights: WeightBytes,
    moe: tuple[int, int] | None,
    deadline: float,
) -> Row:
    cuda = timer.cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = Row(batch)
    for i in range(batch):
        engine.add(engine.make_request(PROMPT, params.replace(seed=i)))
    timer.take()
    done: dict[str, int] = {}
    while engine.has_unfinished():
        if time.perf_counter() > deadline:
            row.cut = True
            drain(engine)
            break
        sync(cuda)
        start = time.perf_counter()
        outputs = engine.step()
        sync(cuda)
        seconds = time.perf_counter() - start
        model_seconds, calls = timer.take()
        row.seconds += seconds
        for out in outputs:
            if out.error:
                row.errors.append(out.error)
            row.row_forwards += sum(out.forwards.values())
            done[out.request_id] = out.completion_tokens  # so far: a cut row counts them too
        row.tokens = sum(done.values())
        stats = engine.last_stats
        if stats is not None and stats.batch_size == batch and model_seconds > 0 and calls:
            row.steps.append(seconds)
            row.forwards.append(model_seconds)
            tokens_per_call = stats.positions / calls
            kv = sum(kv_read(engine, params, out.block_index) for out in outputs)
            row.bytes_read.append(calls * weights.per_forward(tokens_per_call, moe) + kv)
    if cuda:
        row.peak_bytes = torch.cuda.max_memory_allocated()
    return row


def kv_read(engine: Engine, params: SamplingParams, block_index: int) -> int:
    """KV bytes one row's forward reads: the whole canvas under a masked model's dual cache,
    else the prompt and the finished blocks (canvases) before `block_index`."""
    model = engine.first.model
    if params.cache == "dual" and engine.first.kv_bytes_per_token:
        return (len(PROMPT) + params.max_tokens) * engine.first.kv_bytes_per_token
    tokens = len(PROMPT) + block_index * (params.block_length or params.max_tokens)
    if hasattr(model, "cache_bytes"):
        return model.cache_bytes(tokens)
    return tokens * engine.first.kv_bytes_per_token


def peak_tbs(device_name: str) -> float | None:
    upper = device_name.upper()
    for words, tbs in PEAK_TBS:
        if all(w in upper for w in words):
            return tbs
    return None


def print_row(row: Row, layers: int, peak: float | None) -> None:
    if row.errors:  # figures of failed requests would mislead: say what failed instead
        print(f"{row.batch:>3}  {len(row.errors)} requests failed: {row.errors[0][:160]}")
        return
    if not row.steps:
        cut = "; cut at the budget" if row.cut else ""
        print(f"{row.batch:>3}  (no full-batch step was timed{cut})")
        return
    step = statistics.median(row.steps)
    fwd = statistics.median(row.forwards)
    read = statistics.median(b / f for b, f in zip(row.bytes_read, row.forwards))
    gb = statistics.median(row.bytes_read) / 1e9  # 3 significant digits: smoke models are tiny
    tbs = read / 1e12
    share = f"{tbs / peak:6.0%}" if peak else f"{'n/a':>6}"
    peak_gb = f"{row.peak_bytes / 1e9:7.1f}" if row.peak_bytes else f"{'n/a':>7}"
    note = "  (cut at the budget)" if row.cut else ""
    print(
        f"{row.batch:>3} {row.tokens / max(row.seconds, 1e-9):>9.1f} "
        f"{row.tokens / max(row.row_forwards, 1):>7.2f} {1e3 * step:>8.2f} {1e3 * fwd:>8.2f} "
        f"{step / fwd:>8.2f} {1e3 * fwd / layers:>8.3f} {gb:>7.3g} {tbs:>6.3g} {share} "
        f"{peak_gb}{note}"
    )


def explicit_params(shape: Shape, gen: int, smoke: bool) -> SamplingParams:
    """The family's serving defaults with the benchmark's choices on top, every field set."""
    base = load_defaults(shape.tokenizer).replace(
        max_tokens=gen, ignore_eos=True, stop=(), seed=0, token_healing=False
    )
    return shape.params(base, gen, smoke)


def run_shape(
    shape: Shape, args: argparse.Namespace, device: str, deadline: float, peak: float | None
) -> None:
    cuda = device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.layers:
        layers = args.layers
    elif args.smoke:
        layers = 2
    elif cuda:
        layers = fitting_layers(shape, args.smoke, dtype, torch.cuda.mem_get_info()[0])
    else:
        layers = shape.real_layers
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build_on(shape, layers, args.smoke, device, dtype)
    sync(cuda)
    built = time.perf_counter() - started
    weights = weight_bytes(model, shape.tied_head)
    params = explicit_params(shape, args.gen, args.smoke)
    depth = "real depth" if layers == shape.real_layers else f"CUT from {shape.real_layers}"
    total = _param_bytes(model)
    print(
        f"\n== {shape.name}: {layers} layers ({depth}), {total / 1e9:.3g} GB of {dtype} weights "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.3g} B params, "
        f"{_param_bytes(model.layers) / 1e9 / layers:.3g} GB/layer), built on {device} in "
        f"{built:.1f} s; prompt {len(PROMPT)} tokens"
    )
    shown = json.dumps(params.replace(seed=None).to_dict(), default=str)
    print(f"   params: {shown} (seed: the row's index)")
    tokenizer = TextTokenizer(shape.tokenizer)
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(
        model,
        tokenizer,
        scheduler_config(max_batch_size=max(batches), max_batch_tokens=1 << 22),
    )
    if hasattr(engine.runner, "vocab_limit"):
        # The borrowed tokenizer is small: score every id as the real vocabulary would.
        engine.runner.vocab_limit = model.cfg.vocab_size
    timer = CallTimer(model, cuda)
    for batch in batches:  # warm-up: kernels and allocator at every batch's shapes
        for i in range(batch):
            engine.add(engine.make_request(PROMPT, params.replace(seed=i)))
        try:
            for _ in range(3):
                engine.step()
        except torch.OutOfMemoryError:
            pass  # the row itself says so below
        drain(engine)
    timer.take()
    print(
        f"{'B':>3} {'tok/s':>9} {'tok/fwd':>7} {'step ms':>8} {'fwd ms':>8} {'step/fwd':>8} "
        f"{'ms/layer':>8} {'GB/fwd':>7} {'TB/s':>6} {'%peak':>6} {'peak GB':>7}"
    )
    for batch in batches:
        if time.perf_counter() > deadline:
            print(f"{batch:>3}  skipped: this shape's share of --budget-s is spent")
            continue
        try:
            row = run_batch(engine, timer, params, batch, weights, shape.moe, deadline)
        except torch.OutOfMemoryError as exc:
            print(f"{batch:>3}  out of memory ({str(exc).splitlines()[0][:100]})")
            drain(engine)
            continue
        print_row(row, layers, peak)
    del engine, timer
    prefix_cache_row(model, tokenizer, params, args.smoke, deadline)
    del model
    gc.collect()  # the timer's wrappers and the model refer to each other
    if cuda:
        torch.cuda.empty_cache()


def prefix_cache_row(
    model: nn.Module, tokenizer: TextTokenizer, params: SamplingParams, smoke: bool, deadline: float
) -> None:
    """The prefix cache at this shape: 8 requests sharing a long prompt (1,024 tokens; 64 in
    smoke) and each its own tail, one arriving a step, one block or canvas each, with the
    cache off and then on: time to first step and the positions first steps computed."""
    shared = [PROMPT[i % len(PROMPT)] for i in range(64 if smoke else 1024)]
    prompts = [[*shared, PROMPT[i], PROMPT[-1 - i]] for i in range(8)]
    one_block = params.replace(max_tokens=params.block_length or params.max_tokens)
    results = {}
    for on in (False, True):
        if time.perf_counter() > deadline:
            print("   prefix cache: skipped, this shape's share of --budget-s is spent")
            return
        config = scheduler_config(max_batch_size=8, max_batch_tokens=1 << 22, prefix_cache=on)
        engine = Engine(model, tokenizer, config)
        if on and engine.first.prefixes is None:
            print("   prefix cache: none (a full-attention prompt attends to its canvas)")
            return
        results[on] = prefix_run(engine, prompts, one_block)
    off, hit = results[False], results[True]
    first = [statistics.median(r.first_step_s) * 1e3 for r in (off, hit)]
    print(
        f"   prefix cache, 8 requests sharing {len(shared)} prompt tokens: time to first step "
        f"p50 {first[0]:.0f} -> {first[1]:.0f} ms ({first[1] / first[0]:.2f}x), first-step "
        f"positions {off.first_step_positions} -> {hit.first_step_positions}"
    )


# -------------------------------------------------------------------------- side checks
def run_parity(device: str, timeout_s: float, tests: list[str] = PARITY_TESTS) -> None:
    """The parity tests with their models and golden tensors on `device` (pytest --device),
    before any shape, so no benchmark shares the card with them: the summary, then each
    failure's first line (the tensor and its max |delta|)."""
    print(f"\nparity tests on {device} (" + " ".join(tests) + "):", flush=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no"]
    try:
        done = subprocess.run(
            [*command, "-rfE", "--device", device, *tests],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "COLUMNS": "400"},  # pytest cuts summary lines to the width
        )
    except subprocess.TimeoutExpired:
        print(f"  not finished within {timeout_s:.0f} s: stopped")
        return
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else done.stderr.strip()[-300:] or "(no output)"
    print(f"  exit {done.returncode}: {summary}")
    for line in failures[:PARITY_FAILURES_SHOWN]:
        print(f"  {line}")
    if len(failures) > PARITY_FAILURES_SHOWN:
        print(f"  ... and {len(failures) - PARITY_FAILURES_SHOWN} more")


def compiled_rows(args: argparse.Namespace, device: str, deadline: float) -> None:
    """The first shape's engine with its cached forward compiled (`--compile`: inductor with
    CUDA graphs on a GPU; aot_eager in --smoke) against eager, on the same model: seconds to
    compile every bucket one run needs (that untimed run), then tokens/s each way."""
    shape = SHAPES[args.shapes.split(",")[0]]
    cuda = device == "cuda"
    backend = "inductor" if cuda else "aot_eager"
    layers = args.compile_layers
    print(f"\n--compile ({backend}) against eager: {shape.name}, {layers} layers, gen {args.gen}")
    if time.perf_counter() > deadline:
        print("  skipped: the --budget-s is spent")
        return
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_on(shape, layers, args.smoke, device, dtype)
    params = explicit_params(shape, args.gen, args.smoke)
    tokenizer = TextTokenizer(shape.tokenizer)
    for batch in (1, 2) if args.smoke else (1, 8):
        if time.perf_counter() > deadline:
            print(f"  B {batch}: skipped, the compile share of --budget-s is spent")
            continue
        rates = []
        for mode in (False, backend):
            config = scheduler_config(max_batch_size=batch, max_batch_tokens=1 << 22)
            engine = Engine(model, tokenizer, config, compile=mode)
            if hasattr(engine.runner, "vocab_limit"):
                engine.runner.vocab_limit = model.cfg.vocab_size
            warm = timed_run(engine, params, batch, cuda)  # compiles every bucket it meets
            rates.append((timed_run(engine, params, batch, cuda), warm))
        failed = [e for run in rates for part in run for e in part.errors]
        if failed:
            print(f"  B {batch}: {len(failed)} requests failed: {failed[0][:160]}")
            continue
        (eager, _), (compiled, compiling) = ((a.tokens_per_s, b.seconds) for a, b in rates)
        print(
            f"  B {batch}: eager {eager:.1f} tok/s, compiled {compiled:.1f} tok/s "
            f"({compiled / eager:.2f}x), first run with compiles {compiling:.1f} s"
        )
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


@dataclass
class Run:
    tokens_per_s: float  # inside `Engine.step()`
    seconds: float
    errors: list[str]  # what failed requests said


def timed_run(engine: Engine, params: SamplingParams, batch: int, cuda: bool) -> Run:
    """`batch` seeded requests to the end."""
    for i in range(batch):
        engine.add(engine.make_request(PROMPT, params.replace(seed=i)))
    seconds, tokens, errors = 0.0, 0, []
    while engine.has_unfinished():
        sync(cuda)
        start = time.perf_counter()
        outputs = engine.step()
        sync(cuda)
        seconds += time.perf_counter() - start
        tokens += sum(o.completion_tokens for o in outputs if o.finished)
        errors += [o.error for o in outputs if o.error]
    return Run(tokens / max(seconds, 1e-9), seconds, errors)


def transformers_side_by_side(args: argparse.Namespace, device: str, deadline: float) -> None:
    """DiffusionGemma through transformers' own `generate` and through Marble on the same
    weights (the transformers model's tensors, shared) and settings; tokens/s and the ratio."""
    print("\ntransformers DiffusionGemma side by side:")
    if importlib.util.find_spec("transformers") is None:
        print("  skipped: transformers is not installed")
        return
    import transformers

    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        print(f"  skipped: transformers {transformers.__version__} has no DiffusionGemma")
        return
    if time.perf_counter() > deadline:
        print("  skipped: the --budget-s is spent")
        return
    cuda = device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SHAPES["gemma-26b-a4b"]
    layers = args.layers or (2 if args.smoke else 6)
    try:
        raw = _gemma_raw(layers, args.smoke)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(raw))
            hf_config = transformers.AutoConfig.from_pretrained(tmp)
        # Built on the card by its own init (not meta + to_empty): its rotary tables are
        # buffers computed at construction.
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = transformers.DiffusionGemmaForBlockDiffusion(hf_config)
        finally:
            torch.set_default_dtype(torch.float32)
        hf = hf.to(dtype).eval()
        ours_state = {}
        for name, tensor in hf.state_dict().items():
            mapped = gemma_name(name)
            if mapped is not None:
                ours_state[mapped] = tensor
        with torch.device("meta"):
            ours = shape.build(layers, args.smoke).to(dtype)
        missing, _ = ours.load_state_dict(ours_state, strict=False, assign=True)
        if missing:
            print(f"  skipped: no transformers tensor for {missing[:3]}")
            return
        ours.eval()
        params = explicit_params(shape, args.gen, args.smoke)
        prompt = torch.tensor([PROMPT], device=device)
        # The same sampler settings as Marble's requests (the tiny checkpoint's are the real
        # ones but for the step count and length).
        generation = dict(
            max_new_tokens=args.gen,
            max_denoising_steps=params.steps,
            t_min=params.t_min,
            t_max=params.t_max,
            stability_threshold=params.stability_threshold,
            confidence_threshold=params.confidence_threshold,
        )
        rates = {}
        for batch in (1, 8) if not args.smoke else (1,):
            sync(cuda)
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(prompt.expand(batch, -1), **generation)
            sync(cuda)
            hf_rate = batch * args.gen / (time.perf_counter() - start)
            engine = Engine(
                ours, TextTokenizer(shape.tokenizer), scheduler_config(max_batch_size=8)
            )
            for i in range(batch):
                engine.add(engine.make_request(PROMPT, params.replace(seed=i)))
            sync(cuda)
            start = time.perf_counter()
            tokens = 0
            while engine.has_unfinished():
                tokens += sum(o.completion_tokens for o in engine.step() if o.finished)
            sync(cuda)
            rates[batch] = (hf_rate, tokens / (time.perf_counter() - start))
        print(f"  {layers} layers, gen {args.gen}, {params.steps} steps (EOS stops transformers)")
        for batch, (hf_rate, ours_rate) in rates.items():
            print(
                f"  B {batch}: transformers {hf_rate:.1f} tok/s, Marble {ours_rate:.1f} tok/s, "
                f"Marble / transformers {ours_rate / hf_rate:.2f}"
            )
    except Exception as exc:  # a transformers API this script did not foresee: say which
        print(f"  failed: {first_line(exc)}")
        print("\n".join(f"   | {line}" for line in last_frames(exc)))


# ---------------------------------------------------------------------------------- main
def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def last_frames(exc: BaseException) -> list[str]:
    """The last four frames of where `exc` was raised, and its whole message."""
    return "".join(traceback.format_exception(exc, limit=-4)).splitlines()


def report_failure(what: str, exc: BaseException) -> None:
    """`== what failed: ...` and the last frames of where it was raised."""
    print(f"\n== {what} failed: {first_line(exc)}")
    print("\n".join(f"   | {line}" for line in last_frames(exc)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--batches", default=None, help="default 1,8,32 (smoke: 1,2)")
    parser.add_argument("--gen", type=int, default=None, help="tokens per request (default 256)")
    parser.add_argument(
        "--layers", type=int, default=0, help="depth of every shape (0: real, or what fits)"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip rows past this")
    parser.add_argument("--smoke", action="store_true", help="tiny widths on the CPU, < 1 min")
    parser.add_argument("--no-parity", action="store_true", help="do not run the parity tests")
    parser.add_argument(
        "--compile-layers",
        type=int,
        default=2,
        help="depth of the --compile row (0: skip it); compiles take minutes at full depth",
    )
    args = parser.parse_args()
    args.batches = args.batches or ("1,2" if args.smoke else "1,8,32")
    args.gen = args.gen or (16 if args.smoke else 256)
    start = time.perf_counter()
    deadline = start + args.budget_s
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: this script measures a GPU; run it with --smoke on the CPU")
        sys.exit(2)
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tbs(name) if cuda else None
    print(
        f"device {name}; peak HBM {f'{peak} TB/s' if peak else 'unknown'}; torch "
        f"{torch.__version__}; {'smoke: tiny widths, float32' if args.smoke else 'bf16'}; "
        f"batches {args.batches}; gen {args.gen}; budget {args.budget_s:.0f} s"
    )
    names = args.shapes.split(",")
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if args.no_parity or args.smoke:
        print(f"\nparity tests: not run ({'--no-parity' if args.no_parity else '--smoke'})")
    else:
        run_parity(device, PARITY_SECONDS)
    # Then transformers' side by side, until 85% of the budget; the compiled row takes the
    # rest (without it, the shapes run until 90%).
    shapes_end = start + (0.75 if args.compile_layers else 0.9) * args.budget_s
    for left, shape_name in zip(range(len(names), 0, -1), names):
        now = time.perf_counter()
        if now > shapes_end:
            print(f"\n== {shape_name}: skipped, the --budget-s of {args.budget_s:.0f} s is spent")
            continue
        # An equal share of what is left, so one slow shape cannot starve the rest.
        try:
            run_shape(SHAPES[shape_name], args, device, now + (shapes_end - now) / left, peak)
        except Exception as exc:  # one family's failure must not cost the others' figures
            report_failure(shape_name, exc)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    transformers_side_by_side(args, device, start + 0.85 * args.budget_s)
    if args.compile_layers:  # last: a compile that overruns the budget costs only itself
        try:
            compiled_rows(args, device, deadline)
        except Exception as exc:  # as a shape's: what was measured before still stands
            report_failure("--compile", exc)
    print(f"\n(the run took {time.perf_counter() - start:.1f} s)\n{LEGEND}")


if __name__ == "__main__":
    main()
