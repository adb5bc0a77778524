#!/usr/bin/env bash
# Runs perf/gpu_bench.py on the lent GPU machine, from the repository root there:
#   perf/gpu_device.sh [gpu_bench.py arguments]     (OUT is set by the device tool)
# The carried archive (perf/gpu_bundle.sh, in .whl/) is unpacked into a venv whose own
# site-packages come before the machine's torch environment (a .pth line appends that
# one): numpy 1.26 shadows the machine's numpy 2 for Triton 2.51's Python backend stub,
# which needs it, while torch, transformers, protobuf and the CUDA libraries come from the
# machine. The benchmark runs `python -m export` and `python -m launcher` with this venv's
# python, and the launcher puts its python3 first on PATH, so the export, the backend stub
# and the benchmark all see the same packages. perf/numpy_guard.py hides the machine's
# packages built for numpy 2 (scipy 1.18, say) from them. Where the machine's Python has no shared
# libpython (the backend stub links it), the archive's copy goes on the library path.
# Everything printed is also written to $OUT/<workload>-run.log as it comes.
set -euo pipefail
out=${OUT:?set by the device tool}
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
stamp "unpacking the bundle"
machine_site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
venv=${FORGE_BENCH_VENV:-/tmp/forge-bench-venv}
python3 -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
tar -xJf .whl/gpu-site.tar.xz -C "$site"
echo "$machine_site" > "$site/zz_machine_site.pth"
cp perf/numpy_guard.py "$site/forge_numpy_guard.py"  # after the machine's site: zzz_
echo "import forge_numpy_guard; forge_numpy_guard.install()" > "$site/zzz_forge_numpy_guard.pth"
soname=$("$venv/bin/python" -c 'import sys; print("libpython%d.%d.so.1.0" % sys.version_info[:2])')
base_lib=$("$venv/bin/python" -c 'import sys; print(sys.base_prefix + "/lib")')
if ldconfig -p 2>/dev/null | grep -F "$soname" >/dev/null || [ -e "$base_lib/$soname" ]; then
    stamp "the machine has $soname"
elif [ -e "$site/forge-libpython/$soname" ]; then
    stamp "no $soname on this machine: the archive's copy goes on the library path"
    export LD_LIBRARY_PATH="$site/forge-libpython${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    stamp "warning: no $soname here or in the archive: Triton's Python backend will not start"
fi
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 USE_FLAX=0 USE_TF=0
"$venv/bin/python" -c 'import forge_numpy_guard as g, numpy
print("numpy", numpy.__version__, "hidden (built for another numpy):", g.HIDDEN or "none")'
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
workload=gpu
for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = --workload ]; then j=$((i + 1)); workload=${!j}; fi
    case "${!i}" in --workload=*) workload=${!i#--workload=} ;; esac
done
stamp "perf/gpu_bench.py $*"
"$venv/bin/python" perf/gpu_bench.py --out "$out" "$@" 2>&1 | tee "$out/$workload-run.log"
stamp "done"
