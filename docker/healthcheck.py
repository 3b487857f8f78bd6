"""Container HEALTHCHECK: exit 0 when the server's /health answers 200 (ready), else 1.

Finds the port the way the server does: `--port` on PID 1's command line (the exec-form
entrypoint), else MARBLE_PORT, else 8000. Standard library only: no curl in the image.
"""

import os
import sys
import urllib.request


def flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> int:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    port = flag(argv, "--port") or os.environ.get("MARBLE_PORT") or "8000"
    host = flag(argv, "--host") or os.environ.get("MARBLE_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # refused, 503 while loading/draining, timeout
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
