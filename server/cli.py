"""The `marble` command: `marble serve [--model PATH] [--also-serve PATH]... [--port P] ...`.

Flags override `MARBLE_*` environment variables, which override the defaults in
`marble.server.settings.Settings`. The model loads after the socket is listening (`/health` says
503 until it is ready); a missing model folder is reported before anything starts. SIGTERM and
SIGINT drain before the process exits (server/drain.py).
"""

from __future__ import annotations

import argparse
import logging
import os
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
    ("--api-key", str, "require `Authorization: Bearer <key>` on /v1 routes"),
    ("--torch-threads", int, "CPU threads for torch (default: every core)"),
    ("--log-level", str, "debug, info, warning, error"),
    ("--replica-id", str, "tag starting every request id, 1-16 of a-z 0-9 (default: none)"),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _help(flag: str, text: str) -> str:
    default = Settings.model_fields[_field(flag)].default
    return text if default is None else f"{text} (default {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marble", description="Marble: diffusion LM server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    add_serve_flags(serve)
    return parser


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


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {_field(flag): getattr(args, _field(flag)) for flag, _, _ in _FLAGS}
    given["also_serve"] = args.also_serve
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
    from marble.server.drain import DrainingServer
    from marble.server.log_redaction import redact_logs
    from marble.server.stall_guard import stall_guarded

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problem = _model_problem(settings)
    if problem:
        print(f"marble: {problem}", file=sys.stderr)
        return 2
    # Every core: on 2 cores, leaving one to the event loop cost a third of the throughput at
    # 8 clients and did not lower /health's p99 (README, "Server").
    threads = settings.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=stall_guarded(settings.send_timeout_s),  # drops clients that stopped reading
        # Requests have drained by the time uvicorn shuts down; this bounds the last writes.
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    redact_logs()  # after uvicorn.Config, which sets up uvicorn's log handlers
    lifecycle = app.state.lifecycle
    server = DrainingServer(config, lifecycle.drain, lifecycle.abort_running)
    lifecycle.server = server
    server.run()
    if lifecycle.phase == "failed":
        print(f"marble: the model failed to load: {lifecycle.load_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"marble: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
