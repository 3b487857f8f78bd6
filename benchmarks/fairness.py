"""Fairness benchmark, in process on the tiny reference checkpoints (../shared/reference).

Table 1: a short DiffusionGemma request (its serving defaults: one canvas, 8 steps) alone, then
beside 16 maximal-work requests (the most the work bound admits: every canvas of the context,
steps at the bound, a stop rule that never fires), with long requests allowed every batch
slot (short_slots=0: the admission before long/short classing) and with the default reserve.
Table 2: a request to one served model alone, then while 40 closed-loop clients flood another
model, under one FIFO queue across models (the admission before) and under today's rule (the
model running fewest gets the next free slot). Latency is submission to finish, stepping the
engine in this thread; ratio = latency / alone; the CPU columns (this process's CPU time, one
torch thread by default) hold steady where other work shares the cores. A "before" row gives
up after --cap seconds.

    python benchmarks/fairness.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from same_work import scheduler_config

from marble.scheduler.engine import Engine
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import MAX_FORWARDS_PER_POSITION, SamplingParams
from marble.scheduler.scheduler import Scheduler, SchedulerConfig
from marble.scheduler.served_model import ServedModel, load_served

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


class OneQueue(Scheduler):
    """The admission before: one FIFO queue across every served model."""

    def _next_locked(self, long_full: bool) -> Request | None:
        heads = [queue[0] for queue in self.waiting.values() if queue]
        return min(heads, key=lambda r: self._arrival[r.request_id], default=None)


def engine_of(first: ServedModel, config: SchedulerConfig, *more: ServedModel) -> Engine:
    """A fresh engine (fresh runners) over loaded models."""
    engine = Engine(first.model, first.tokenizer, config, first.defaults, first.name)
    for m in more:
        engine.add_model(ServedModel(m.name, m.model, m.tokenizer, m.defaults))
    return engine


def run_until(engine: Engine, request: Request, cap: float, refill=None) -> Timed | None:
    """From adding `request` until it finishes (None past `cap`), stepping the engine;
    `refill(finished_id)` runs for every other request that finishes."""
    start, cpu = time.perf_counter(), time.process_time()
    engine.add(request)
    steps = 0
    while time.perf_counter() - start < cap:
        steps += 1
        for out in engine.step():
            if not out.finished:
                continue
            if out.request_id == request.request_id:
                wall = time.perf_counter() - start
                return Timed(wall, time.process_time() - cpu, steps, out.step)
            if refill is not None:
                refill(out.request_id)
    engine.abort(request.request_id)
    return None


def stop_all(engine: Engine) -> None:
    for request_id in list(engine.requests):
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()


@dataclass(frozen=True)
class Timed:
    seconds: float  # submission to finish
    cpu: float  # CPU seconds this process spent meanwhile (steady on a shared machine)
    engine_steps: int  # engine steps meanwhile (waiting ones included)
    own_steps: int  # steps the request took part in


def median_of(engine: Engine, make, repeats: int, cap: float, refill=None) -> Timed | None:
    """The median latency of `repeats` requests `make(engine)`, one after the other (after
    one untimed, which warms the engine up when it is idle)."""
    run_until(engine, make(engine), cap, refill)
    times = [run_until(engine, make(engine), cap, refill) for _ in range(repeats)]
    if None in times:
        return None
    return sorted(times, key=lambda t: t.seconds)[len(times) // 2]


class Flood:
    """Closed-loop clients of one model: each sends its next request when its last finishes."""

    def __init__(self, engine: Engine, params: SamplingParams, clients: int) -> None:
        self.engine, self.params = engine, params
        self.ids: set[str] = set()
        for _ in range(clients):
            self.submit()

    def submit(self) -> None:
        request = self.engine.make_request("Count to ten:", self.params)
        self.ids.add(self.engine.add(request).request_id)

    def refill(self, finished_id: str) -> None:
        if finished_id in self.ids:
            self.ids.discard(finished_id)
            self.submit()


HEADER = (
    "| latency s | ratio | CPU s | CPU ratio | engine steps (its own) |\n|---|---|---|---|---|---|"
)


def row(label: str, timed: Timed | None, alone: Timed, cap: float) -> None:
    if timed is None:
        print(f"| {label} | > {cap:.0f} (gave up) | > {cap / alone.seconds:.0f} | | | |")
        return
    ratio, cpu_ratio = timed.seconds / alone.seconds, timed.cpu / alone.cpu
    steps = f"{timed.engine_steps} ({timed.own_steps})"
    print(
        f"| {label} | {timed.seconds:.3f} | {ratio:.1f} | {timed.cpu:.3f} | {cpu_ratio:.1f} "
        f"| {steps} |"
    )


def long_versus_short(dg: ServedModel, repeats: int, cap: float) -> None:
    context, canvas = dg.context, dg.model.cfg.canvas_length
    prompt = "Tell me a long story."
    prompt_len = len(dg.tokenizer.encode(prompt))
    maximal = dg.defaults.replace(
        max_tokens=(context - prompt_len) // canvas * canvas,
        steps=MAX_FORWARDS_PER_POSITION * canvas,
        stability_threshold=64,
        confidence_threshold=0.0,
        ignore_eos=True,
    )

    def short(engine: Engine) -> Request:
        return engine.make_request("What is the capital of France?", dg.defaults.replace(seed=1))

    probe = engine_of(dg, scheduler_config())
    alone = median_of(probe, short, repeats, cap)
    worst = probe.make_request(prompt, maximal).max_forwards
    print(f"\n### A short request beside 16 maximal-work requests ({worst} forwards each)\n")
    print(f"| short request (DiffusionGemma defaults) {HEADER}")
    row("alone", alone, alone, cap)
    for label, slots in (("beside 16 long, long may take every slot (before)", 0), ("", None)):
        probe = engine_of(dg, scheduler_config(max_batch_size=16, short_slots=slots))
        label = label or f"beside 16 long, {probe.scheduler.config.reserved_short} slots kept short"
        for _ in range(16):
            probe.add(probe.make_request(prompt, maximal))
        for _ in range(3):
            probe.step()
        row(label, median_of(probe, short, 1 if slots == 0 else repeats, cap), alone, cap)
        stop_all(probe)


def across_models(flooded: ServedModel, other: ServedModel, repeats: int, cap: float) -> None:
    flood_params = flooded.defaults.replace(max_tokens=64, block_length=32, ignore_eos=True)
    clients, name = 40, other.name

    def request_to_other(engine: Engine) -> Request:
        params = other.defaults.replace(seed=1)  # the same steps wherever it runs
        return engine.make_request("What is the capital of France?", params, model=name)

    probe = engine_of(flooded, scheduler_config(max_batch_size=16), other)
    alone = median_of(probe, request_to_other, repeats, cap)
    print(f"\n### A request to one model while {clients} clients flood another\n")
    print(f"| request to {other.name} ({flooded.name} flooded) {HEADER}")
    row("alone", alone, alone, cap)
    for label, scheduler in (("one FIFO queue (before)", OneQueue), ("fewest running first", None)):
        probe = engine_of(flooded, scheduler_config(max_batch_size=16), other)
        if scheduler is not None:
            probe.scheduler = scheduler(probe.scheduler.config)
            probe.scheduler.serve_models(len(probe.models))
        flood = Flood(probe, flood_params, clients)
        for _ in range(3):
            probe.step()
        row(label, median_of(probe, request_to_other, repeats, cap, flood.refill), alone, cap)
        stop_all(probe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="short requests timed per row")
    parser.add_argument("--cap", type=float, default=30.0, help="seconds a before-row waits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU s ~ work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dg = load_served(REFERENCE / "diffusiongemma-tiny", "diffusiongemma-tiny", "cpu", "float32")
    llada = load_served(REFERENCE / "llada-tiny", "llada-tiny", "cpu", "float32", SamplingParams())
    print(f"torch threads: {torch.get_num_threads()}")
    long_versus_short(dg, args.repeats, args.cap)
    across_models(llada, dg, args.repeats, args.cap)


if __name__ == "__main__":
    main()
