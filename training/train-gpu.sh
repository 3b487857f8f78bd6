#!/usr/bin/env bash
# The recipe of the shipped default model: one wall-clock-budgeted run on one GPU, then export.
#
# Run from the repository root: `bash training/train-gpu.sh` (BUDGET seconds, default
# 450; OUT, the folder for the checkpoint and logs). The extra training text is whatever
# installed packages of WANT the interpreter finds, so the run records the list it used. The
# tokenizer is the shipped one, so checkpoints stay comparable. It ends with the CUDA training
# test, which CI (no GPU) skips.
set -u
DEVICE=${DEVICE:-cuda} BUDGET=${BUDGET:-450} R=${R:-/tmp/gpu-run} PY=${PY:-python3}
OUT=${OUT:-runs/gpu-export}
export PYTHONUNBUFFERED=1
# The trainer runs as `marble.training`: install the checkout (editable) where it is not yet.
$PY -c "import marble.training" 2>/dev/null || $PY -m pip install -q --no-deps -e .
mkdir -p "$OUT" "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
WANT=torch,numpy,scipy,sklearn,pandas,sympy,matplotlib,networkx,jax,flax,optax,transformers,jinja2,httpx,requests,rich,pygments,aiohttp,werkzeug,click,hypothesis,_pytest,numba,xarray,statsmodels,skimage,timm,torchvision,accelerate,peft,tqdm,typer,pydantic,fastapi,starlette,uvicorn
PKGS=$($PY -c "import importlib.util as u,sys;print(','.join(n for n in sys.argv[1].split(',') if (s:=u.find_spec(n)) and s.submodule_search_locations))" $WANT)
echo "packages: $PKGS"
cp model/default/checkpoint/tokenizer.json "$R/"
# The process's own budget covers corpus loading and compilation; timeout is only a backstop.
timeout -s TERM $((BUDGET + 60)) $PY -m marble.training.train --run-dir "$R" --device "$DEVICE" \
  --budget-s "$BUDGET" --tokens 4000000000 --seed 2 --threads 8 \
  --d-model 320 --n-layers 6 --n-heads 5 --mlp-hidden 768 --seq-len 256 --batch-size 256 \
  --lr 3e-3 --warmup-steps 200 --decay-frac 0.3 --eval-every 500 --eval-windows 64 \
  --extra-packages "$PKGS" --stdlib-share 0.15 ${EXTRA:-} > "$OUT/stdout.log" 2>&1
echo "train rc=$?"
$PY -m marble.training.train --run-dir "$R" --export "$OUT/ckpt" 2>&1 | tail -2
cp "$R/train.log" "$OUT/"
grep -E "params|budget|eval step|saved|python" "$R/train.log" | cut -c1-300 | tail -40
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_default_train.py -k cuda 2>&1 | tail -3
