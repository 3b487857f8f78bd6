#!/usr/bin/env bash
# Build the Marble image with podman and prove it serves: /health, one /v1/completions.
#
# Steps: base image from Debian packages (docker/build-base.sh, if missing) -> torch wheel into
# docker/wheels/ (from $TORCH_WHEEL_DIR, default /opt/wheels, if there) -> podman build with the
# host CA folder mounted read-only and PIP_CERT -> run on a free loopback port -> wait for
# /health (bounded) -> HEALTHCHECK -> completion -> stop and remove. Exits non-zero on failure.
# Needs root, podman, runc, debootstrap (apt-get install -y podman runc debootstrap).
#
#   docker/check-image.sh [--model-dir DIR]   # DIR: a checkpoint mounted at /models/check
# Without --model-dir: the embedded model (if the image holds it), then ../shared/reference/
# llada-tiny mounted as a volume (if present beside the repository).
# Environment: MARBLE_IMAGE (localhost/marble:check), BASE_IMAGE (localhost/marble-base),
#   CA_DIR (/etc/ssl/certs), PIP_CERT ($CA_DIR/ca-certificates.crt), TORCH_WHEEL_DIR
#   (/opt/wheels), HEALTH_TIMEOUT (240 s), SKIP_BUILD=1 to reuse an existing image.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
image="${MARBLE_IMAGE:-localhost/marble:check}"
base="${BASE_IMAGE:-localhost/marble-base}"
ca_dir="${CA_DIR:-/etc/ssl/certs}"
pip_cert="${PIP_CERT:-$ca_dir/ca-certificates.crt}"
wheel_dir="${TORCH_WHEEL_DIR:-/opt/wheels}"
health_timeout="${HEALTH_TIMEOUT:-240}"
model_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model-dir) model_dir="$(cd "$2" && pwd)"; shift ;;
        -h|--help) sed -n "2,16p" "$0"; exit 0 ;;
        *) echo "check-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "check-image.sh: $*"; }
t0=$SECONDS

# ---------------------------------------------------------------------------------- build
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    if [[ "$base" == localhost/marble-base ]]; then
        "$here/build-base.sh" --image "$base"
    fi
    if ! ls "$root"/docker/wheels/torch-*.whl >/dev/null 2>&1; then
        if ls "$wheel_dir"/torch-*cp311*.whl >/dev/null 2>&1; then
            # A hard link when on the same filesystem, else a copy (190 MB).
            for w in "$wheel_dir"/torch-*cp311*.whl; do
                ln "$w" "$root/docker/wheels/" 2>/dev/null || cp "$w" "$root/docker/wheels/"
            done
            log "torch wheel from $wheel_dir -> docker/wheels/"
        else
            log "no local torch wheel; the build downloads it from TORCH_INDEX_URL"
        fi
    fi
    build_args=(--build-arg "BASE_IMAGE=$base")
    volumes=()
    if [[ -f "$pip_cert" ]]; then
        # The package proxy's CA is trusted by the host only: lend it to the RUN steps.
        volumes=(-v "$ca_dir:$ca_dir:ro")
        build_args+=(--build-arg "PIP_CERT=$pip_cert")
    fi
    tb=$SECONDS
    podman build --isolation=chroot --format docker "${volumes[@]}" "${build_args[@]}" \
        -t "$image" -f "$root/Dockerfile" "$root"
    log "image $image built in $((SECONDS - tb)) s"
fi
podman image ls "$image"

# ------------------------------------------------------------------------------------ run
# This host's container sandbox refuses the default rlimits: set them explicitly.
podman_limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
name=""
cleanup() {
    rc=$?
    if [[ -n "$name" ]] && podman container exists "$name" 2>/dev/null; then
        [[ $rc -ne 0 ]] && { log "container logs:"; podman logs --tail 60 "$name" || true; }
        podman stop --time 10 "$name" >/dev/null 2>&1 || true
        podman rm -f "$name" >/dev/null 2>&1 || true
    fi
    exit $rc
}
trap cleanup EXIT

# check_serving [HOST_CHECKPOINT_DIR]: run the image (the embedded model, or the folder mounted
# read-only at /models/check and chosen with --model), check it, stop and remove it.
check_serving() {
    local dir="${1:-}" port url tr deadline state uid tm
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    name="marble-check-$$-$port"
    local run_args=(--name "$name" --network host "${podman_limits[@]}" -e "MARBLE_PORT=$port")
    local serve_args=(--host 127.0.0.1 --port "$port")
    if [[ -n "$dir" ]]; then
        run_args+=(-v "$dir:/models/check:ro")
        serve_args+=(--model /models/check)
    fi
    tr=$SECONDS
    # Without systemd, podman logs "unable to get systemd connection" for the HEALTHCHECK
    # timer: harmless here, the check below runs the image's HEALTHCHECK by hand.
    podman --runtime runc run -d "${run_args[@]}" "$image" "${serve_args[@]}" >/dev/null
    log "started $name on 127.0.0.1:$port, model: ${dir:-embedded}"

    url="http://127.0.0.1:$port"
    deadline=$((SECONDS + health_timeout))
    until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
            "$url/health" 2>/dev/null; do
        state="$(podman inspect -f '{{.State.Status}}' "$name" 2>/dev/null || echo gone)"
        if [[ "$state" != running ]]; then
            log "container is $state before /health answered"; return 1
        fi
        if (( SECONDS > deadline )); then
            log "/health not ready after ${health_timeout} s"; return 1
        fi
        sleep 1
    done
    log "/health ready after $((SECONDS - tr)) s"

    # The image's own HEALTHCHECK command, run inside the container.
    podman healthcheck run "$name" && log "HEALTHCHECK: healthy"
    uid="$(podman exec "$name" id -u)"
    [[ "$uid" != 0 ]] || { log "the server runs as root"; return 1; }
    log "server runs as uid $uid"

    python3 - "$url" <<'PY'
import json, sys, time, urllib.request

url = sys.argv[1]
models = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))
name = models["data"][0]["id"]
body = {"model": name, "prompt": "The capital of France is", "max_tokens": 16,
        "temperature": 0}
req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
t = time.monotonic()
with urllib.request.urlopen(req, timeout=120) as resp:
    answer = json.load(resp)
    rid = resp.headers.get("X-Request-Id")
choice = answer["choices"][0]
assert isinstance(choice["text"], str), answer
assert choice["finish_reason"] in ("stop", "length"), answer
assert answer["usage"]["completion_tokens"] > 0, answer
assert rid, "no X-Request-Id header"
print(f"check-image.sh: completion from {name!r} in {time.monotonic() - t:.2f} s: "
      f"{choice['text']!r} ({answer['usage']})")
PY

    tm=$SECONDS
    podman stop --time 20 "$name" >/dev/null
    log "stopped in $((SECONDS - tm)) s (exit code $(podman inspect -f '{{.State.ExitCode}}' "$name"))"
    podman rm "$name" >/dev/null
    name=""
    checked=$((checked + 1))
}
checked=0

if [[ -n "$model_dir" ]]; then
    check_serving "$model_dir"
else
    # The embedded default model, when the image holds it (package data of `marble.model`).
    embedded="$(podman --runtime runc run --rm "${podman_limits[@]}" --entrypoint python3 "$image" \
        -c "from marble.model.default import CHECKPOINT_DIR; print((CHECKPOINT_DIR / 'config.json').exists())" \
        2>/dev/null | tail -n 1)"
    case "$embedded" in
        True) check_serving "" ;;
        False) log "the image holds no embedded model (model/default/checkpoint/ was empty at build)" ;;
        *) log "could not run python3 in $image"; exit 1 ;;
    esac
    # A real checkpoint mounted as a volume, as users run LLaDA/Dream weights.
    reference="$root/../shared/reference/llada-tiny"
    if [[ -f "$reference/config.json" ]]; then
        check_serving "$(cd "$reference" && pwd)"
    fi
    [[ $checked -gt 0 ]] || { log "no model to serve: pass --model-dir DIR"; exit 1; }
fi
log "OK in $((SECONDS - t0)) s"
