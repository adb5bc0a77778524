"""The Helm chart (helm/forge), rendered offline and checked resource by resource.

`make chart-test` installs Helm into var/tools (helm/tools/install.sh) and runs this file
after helm lint, kubernetes-validate and checkov. Under plain `make test` the tests that
render the chart skip when no Helm is installed (the skip says so); the others (values schema,
rule files, cluster definition, images) always run. Nothing here needs a cluster.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "forge"
VALUES = ROOT / "helm" / "values"
MONITORING = CHART / "files" / "monitoring"
CLUSTER = ROOT / "helm" / "eks" / "cluster.yaml"
RELEASE, NAMESPACE = "forge", "forge"

# The values files `make chart-test` renders; external.yaml is layered on production.yaml.
SCENARIOS = {
    "minimal": ["minimal.yaml"],
    "production": ["production.yaml"],
    "external": ["production.yaml", "external.yaml"],
}
JOB_TOPICS = {"forge.jobs.priority", "forge.jobs.standard", "forge.jobs.bulk"}
RETRY_TOPICS = {"forge.jobs.priority.retry", "forge.jobs.standard.retry", "forge.jobs.bulk.retry"}
ALL_TOPICS = JOB_TOPICS | RETRY_TOPICS | {"forge.jobs.results", "forge.jobs.dead-letter"}
WORKLOADS = ("Deployment", "StatefulSet")


def find_helm() -> str | None:
    local = ROOT / "var" / "tools" / "bin" / "helm"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


HELM = find_helm()
NO_HELM = "helm is not installed (var/tools/bin/helm or PATH): `make chart-test` installs it"


def helm_template(*values_files: str, sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if HELM is None:
        pytest.skip(NO_HELM)
    cmd = [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for name in values_files:
        cmd += ["-f", str(VALUES / name)]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def render(*values_files: str, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    result = helm_template(*values_files, sets=sets)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(*files) for name, files in SCENARIOS.items()}


@pytest.fixture(params=list(SCENARIOS))
def docs(request: pytest.FixtureRequest, rendered: dict) -> list[dict[str, Any]]:
    return rendered[request.param]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(workload name, pod template metadata, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            template = d["spec"]["template"]
            yield d["metadata"]["name"], template["metadata"], template["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def settings_from(env: dict[str, Any]) -> Any:
    """gateway.settings.Settings read from a container's FORGE_* values (as the pod would)."""
    from gateway.settings import Settings

    values = {k: v for k, v in env.items() if k.startswith("FORGE_") and isinstance(v, str)}
    with mock.patch.dict(os.environ, values):
        return Settings(_env_file=None)  # type: ignore[call-arg]


# --- Triton ---------------------------------------------------------------------------------


def test_triton_probes_per_model_readiness_and_long_startup(docs: list[dict]) -> None:
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    triton = spec["containers"][0]
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/models/stable_diffusion/ready"
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/models/stable_diffusion/ready"
    # Loading SD weights (and TensorRT engines) takes minutes: at least 10 minutes of budget.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert triton[probe]["httpGet"]["port"] == "http"


def test_triton_command_follows_the_contract(docs: list[dict]) -> None:
    triton = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["command"] == ["tritonserver"]
    for arg in (
        "--model-repository=/models",
        "--model-control-mode=explicit",
        "--load-model=stable_diffusion",
        "--allow-metrics=true",
        "--allow-gpu-metrics=true",
        "--allow-cpu-metrics=true",
        "--metrics-port=8002",
        # The config written by `python -m export config` (model-config init container).
        "--model-config-name=exported",
    ):
        assert arg in triton["args"]
    # The metrics the dashboards read: the chart passes the launcher's --metrics-config flags.
    launcher = (ROOT / "launcher" / "triton.py").read_text()
    metrics_config = re.findall(r'"(--metrics-config=[^"]+)"', launcher)
    assert metrics_config, "launcher/triton.py passes no --metrics-config"
    for arg in metrics_config:
        assert arg in triton["args"], arg
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_triton_gets_one_gpu_on_the_gpu_node_group(docs: list[dict]) -> None:
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The node selector and toleration are those of the GPU node group in helm/eks/cluster.yaml.
    gpu_group = next(
        g
        for g in yaml.safe_load(CLUSTER.read_text())["managedNodeGroups"]
        if g["instanceType"] == "g4dn.xlarge"
    )
    assert labels_match(spec["nodeSelector"], gpu_group["labels"])
    taint = gpu_group["taints"][0]
    assert {
        "key": taint["key"],
        "operator": "Equal",
        "value": taint["value"],
        "effect": taint["effect"],
    } in spec["tolerations"]


def test_triton_shm_is_a_memory_emptydir(docs: list[dict]) -> None:
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert shm["sizeLimit"]


def test_triton_terminates_gracefully(docs: list[dict]) -> None:
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    exit_timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert 0 < exit_timeout < spec["terminationGracePeriodSeconds"]


def test_model_repository_source_switch(rendered: dict) -> None:
    # minimal: a gp3 claim, weights exported on first start.
    minimal = one(rendered["minimal"], "Deployment", "forge-triton")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in minimal["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "forge-models"
    init = [c["name"] for c in minimal["initContainers"]]
    assert init == ["model-code", "model-export", "model-config"]
    assert "python -m export onnx" in minimal["initContainers"][1]["command"][-1]
    one(rendered["minimal"], "PersistentVolumeClaim", "forge-models")
    # production: weights from S3 into an emptyDir.
    prod = one(rendered["production"], "Deployment", "forge-triton")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in prod["volumes"]}
    assert "emptyDir" in volumes["models"]
    pull = next(c for c in prod["initContainers"] if c["name"] == "model-weights")
    assert pull["command"][:3] == ["aws", "s3", "sync"]
    assert pull["command"][-1] == "/models/stable_diffusion/1/weights/"


EXPORT_CONFIG = ["python", "-m", "export", "config", "--repository", "/models"]


def test_model_config_is_written_by_export_config(docs: list[dict]) -> None:
    """config.pbtxt is copied as committed (no sed); after the weights step, an init container
    runs `python -m export config` with the runtime and instance kind of the values."""
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    code = spec["initContainers"][0]
    assert code["name"] == "model-code"
    script = code["command"][-1]
    assert "sed " not in script and "grep " not in script
    assert "/config.pbtxt" in script and "/1/*.py" in script
    weights = "model-weights" if "model-weights" in names else "model-export"
    assert names.index("model-config") == names.index(weights) + 1
    config = spec["initContainers"][names.index("model-config")]
    assert config["image"] == spec["containers"][0]["image"]
    assert config["command"] == [
        *EXPORT_CONFIG,
        "--model-name",
        "stable_diffusion",
        "--runtime",
        "onnxruntime_cuda",
        "--instance-kind",
        "KIND_GPU",
    ]
    assert {m["mountPath"] for m in config["volumeMounts"]} >= {"/models", "/tmp"}


def test_model_config_tuning_values() -> None:
    docs = render(
        "production.yaml",
        sets=(
            "triton.model.instances=2",
            "triton.model.maxBatchSize=4",
            "triton.model.maxQueueDelayUs=0",
            "triton.model.instanceKind=KIND_CPU",
            "triton.model.runtime=onnxruntime",
        ),
    )
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    command = next(c for c in spec["initContainers"] if c["name"] == "model-config")["command"]
    flags = dict(zip(command[4::2], command[5::2], strict=True))
    assert flags == {
        "--repository": "/models",
        "--model-name": "stable_diffusion",
        "--runtime": "onnxruntime",
        "--instance-kind": "KIND_CPU",
        "--instances": "2",
        "--max-batch-size": "4",
        "--max-queue-delay-us": "0",  # 0 is a setting, not "unset"
    }
    result = helm_template("production.yaml", sets=("triton.model.maxBatchSize=0",))
    assert result.returncode != 0 and "maxBatchSize" in result.stderr


def test_chart_export_config_flags_exist() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", "config", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--repository",
        "--model-name",
        "--runtime",
        "--instance-kind",
        "--instances",
        "--max-batch-size",
        "--max-queue-delay-us",
    ):
        assert flag in result.stdout, flag


def test_chart_export_config_command_writes_the_config(tmp_path: Path) -> None:
    """The model-code and model-config init containers' commands, run on this repository's
    model folders and a published manifest, write configs/exported.pbtxt with the values and
    the model identity, and the streaming model's config from it."""
    docs = render(
        "production.yaml",
        sets=(
            "triton.model.maxBatchSize=4",
            "triton.model.instances=2",
            "triton.model.parameters.torch_compile=reduce-overhead",
        ),
    )
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    command = next(c for c in spec["initContainers"] if c["name"] == "model-config")["command"]
    code = next(c for c in spec["initContainers"] if c["name"] == "model-code")["command"]
    script = code[-1].replace("/opt/forge/model_repository", str(ROOT / "model_repository"))
    script = script.replace("/models", str(tmp_path))
    copied = subprocess.run([*code[:-1], script], capture_output=True, text=True, check=False)
    assert copied.returncode == 0, copied.stderr
    model = tmp_path / "stable_diffusion"
    (model / "1" / "weights").mkdir(parents=True)
    identity = {"name": "stable-diffusion-v1-5", "version": "weights-0123abcd"}
    contract = {"size_multiple": 64, "default_size": 512, "max_prompt_tokens": 77}
    manifest = {"model": identity, "contract": contract}
    (model / "1" / "weights" / "manifest.json").write_text(json.dumps(manifest))
    assert command[:3] == ["python", "-m", "export"]
    argv = [sys.executable, *command[1:]]
    argv[argv.index("/models")] = str(tmp_path)
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr

    from tritonclient.grpc import model_config_pb2

    from export.triton_config import read_config

    config = read_config(model / "configs" / "exported.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["runtime"] == "onnxruntime_cuda"
    assert params["torch_compile"] == "reduce-overhead"  # triton.model.parameters
    assert (params["model_name"], params["model_version"]) == (
        identity["name"],
        identity["version"],
    )
    assert {k: params[k] for k in contract} == {k: str(v) for k, v in contract.items()}
    assert config.max_batch_size == 4
    kind_gpu = model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert [(g.kind, g.count) for g in config.instance_group] == [(kind_gpu, 2)]
    # The streaming model: the same code and weights, this config under a decoupled policy.
    streaming = tmp_path / "stable_diffusion_stream"
    assert (streaming / "1").resolve() == (model / "1").resolve()
    stream_config = read_config(streaming / "configs" / "exported.pbtxt")
    assert stream_config.name == "stable_diffusion_stream"
    assert stream_config.model_transaction_policy.decoupled
    assert stream_config.max_batch_size == 4
    stream_params = {k: v.string_value for k, v in stream_config.parameters.items()}
    assert {k: stream_params[k] for k in params} == params
    inputs = [i.name for i in stream_config.input]
    assert inputs[0] == "prompt" and inputs[-2:] == ["preview_every", "progress_interval_s"]
    assert f"--load-model={streaming.name}" in spec["containers"][0]["args"]
    # The styles listing: its committed config, the same folder (so the same styles/).
    listing = tmp_path / "stable_diffusion_styles"
    assert (listing / "1").resolve() == (model / "1").resolve()
    assert read_config(listing / "config.pbtxt").default_model_filename == "styles_model.py"
    assert f"--load-model={listing.name}" in spec["containers"][0]["args"]


def test_tensorrt_build_runs_on_the_serving_gpu() -> None:
    docs = render("production.yaml", sets=("triton.tensorrt.build=true",))
    spec = one(docs, "Deployment", "forge-triton")["spec"]["template"]["spec"]
    build = next(c for c in spec["initContainers"] if c["name"] == "tensorrt-build")
    assert build["command"] == ["python", "-m", "export", "tensorrt", "--repository", "/models"]
    assert build["resources"]["limits"]["nvidia.com/gpu"] == 1
    # It runs after the weights are in place.
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("tensorrt-build") > names.index("model-weights")


def test_one_triton_replica_on_a_readwriteonce_volume() -> None:
    result = helm_template("minimal.yaml", sets=("triton.replicaCount=2",))
    assert result.returncode != 0
    assert "ReadWriteOnce" in result.stderr


# --- gateway and workers --------------------------------------------------------------------


def test_gateway_and_workers_follow_the_contract(docs: list[dict]) -> None:
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]["containers"][0]
    worker = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["command"] == ["python", "-m", "gateway"]
    assert worker["command"] == ["python", "-m", "gateway.worker"]
    assert gateway["image"] == worker["image"]
    # Liveness: the process (gateway) or its event loop (worker) answers. Readiness: the
    # gateway can accept work (Redis, broker); the worker takes work (gateway/worker_probe.py).
    for container, port in ((gateway, "http"), (worker, "metrics")):
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"http": 8080}
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": 9300}
    for container in (gateway, worker):
        env = env_of(container)
        assert env["FORGE_HOST"] == "0.0.0.0"
        assert env["FORGE_TRITON_GRPC_URL"] == "forge-triton.forge.svc:8001"
        assert env["FORGE_KAFKA_BOOTSTRAP"]
        assert env["FORGE_REDIS_URL"]
        assert ("FORGE_ASSET_S3_BUCKET" in env) != ("FORGE_ASSET_DIR" in env)
    triton_svc = one(docs, "Service", "forge-triton")
    assert {p["name"]: p["port"] for p in triton_svc["spec"]["ports"]}["grpc"] == 8001


def test_app_env_follows_the_charts_values(docs: list[dict]) -> None:
    """Every FORGE_* variable is a setting of gateway/settings.py, and the Kafka and worker
    settings come from the values the chart itself uses (topics, KEDA, ports), so they cannot
    drift apart."""
    from gateway.settings import Settings

    settings = {f"FORGE_{name.upper()}" for name in Settings.model_fields}
    worker_pod = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]["containers"][0]
    # The same settings, but whose forwarded headers to believe: only the gateway serves HTTP
    # behind the ALB.
    gateway_env = env_of(gateway)
    assert gateway_env.pop("FORGE_FORWARDED_ALLOW_IPS")
    assert gateway_env == env_of(worker)
    env = env_of(worker)
    forge = {name for name in env if name.startswith("FORGE_")}
    assert forge <= settings, forge - settings
    # Besides the settings, only the Redis password that Kubernetes puts into the URLs.
    assert set(env) - forge <= {"REDIS_PASSWORD"}, set(env) - forge
    assert len(env) == len(worker["env"]), "a variable is set twice"
    assert env["FORGE_WORKER_METRICS_PORT"] == str(worker["ports"][0]["containerPort"]) == "9300"
    assert env["FORGE_CONSUMER_GROUP"] == "forge-workers"
    assert env["FORGE_WORKER_CONCURRENCY"] == "4"
    assert int(env["FORGE_MAX_POLL_INTERVAL_MS"]) > int(env["FORGE_SESSION_TIMEOUT_MS"]) > 0
    assert env["FORGE_KAFKA_IDEMPOTENCE"] == "true"  # real Kafka: Strimzi or MSK
    prefix = env["FORGE_TOPIC_PREFIX"]
    assert prefix == "forge.jobs."
    assert {f"{prefix}{t}" for t in ("priority", "standard", "bulk")} == JOB_TOPICS
    assert int(env["FORGE_TOPIC_PARTITIONS"]) >= 1
    topics = find(docs, "KafkaTopic")
    if topics:  # Strimzi: the gateway creates topics as the chart's KafkaTopics are
        assert {t["spec"]["replicas"] for t in topics} == {int(env["FORGE_TOPIC_REPLICATION"])}
        assert max(t["spec"]["partitions"] for t in topics) == int(env["FORGE_TOPIC_PARTITIONS"])
    scaled = find(docs, "ScaledObject", "forge-worker")
    for trigger in scaled[0]["spec"]["triggers"] if scaled else []:
        assert trigger["metadata"]["consumerGroup"] == env["FORGE_CONSUMER_GROUP"]
        assert trigger["metadata"]["topic"].startswith(prefix)
    # Every value the chart sets parses as its setting.
    parsed = settings_from(env_of(gateway))
    assert parsed.callbacks is True and parsed.callback_ports == [80, 443]
    assert parsed.callback_allow_networks == []


def test_topic_replication_follows_the_brokers(rendered: dict) -> None:
    for scenario, replication in (("production", "3"), ("minimal", "1"), ("external", "2")):
        spec = one(rendered[scenario], "Deployment", "forge-worker")["spec"]["template"]["spec"]
        assert env_of(spec["containers"][0])["FORGE_TOPIC_REPLICATION"] == replication, scenario


def test_no_deployment_wide_webhook_secret(docs: list[dict]) -> None:
    """Each API key signs its callbacks with its own webhook secret: the chart renders no
    shared one, takes none as a value, and refuses one through extraEnv."""
    for d in docs:
        assert "webhook" not in d["metadata"]["name"], d["metadata"]["name"]
    for name in ("forge-gateway", "forge-worker"):
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert not [n for n in env_of(container) if "WEBHOOK_SECRET" in n], name
        skips = one(docs, "Deployment", name)["metadata"].get("annotations", {}).values()
        assert not [v for v in skips if "WEBHOOK" in v], name


def test_webhook_secret_values_and_env_are_refused() -> None:
    result = helm_template("production.yaml", sets=("forge.webhooks.existingSecret=x",))
    assert result.returncode != 0 and "webhooks" in result.stderr
    result = helm_template("production.yaml", sets=("forge.extraEnv.FORGE_WEBHOOK_SECRET=whsec_x",))
    assert result.returncode != 0 and "each API key signs its callbacks" in result.stderr
    # The deploy guide says how per-key secrets work: made with the key, shown once, rotated
    # with an overlap, optional in the keys file.
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for text in (
        "webhook_secret",
        "/v1/admin/keys/{id}/webhook-secret",
        "FORGE_WEBHOOK_SECRET_OVERLAP_S",
        "shown once",
    ):
        assert text in deploy, text
    assert "FORGE_WEBHOOK_SECRET`" not in deploy and "forge.webhooks" not in deploy


def test_callback_settings_follow_the_values() -> None:
    """forge.callbacks sets FORGE_CALLBACKS, FORGE_CALLBACK_PORTS and
    FORGE_CALLBACK_ALLOW_NETWORKS, and the workers' egress follows the same values."""
    docs = render(
        "production.yaml",
        sets=(
            "forge.callbacks.ports={443,8443}",
            "forge.callbacks.allowNetworks={10.20.0.0/16}",
        ),
    )
    worker = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(worker)
    assert (env["FORGE_CALLBACKS"], env["FORGE_CALLBACK_PORTS"]) == ("true", "[443,8443]")
    assert env["FORGE_CALLBACK_ALLOW_NETWORKS"] == '["10.20.0.0/16"]'
    parsed = settings_from(env)
    assert parsed.callbacks is True and parsed.callback_ports == [443, 8443]
    assert parsed.callback_allow_networks == ["10.20.0.0/16"]
    egress = policy_egress(docs, "forge-worker")
    assert internet_ports(egress) == {443, 8443}
    allowed = [r for r in egress if cidrs(r) == {"10.20.0.0/16"}]
    assert len(allowed) == 1 and rule_ports(allowed[0]) == {443, 8443}
    # Off: no callback_url, no callback ports (443 stays for S3).
    docs = render("production.yaml", sets=("forge.callbacks.enabled=false",))
    worker = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(worker)["FORGE_CALLBACKS"] == "false"
    assert internet_ports(policy_egress(docs, "forge-worker")) == {443}


def test_chart_topics_are_the_applications_topics() -> None:
    """kafka.topics names exactly the topics gateway/topics.py uses: each tier's requests and
    retries, results and dead letters."""
    from gateway.topics import Topics

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    names = {t["name"] for t in values["kafka"]["topics"]}
    assert names == set(Topics(values["kafka"]["topicPrefix"]).all) == ALL_TOPICS
    assert set(values["workers"]["autoscaling"]["lagThreshold"]) == JOB_TOPICS


def test_chart_refuses_topics_without_a_tiers_retry_topic() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    topics = [t for t in values["kafka"]["topics"] if t["name"] != "forge.jobs.bulk.retry"]
    sets = tuple(
        f"kafka.topics[{i}].{key}={value}"
        for i, topic in enumerate(topics)
        for key, value in topic.items()
    )
    result = helm_template("production.yaml", sets=sets)
    assert result.returncode != 0 and "forge.jobs.bulk.retry" in result.stderr


def test_chart_managed_settings_cannot_drift() -> None:
    result = helm_template("production.yaml", sets=("forge.extraEnv.FORGE_CONSUMER_GROUP=other",))
    assert result.returncode != 0 and "FORGE_CONSUMER_GROUP" in result.stderr
    result = helm_template(
        "production.yaml", sets=("forge.extraEnv.FORGE_CACHE_REDIS_URL=redis://elsewhere",)
    )
    assert result.returncode != 0 and "FORGE_CACHE_REDIS_URL" in result.stderr
    # A topic prefix that kafka.topics and the KEDA triggers do not use is refused.
    result = helm_template("production.yaml", sets=("kafka.topicPrefix=studio.jobs.",))
    assert result.returncode != 0 and "studio.jobs.priority" in result.stderr
    docs = render("production.yaml", sets=("workers.metricsPort=9400",))
    worker = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["ports"][0]["containerPort"] == 9400
    assert env_of(worker)["FORGE_WORKER_METRICS_PORT"] == "9400"


def test_api_keys_come_from_a_secret_file(rendered: dict) -> None:
    spec = one(rendered["production"], "Deployment", "forge-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "forge-api-keys"
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] is True
    assert env_of(container)["FORGE_API_KEYS_FILE"].startswith(mount["mountPath"] + "/")


def test_weapon_templates_from_a_configmap() -> None:
    docs = render("production.yaml", sets=("forge.weaponTemplates.content=axe: a {material} axe",))
    cm = one(docs, "ConfigMap", "forge-weapon-templates")
    assert "weapon-templates.yaml" in cm["data"]
    container = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["FORGE_WEAPON_TEMPLATES"] == (
        "/etc/forge/weapon-templates/weapon-templates.yaml"
    )


POLICY = "/etc/forge/content-policy/content-policy.yaml"


def assert_content_policy_mounted(docs: list[dict], configmap: str) -> None:
    """The gateway and the worker mount the policy ConfigMap as a directory (no subPath, so
    kubelet's updates reach the running pods' file) and read it through FORGE_CONTENT_POLICY."""
    for workload in ("forge-gateway", "forge-worker"):
        spec = one(docs, "Deployment", workload)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["content-policy"]["configMap"]["name"] == configmap, workload
        container = spec["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "content-policy")
        assert mount == {
            "name": "content-policy",
            "mountPath": "/etc/forge/content-policy",
            "readOnly": True,
        }, workload
        assert env_of(container)["FORGE_CONTENT_POLICY"] == POLICY, workload
        assert POLICY.startswith(mount["mountPath"] + "/")
        assert settings_from(env_of(container)).content_policy == Path(POLICY)


def test_content_policy_from_a_configmap(rendered: dict) -> None:
    content = "categories:\n  gore: [decapitated]"
    docs = render("production.yaml", sets=(f"forge.contentPolicy.content={content}",))
    cm = one(docs, "ConfigMap", "forge-content-policy")
    assert yaml.safe_load(cm["data"]["content-policy.yaml"]) == {
        "categories": {"gore": ["decapitated"]}
    }
    assert_content_policy_mounted(docs, "forge-content-policy")
    # The policy is read again when its file changes: an edit must not roll the pods.
    for workload in ("forge-gateway", "forge-worker"):
        before = one(rendered["production"], "Deployment", workload)["spec"]["template"]
        after = one(docs, "Deployment", workload)["spec"]["template"]
        assert (
            after["metadata"]["annotations"]["checksum/config"]
            == before["metadata"]["annotations"]["checksum/config"]
        ), workload
    # Without one, the pods use the policy built into the image.
    for name, scenario in rendered.items():
        assert not find(scenario, "ConfigMap", "forge-content-policy"), name
        for workload, _, spec in pod_specs(scenario):
            for container in containers(spec):
                assert "FORGE_CONTENT_POLICY" not in env_of(container), (name, workload)
    result = helm_template(
        "production.yaml", sets=("forge.extraEnv.FORGE_CONTENT_POLICY=/elsewhere.yaml",)
    )
    assert result.returncode != 0 and "FORGE_CONTENT_POLICY" in result.stderr


def test_content_policy_from_an_existing_configmap() -> None:
    docs = render(
        "production.yaml",
        sets=(
            "forge.contentPolicy.existingConfigMap=studio-policy",
            "forge.contentPolicy.content=ignored: true",
        ),
    )
    assert not find(docs, "ConfigMap", "forge-content-policy")
    assert_content_policy_mounted(docs, "studio-policy")


def test_assets_on_a_pvc_keep_gateway_and_workers_on_one_node(rendered: dict) -> None:
    docs = rendered["minimal"]
    worker = one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]
    term = worker["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert one(docs, "PersistentVolumeClaim", "forge-assets")["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    result = helm_template("minimal.yaml", sets=("gateway.replicaCount=2",))
    assert result.returncode != 0 and "ReadWriteOnce" in result.stderr


def test_ingress_is_an_internet_facing_alb_with_tls(rendered: dict) -> None:
    ingress = one(rendered["production"], "Ingress", "forge-gateway")
    annotations = ingress["metadata"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "alb"
    assert annotations["alb.ingress.kubernetes.io/scheme"] == "internet-facing"
    assert annotations["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert annotations["alb.ingress.kubernetes.io/certificate-arn"].startswith("arn:aws:acm:")
    assert annotations["alb.ingress.kubernetes.io/ssl-redirect"] == "443"
    assert json.loads(annotations["alb.ingress.kubernetes.io/listen-ports"]) == [
        {"HTTP": 80},
        {"HTTPS": 443},
    ]
    # The ALB keeps a gateway while it can accept work (Redis and the broker answer).
    assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == "/readyz"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "forge-gateway"
    assert not find(rendered["minimal"], "Ingress")


def ingress_path_matches(rule: dict, path: str) -> bool:
    """Whether an Ingress path rule takes a request path, as Kubernetes defines it: Exact is
    equality, Prefix matches element by element along the `/`-split path."""
    if rule["pathType"] == "Exact":
        return path == rule["path"]
    assert rule["pathType"] == "Prefix", rule  # ImplementationSpecific could match anything
    prefix = [p for p in rule["path"].split("/") if p]
    return [p for p in path.split("/") if p][: len(prefix)] == prefix


PUBLIC_PATHS = (
    "/",
    "/static/app.js",
    "/v1/images",
    "/v1/jobs/abc",
    "/v1/admin/keys",
    "/assets/0123abcd.png",
    "/docs",
    "/openapi.json",
)
PRIVATE_PATHS = ("/metrics", "/metrics/", "/healthz", "/readyz", "/readyz/x", "/metricsx")


def test_ingress_routes_only_public_paths(rendered: dict) -> None:
    """No rule of the gateway's Ingress reaches /metrics (nor /healthz, /readyz), and none
    sends what it does not list to the gateway; every public path is routed."""
    for scenario in ("production", "external"):
        ingress = one(rendered[scenario], "Ingress", "forge-gateway")
        assert "defaultBackend" not in ingress["spec"]
        rules = [r for host in ingress["spec"]["rules"] for r in host["http"]["paths"]]
        assert rules
        for path in PRIVATE_PATHS:
            assert not [r for r in rules if ingress_path_matches(r, path)], (scenario, path)
        for path in PUBLIC_PATHS:
            assert [r for r in rules if ingress_path_matches(r, path)], (scenario, path)
        # The ALB's target health check goes to the pods directly, on /readyz.
        annotations = ingress["metadata"]["annotations"]
        assert annotations["alb.ingress.kubernetes.io/healthcheck-path"] == "/readyz"
    # Per host, too.
    docs = render("production.yaml", sets=("gateway.ingress.hosts={a.example.com,b.example.com}",))
    ingress = one(docs, "Ingress", "forge-gateway")
    assert [h["host"] for h in ingress["spec"]["rules"]] == ["a.example.com", "b.example.com"]
    for host in ingress["spec"]["rules"]:
        assert not [r for r in host["http"]["paths"] if ingress_path_matches(r, "/metrics")]


def test_forwarded_headers_trusted_only_from_the_vpc(rendered: dict) -> None:
    """The gateway believes X-Forwarded-For/-Proto only from the VPC the ALB lives in (the
    CIDR of helm/eks/cluster.yaml), never from anyone."""
    vpc = yaml.safe_load(CLUSTER.read_text())["vpc"]["cidr"]
    for scenario, docs in rendered.items():
        gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]
        allowed = env_of(gateway["containers"][0])["FORGE_FORWARDED_ALLOW_IPS"]
        assert allowed == vpc == "192.168.0.0/16", scenario
        assert settings_from(env_of(gateway["containers"][0])).forwarded_allow_ips == vpc
    docs = render("production.yaml", sets=("gateway.forwardedAllowIps=10.0.0.0/24\\,10.0.1.0/24",))
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(gateway)["FORGE_FORWARDED_ALLOW_IPS"] == "10.0.0.0/24,10.0.1.0/24"
    result = helm_template("production.yaml", sets=("forge.extraEnv.FORGE_FORWARDED_ALLOW_IPS=*",))
    assert result.returncode != 0 and "FORGE_FORWARDED_ALLOW_IPS" in result.stderr


def test_gateway_hpa_on_cpu(rendered: dict) -> None:
    hpa = one(rendered["production"], "HorizontalPodAutoscaler", "forge-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "forge-gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2


def test_workers_scale_on_consumer_lag_with_keda(rendered: dict) -> None:
    scaled = one(rendered["production"], "ScaledObject", "forge-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "forge-worker"
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"kafka"}
    assert {t["metadata"]["topic"] for t in triggers} == JOB_TOPICS
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {"forge-workers"}
    assert {t["metadata"]["bootstrapServers"] for t in triggers} == {
        "forge-kafka-bootstrap.forge.svc:9092"
    }
    # KEDA metadata values are strings.
    assert all(isinstance(v, str) for t in triggers for v in t["metadata"].values())
    assert not find(rendered["production"], "HorizontalPodAutoscaler", "forge-worker")


def test_workers_fall_back_to_an_hpa_without_keda() -> None:
    docs = render("production.yaml", sets=("workers.autoscaling.mode=hpa",))
    assert not find(docs, "ScaledObject", "forge-worker")
    hpa = one(docs, "HorizontalPodAutoscaler", "forge-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "forge-worker"


def test_triton_scales_on_queue_time(rendered: dict) -> None:
    scaled = one(rendered["production"], "ScaledObject", "forge-triton")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "Value"
    query = trigger["metadata"]["query"]
    assert "nv_inference_queue_duration_us" in query
    assert "nv_inference_request_success" in query
    assert 'model="stable_diffusion"' in query


# --- Kafka, Redis, storage ------------------------------------------------------------------


def test_strimzi_kafka_three_brokers_kraft_and_topics(rendered: dict) -> None:
    docs = rendered["production"]
    kafka = one(docs, "Kafka", "forge")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    pools = {p["metadata"]["name"]: p for p in find(docs, "KafkaNodePool")}
    assert pools["brokers"]["spec"]["replicas"] == 3
    assert pools["brokers"]["spec"]["roles"] == ["broker"]
    assert pools["controllers"]["spec"]["roles"] == ["controller"]
    for pool in pools.values():
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == "forge"
    topics = find(docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics} == ALL_TOPICS
    assert {t["spec"]["replicas"] for t in topics} == {3}
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == "forge" for t in topics)
    # Only the gateway, the workers and KEDA may connect (Strimzi writes the NetworkPolicy).
    peers = kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    components = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in peers
        if "podSelector" in p
    }
    assert components == {"gateway", "worker"}


def kafka_durability(docs: list[dict]) -> tuple[int, int, int]:
    """(brokers, replication of the topics, min.insync.replicas) of the Strimzi cluster."""
    config = one(docs, "Kafka", "forge")["spec"]["kafka"]["config"]
    brokers = one(docs, "KafkaNodePool", "brokers")["spec"]["replicas"]
    replicas = {t["spec"]["replicas"] for t in find(docs, "KafkaTopic")}
    assert replicas == {config["default.replication.factor"]}
    assert config["offsets.topic.replication.factor"] == config["default.replication.factor"]
    assert config["transaction.state.log.min.isr"] == config["min.insync.replicas"]
    assert config["unclean.leader.election.enable"] is False
    return brokers, config["default.replication.factor"], config["min.insync.replicas"]


def test_kafka_survives_a_broker_without_losing_acknowledged_writes(rendered: dict) -> None:
    """Production: 3 brokers, replication 3, min.insync.replicas 2 (acks=all with the
    idempotent producer): one broker down neither stops writes nor loses an acknowledged one.
    Two brokers get min.insync.replicas 1, whose cost the docs state; one broker gets 1."""
    assert kafka_durability(rendered["production"]) == (3, 3, 2)
    worker = one(rendered["production"], "Deployment", "forge-worker")
    env = env_of(worker["spec"]["template"]["spec"]["containers"][0])
    assert env["FORGE_KAFKA_IDEMPOTENCE"] == "true"  # acks=all
    assert kafka_durability(rendered["minimal"]) == (1, 1, 1)
    assert kafka_durability(render("production.yaml", sets=("kafka.strimzi.brokers=2",))) == (
        2,
        2,
        1,
    )
    assert kafka_durability(render("production.yaml", sets=("kafka.strimzi.brokers=5",))) == (
        5,
        3,
        2,
    )
    operations = (ROOT / "docs" / "operations.md").read_text()
    values = (CHART / "values.yaml").read_text()
    for text in (operations, values):
        assert "min.insync.replicas 2" in text and "min.insync.replicas 1" in text


def test_external_kafka_and_redis(rendered: dict) -> None:
    docs = rendered["external"]
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic", "StatefulSet"):
        assert not find(docs, kind), kind
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]
    env = env_of(gateway["containers"][0])
    assert env["FORGE_KAFKA_BOOTSTRAP"].startswith("b-1.forge.")
    # Two ElastiCache clusters: the state (noeviction) and the cache (allkeys-lru).
    assert env["FORGE_REDIS_URL"] == {"secretKeyRef": {"name": "forge-redis-url", "key": "url"}}
    assert env["FORGE_CACHE_REDIS_URL"] == {
        "secretKeyRef": {"name": "forge-cache-redis-url", "key": "url"}
    }
    assert not find(docs, "Deployment", "forge-redis-cache")
    assert not find(docs, "NetworkPolicy", "forge-redis")
    assert not find(docs, "NetworkPolicy", "forge-redis-cache")
    # The external modes need the policies set on the clusters: the values and docs say so.
    values = (CHART / "values.yaml").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for text in (values, deploy):
        assert "maxmemory-policy noeviction" in text and "allkeys-lru" in text


def test_external_state_redis_with_the_cache_in_the_cluster() -> None:
    docs = render("production.yaml", "external.yaml", sets=("redis.cache.mode=incluster",))
    env = env_of(
        one(docs, "Deployment", "forge-worker")["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["FORGE_CACHE_REDIS_URL"] == CACHE_URL
    assert env["REDIS_PASSWORD"] == PASSWORD_FROM
    one(docs, "Deployment", "forge-redis-cache")
    one(docs, "Secret", "forge-redis-auth")
    result = helm_template("production.yaml", sets=("redis.cache.mode=external",))
    assert result.returncode != 0 and "redis.cache.external.url" in result.stderr


# The in-cluster Redis URLs: Kubernetes puts the password from the Secret in $(REDIS_PASSWORD).
STATE_URL = "redis://:$(REDIS_PASSWORD)@forge-redis-master.forge.svc:6379/0"
CACHE_URL = "redis://:$(REDIS_PASSWORD)@forge-redis-cache.forge.svc:6379/0"
PASSWORD_FROM = {"secretKeyRef": {"name": "forge-redis-auth", "key": "password"}}


@pytest.mark.parametrize("scenario", ["minimal", "production"])
def test_redis_requires_a_password_from_a_secret(rendered: dict, scenario: str) -> None:
    """Both in-cluster Redis run with --requirepass (the replicas with --masterauth too) from
    the chart's Secret; the probes pass it in REDISCLI_AUTH; the gateway and the workers get
    it inside their URLs by env interpolation. No manifest but the Secret holds it."""
    docs = rendered[scenario]
    secret = one(docs, "Secret", "forge-redis-auth")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 32 and password.isalnum()  # fits a redis:// URL as it is
    for kind, name in (("StatefulSet", "forge-redis"), ("Deployment", "forge-redis-cache")):
        container = one(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]
        env = env_of(container)
        assert env["REDIS_PASSWORD"] == PASSWORD_FROM, name
        assert env["REDISCLI_AUTH"] == PASSWORD_FROM, name
        options = redis_args(container)
        # $VAR in the state Redis's shell script, $(VAR) filled in by Kubernetes in the cache's.
        assert options["requirepass"] in ('"$REDIS_PASSWORD"', "$(REDIS_PASSWORD)"), name
        if kind == "StatefulSet":
            assert options["masterauth"] == '"$REDIS_PASSWORD"'
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["exec"]["command"] == ["redis-cli", "ping"], name
    for name in ("forge-gateway", "forge-worker"):
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        names = [e["name"] for e in container["env"]]
        # Defined before the URLs that use it, or Kubernetes leaves $(REDIS_PASSWORD) as is.
        assert names.index("REDIS_PASSWORD") < names.index("FORGE_REDIS_URL")
        assert env_of(container)["REDIS_PASSWORD"] == PASSWORD_FROM
        assert env_of(container)["FORGE_REDIS_URL"] == STATE_URL
    encoded = secret["data"]["password"]
    for d in docs:
        if d is not secret:
            text = yaml.safe_dump(d)
            where = f"{d['kind']}/{d['metadata']['name']}"
            assert password not in text and encoded not in text, where


def test_redis_password_from_an_existing_secret() -> None:
    docs = render(
        "production.yaml",
        sets=("redis.auth.existingSecret=studio-redis", "redis.auth.secretKey=pw"),
    )
    assert not find(docs, "Secret", "forge-redis-auth")
    ref = {"secretKeyRef": {"name": "studio-redis", "key": "pw"}}
    for kind, name in (
        ("StatefulSet", "forge-redis"),
        ("Deployment", "forge-redis-cache"),
        ("Deployment", "forge-gateway"),
        ("Deployment", "forge-worker"),
    ):
        container = one(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["REDIS_PASSWORD"] == ref, name


def test_external_redis_takes_its_auth_token_in_the_url_secret(rendered: dict) -> None:
    """ElastiCache: the AUTH token is part of the URL in its Secret; the chart makes no
    password and sets no REDIS_PASSWORD. The docs say how to make the token and the URL."""
    docs = rendered["external"]
    assert not find(docs, "Secret", "forge-redis-auth")
    for name in ("forge-gateway", "forge-worker"):
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert "REDIS_PASSWORD" not in env_of(container)
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "--auth-token" in deploy and "--transit-encryption-enabled" in deploy
    assert "rediss://:" in deploy


def redis_args(container: dict) -> dict[str, str]:
    """The redis-server options of a container (`--name value` pairs), from its command."""
    words = container["command"]
    if words[:2] == ["sh", "-ec"]:  # a script: `set -- --opt value ...`
        script = words[-1]
        words = re.sub(r"\\\n", " ", script).split("set --", 1)[1].split("\n", 1)[0].split()
    else:
        assert words[0] == "redis-server", words
        words = words[1:]
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            options[word[2:]] = value
    return options


@pytest.mark.parametrize("scenario", ["minimal", "production"])
def test_job_state_cannot_be_evicted_and_the_cache_can(rendered: dict, scenario: str) -> None:
    """The state Redis (job state, keys, limits, idempotency) refuses writes when full instead
    of evicting, and keeps an append-only file on its volume; the result cache is a Redis of
    its own that evicts least recently used keys within its maxmemory. (The external scenario:
    test_external_kafka_and_redis.)"""
    docs = rendered[scenario]
    state = one(docs, "StatefulSet", "forge-redis")
    spec = state["spec"]["template"]["spec"]
    options = redis_args(spec["containers"][0])
    assert options["maxmemory-policy"] == "noeviction"
    assert options["maxmemory"]
    assert options["appendonly"] == "yes" and options["dir"] == "/data"
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in state["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims
    cache = one(docs, "Deployment", "forge-redis-cache")["spec"]["template"]["spec"]
    options = redis_args(cache["containers"][0])
    assert options["maxmemory-policy"] == "allkeys-lru"
    assert options["maxmemory"] == "200mb"
    assert options["appendonly"] == "no" and options["save"] == ""
    # The gateway and the workers use the cache Redis for the cache only.
    for name in ("forge-gateway", "forge-worker"):
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        env = env_of(container)
        assert env["FORGE_REDIS_URL"] == STATE_URL
        assert env["FORGE_CACHE_REDIS_URL"] == CACHE_URL
    service = one(docs, "Service", "forge-redis-cache")
    assert service["spec"]["ports"][0]["port"] == 6379


def test_redis_is_replicated_from_pod_zero(rendered: dict) -> None:
    docs = rendered["production"]
    redis = one(docs, "StatefulSet", "forge-redis")
    assert redis["spec"]["replicas"] == 2
    script = redis["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--replicaof forge-redis-0.forge-redis-headless.forge.svc 6379" in script
    assert "--appendonly yes" in script
    master = one(docs, "Service", "forge-redis-master")
    assert master["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "forge-redis-0"
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]
    assert env_of(gateway["containers"][0])["FORGE_REDIS_URL"] == STATE_URL


def test_gp3_storage_class(rendered: dict) -> None:
    sc = one(rendered["production"], "StorageClass", "forge-gp3")
    assert sc["provisioner"] == "ebs.csi.aws.com"
    assert sc["parameters"]["type"] == "gp3"
    assert sc["parameters"]["iops"] == "3000"
    assert sc["parameters"]["throughput"] == "125"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    claims = find(rendered["minimal"], "PersistentVolumeClaim")
    assert claims and {c["spec"]["storageClassName"] for c in claims} == {"forge-gp3"}


# --- security, labels, disruption, network --------------------------------------------------


def test_pods_run_locked_down(docs: list[dict]) -> None:
    for name, _, spec in pod_specs(docs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] >= 10000, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for container in containers(spec):
            ctx = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in ctx["capabilities"], where
            assert ctx["runAsNonRoot"] is True, where
            assert container["resources"]["limits"]["memory"], where
            assert container["resources"]["requests"]["cpu"], where


def test_standard_labels_and_selectors(docs: list[dict]) -> None:
    for d in docs:
        labels = d["metadata"]["labels"]
        where = f"{d['kind']}/{d['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "forge", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["helm.sh/chart"] == "forge-0.1.0", where
        assert labels["app.kubernetes.io/part-of"] == "crafterse-forge", where
        if d["kind"] not in ("StorageClass",):
            assert d["metadata"]["namespace"] == NAMESPACE, where
    pods = {name: meta["labels"] for name, meta, _ in pod_specs(docs)}
    for d in docs:
        if d["kind"] in WORKLOADS:
            assert labels_match(d["spec"]["selector"]["matchLabels"], pods[d["metadata"]["name"]])
        if d["kind"] == "Service":
            # The StatefulSet controller adds the pod-name label; the template cannot carry it.
            selector = {
                k: v
                for k, v in d["spec"]["selector"].items()
                if k != "statefulset.kubernetes.io/pod-name"
            }
            assert any(labels_match(selector, p) for p in pods.values()), d["metadata"]["name"]
        if d["kind"] == "PodDisruptionBudget":
            assert any(labels_match(d["spec"]["selector"]["matchLabels"], p) for p in pods.values())


def test_every_workload_has_a_pdb(docs: list[dict]) -> None:
    pdbs = [d["spec"]["selector"]["matchLabels"] for d in find(docs, "PodDisruptionBudget")]
    for name, meta, _ in pod_specs(docs):
        assert any(labels_match(sel, meta["labels"]) for sel in pdbs), name
    # A worker that is not Ready (paused while the image model is unavailable) or a gateway
    # without Redis can still be evicted: such an outage never blocks a node drain.
    for name in ("forge-worker", "forge-gateway", "forge-triton"):
        pdb = one(docs, "PodDisruptionBudget", name)
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name


def _component_selector(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "forge",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component,
    }


def test_network_policies(docs: list[dict]) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    # Every pod of the chart is selected by a policy.
    for name, meta, _ in pod_specs(docs):
        assert any(
            labels_match(p["podSelector"]["matchLabels"], meta["labels"]) for p in policies.values()
        ), name
    # Only the gateway takes traffic from anywhere, and only on its HTTP port.
    gateway = policies["forge-gateway"]
    assert gateway["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    inside = [_component_selector("gateway"), _component_selector("worker")]
    for name in ("forge-triton", "forge-redis", "forge-redis-cache"):
        if name not in policies:
            continue
        for rule in policies[name]["ingress"]:
            assert rule.get("from"), name
            for peer in rule["from"]:
                if "namespaceSelector" in peer:  # Prometheus, metrics port only
                    assert [p["port"] for p in rule["ports"]] == ["metrics"], name
                else:
                    allowed = (
                        [*inside, _component_selector("redis")] if name == "forge-redis" else inside
                    )
                    assert peer["podSelector"]["matchLabels"] in allowed, name
    triton_ports = {p["port"] for r in policies["forge-triton"]["ingress"] for p in r["ports"]}
    assert triton_ports == {"http", "grpc", "metrics"}


PRIVATE_V4 = {
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
}
PRIVATE_V6 = {"fc00::/7", "fe80::/10"}


def policy_egress(docs: list[dict], name: str) -> list[dict]:
    """The egress rules of a NetworkPolicy that also restricts egress."""
    spec = one(docs, "NetworkPolicy", name)["spec"]
    assert "Egress" in spec["policyTypes"], name
    return spec["egress"]


def rule_ports(rule: dict) -> set[int]:
    assert all(p.get("protocol", "TCP") in ("TCP", "UDP") for p in rule["ports"]), rule
    return {p["port"] for p in rule["ports"]}


def cidrs(rule: dict) -> set[str]:
    return {peer["ipBlock"]["cidr"] for peer in rule["to"] if "ipBlock" in peer}


def internet_rule(egress: list[dict]) -> dict | None:
    found = [r for r in egress if "0.0.0.0/0" in cidrs(r)]
    assert len(found) <= 1, found
    return found[0] if found else None


def internet_ports(egress: list[dict]) -> set[int]:
    rule = internet_rule(egress)
    return rule_ports(rule) if rule else set()


def egress_allows_address(egress: list[dict], address: str, port: int) -> bool:
    """Whether an ipBlock rule lets traffic out to address:port (pod selectors aside)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    for rule in egress:
        if port not in rule_ports(rule):
            continue
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if not block or ip.version != ipaddress.ip_network(block["cidr"]).version:
                continue
            inside = ip in ipaddress.ip_network(block["cidr"])
            excepted = any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
            if inside and not excepted:
                return True
    return False


def egress_targets(egress: list[dict]) -> dict[str, set[int]]:
    """What each rule reaches, by name ("dns", "kafka", "redis", "redis-cache", "triton",
    an ipBlock's CIDR), and its ports; a rule that reaches anything else fails."""
    found: dict[str, set[int]] = {}
    for rule in egress:
        assert rule.get("to"), f"an egress rule without `to` reaches everything: {rule}"
        assert rule.get("ports"), f"an egress rule without ports: {rule}"
        for peer in rule["to"]:
            if "ipBlock" in peer:
                name = peer["ipBlock"]["cidr"]
            elif "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "kube-system"
                }
                assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                name = "dns"
            else:
                labels = peer["podSelector"]["matchLabels"]
                if labels.get("strimzi.io/cluster"):
                    broker = {"strimzi.io/cluster": "forge", "strimzi.io/broker-role": "true"}
                    assert labels == broker
                    name = "kafka"
                else:
                    name = labels["app.kubernetes.io/component"]
                    assert labels == _component_selector(name), labels
            assert name not in found, f"{name} twice"
            found[name] = rule_ports(rule)
    return found


def test_gateway_and_worker_egress(rendered: dict) -> None:
    """The workers reach DNS, the brokers, both Redis, Triton's gRPC port and the public
    internet (private ranges left out) on the callback ports and 443 (S3); the gateway the
    same without the internet, but for S3 and STS on 443 where assets are on S3."""
    inside = {
        "dns": {53},
        "kafka": {9092},
        "redis": {6379},
        "redis-cache": {6379},
        "triton": {8001},
    }
    for scenario in ("production", "minimal"):
        docs = rendered[scenario]
        s3 = scenario == "production"  # minimal keeps assets on a volume
        worker = policy_egress(docs, "forge-worker")
        gateway = policy_egress(docs, "forge-gateway")
        assert egress_targets(worker) == {**inside, "0.0.0.0/0": {80, 443}}, scenario
        expected = {**inside, "0.0.0.0/0": {443}} if s3 else inside
        assert egress_targets(gateway) == expected, scenario
        dns = next(r for r in worker if egress_targets([r]) == {"dns": {53}})
        assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
        for egress in (worker, gateway) if s3 else (worker,):
            block = internet_rule(egress)["to"][0]["ipBlock"]  # type: ignore[index]
            assert set(block["except"]) == PRIVATE_V4
        private = ("10.1.2.3", "172.20.0.1", "192.168.5.5", "169.254.169.254", "100.64.1.1")
        for address in (*private, "127.0.0.1"):
            for egress in (worker, gateway):
                for port in (80, 443, 6379, 9092):
                    assert not egress_allows_address(egress, address, port), (scenario, address)
        assert egress_allows_address(worker, "203.0.113.7", 443)
        assert egress_allows_address(worker, "203.0.113.7", 80)
        assert not egress_allows_address(worker, "203.0.113.7", 22)
        assert egress_allows_address(gateway, "203.0.113.7", 443) is s3
        assert not egress_allows_address(gateway, "203.0.113.7", 80)
    # External Kafka and Redis: no in-cluster peers for them, their subnets instead.
    docs = rendered["external"]
    for name in ("forge-worker", "forge-gateway"):
        targets = egress_targets(policy_egress(docs, name))
        assert "kafka" not in targets and "redis" not in targets and "redis-cache" not in targets
        assert targets["192.168.0.0/16"] == {9092, 9094, 6379}
        assert targets["dns"] == {53} and targets["triton"] == {8001}
    result = helm_template(
        "production.yaml", "external.yaml", sets=("networkPolicy.externalServices=null",)
    )
    assert result.returncode != 0 and "networkPolicy.externalServices" in result.stderr


def test_egress_ipv6_internet_when_asked() -> None:
    docs = render("production.yaml", sets=("networkPolicy.ipv6=true",))
    worker = policy_egress(docs, "forge-worker")
    v6 = [p["ipBlock"] for p in internet_rule(worker)["to"] if p["ipBlock"]["cidr"] == "::/0"]  # type: ignore[index]
    assert len(v6) == 1 and set(v6[0]["except"]) == PRIVATE_V6
    assert egress_allows_address(worker, "2001:db8::1", 443)
    assert not egress_allows_address(worker, "fd00::1", 443)
    assert not egress_allows_address(worker, "fe80::1", 443)


def test_checkov_skips_carry_reasons(docs: list[dict]) -> None:
    for d in docs:
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith("CKV"), value
                assert len(reason.split()) >= 8, f"{d['metadata']['name']}: {value}"


# --- monitoring: one source of truth --------------------------------------------------------


def test_prometheus_rules_are_the_files_unchanged(rendered: dict) -> None:
    files = sorted((MONITORING / "rules").glob("*.yml"))
    assert files, "no rule files"
    docs = rendered["production"]
    for path in files:
        rule = one(docs, "PrometheusRule", f"forge-{path.stem}")
        assert rule["spec"] == yaml.safe_load(path.read_text()), path.name
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert len(find(docs, "PrometheusRule")) == len(files)


def test_grafana_dashboards_are_the_files_unchanged(rendered: dict) -> None:
    files = sorted((MONITORING / "dashboards").glob("*.json"))
    assert files, "no dashboards"
    docs = rendered["production"]
    for path in files:
        cm = one(docs, "ConfigMap", f"forge-dashboard-{path.stem}")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text()), path.name


def test_rule_files_are_prometheus_rule_files() -> None:
    for path in (MONITORING / "rules").glob("*.yml"):
        content = yaml.safe_load(path.read_text())
        assert set(content) == {"groups"}, path.name
        for group in content["groups"]:
            for rule in group["rules"]:
                assert ("record" in rule) != ("alert" in rule), rule
                if "alert" in rule:
                    assert rule["labels"]["severity"], rule["alert"]
                    for key in ("summary", "description", "runbook_url"):
                        assert rule["annotations"][key], (rule["alert"], key)


def test_scrape_targets_use_the_rule_files_job_names(rendered: dict) -> None:
    docs = rendered["production"]
    monitors = {m["metadata"]["name"]: m for m in find(docs, "ServiceMonitor")}
    for component, port in (("triton", "metrics"), ("gateway", "http")):
        monitor = monitors[f"forge-{component}"]
        service = one(docs, "Service", f"forge-{component}")
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == component
        assert monitor["spec"]["endpoints"][0]["port"] == port
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert labels_match(selector, service["metadata"]["labels"])
    podmonitor = one(docs, "PodMonitor", "forge-worker")
    endpoint = podmonitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "worker"} in endpoint[
        "relabelings"
    ]
    # The rule files select Triton by job="triton".
    rules = (MONITORING / "rules" / "forge-availability.yml").read_text()
    assert 'job="triton"' in rules


def test_minimal_needs_no_prometheus_operator_or_keda(rendered: dict) -> None:
    kinds = {d["apiVersion"].split("/")[0] for d in rendered["minimal"]}
    assert "monitoring.coreos.com" not in kinds
    assert "keda.sh" not in kinds


# --- values schema, cluster definition, images ----------------------------------------------


def test_values_schema_is_generated_from_values_yaml() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "tools" / "gen_schema.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_values_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict, path: str) -> Iterator[tuple[str, dict]]:
        for key, child in node.get("properties", {}).items():
            yield f"{path}.{key}", child
            yield from walk(child, f"{path}.{key}")

    nodes = list(walk(schema, ""))
    assert len(nodes) > 100
    for path, node in nodes:
        assert node.get("type"), path
        assert node.get("description"), path


def test_schema_rejects_unknown_values() -> None:
    result = helm_template("production.yaml", sets=("gateway.replicas=3",))
    assert result.returncode != 0
    assert "replicas" in result.stderr


def test_eks_cluster_matches_the_seed() -> None:
    cluster = yaml.safe_load(CLUSTER.read_text())
    assert cluster["kind"] == "ClusterConfig"
    assert cluster["apiVersion"] == "eksctl.io/v1alpha5"
    name = cluster["metadata"]["name"]
    groups = {g["instanceType"]: g for g in cluster["managedNodeGroups"]}
    general, gpu = groups["t3.medium"], groups["g4dn.xlarge"]
    assert general["desiredCapacity"] == 2 and general["minSize"] <= 2 <= general["maxSize"]
    assert gpu["desiredCapacity"] == 1
    assert gpu["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    assert gpu["labels"]["forge.crafterse.io/node"] == "gpu"
    for group in (general, gpu):
        assert group["tags"]["k8s.io/cluster-autoscaler/enabled"] == "true"
        assert group["tags"][f"k8s.io/cluster-autoscaler/{name}"] == "owned"
    addons = {a["name"]: a for a in cluster["addons"]}
    assert json.loads(addons["vpc-cni"]["configurationValues"])["enableNetworkPolicy"] == "true"
    assert "aws-ebs-csi-driver" in addons


def test_model_code_runs_on_the_triton_images_python() -> None:
    # NGC tritonserver 24.10 runs the Python backend with Python 3.10.
    sources = [
        *(ROOT / "model_repository" / "stable_diffusion" / "1").glob("*.py"),
        *(ROOT / "export").glob("*.py"),
    ]
    assert sources
    for path in sources:
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))


def test_dockerfiles_follow_the_contract() -> None:
    triton = (ROOT / "helm" / "images" / "triton.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in triton
    for package in ("torch", "diffusers", "transformers", "onnxruntime-gpu", "tensorrt"):
        assert package in triton
    assert "COPY model_repository/" in triton
    # `python -m export config` (the model-config init container) needs tritonclient's
    # model_config protobuf; Triton loads the config that command writes.
    assert '"tritonclient[grpc]==' in triton
    assert '"--model-config-name=exported"' in triton
    gateway = (ROOT / "helm" / "images" / "gateway.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in gateway
    assert "USER 10001" in gateway and "pip install ." in gateway
    # torch is a core dependency: the CPU build is installed first to keep CUDA out.
    assert "download.pytorch.org/whl/cpu" in gateway
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and f"torch=={pinned[1]}" in gateway
    # The wheel carries only .py files: the page and the default templates are copied in.
    assert (
        "cp -r gateway/static gateway/weapon_templates.yaml gateway/content_policy.yaml" in gateway
    )
    assert "Settings().content_policy.is_file()" in gateway
    assert "import gateway.__main__, gateway.app, gateway.worker" in gateway
