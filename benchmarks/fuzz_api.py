"""Fuzz the HTTP API against its own OpenAPI spec with schemathesis: no 5xx, no spec violation.

Starts a real server (`python -m marble.server`, 127.0.0.1 only, small limits so generated requests
finish fast: a view of the checkpoint whose serving defaults ask for a short canvas, at most 2
choices; a cap on its address space so a runaway request fails instead of taking the machine's
memory), loads its `/openapi.json`, sends `--cases` generated requests spread over every
operation (schema-valid and schema-invalid data), and checks each response with
`not_a_server_error`, `status_code_conformance`, `content_type_conformance`,
`response_headers_conformance` and `response_schema_conformance`. Prints the cases, the
responses by status and the failures by check, with one example of each failure. Exit status 1
when any check failed.

Not part of CI (minutes on a CPU). Needs schemathesis, which this script does not install:

    pip install schemathesis
    python benchmarks/fuzz_api.py                 # 2,000 cases against the tiny LLaDA checkpoint
    python benchmarks/fuzz_api.py --cases 300 --model model/default/checkpoint
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_server import local_server

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "reference" / "llada-tiny"
EMBEDDED = ROOT / "model" / "default" / "checkpoint"

# Small limits: a generated case is refused or finishes in milliseconds to about a second.
SERVER_ENV = {
    "MARBLE_MAX_BODY_BYTES": "65536",
    "MARBLE_MAX_N": "2",
    "MARBLE_MAX_BATCH_SIZE": "4",
    "MARBLE_DRAIN_TIMEOUT_S": "2",
    "MARBLE_RETAIN_FINISHED_S": "5",
    "MARBLE_TORCH_THREADS": "1",
    "MARBLE_LOG_LEVEL": "warning",
    "MARBLE_PING_S": "0.1",  # an idle event stream sends bytes, so reading it stops on time
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=2000, help="generated requests in all (>= 1)")
    p.add_argument(
        "--model",
        type=Path,
        default=TINY if TINY.exists() else EMBEDDED,
        help="checkpoint folder (default: the tiny LLaDA reference, else embedded)",
    )
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a response may take before it counts as a hang",
    )
    p.add_argument(
        "--stream-seconds",
        type=float,
        default=0.3,
        help="an event stream is read this long at most, then closed",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=6.0,
        help="the server's address-space cap (RLIMIT_AS); 0 for none",
    )
    p.add_argument(
        "--max-wall",
        type=float,
        default=1800.0,
        help="stop generating after this many seconds (the counts say so)",
    )
    p.add_argument("--show", type=int, default=3, help="examples printed per failing check")
    args = p.parse_args()
    if args.cases < 1:
        p.error("--cases must be at least 1")
    return args


def short_defaults(model: Path, into: Path) -> Path:
    """The checkpoint's files linked under `into` (same folder name, so the same served model
    name), with serving defaults of an 8-token canvas: a request that leaves `max_tokens`
    out finishes in a few forwards."""
    view = into / model.name
    view.mkdir()
    for file in model.iterdir():
        if file.name != "marble_defaults.json":
            (view / file.name).symlink_to(file.resolve())
    defaults_file = model / "marble_defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    defaults.update(max_tokens=8, block_length=8)
    (view / "marble_defaults.json").write_text(json.dumps(defaults))
    return view


def memory_cap(gigabytes: float) -> Callable[[], None] | None:
    """Caps the server's address space, so a request that allocates without bound fails."""
    limit = int(gigabytes * 2**30)
    if not limit:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@dataclass
class Tally:
    cases: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    seconds: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter = field(default_factory=collections.Counter)


def send(case: Any, base: str, args: argparse.Namespace) -> Any:
    """The case over HTTP; an event stream is read until it ends or `--stream-seconds`."""
    import requests

    kwargs = case.as_transport_kwargs(base_url=base)
    kwargs.pop("timeout", None)
    start = time.monotonic()
    r = requests.request(**kwargs, stream=True, timeout=(5, args.timeout))
    body = b""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        r.raw.decode_content = True
        try:
            for chunk in r.iter_content(chunk_size=None):
                body += chunk
                if time.monotonic() - start > args.stream_seconds:
                    break
        except requests.RequestException:
            pass
        r.close()
    else:
        body = r.content
    r._content = body
    r._content_consumed = True
    return r


def describe(case: Any, response: Any, failure: Any) -> str:
    body = case.body if not _is_unset(case.body) else None
    sent = {
        k: v
        for k, v in (
            ("path", case.path_parameters),
            ("query", case.query),
            ("headers", case.headers),
            ("body", body),
        )
        if v
    }
    text = response.content[:300].decode("utf-8", "replace")
    title = getattr(failure, "title", type(failure).__name__)
    return (
        f"{case.method} {case.formatted_path} {sent!r:.400}\n      -> {response.status_code} "
        f"{response.headers.get('content-type')} {text!r}\n      {title}: "
        f"{str(getattr(failure, 'message', failure))[:400]}"
    )


def _is_unset(value: Any) -> bool:
    return type(value).__name__ == "NotSet"


def run(args: argparse.Namespace, base: str) -> Tally:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import Failure, FailureGroup
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    tally = Tally()
    started = time.monotonic()

    def record(case: Any) -> None:
        label = f"{case.method} {case.path}"
        start = time.monotonic()
        try:
            response = send(case, base, args)
            tally.seconds[label] += time.monotonic() - start
        except Exception as exc:  # a hang or a dropped connection is a finding too
            tally.cases += 1
            tally.by_op[label] += 1
            tally.errors[type(exc).__name__] += 1
            key = f"transport: {type(exc).__name__}"
            tally.failures[key] += 1
            if len(tally.examples[key]) < args.show:
                tally.examples[key].append(f"{case.method} {case.formatted_path} {exc}")
            return
        tally.cases += 1
        tally.by_op[label] += 1
        tally.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except (FailureGroup, Failure) as exc:
            found = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
            for failure in found:
                name = ",".join(getattr(failure, "checks", ())) or type(failure).__name__
                tally.failures[name] += 1
                if len(tally.examples[name]) < args.show:
                    tally.examples[name].append(describe(case, response, failure))

    # Rounds over every (operation, mode) until the budget is spent: hypothesis stops early on
    # an operation with few distinct inputs, so the others take up the rest.
    per_round = max(1, args.cases // (2 * len(operations)))
    exhausted: set[tuple[str, str]] = set()
    round_seed = args.seed
    while tally.cases < args.cases and time.monotonic() - started < args.max_wall:
        progressed = False
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                key = (op.label, mode.value)
                if key in exhausted or tally.cases >= args.cases:
                    continue
                before = tally.cases
                budget = min(per_round, args.cases - tally.cases)

                @seed(round_seed)
                @settings(
                    max_examples=budget,
                    database=None,
                    deadline=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                    derandomize=False,
                )
                @given(case=op.as_strategy(generation_mode=mode))
                def fuzz(case: Any) -> None:
                    record(case)

                try:
                    fuzz()
                except Exception as exc:  # unsatisfiable negative data, for instance
                    tally.errors[f"generation {op.label} {mode.value}: {type(exc).__name__}"] += 1
                    exhausted.add(key)
                made = tally.cases - before
                progressed |= made > 0
                elapsed = time.monotonic() - started
                print(f"  {tally.cases:5d} cases, {elapsed:4.0f} s  (+{made} {key})", flush=True)
                if made < budget // 2:
                    exhausted.add(key)
        round_seed += 1
        if not progressed:
            break
    return tally


def report(tally: Tally, wall: float) -> None:
    print(f"\ncases: {tally.cases} in {wall:.0f} s")
    print("by operation:")
    for label, count in sorted(tally.by_op.items()):
        print(f"  {count:6d}  {label}  ({tally.seconds[label] / count * 1e3:.0f} ms each)")
    print("responses by status:")
    for status, count in sorted(tally.statuses.items()):
        print(f"  {count:6d}  {status}")
    server_errors = sum(c for s, c in tally.statuses.items() if s >= 500)
    print(f"responses >= 500: {server_errors}")
    print("failures by check:" + ("" if tally.failures else " none"))
    for name, count in tally.failures.most_common():
        print(f"  {count:6d}  {name}")
        for example in tally.examples[name]:
            print(f"      e.g. {example}")
    for name, count in tally.errors.items():
        print(f"  note: {count} x {name}")


def main() -> int:
    args = parse_args()
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        print("needs schemathesis: pip install schemathesis", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="marble-fuzz-") as tmp:
        model = short_defaults(args.model.resolve(), Path(tmp))
        with local_server(
            ["--model", str(model)],
            port=args.port,
            env=SERVER_ENV,
            preexec_fn=memory_cap(args.memory_gb),
        ) as (base, _):
            tally = run(args, base)
    report(tally, time.monotonic() - started)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
