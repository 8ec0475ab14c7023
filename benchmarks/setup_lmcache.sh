#!/usr/bin/env bash
# Creates benchmarks/.lmcache-venv: LMCache 0.5.6 with what its cache engine, CPU backend and local-disk
# backend need to run on CPU, for benchmarks/lmcache_compare.py. Its own venv because its pins (numpy<=2.2.6,
# prometheus_client<=0.24.1, ...) clash with vLLM's in the project's .venv.
#
#   bash benchmarks/setup_lmcache.sh            # idempotent: a second run checks and installs nothing
#   PYTHON=python3.11 bash benchmarks/setup_lmcache.sh
#
# lmcache is installed --no-deps: its declared requirements include CUDA packages (cupy-cuda13x,
# cuda-python, cufile-python, nvtx) and cloud clients that the CPU engine never imports. torch goes in
# first, pinned to the CPU build, so nothing can pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LMCACHE_VENV:-.lmcache-venv}"
PY="${PYTHON:-python3}"
VPY="$VENV/bin/python"
LMCACHE_VERSION=0.5.6

check() {
  "$VPY" - <<EOF >/dev/null 2>&1
import importlib.metadata as m
assert m.version("lmcache") == "$LMCACHE_VERSION", m.version("lmcache")
import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
EOF
}

if [ -x "$VPY" ] && check; then
  echo "LMCache $LMCACHE_VERSION venv ready: benchmarks/$VENV"
  exit 0
fi

[ -x "$VPY" ] || "$PY" -m venv "$VENV"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
pip_install() {
  # pip's resolver complains that lmcache's declared (CUDA, cloud) requirements are missing: expected
  # with --no-deps, so those lines are dropped; any real failure is shown whole.
  local log
  log=$(mktemp)
  if ! "${PIP[@]}" "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v -e "lmcache $LMCACHE_VERSION requires" -e "dependency resolver does not currently" \
    -e "^WARNING: Location" "$log" || true
  rm -f "$log"
}
pip_install torch==2.13.0 "numpy<=2.2.6"
pip_install --no-deps "lmcache==$LMCACHE_VERSION"
# The runtime closure of `lmcache.v1.cache_engine` on CPU (found by importing it in a bare venv),
# within lmcache 0.5.6's own version bounds.
pip_install \
  "prometheus_client>=0.18.0,<=0.24.1" \
  "transformers>=5.4" \
  numba sortedcontainers py-cpuinfo psutil aiohttp aiofile cachetools pyyaml msgspec "pyzmq>=25.0.0" \
  cryptography safetensors requests

if ! check; then
  echo "benchmarks/setup_lmcache.sh: LMCache installed but its cache engine does not import; run" >&2
  echo "  $VPY -c 'from lmcache.v1.cache_engine import LMCacheEngineBuilder'" >&2
  echo "to see which module is missing, and add it to the list above." >&2
  exit 1
fi
echo "LMCache $LMCACHE_VERSION venv ready: benchmarks/$VENV"
