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
ALL_TOPICS = JOB_TOPICS | {"forge.jobs.retry", "forge.jobs.results", "forge.jobs.dead-letter"}
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
    """The model-config init container's command, run on a copy of the committed config and a
    published manifest, writes configs/exported.pbtxt with the values and the model identity."""
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
    model = tmp_path / "stable_diffusion"
    (model / "1" / "weights").mkdir(parents=True)
    for name in ("config.pbtxt", "weights.schema.json"):  # what the model-code step copies
        shutil.copy(ROOT / "model_repository" / "stable_diffusion" / name, model)
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
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
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
    assert env_of(gateway) == env_of(worker)
    env = env_of(worker)
    assert set(env) <= settings, set(env) - settings
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
    # The webhook signing secret comes from a Secret, generated when none is given.
    ref = env["FORGE_WEBHOOK_SECRET"]["secretKeyRef"]
    assert ref == {"name": "forge-webhook", "key": "webhook-secret"}
    secret = one(docs, "Secret", "forge-webhook")
    value = base64.b64decode(secret["data"]["webhook-secret"]).decode()
    assert value.startswith("whsec_") and len(base64.b64decode(value[6:])) == 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_replication_two_on_the_two_broker_strimzi_cluster(rendered: dict) -> None:
    for scenario, replication in (("production", "2"), ("minimal", "1"), ("external", "2")):
        spec = one(rendered[scenario], "Deployment", "forge-worker")["spec"]["template"]["spec"]
        assert env_of(spec["containers"][0])["FORGE_TOPIC_REPLICATION"] == replication, scenario


def test_webhook_secret_from_an_existing_secret() -> None:
    docs = render(
        "production.yaml",
        sets=("forge.webhooks.existingSecret=forge-callbacks", "forge.webhooks.secretKey=whsec"),
    )
    assert not find(docs, "Secret", "forge-webhook")
    for name in ("forge-gateway", "forge-worker"):
        container = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["FORGE_WEBHOOK_SECRET"] == {
            "secretKeyRef": {"name": "forge-callbacks", "key": "whsec"}
        }


def test_chart_managed_settings_cannot_drift() -> None:
    result = helm_template("production.yaml", sets=("forge.extraEnv.FORGE_CONSUMER_GROUP=other",))
    assert result.returncode != 0 and "FORGE_CONSUMER_GROUP" in result.stderr
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
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "forge-gateway"
    assert not find(rendered["minimal"], "Ingress")


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


def test_strimzi_kafka_two_brokers_kraft_and_topics(rendered: dict) -> None:
    docs = rendered["production"]
    kafka = one(docs, "Kafka", "forge")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    pools = {p["metadata"]["name"]: p for p in find(docs, "KafkaNodePool")}
    assert pools["brokers"]["spec"]["replicas"] == 2
    assert pools["brokers"]["spec"]["roles"] == ["broker"]
    assert pools["controllers"]["spec"]["roles"] == ["controller"]
    for pool in pools.values():
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == "forge"
    topics = find(docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics} == ALL_TOPICS
    assert {t["spec"]["replicas"] for t in topics} == {2}
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == "forge" for t in topics)
    # Only the gateway, the workers and KEDA may connect (Strimzi writes the NetworkPolicy).
    peers = kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    components = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in peers
        if "podSelector" in p
    }
    assert components == {"gateway", "worker"}


def test_external_kafka_and_redis(rendered: dict) -> None:
    docs = rendered["external"]
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic", "StatefulSet"):
        assert not find(docs, kind), kind
    gateway = one(docs, "Deployment", "forge-gateway")["spec"]["template"]["spec"]
    env = env_of(gateway["containers"][0])
    assert env["FORGE_KAFKA_BOOTSTRAP"].startswith("b-1.forge.")
    assert env["FORGE_REDIS_URL"] == {"secretKeyRef": {"name": "forge-redis-url", "key": "url"}}
    assert not find(docs, "NetworkPolicy", "forge-redis")


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
    assert (
        env_of(gateway["containers"][0])["FORGE_REDIS_URL"]
        == "redis://forge-redis-master.forge.svc:6379/0"
    )


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
    for name in ("forge-triton", "forge-redis"):
        if name not in policies:
            continue
        for rule in policies[name]["ingress"]:
            assert rule.get("from"), name
            for peer in rule["from"]:
                if "namespaceSelector" in peer:  # Prometheus, metrics port only
                    assert [p["port"] for p in rule["ports"]] == ["metrics"], name
                else:
                    allowed = [*inside, _component_selector("redis")] if "redis" in name else inside
                    assert peer["podSelector"]["matchLabels"] in allowed, name
    triton_ports = {p["port"] for r in policies["forge-triton"]["ingress"] for p in r["ports"]}
    assert triton_ports == {"http", "grpc", "metrics"}


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
    assert "cp -r gateway/static gateway/weapon_templates.yaml" in gateway
    assert "import gateway.__main__, gateway.app, gateway.worker" in gateway
