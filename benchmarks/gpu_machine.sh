#!/usr/bin/env bash
# benchmarks/gpu.py on a bare GPU machine, from a copy of this checkout, with no network: Marble
# is installed from the checkout without its dependencies into a folder of its own (gpu.py and
# the parity tests need torch, safetensors, tokenizers, jinja2, tqdm, pytest and llguidance,
# none of the server's packages), beside any wheels in .whl/ for what the machine lacks
# (llguidance: `pip download --no-deps -d .whl llguidance==1.9.1` where PyPI is reachable). The
# parity tests read the reference data at REFERENCE (default ../shared/reference; a copy
# carried inside the checkout, say .ref, is linked there). Output also to $OUT/gpu.txt.
#
#   bash benchmarks/gpu_machine.sh [REFERENCE] [gpu.py options...]
set -uo pipefail
cd "$(dirname "$0")/.."
reference="${1:-../shared/reference}"
shift $(($# > 0 ? 1 : 0))
if [ ! -e ../shared/reference ] && [ -d "$reference" ]; then
    mkdir -p ../shared && ln -s "$(realpath "$reference")" ../shared/reference
fi
[ -d ../shared/reference ] || echo "no reference data at $reference: the parity tests will skip"
site=$(mktemp -d)
install=(python3 -m pip install -q --no-deps --no-index --no-build-isolation --target "$site")
if compgen -G ".whl/*.whl" >/dev/null; then
    "${install[@]}" .whl/*.whl || exit 1
fi
"${install[@]}" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
python3 benchmarks/gpu.py "$@" 2>&1 | tee "${OUT:-$site}/gpu.txt"
