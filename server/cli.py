"""The `marble` command: `marble serve [--model PATH] [--also-serve PATH]... [--port P] ...`.

Flags override `MARBLE_*` environment variables, which override the defaults in
`marble.server.settings.Settings`. The model loads after the socket is listening (`/health` says
503 until it is ready); a missing model folder is reported before anything starts. SIGTERM and
SIGINT drain before the process exits (server/drain.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from marble.server.settings import Settings

# flag -> (type, help); the flag names a `Settings` field, whose default the help shows.
_FLAGS: list[tuple[str, type, str]] = [
    ("--model", Path, "checkpoint folder (default: the embedded Marble model)"),
    ("--served-model-name", str, "name clients pass as `model` (default: the folder's name)"),
    ("--host", str, "interface to bind"),
    ("--port", int, "port"),
    ("--device", str, "auto, cpu, cuda, cuda:1, ..."),
    ("--dtype", str, "auto, float32, bfloat16 or float16"),
    ("--max-batch-size", int, "requests denoised together in one step"),
    ("--max-queue", int, "waiting requests before 429"),
    ("--max-batch-tokens", int, "canvas tokens per forward"),
    (
        "--kv-cache-bytes",
        int,
        "KV cache running requests may hold (default: GPU 50%% of free memory, CPU 2 GiB)",
    ),
    (
        "--api-key",
        str,
        "require `Authorization: Bearer <key>` on /v1 routes and (see --public-ops) /metrics, "
        "/openapi.json, /docs; printable ASCII without spaces",
    ),
    ("--torch-threads", int, "CPU threads for torch (default: every core but one)"),
    ("--log-level", str, "debug, info, warning, error"),
    ("--replica-id", str, "tag starting every request id, 1-16 of a-z 0-9 (default: none)"),
    ("--request-timeout-s", float, "seconds a request may take from submission (0: no limit)"),
    (
        "--header-timeout-s",
        float,
        "seconds a request's headers may take from connection open or the previous response",
    ),
    ("--body-timeout-s", float, "seconds a request's body may take after its headers"),
    (
        "--max-connections",
        int,
        "connections kept at once; past it the oldest idle one is closed or the new one gets "
        "503 (default: what RLIMIT_NOFILE leaves room for)",
    ),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _help(flag: str, text: str) -> str:
    default = Settings.model_fields[_field(flag)].default
    return text if default is None else f"{text} (default {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marble", description="Marble: diffusion LM server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="start the HTTP server", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_serve_flags(serve)
    serve.epilog = _env_epilog({a.dest for a in serve._actions})
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("marble")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"


def _env_epilog(flag_fields: set[str]) -> str:
    """Where else each setting may come from: its MARBLE_* variable, and the settings that
    have no flag at all (read from Settings, so a new field is listed without an edit here)."""
    env_only = [name for name in Settings.model_fields if name not in flag_fields]
    lines = [
        "Every flag can also be set in the environment as MARBLE_<FLAG> (a flag given wins):",
        "e.g. MARBLE_MAX_BATCH_SIZE=8, MARBLE_API_KEY=..., MARBLE_PUBLIC_OPS=true,",
        'MARBLE_ALSO_SERVE=\'["/models/a", "/models/b"]\' (a JSON list).',
    ]
    if env_only:
        lines += ["", "Settings with no flag, environment only (defaults in parentheses):"]
        for name in env_only:
            lines.append(f"  MARBLE_{name.upper()} ({Settings.model_fields[name].default})")
    return "\n".join(lines)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, type_, help_ in _FLAGS:
        parser.add_argument(flag, type=type_, default=None, help=_help(flag, help_))
    parser.add_argument(
        "--also-serve",
        type=Path,
        action="append",
        default=None,
        metavar="PATH",
        help="another checkpoint folder to serve beside --model in the same engine steps, "
        "named by its folder (repeatable)",
    )
    parser.add_argument(
        "--public-ops",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --api-key, leave /metrics, /openapi.json and /docs public too "
        "(default: they need the key; /health, /live and / are always public)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each model's cached decode forward through torch.compile over padded shape "
        "buckets, with CUDA graphs on a GPU (default: off; each bucket's first step compiles, "
        "tens of seconds on a CPU)",
    )
    parser.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep finished prompt blocks (LLaDA2, SDAR; DiffusionGemma's encoder) for later "
        "requests that start with the same tokens, counted once against --kv-cache-bytes "
        "(default: on; a request opts out with prefix_cache: false)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {_field(flag): getattr(args, _field(flag)) for flag, _, _ in _FLAGS}
    given["also_serve"] = args.also_serve
    given["public_ops"] = args.public_ops
    given["compile"] = args.compile
    given["prefix_cache"] = args.prefix_cache
    return Settings(**{k: v for k, v in given.items() if v is not None})


def _model_problem(settings: Settings) -> str | None:
    from marble.model.default import CHECKPOINT_DIR

    if settings.model is None and not (CHECKPOINT_DIR / "config.json").exists():
        return (
            "no model given and the embedded default model is not available yet "
            f"({CHECKPOINT_DIR} has no checkpoint).\n"
            "Pass a checkpoint folder: marble serve --model /path/to/checkpoint"
        )
    given = [] if settings.model is None else [settings.model]
    for path in (*given, *settings.also_serve):
        if not (path / "config.json").exists():
            return f"{path}: not a checkpoint folder (no config.json)"
    return None


def serve(settings: Settings) -> int:
    import torch
    import uvicorn

    from marble.server.app import create_app
    from marble.server.connection_guard import (
        ACCEPT_BURST,
        connection_guarded,
        guard_limits,
        widen_listen_queue,
    )
    from marble.server.drain import DrainingServer
    from marble.server.log_rate_limit import limit_repeats
    from marble.server.log_redaction import redact_logs
    from marble.server.stall_guard import stall_guarded

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problem = _model_problem(settings)
    if problem:
        print(f"marble: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.torch_threads)  # default: every core but one (settings.py)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # Drops clients that stopped reading, or are slow to send a request, or one too many.
        http=connection_guarded(stall_guarded(settings.send_timeout_s), guard_limits(settings)),
        backlog=ACCEPT_BURST,  # also the accepts per loop pass: server/connection_guard.py
        # Requests have drained by the time uvicorn shuts down; this bounds the last writes.
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    redact_logs()  # after uvicorn.Config, which sets up uvicorn's log handlers
    limit_repeats()
    lifecycle = app.state.lifecycle
    server = DrainingServer(
        config, lifecycle.drain, lifecycle.abort_running, listening=widen_listen_queue
    )
    lifecycle.server = server
    server.run()
    if lifecycle.phase == "failed":
        print(f"marble: the model failed to load: {lifecycle.load_error}", file=sys.stderr)
        return 1
    return 0


def _problems(exc: ValidationError) -> str:
    """One line per invalid setting naming its flag and variable, never the value given (it
    may be the API key)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "settings"
        flag = f"--{name.replace('_', '-')}"
        lines.append(f"  {name} ({flag}, MARBLE_{name.upper()}): {error['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"marble: invalid settings:\n{_problems(exc)}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
