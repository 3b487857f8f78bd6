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

Then sends the hostile cases no schema describes, each a class counted on its own line: bodies
of about 1 MB made of one item repeated (a huge prompt list, a million bad values),
`chat_template_kwargs` naming the renderer's own variables, odd `Last-Event-ID` headers and
`last_event_id` values (long digit strings, digits `int()` refuses), tiny positive temperatures
on every sampler path, the largest `steps` / `max_post_steps` / `stability_threshold`, and odd
API keys. The server runs with an API key, which every case but the API-key ones sends. A
response >= 500, or a 200 event stream carrying a server error, fails its class.

Not part of CI (minutes on a CPU). Needs schemathesis, which this script does not install:

    pip install schemathesis
    python benchmarks/fuzz_api.py                 # 2,000 cases against the tiny LLaDA checkpoint
    python benchmarks/fuzz_api.py --cases 300 --model model/default/checkpoint
    python benchmarks/fuzz_api.py --cases 0 --model ../shared/reference/llada2-tiny  # hostile only
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_server import local_server

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "reference" / "llada-tiny"
EMBEDDED = ROOT / "model" / "default" / "checkpoint"

# Small limits: a generated case is refused or finishes in milliseconds to about a second.
API_KEY = "fuzz-key"
# Hostile bodies are about this size: past the 64 KiB of the generated cases, so the body
# limit lets them through to validation, small enough that a run stays quick.
HOSTILE_BYTES = 1 << 20
SERVER_ENV = {
    "MARBLE_API_KEY": API_KEY,
    "MARBLE_PUBLIC_OPS": "true",  # the spec loads without the key
    "MARBLE_MAX_BODY_BYTES": str(2 * HOSTILE_BYTES),
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
    p.add_argument(
        "--cases", type=int, default=2000, help="generated requests in all (0: hostile cases only)"
    )
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
    if args.cases < 0:
        p.error("--cases must be at least 0")
    return args


def short_defaults(model: Path, into: Path) -> Path:
    """The checkpoint's files linked under `into` (same folder name, so the same served model
    name), with serving defaults of an 8-token canvas: a request that leaves `max_tokens`
    out finishes in a few forwards. A uniform-state model (DiffusionGemma) keeps the block
    length its fixed canvas sets, which is the only one it takes."""
    view = into / model.name
    view.mkdir()
    for file in model.iterdir():
        if file.name != "marble_defaults.json":
            (view / file.name).symlink_to(file.resolve())
    defaults_file = model / "marble_defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    defaults.update(max_tokens=8)
    config_file = model / "config.json"
    if "canvas_length" not in (json.loads(config_file.read_text()) if config_file.exists() else {}):
        defaults.update(block_length=8)
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
    op_statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter = field(default_factory=collections.Counter)


def send(case: Any, base: str, args: argparse.Namespace) -> Any:
    """The case over HTTP; an event stream is read until it ends or `--stream-seconds`."""
    import requests

    kwargs = case.as_transport_kwargs(base_url=base)
    kwargs.pop("timeout", None)
    headers = kwargs.setdefault("headers", {})
    if not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = f"Bearer {API_KEY}"
    return read(requests.request(**kwargs, stream=True, timeout=(5, args.timeout)), args)


def read(r: Any, args: argparse.Namespace) -> Any:
    """The response's body; an event stream is read until it ends or `--stream-seconds`."""
    import requests

    start = time.monotonic()
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
        tally.op_statuses[label][response.status_code] += 1
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


@dataclass(frozen=True)
class Hostile:
    """One hand-made request of a hostile class; `own_stream`: an event stream that only
    carries this request's events (the dashboard feed also replays other requests')."""

    kind: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    params: dict[str, str] | None = None
    own_stream: bool = True


COMPLETIONS, CHAT, GENERATE = "/v1/completions", "/v1/chat/completions", "/v1/diffusion/generate"
ATTACH = "/v1/diffusion/requests/{id}/events"
DASHBOARD = "/v1/diffusion/events"
# Variables chat templates read or the renderer sets (refused), then names it does not know.
TEMPLATE_NAMES = (
    "messages",
    "add_generation_prompt",
    "tools",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "mask_token",
    "raise_exception",
    "namespace",
    "range",
    "dict",
    "lipsum",
    "cycler",
    "joiner",
    "self",
    "loop",
    "caller",
    "kwargs",
    "varargs",
    "enable_thinking",
    "custom_tools",
    "documents",
    "date_string",
    "strftime_now",
    "",
    "__class__",
    "x" * 1000,
)
EVENT_IDS = (
    "9" * 5000,  # past int()'s 4,300-digit limit
    "9" * 20,
    str(2**63),
    str(2**63 - 1),
    "0" * 19,
    "0" * 20,
    "\u00b2",  # superscript two: str.isdigit() says yes, int() says no
    "\u0661\u0662",  # Arabic-Indic digits: int() reads them
    "\uff11\uff12",  # fullwidth digits
    "-1",
    "+3",
    " 3 ",
    "",
    "0x10",
    "3.0",
    "1e3",
    "3_0",
    "abc",
)
TINY_TEMPERATURES = (5e-324, 1e-300, 1e-46, 1e-45, 1e-40, 1e-38, 1e-37, 1e-30, 1e-20, 1e-7)
SAMPLERS = ({}, {"top_k": 3}, {"top_p": 0.5}, {"remasking": "random"})
# The largest work a request may ask for, alone and together; read briefly, then dropped.
HUGE_WORK = (
    {"steps": 1 << 20},
    {"steps": 10**9},
    {"max_tokens": 1 << 20},
    {"max_tokens": 1 << 20, "block_length": 1},
    {"max_post_steps": 1024, "editing_threshold": 0.0},
    {"max_post_steps": 10**9},
    {"stability_threshold": 64, "confidence_threshold": 0.0},
    {"stability_threshold": 10**9},
    {"num_to_transfer": 1 << 20},
    {"draft_every": 1 << 20},
    {"steps": 1 << 20, "stability_threshold": 64, "max_post_steps": 1024, "n": 2},
)
API_KEYS: tuple[str | bytes | None, ...] = (
    None,
    "Bearer",
    "Bearer ",
    "Bearer wrong",
    f"bearer {API_KEY}",
    f"Bearer  {API_KEY} ",
    "Basic Zm9vOmJhcg==",
    "Bearer " + "x" * 8000,
    b"Bearer \xe9\xff",  # latin-1, not UTF-8
    "Bearer ключ".encode(),
    b"Bearer \x7f\x01",
    f"Bearer {API_KEY}".encode() + b"\x80",
)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _repeated(head: str, item: str, tail: str) -> bytes:
    """`head` + a JSON list of `item` repeated to about HOSTILE_BYTES + `tail`."""
    count = HOSTILE_BYTES // (len(item) + 1)
    return f"{head}[{','.join([item] * count)}]{tail}".encode()


def hostile_cases() -> Iterator[Hostile]:
    """Every hostile case; `{id}` in a path is a live request's id, filled in when sent."""
    short = '"max_tokens":1}'
    for path, head, item in (
        (COMPLETIONS, '{"prompt":', "0"),
        (COMPLETIONS, '{"prompt":', '"a"'),
        (COMPLETIONS, '{"prompt":', "[0]"),
        (COMPLETIONS, '{"prompt":', "null"),
        (COMPLETIONS, '{"prompt":', "{}"),
        (COMPLETIONS, '{"prompt":', "-1"),
        (COMPLETIONS, '{"prompt":"a","stop":', '"x"'),
        (COMPLETIONS, '{"prompt":"a","temperature":', "0"),
        (CHAT, '{"messages":', '{"role":"user","content":"x"}'),
        (CHAT, '{"messages":', "1"),
        (CHAT, '{"messages":', '{"role":"nobody"}'),
        (CHAT, '{"messages":[{"role":"user","content":', '{"type":"text","text":"x"}'),
        (GENERATE, '{"prompt":', "0"),
        (GENERATE, '{"prompt":', "1.5"),
    ):
        close = "}]," if head.endswith('"content":') else ","
        yield Hostile("huge body", "POST", path, _repeated(head, item, close + short))
    many_keys = ",".join(f'"k{i}":{i}' for i in range(HOSTILE_BYTES // 12))
    body = (
        f'{{"messages":[{{"role":"user","content":"x"}}],"chat_template_kwargs":{{{many_keys}}}}}'
    )
    yield Hostile("huge body", "POST", CHAT, body.encode())

    # Numbers JSON allows that Python's int() and float() may refuse or overflow on.
    for number in ("9" * 5000, "1" + "0" * 400, "1e999", "-1e999", "NaN", "Infinity", "-0", "1.5"):
        for name in ("temperature", "seed", "max_tokens", "steps", "top_k", "stability_threshold"):
            body = f'{{"prompt":"a","{name}":{number}}}'.encode()
            yield Hostile("odd numbers", "POST", COMPLETIONS, body)
        yield Hostile("odd numbers", "POST", COMPLETIONS, f'{{"prompt":[{number}]}}'.encode())
        message = '{"role":"user","content":"x"}'
        chat = f'{{"messages":[{message}],"chat_template_kwargs":{{"x":{number}}}}}'
        yield Hostile("odd numbers", "POST", CHAT, chat.encode())

    for name in TEMPLATE_NAMES:
        for value in ("s", 1, None, True):
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            body = _json({**chat, "chat_template_kwargs": {name: value}})
            yield Hostile("chat_template_kwargs", "POST", CHAT, body)

    for value in EVENT_IDS:
        # A header goes as latin-1 where it can (what servers decode it as), else as UTF-8;
        # surrounding whitespace, which HTTP strips, only in the query.
        text = value.strip()
        header = text.encode("latin-1" if all(ord(c) < 256 for c in text) else "utf-8")
        for path in (ATTACH, DASHBOARD):
            own = path == ATTACH
            yield Hostile(
                "Last-Event-ID", "GET", path, headers={"Last-Event-ID": header}, own_stream=own
            )
            yield Hostile(
                "Last-Event-ID", "GET", path, params={"last_event_id": value}, own_stream=own
            )

    for temperature in TINY_TEMPERATURES:
        for sampler in SAMPLERS:
            settings = {"temperature": temperature, "seed": 1, "max_tokens": 8, **sampler}
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            yield Hostile(
                "tiny temperature", "POST", COMPLETIONS, _json({"prompt": "hi", **settings})
            )
            yield Hostile("tiny temperature", "POST", CHAT, _json({**chat, **settings}))
            yield Hostile("tiny temperature", "POST", GENERATE, _json({"prompt": "hi", **settings}))
        # DiffusionGemma's schedule reaching the same temperatures from t_max (others ignore it).
        schedule = {"prompt": "hi", "temperature": 1.0, "t_min": 0.0, "t_max": temperature}
        yield Hostile("tiny temperature", "POST", GENERATE, _json({**schedule, "max_tokens": 8}))

    for work in HUGE_WORK:
        body = {"prompt": "hi", "seed": 1, **work}
        yield Hostile("huge work", "POST", GENERATE, _json(body))
        yield Hostile("huge work", "POST", COMPLETIONS, _json({**body, "stream": True}))

    for key in API_KEYS:
        headers = {} if key is None else {"Authorization": key}
        yield Hostile("API key", "GET", "/v1/models", headers=headers)
        body = _json({"prompt": "hi", "max_tokens": 1})
        yield Hostile("API key", "POST", COMPLETIONS, body, headers=headers)
    for value in ("\u00e9", "\x00", "x" * 8000, API_KEY + "\u0000", "%"):
        yield Hostile("API key", "GET", DASHBOARD, params={"api_key": value}, own_stream=False)


def _server_error_in(body: bytes) -> bool:
    """A 200 event stream that failed on the server: a native `error` event, or an OpenAI
    chunk holding a server_error."""
    return b"event: error" in body or b'"type": "server_error"' in body


def _live_request(base: str) -> str:
    """A finished request still held for attach (a few seconds): its id."""
    import requests

    auth = {"Authorization": f"Bearer {API_KEY}"}
    with requests.post(
        f"{base}{GENERATE}", json={"prompt": "hi", "max_tokens": 1}, headers=auth, timeout=30
    ) as r:
        return r.headers["x-request-id"]


def run_hostile(args: argparse.Namespace, base: str, tally: Tally) -> None:
    import requests

    for case in hostile_cases():
        label = f"hostile: {case.kind}"
        path = case.path.format(id=_live_request(base)) if "{id}" in case.path else case.path
        headers = dict(case.headers)
        if case.kind != "API key":
            headers["Authorization"] = f"Bearer {API_KEY}"
        if case.body is not None:
            headers["Content-Type"] = "application/json"
        start = time.monotonic()
        shown = f"{case.method} {path} {case.params or ''} {headers!r:.120} {case.body!r:.160}"
        try:
            r = requests.request(
                case.method,
                f"{base}{path}",
                data=case.body,
                headers=headers,
                params=case.params,
                stream=True,
                timeout=(5, args.timeout),
            )
            response = read(r, args)
        except requests.RequestException as exc:
            tally.cases += 1
            tally.by_op[label] += 1
            tally.errors[f"{label}: {type(exc).__name__}"] += 1
            failure = f"{label}: transport {type(exc).__name__}"
            tally.failures[failure] += 1
            if len(tally.examples[failure]) < args.show:
                tally.examples[failure].append(f"{shown}\n      {exc}")
            continue
        tally.seconds[label] += time.monotonic() - start
        tally.cases += 1
        tally.by_op[label] += 1
        tally.statuses[response.status_code] += 1
        tally.op_statuses[label][response.status_code] += 1
        failure = None
        if response.status_code >= 500:
            failure = f"{label}: {response.status_code}"
        elif case.own_stream and _server_error_in(response.content):
            failure = f"{label}: server error in a {response.status_code} stream"
        if failure:
            tally.failures[failure] += 1
            if len(tally.examples[failure]) < args.show:
                text = response.content[:300].decode("utf-8", "replace")
                tally.examples[failure].append(f"{shown}\n      -> {text!r}")


def report(tally: Tally, wall: float) -> None:
    print(f"\ncases: {tally.cases} in {wall:.0f} s")
    print("by operation:")
    for label, count in sorted(tally.by_op.items()):
        each = tally.seconds[label] / count * 1e3
        statuses = ", ".join(f"{n} x {s}" for s, n in sorted(tally.op_statuses[label].items()))
        print(f"  {count:6d}  {label}  ({each:.0f} ms each; {statuses})")
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
        if args.cases:
            import schemathesis  # noqa: F401
    except ImportError:
        print("needs schemathesis: pip install schemathesis (or --cases 0)", file=sys.stderr)
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
            tally = run(args, base) if args.cases else Tally()
            run_hostile(args, base, tally)
    report(tally, time.monotonic() - started)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
