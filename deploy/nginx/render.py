"""Render nginx's configuration for Marble replicas: an `http`-context file (conf.d/marble.conf).

Owns the balancing rules: least connections over every replica, SSE passed through unbuffered,
the server's body limit, a retry on another replica only for a request no replica started, and
attach-by-id sent to the replica whose tag starts the id. Standard library only; knows nothing of
Marble's code, only its HTTP contract (docs/deploy.md, "Scaling out").

  python deploy/nginx/render.py static r1=127.0.0.1:8001 r2=127.0.0.1:8002   # named replicas
  python deploy/nginx/render.py dns --pool HOST:PORT --owner 'marble-{tag}.HEADLESS:PORT' \\
      --resolver kube-dns.kube-system.svc.cluster.local                      # Kubernetes
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence

MAX_BODY_BYTES = 4 * 1024 * 1024  # Marble's `max_body_bytes` default
TAG = "[a-z0-9]{1,16}"  # what `replica_id` accepts (server/settings.py)
# Attach paths: the id, or a response id (`cmpl-<id>`, ...) that the server also resolves.
ATTACH = "^/v1/diffusion/requests/(?:chatcmpl-|cmpl-|gen-)?{tag}-[0-9a-f]{{32}}/events$"

LOG_FORMAT = """
# Which replica answered, and with which request id (the balancer passes X-Request-Id through).
log_format marble '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                  'rid=$upstream_http_x_request_id upstream=$upstream_addr '
                  'upstream_status=$upstream_status time=$request_time';
"""

POOL = """
# Every replica. least_conn: requests are long and uneven, so open connections measure load.
# One failure (no connection, a timeout, a 503 while loading or draining) rests a replica for
# fail_timeout: nginx OSS has no active health checks, this passive one keeps such replicas out.
upstream marble {{
    least_conn;
    zone marble 64k;  # the workers share the connection counts and failures (and `resolve`)
{servers}
    keepalive 32;
    # Below uvicorn's 5 s keep-alive: nginx never reuses a socket the replica is closing.
    keepalive_timeout 4s;
}}
"""

OWNER = """
# {tag}'s own requests; one server is never marked down, and nothing is retried elsewhere.
upstream marble_{tag} {{
    server {server};
    keepalive 4;
    keepalive_timeout 4s;
}}
"""

MAP = """
# The replica tag starts each request id (`r1-<32 hex>`): attaching goes to its owner.
map $uri $marble_upstream {{
    default marble;
{routes}
}}
"""

SERVER = """
server {{
    listen {listen};
    access_log {access_log} marble;
    # Marble refuses larger bodies itself; refusing them here spares the upload.
    client_max_body_size {max_body};
    error_page 413 @too_large;
    # nginx's own 502/504 (no replica reachable) become Marble-shaped 503s that clients retry.
    error_page 502 504 =503 @no_replica;

    location / {{
        proxy_pass http://$marble_upstream;
        proxy_http_version 1.1;
        proxy_set_header Connection "";  # keep-alive to the replicas
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        # SSE: every event (and the 15 s ping) leaves as it arrives; a slow client slows only
        # its own socket, which Marble sees and handles (it drops `step` events, not others).
        proxy_buffering off;
        proxy_cache off;
        gzip off;
        proxy_connect_timeout 2s;
        # Streams are long and non-streaming completions silent until done: hours, not seconds.
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;
        # Another replica gets the request when this one could not be reached or answered 503
        # (loading or draining: it started nothing), POST included. nginx never retries once
        # any of the response went to the client, so a started stream is never replayed.
        proxy_next_upstream error timeout http_503 non_idempotent;
    }}

    location @too_large {{
        default_type application/json;
        return 413 '{too_large}';
    }}

    location @no_replica {{
        default_type application/json;
        add_header Retry-After 1 always;
        return 503 '{no_replica}';
    }}
}}
"""


def _error(message: str, code: str, type_: str) -> str:
    """OpenAI's error object, as Marble answers it (one line: it sits in a quoted string)."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def _pool(servers: Sequence[str], fail_timeout: int, resolve: bool) -> str:
    # `resolve` (nginx >= 1.27.3) re-resolves while running: pods the autoscaler adds join.
    suffix = " resolve" if resolve else ""
    lines = [f"    server {s} max_fails=1 fail_timeout={fail_timeout}s{suffix};" for s in servers]
    return POOL.format(servers="\n".join(lines))


def _server(listen: str, access_log: str, max_body: int) -> str:
    too_large = _error(
        f"request body is larger than {max_body} bytes", "body_too_large", "invalid_request_error"
    )
    no_replica = _error("no Marble replica could take the request", "no_replica", "server_error")
    return SERVER.format(
        listen=listen,
        access_log=access_log,
        max_body=max_body,
        too_large=too_large,
        no_replica=no_replica,
    )


def render_static(
    replicas: dict[str, str], listen: str, fail_timeout: int, access_log: str, max_body: int
) -> str:
    """A pool of every replica, and one group per replica for the requests it owns."""
    routes = [f'    "~{ATTACH.format(tag=tag)}" marble_{tag};' for tag in replicas]
    return "".join(
        [
            LOG_FORMAT,
            _pool(list(replicas.values()), fail_timeout, resolve=False),
            *(OWNER.format(tag=tag, server=server) for tag, server in replicas.items()),
            MAP.format(routes="\n".join(routes)),
            _server(listen, access_log, max_body),
        ]
    )


def render_dns(
    pool: str,
    owner: str,
    resolver: str,
    listen: str,
    fail_timeout: int,
    access_log: str,
    max_body: int,
) -> str:
    """A pool from one name resolving to every ready replica; an owner's address from its tag
    (`owner` with `{tag}` in it), looked up when a request needs it."""
    route = f'    "~{ATTACH.format(tag=f"(?<marble_tag>{TAG})")}" '
    route += owner.replace("{tag}", "$marble_tag") + ";"
    return "".join(
        [
            LOG_FORMAT,
            f"\n# Asked while running, for the pool and for owners; answers kept 10 s.\n"
            f"resolver {resolver} valid=10s;\n",
            _pool([pool], fail_timeout, resolve=True),
            MAP.format(routes=route),
            _server(listen, access_log, max_body),
        ]
    )


def _replica(text: str) -> tuple[str, str]:
    tag, sep, server = text.partition("=")
    if not sep or not re.fullmatch(TAG, tag) or not server:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TAG=HOST:PORT, TAG of {TAG}")
    return tag, server


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--listen", default="8080", help="nginx's listen address (default 8080)")
    common.add_argument("--fail-timeout", type=int, default=10, help="seconds a failure rests")
    common.add_argument("--access-log", default="/var/log/nginx/access.log")
    common.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    static = modes.add_parser("static", parents=[common], help="named replicas: TAG=HOST:PORT")
    static.add_argument("replicas", nargs="+", type=_replica)
    dns = modes.add_parser("dns", parents=[common], help="replicas found by DNS (Kubernetes)")
    dns.add_argument("--pool", required=True, help="HOST:PORT resolving to every ready replica")
    dns.add_argument("--owner", required=True, help="HOST:PORT of replica {tag}")
    dns.add_argument("--resolver", required=True, help="DNS server nginx asks while running")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    settings = (args.listen, args.fail_timeout, args.access_log, args.max_body_bytes)
    if args.mode == "static":
        replicas = dict(args.replicas)
        if len(replicas) != len(args.replicas):
            parser.error("replica tags must differ")
        body = render_static(replicas, *settings)
    else:
        if "{tag}" not in args.owner:
            parser.error("--owner must contain {tag}, where the replica's tag goes")
        body = render_dns(args.pool, args.owner, args.resolver, *settings)
    command = shlex.join(["python", "deploy/nginx/render.py", *argv])
    sys.stdout.write(
        f"# Marble behind nginx. Rendered by: {command}\n# Re-render it, do not edit.\n"
    )
    sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
