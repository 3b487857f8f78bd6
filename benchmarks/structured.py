r"""Structured-output benchmark: real-world JSON Schemas (JSONSchemaBench's, in
shared/reference/schemas) held on each model's output, in process.

Per model: how many schemas compile and why the rest are refused (first line of the message,
counted), the compile time per schema, then for the compiled ones, each request alone (one at a
time) and batched (`--batch` at once), with the constraint and without it (the same prompt and
every field the same; without a constraint every schema's request is the same one, so it runs
once alone and as one batch). Printed per run: the share of `stop` finishes that validate (any
that does not is printed loudly with its schema's file), the share of all requests that end
valid, the share cut by length (and which schemas), errors, steps the closing rule forced and in
how many requests, tokens per forward (tokens committed up to and with EOS / forwards of the
request), the matcher's cost (`RowConstraint.allowed` + `accept`, per row-step, and its share
of the step time) and wall time. The tiny reference checkpoints have random weights: only the
validity shares, tokens per forward and costs mean anything there. Families without a
constrained rule are reported refused, with the reason.

    python benchmarks/structured.py                      # all 160 schemas, ~6 min on 2 cores
    python benchmarks/structured.py --limit 2            # 2 schemas a group, ~1 min
    python benchmarks/structured.py --models embedded --groups Glaiveai2K,Kubernetes --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch

from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import InvalidParam, SamplingParams
from marble.structured.compiler import ConstraintError
from marble.structured.constraint import Constraint

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
SCHEMAS = REFERENCE / "schemas"
MODELS = "embedded,llada-tiny,dream-tiny,llada2-tiny,diffusiongemma-tiny,sdar-tiny"
PROMPT = "Return a JSON object matching the schema."
LEGEND = """\
  stop-valid  `stop` finishes whose text validates against the schema (must be 100%)
  valid       requests that end with a valid text / all requests
  length      requests cut by max_tokens (they need more tokens); error: finish_reason error
  closed      steps whose token the closing rule forced / requests it forced any in
  tok/fwd     tokens committed up to and with EOS / forwards, summed over the requests
  matcher     RowConstraint.allowed + accept: median us per row-step, share of step wall time
  wall        seconds for the whole run"""


@dataclass
class Schema:
    name: str  # group/file
    schema: Any
    constraint: Constraint


@dataclass
class Outcome:
    """One finished request."""

    name: str
    finish: str
    text: str
    forwards: int
    tokens: int
    closed: int
    error_code: str | None


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    row_step_s: list[float] = field(default_factory=list)  # matcher time per row-step
    matcher_s: float = 0.0
    step_s: float = 0.0
    wall_s: float = 0.0


def load_schemas(groups: list[str] | None, limit: int) -> list[Schema]:
    folders = sorted(p for p in SCHEMAS.iterdir() if p.is_dir())
    if groups:
        missing = set(groups) - {p.name for p in folders}
        if missing:
            raise SystemExit(f"no schema group {sorted(missing)} in {SCHEMAS}")
        folders = [p for p in folders if p.name in groups]
    out = []
    for folder in folders:
        files = sorted(folder.glob("*.json"))
        for f in files[:limit] if limit else files:
            schema = json.loads(f.read_text())
            name = f"{folder.name}/{f.name}"
            out.append(Schema(name, schema, Constraint.json_schema(schema, "response_format")))
    return out


def checkpoint(name: str) -> str | None:
    return None if name == "embedded" else str(REFERENCE / name if "/" not in name else name)


def first_line(exc: Exception) -> str:
    """The reason a refusal gives, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # A message that introduces its detail on the next line ("regex parse error:") keeps it.
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def timed(method: Callable[..., Any], run: Run, per_step: dict[int, float], at: list[int]) -> Any:
    """`method`, with its time added to the run's and to the current step's."""

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            spent = time.perf_counter() - start
            run.matcher_s += spent
            per_step[at[0]] = per_step.get(at[0], 0.0) + spent

    return wrapper


def tokens_to_eos(request: Request, outs: list[StepOutput]) -> int:
    """Generated tokens committed, up to and with the first EOS (filled positions past it
    are not committed tokens). A uniform-state canvas commits nothing one token at a time:
    its tokens are the final ones up to and with EOS."""
    end = request.eos_at if request.eos_at is not None else len(request.tokens)
    if outs and outs[-1].canvas_span is not None:
        return min(end + 1, len(request.tokens))
    return sum(1 for o in outs for c in o.committed if c.pos <= end)


def execute(engine: Engine, batches: list[list[tuple[str, Request]]]) -> Run:
    """Each batch added at once and stepped to the end, one batch after another."""
    run = Run()
    at = [0]
    start = time.perf_counter()
    for batch in batches:
        steps: dict[str, dict[int, float]] = {}
        names = {}
        for name, request in batch:
            rid = request.request_id
            names[rid] = (name, request)
            if request.constraint is not None:
                rc = request.constraint
                steps[rid] = {}
                rc.allowed = timed(rc.allowed, run, steps[rid], at)  # type: ignore[method-assign]
                rc.accept = timed(rc.accept, run, steps[rid], at)  # type: ignore[method-assign]
            engine.add(request)
        outs: dict[str, list[StepOutput]] = {rid: [] for rid in names}
        while engine.has_unfinished():
            at[0] += 1
            t = time.perf_counter()
            step = engine.step()
            run.step_s += time.perf_counter() - t
            for o in step:
                outs[o.request_id].append(o)
        for rid, (name, request) in names.items():
            last = outs[rid][-1]
            rc = request.constraint
            run.outcomes.append(
                Outcome(
                    name,
                    str(last.finish_reason),
                    last.text,
                    max(o.step for o in outs[rid]),
                    tokens_to_eos(request, outs[rid]),
                    rc.closed if rc is not None else 0,
                    last.error_code,
                )
            )
            run.row_step_s += list(steps.get(rid, {}).values())
    run.wall_s = time.perf_counter() - start
    return run


def validity(schema: Any, text: str) -> tuple[bool, str]:
    """(valid, why not), by the validator its $schema names; formats checked separately."""
    try:
        instance = json.loads(text)
    except ValueError as exc:
        return False, f"not JSON: {exc}"
    cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(instance))
    if error is not None:
        return False, error.message[:200]
    fmt = cls(schema, format_checker=cls.FORMAT_CHECKER)
    error = jsonschema.exceptions.best_match(fmt.iter_errors(instance))
    return True, "" if error is None else f"format: {error.message[:200]}"


def report(label: str, run: Run, schemas: dict[str, Schema] | None) -> None:
    n = len(run.outcomes)
    finishes = Counter(o.finish for o in run.outcomes)
    tokens = sum(o.tokens for o in run.outcomes)
    forwards = sum(o.forwards for o in run.outcomes)
    line = (
        f"  {label:<26} n={n:<4} length {finishes['length']:>3} ({finishes['length'] / n:6.1%})"
        f"  error {finishes['error']:<3} tok/fwd {tokens / max(forwards, 1):5.2f}"
        f"  wall {run.wall_s:7.1f}s"
    )
    if schemas is None:
        print(line + f"  stop {finishes['stop'] / n:6.1%}")
        return
    stops = [o for o in run.outcomes if o.finish == "stop"]
    checked = {o.name: validity(schemas[o.name].schema, o.text) for o in stops}
    valid = [o for o in stops if checked[o.name][0]]
    closed = [o.closed for o in run.outcomes if o.closed]
    med = statistics.median(run.row_step_s) * 1e6 if run.row_step_s else 0.0
    share = run.matcher_s / max(run.step_s, 1e-9)
    print(
        line + f"\n  {'':<26} stop-valid {len(valid)}/{len(stops)}"
        f" ({len(valid) / max(len(stops), 1):.1%})  valid {len(valid) / n:6.1%}"
        f"  closed {sum(closed)} steps in {len(closed)} requests"
        f"  matcher {med:8.0f} us/row-step, {share:5.1%} of step time"
    )
    for o in stops:
        ok, why = checked[o.name]
        if not ok:
            print(f"  !!! VIOLATION {o.name}: {why}\n      text: {o.text[:300]!r}")
        elif why:
            print(f"  (format not met, {o.name}: {why})")
    cut = sorted(o.name for o in run.outcomes if o.finish == "length")
    if cut:
        print(f"  {'':<26} cut by length (need more tokens): {', '.join(cut)}")
    codes = Counter(o.error_code for o in run.outcomes if o.finish == "error")
    if codes:
        print(f"  {'':<26} errors: " + ", ".join(f"{c} x{k}" for c, k in codes.most_common()))


def bench_model(name: str, schemas: list[Schema], args: argparse.Namespace) -> None:
    print(f"\n=== {name} ===")
    try:
        engine = Engine.from_pretrained(checkpoint(name), progress=False)
    except (OSError, ValueError) as exc:
        print(f"  not loaded: {first_line(exc)}")
        return
    anything = Constraint.json_schema({"type": "object"}, "response_format")
    start = time.perf_counter()
    try:  # the model's own defaults: what a family refuses beside a constraint, it names
        probe = engine.make_request(
            PROMPT, engine.defaults.replace(token_healing=False), constraint=anything
        )
    except InvalidParam as exc:
        print(f"  refused all {len(schemas)} schemas: {first_line(exc)}")
        return
    print(f"  llguidance tokenizer + first compile {time.perf_counter() - start:.2f}s")
    room = engine.context - len(probe.prompt_ids)
    block = engine.defaults.block_length or args.max_tokens
    max_tokens = min(args.max_tokens, room // block * block or room)
    # steps stays the model's own: its meaning is the family's (total, or per block).
    params: SamplingParams = engine.defaults.replace(
        max_tokens=max_tokens,
        threshold=args.threshold,
        temperature=args.temperature,
        seed=args.seed,
        token_healing=False,
    )
    print(
        f"  family {engine.first.family.name}, context {engine.context}; every request: "
        f"max_tokens={params.max_tokens} steps={params.steps} threshold={params.threshold} "
        f"temperature={params.temperature} seed={params.seed} "
        f"block_length={params.block_length} token_healing={params.token_healing}"
    )

    compiled: list[Schema] = []
    refused: Counter[str] = Counter()
    seconds: list[float] = []
    for s in schemas:
        start = time.perf_counter()
        try:
            engine.first.grammars.compile(s.constraint)
            seconds.append(time.perf_counter() - start)
            engine.make_request(PROMPT, params, constraint=s.constraint)
            compiled.append(s)
        except (ConstraintError, InvalidParam) as exc:
            seconds.append(time.perf_counter() - start)
            refused[first_line(exc)] += 1
    print(
        f"  schemas: {len(compiled)} compiled, {sum(refused.values())} refused;"
        f" compile median {statistics.median(seconds) * 1e3:.1f} ms,"
        f" max {max(seconds) * 1e3:.1f} ms"
    )
    for why, count in refused.most_common():
        print(f"    refused x{count}: {why}")
    if not compiled:
        return
    by_name = {s.name: s for s in compiled}

    def requests(constrained: bool) -> list[tuple[str, Request]]:
        return [
            (s.name, engine.make_request(PROMPT, params, constraint=s.constraint))
            if constrained
            else (s.name, engine.make_request(PROMPT, params))
            for s in compiled
        ]

    def batches(items: list[tuple[str, Request]]) -> list[list[tuple[str, Request]]]:
        return [items[i : i + args.batch] for i in range(0, len(items), args.batch)]

    report("alone, constrained", execute(engine, [[r] for r in requests(True)]), by_name)
    report("alone, unconstrained", execute(engine, [requests(False)[:1]]), None)
    report(f"batch {args.batch}, constrained", execute(engine, batches(requests(True))), by_name)
    # Unconstrained, every request is the same one: one batch of them shows the batched rate.
    same = requests(False)[: args.batch]
    report(f"batch {len(same)}, unconstrained", execute(engine, [same]), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="embedded or reference checkpoints")
    parser.add_argument("--groups", default="", help="schema folders (default: all eight)")
    parser.add_argument("--limit", type=int, default=0, help="schemas per group (0: all)")
    parser.add_argument("--max-tokens", type=int, default=256, help="cut to fit the context")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="requests added at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schemas = load_schemas([g for g in args.groups.split(",") if g], args.limit)
    print(f"{len(schemas)} schemas from {SCHEMAS}; prompt {PROMPT!r}")
    print(LEGEND)
    for name in args.models.split(","):
        bench_model(name, schemas, args)


if __name__ == "__main__":
    main()
