#!/usr/bin/env bash
# Packs the Python packages perf/gpu_bench.py needs on the lent GPU machine and that machine
# lacks, into one archive under the 64 MiB a device call carries:
#   perf/gpu_bundle.sh [OUT_DIR] [PYTHON_VERSION]   (defaults: .whl and 3.12, the device's)
# The model validates its weights manifest with jsonschema (with referencing, rpds-py,
# jsonschema-specifications and attrs); the launcher finds its services' sockets with psutil
# 6 or later (net_connections), carried so that its version is known.
# numpy 1.26: Triton 2.51's Python backend stub breaks on numpy 2 (fixed in 2.52). protobuf
# is not carried: the machine's newer one serves tritonclient's generated code and onnx, and
# onnx breaks on protobuf 4.
# libpython: Triton's Python backend stub links libpython<PY>.so.1.0, which a Python built
# without a shared library (a distribution's python3 without its libpython package) lacks;
# a stripped copy from a local Python of the same minor version travels in forge-libpython/
# and perf/gpu_device.sh puts it on the library path only where the machine has none.
# Wheels as the device tool's README says (pip download --no-deps for the device's Python),
# installed into a folder, trimmed of what the benchmark never runs (other Pythons' backend
# stubs and the libpython 3.13 they bundle, perf_analyzer), then tar.xz (zip's deflate
# leaves it over the limit). perf/gpu_device.sh unpacks it on the device.
set -euo pipefail
out=${1:-.whl}
py=${2:-3.12}
abi=cp${py/./}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=(--no-deps --only-binary=:all: --python-version "$py" --implementation cp
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q "${target[@]}" -d "$work/wheels" \
    diffusers==0.42.1 tritonclient==2.51.0 nvidia-pytriton==0.7.0 open-clip-torch==3.3.0 \
    numpy==1.26.4 python-rapidjson==1.25 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 attrs==26.1.0 psutil==7.2.2
ls "$work"/wheels/*"$abi"* >/dev/null  # the compiled wheels are for the device's Python
python3 -m pip install -q --no-index --no-compile "${target[@]}" --target "$work/site" \
    "$work"/wheels/*.whl
stubs="$work/site/pytriton/tritonserver/python_backend_stubs"
find "$stubs" -mindepth 1 -maxdepth 1 ! -name "$py" -exec rm -rf {} +
rm -f "$work"/site/nvidia_pytriton.libs/libpython3-*.13.so.1.0
rm -rf "$work/site/bin"  # perf_analyzer and perf_client: not used on the device
interpreter=$(command -v "python$py" 2>/dev/null || true)
if ! "$interpreter" -c '' 2>/dev/null; then
    interpreter=$(ls -d "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/"$py".*/bin/"python$py" \
        2>/dev/null | tail -1 || true)
fi
if [ -n "$interpreter" ] && "$interpreter" -c '' 2>/dev/null; then
    libpython=$("$interpreter" -c 'import os, sysconfig as s
print(os.path.join(s.get_config_var("LIBDIR"), s.get_config_var("INSTSONAME")))')
    mkdir -p "$work/site/forge-libpython"
    strip --strip-unneeded -o "$work/site/forge-libpython/$(basename "$libpython")" "$libpython"
else
    echo "warning: no local python$py: no fallback libpython in the archive" >&2
fi
mkdir -p "$out"
XZ_OPT=-9 tar -C "$work/site" -cJf "$out/gpu-site.tar.xz" .
du -h "$out/gpu-site.tar.xz"
