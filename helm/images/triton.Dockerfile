# syntax=docker/dockerfile:1.7
# Triton with the stable_diffusion Python-backend model and the export package:
#   docker build -f helm/images/triton.Dockerfile -t forge-triton:0.1.0 .
# NGC's tritonserver 24.10 is Triton 2.51 on Ubuntu 22.04 with CUDA 12.6 and Python 3.10:
# the Python backend runs the model with that Python, so model_repository/ and export/ stay
# Python 3.10 compatible (tests/test_chart.py checks the syntax).
#
# The image carries code, not weights: the chart's init containers pull the exported weights
# from S3 or export them onto a volume, and build TensorRT engines on the serving GPU
# (engines are specific to the GPU architecture, so they cannot be built here).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the model and the export need, as GPU builds, in one pip call so numpy and protobuf
# stay at the versions tritonclient 2.51 is built against (numpy<2, protobuf<5).
# torch 2.5.1 is PyPI's default (CUDA 12.4 runtime) wheel, which runs on the image's CUDA 12.6
# driver stack; it is pinned so rebuilds are reproducible. tensorrt 10.5 is the TensorRT
# release that Triton 24.10 itself ships. tritonclient (its model_config protobuf) is what
# `python -m export config` writes configs/exported.pbtxt with; jsonschema checks the weights'
# manifests against model_repository/stable_diffusion/weights.schema.json, in the export and
# in the model. Every package has a version range (hadolint DL3013): lower bounds from
# pyproject.toml, upper bounds at the next major.
RUN pip install \
      "numpy>=1.26,<2" "protobuf>=4.25,<5" \
      "tritonclient[grpc]==2.51.0" \
      torch==2.5.1 \
      "diffusers>=0.35,<1" "transformers>=4.45,<6" "safetensors>=0.4,<1" "accelerate>=1.0,<2" \
      "onnx>=1.17,<2" "onnxscript>=0.1,<1" "onnxruntime-gpu>=1.20,<2" \
      "tensorrt==10.5.*" \
      "pillow>=10,<14" "pyyaml>=6,<7" "jsonschema>=4.18,<5"

# The model code and the committed config.pbtxt (copied onto the model volume by the chart's
# init container) and the export package (python -m export onnx | config | tensorrt; the
# chart's model-config init container writes configs/exported.pbtxt, which Triton loads with
# --model-config-name=exported).
COPY model_repository/ /opt/forge/model_repository/
COPY export/ /opt/forge/export/
ENV PYTHONPATH=/opt/forge \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /opt/forge

# The chart runs as UID 10001 with a read-only root filesystem: /models, /tmp and /dev/shm
# are volumes. Local runs: docker run --gpus all --shm-size 2g -v $PWD/model_repository:/models
USER 10001:10001
EXPOSE 8000 8001 8002
# Exec form through sh: curl exits 22 on an HTTP error, Docker wants 1 for unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:8000/v2/health/live || exit 1"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
     "--model-config-name=exported", "--load-model=stable_diffusion", \
     "--load-model=stable_diffusion_stream", "--load-model=stable_diffusion_styles", \
     "--allow-metrics=true", "--allow-gpu-metrics=true", "--allow-cpu-metrics=true", \
     "--metrics-config=summary_latencies=true", "--metrics-port=8002"]
