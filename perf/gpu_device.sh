#!/usr/bin/env bash
# Runs perf/gpu_bench.py on the lent GPU machine, from the repository root there:
#   perf/gpu_device.sh [gpu_bench.py arguments]     (OUT is set by the device tool)
# The carried archive (perf/gpu_bundle.sh, in .whl/) is unpacked into a venv whose own
# site-packages come before the machine's torch environment (a .pth line appends that
# one): numpy 1.26 and protobuf 4 shadow the machine's numpy 2 and protobuf for Triton
# 2.51's Python backend stub and client, which need them, while torch, transformers and
# the CUDA libraries come from the machine. The launcher puts this venv's python3 first on
# PATH, so the backend stub sees the same packages as the benchmark.
set -euo pipefail
machine_site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
venv=${FORGE_BENCH_VENV:-/tmp/forge-bench-venv}
python3 -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
tar -xJf .whl/gpu-site.tar.xz -C "$site"
echo "$machine_site" > "$site/zz_machine_site.pth"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "$venv/bin/python" perf/gpu_bench.py --out "${OUT:?set by the device tool}" "$@"
