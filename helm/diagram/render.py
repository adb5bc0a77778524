"""Render the architecture diagram from the deployment's own files.

Sources, all read at render time so the picture cannot drift from what is deployed:

- helm/forge/values.yaml merged with the values files given (default: helm/values/production.yaml):
  which components are enabled, replicas, autoscaling bounds, Kafka brokers, Redis replicas,
  the gp3 StorageClass's IOPS and throughput, asset storage, monitoring switches;
- helm/eks/cluster.yaml: node groups (instance types, counts, autoscaling bounds, taints);
- helm/forge/files/monitoring/: alert rules, Grafana dashboards, Alertmanager receivers;
- model_repository/stable_diffusion/config.pbtxt: the dynamic batcher's defaults;
- perf/RESULTS.md: every row of its tables (figure, value, kind), shown beside the seed's claims.

The layout follows the seed architecture (Option 3: Custom Kubernetes Deployment): five layers
left to right, its colour scheme, the 11-step data flow numbered on the edges, and the security
boundaries (public edge, private services, the tainted GPU node).
"""

from __future__ import annotations

import argparse
import copy
import html
import itertools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VALUES = ("helm/values/production.yaml",)

# The seed's colour scheme.
KUBERNETES = "#3498db"
GPU = "#27ae60"
KAFKA = "#f39c12"
STORAGE = "#9b59b6"
MONITORING = "#95a5a6"
LOAD_BALANCER = "#17a2b8"
# Ours: the API (no seed colour), the public edge and the text.
API = "#34495e"
PUBLIC_EDGE = "#c0392b"
TEXT = "#2c3e50"
MUTED = "#5d6d7e"
FONT = "Helvetica,Arial,sans-serif"

# What the instance types offer (AWS's published figures); the counts come from cluster.yaml.
INSTANCE_TYPES: dict[str, str] = {
    "t3.small": "2 vCPU, 2 GiB",
    "t3.medium": "2 vCPU, 4 GiB",
    "t3.large": "2 vCPU, 8 GiB",
    "g4dn.xlarge": "NVIDIA T4 16 GB, 4 vCPU, 16 GiB",
    "g4dn.2xlarge": "NVIDIA T4 16 GB, 8 vCPU, 32 GiB",
    "g5.xlarge": "NVIDIA A10G 24 GB, 4 vCPU, 16 GiB",
}

# The seed's performance claims, word for word in value; none of them is measured here.
SEED_CLAIMS: tuple[tuple[str, str], ...] = (
    ("generation speed (GPU-optimized)", "10-25 s"),
    ("throughput, single GPU", "500-1,000 images/hour"),
    ("throughput, multi-GPU potential", "5,000+ images/hour"),
    ("latency P50", "15 s"),
    ("latency P95", "30 s"),
    ("latency P99", "45 s"),
    ("cost", "$435/month"),
    ("uptime", "99.5%"),
)
SEED_CLAIM_KIND = "seed claim"


@dataclass(frozen=True)
class Component:
    """One box: a stable id, the cluster it sits in, a title and detail lines."""

    id: str
    group: str
    title: str
    details: tuple[str, ...]
    colour: str


@dataclass(frozen=True)
class Flow:
    """One numbered step of the seed's data flow, drawn as an edge."""

    step: int
    src: str
    dst: str
    label: str


@dataclass(frozen=True)
class PerfRow:
    """One row of the performance panel."""

    section: str
    figure: str
    value: str
    kind: str


@dataclass
class Architecture:
    """The picture's model: the cluster's name, the boxes, the numbered flow, the other links,
    the performance panel's rows and what perf/RESULTS.md lists as not measured."""

    name: str
    components: list[Component] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # unnumbered: src, dst, label
    perf: list[PerfRow] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def component(self, cid: str) -> Component:
        """The component with this id."""
        return next(c for c in self.components if c.id == cid)


# --- reading the description ------------------------------------------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(root: Path, values_files: tuple[str, ...] | list[str] = DEFAULT_VALUES) -> dict:
    """helm/forge/values.yaml with the values files (relative to root) merged over it, in order."""
    values = yaml.safe_load((root / "helm/forge/values.yaml").read_text())
    for name in values_files:
        values = deep_merge(values, yaml.safe_load((root / name).read_text()) or {})
    return values


def parse_results(path: Path) -> tuple[list[PerfRow], list[str]]:
    """Every row of every `| figure | value | kind |` table in RESULTS.md, with its section,
    and the bullet points of its "Not measured" section (first lines, joined)."""
    rows: list[PerfRow] = []
    not_measured: list[str] = []
    section = ""
    header: list[str] | None = None
    bullet: list[str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("## "):
            section = line[3:].strip()
            header = None
            continue
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = [c.lower() for c in cells]
            elif not all(set(c) <= set("-: ") for c in cells):
                row = dict(zip(header, cells, strict=False))
                if {"figure", "value", "kind"} <= row.keys():
                    rows.append(PerfRow(section, row["figure"], row["value"], row["kind"]))
            continue
        header = None
        if section.lower() == "not measured":
            if line.startswith("- "):
                bullet = [line[2:]]
                not_measured.append("")
            elif line and bullet is not None:
                bullet.append(line)
            if bullet is not None and not_measured:
                not_measured[-1] = " ".join(bullet)
    return rows, not_measured


def _pbtxt_int(text: str, key: str) -> int | None:
    """The integer after `key:` in a Triton config.pbtxt, or None when absent."""
    match = re.search(rf"^\s*{key}\s*:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _thousands(value: Any) -> str:
    """3000 -> "3,000"."""
    return f"{int(value):,}"


def _range(lo: Any, hi: Any) -> str:
    """ "lo-hi", or "lo" alone when both are equal."""
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _node_group(cluster: dict, label: str) -> dict:
    """The eksctl node group labelled forge.crafterse.io/node=label."""
    for group in cluster.get("managedNodeGroups", []) + cluster.get("nodeGroups", []):
        if group.get("labels", {}).get("forge.crafterse.io/node") == label:
            return dict(group)
    raise ValueError(
        f"helm/eks/cluster.yaml has no node group labelled forge.crafterse.io/node={label}"
    )


def _spec(instance_type: str) -> str:
    """What an instance type offers (GPU, vCPUs, memory)."""
    return INSTANCE_TYPES.get(instance_type, "see AWS instance types")


def _bounds(component: dict) -> str:
    """minReplicas-maxReplicas of a component's autoscaling values."""
    return _range(component["autoscaling"]["minReplicas"], component["autoscaling"]["maxReplicas"])


def _plural(n: int, word: str) -> str:
    """ "1 pod", "2 pods"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- the model of the picture -------------------------------------------------------------------


@dataclass(frozen=True)
class MonitoringFiles:
    """What helm/forge/files/monitoring/ holds: alert names, rule files, dashboards, receivers."""

    alerts: list[str]
    rule_files: int
    dashboards: list[str]
    receivers: list[str]


def read_monitoring(monitoring_dir: Path) -> MonitoringFiles:
    """The alert rules, Grafana dashboard titles and Alertmanager receivers of the chart."""
    rule_files = sorted((monitoring_dir / "rules").glob("*.yml"))
    alerts = [
        rule["alert"]
        for f in rule_files
        for group in (yaml.safe_load(f.read_text()) or {}).get("groups", [])
        for rule in group.get("rules", [])
        if "alert" in rule
    ]
    dashboards = [
        json.loads(f.read_text()).get("title", f.stem)
        for f in sorted((monitoring_dir / "dashboards").glob("*.json"))
    ]
    am = yaml.safe_load((monitoring_dir / "alertmanager.yml").read_text())
    receivers = [r["name"] for r in am.get("receivers", [])]
    return MonitoringFiles(alerts, len(rule_files), dashboards, receivers)


def build_architecture(
    root: Path = ROOT, values_files: tuple[str, ...] | list[str] = DEFAULT_VALUES
) -> Architecture:
    """The picture's model: every component, flow and link, read from the deployment's files."""
    v = load_values(root, values_files)
    cluster = yaml.safe_load((root / "helm/eks/cluster.yaml").read_text())
    pbtxt = (root / "model_repository/stable_diffusion/config.pbtxt").read_text()
    monitoring = read_monitoring(root / "helm/forge/files/monitoring")
    perf, not_measured = parse_results(root / "perf/RESULTS.md")

    arch = Architecture(name=cluster["metadata"]["name"], perf=perf, not_measured=not_measured)
    arch.sources = [
        "helm/forge/values.yaml",
        *values_files,
        "helm/eks/cluster.yaml",
        "helm/forge/files/monitoring/",
        "model_repository/stable_diffusion/config.pbtxt",
        "perf/RESULTS.md",
    ]
    assets = v["forge"]["assets"]
    arch.components = [
        *user_and_api_layer(v["gateway"]),
        *kubernetes_layer(v, cluster),
        *ai_processing_layer(v["triton"], pbtxt),
        *message_queue_layer(v["kafka"], v["workers"]),
        *data_layer(v["redis"], v["storageClass"], assets),
        *monitoring_layer(v["monitoring"], monitoring),
        cdn(assets),
    ]
    arch.components.sort(key=_column_position)
    arch.flows = list(DATA_FLOW)
    arch.links = list(LINKS)
    return arch


# Within a column, top to bottom: Kafka's persistence above the cluster it belongs to.
MQ_TOP_DOWN = {"persistence": 0, "kafka": 1, "topics": 2, "workers": 3}


def _column_position(c: Component) -> tuple[bool, int]:
    """Sort key: the message queue layer's components last, in MQ_TOP_DOWN order."""
    return (c.group != "mq", MQ_TOP_DOWN.get(c.id, 0))


# The seed's data flow, step by step, on our components.
DATA_FLOW: tuple[Flow, ...] = (
    Flow(1, "client", "alb", "weapon request"),
    Flow(2, "alb", "api", "to the API pods"),
    Flow(3, "auth", "svc", "validated, forwarded"),
    Flow(4, "svc", "sdpods", "routed to a GPU pod"),
    Flow(5, "sdpods", "inference", "Stable Diffusion"),
    Flow(6, "batching", "kafka", "batch jobs, results queued"),
    Flow(7, "workers", "redis", "cache + job state"),
    Flow(8, "workers", "assets", "asset saved"),
    Flow(9, "sdpods", "prometheus", "metrics scraped"),
    Flow(10, "prometheus", "grafana", "dashboards"),
    Flow(11, "assets", "cdn", "delivered via CDN"),
    Flow(11, "prometheus", "alertmanager", "monitoring alerts"),
)

# Unnumbered links between components: src, dst, label.
LINKS: tuple[tuple[str, str, str], ...] = (
    ("api", "auth", ""),
    ("inference", "batching", ""),
    ("kafka", "topics", ""),
    ("topics", "workers", ""),
    ("persistence", "kafka", ""),
    ("redis", "ebs", "volumes"),
    ("eks", "nodes", ""),
    ("nodes", "gpunode", ""),
    ("autoscaling", "gpunode", ""),
)


# --- 1 · User & API layer: the public edge, then the gateway pods --------------------------------


def user_and_api_layer(gw: dict) -> list[Component]:
    """The game client and the load balancer (public edge), the gateway and its auth."""
    return [game_client(), load_balancer(gw["ingress"]), backend_api(gw), auth_and_rate_limits()]


def game_client() -> Component:
    """Who calls the API, and how."""
    return Component(
        "client",
        "public",
        "Game Client (Web/Mobile)",
        ("game build tools, the forge web page", "HTTPS + API key (Bearer)"),
        API,
    )


def load_balancer(ingress: dict) -> Component:
    """The ALB the ingress creates, or none when the ingress is off."""
    if not ingress["enabled"]:
        return Component(
            "alb",
            "public",
            "Load Balancer: none",
            ("gateway.ingress.enabled=false", "kubectl port-forward"),
            LOAD_BALANCER,
        )
    tls = "TLS from ACM, " + ingress["sslPolicy"] if ingress["certificateArn"] else "HTTP only"
    return Component(
        "alb",
        "public",
        "Load Balancer (AWS ALB)",
        (f"{ingress['scheme']}, target type ip", tls, "public paths only, health check /readyz"),
        LOAD_BALANCER,
    )


def backend_api(gw: dict) -> Component:
    """The FastAPI gateway: port, pod count (or HPA bounds) and endpoints."""
    if gw["autoscaling"]["enabled"]:
        gw_pods = (
            f"{_bounds(gw)} pods (HPA, {gw['autoscaling']['targetCPUUtilizationPercentage']}% CPU)"
        )
    else:
        gw_pods = _plural(gw["replicaCount"], "pod")
    return Component(
        "api",
        "api",
        "Crafterse Backend API",
        (
            "FastAPI gateway :" + str(gw["service"]["port"]),
            gw_pods,
            "sync /v1/images, async /v1/jobs",
        ),
        API,
    )


def auth_and_rate_limits() -> Component:
    """The gateway's API keys, rate limits and request validation."""
    return Component(
        "auth",
        "api",
        "Authentication & Rate Limiting",
        (
            "API keys (SHA-256), scopes, tiers",
            "sliding-window limits in Redis",
            "validation, idempotency keys",
        ),
        API,
    )


# --- 2 · Kubernetes cluster layer ----------------------------------------------------------------


def kubernetes_layer(v: dict, cluster: dict) -> list[Component]:
    """Triton's Service, the EKS control plane, both node groups and the autoscalers."""
    return [
        triton_service(v["triton"], v["networkPolicy"]["enabled"]),
        eks_control_plane(cluster["metadata"]),
        worker_nodes(_node_group(cluster, "general")),
        gpu_node(_node_group(cluster, "gpu")),
        autoscaling(v["gateway"], v["workers"], v["triton"]),
    ]


def triton_service(tr: dict, network_policy: bool) -> Component:
    """The ClusterIP Service in front of Triton's gRPC port."""
    return Component(
        "svc",
        "k8s",
        "Kubernetes Service (Triton)",
        (
            f"ClusterIP, gRPC :{tr['service']['grpcPort']}",
            "NetworkPolicy: gateway and workers only" if network_policy else "no NetworkPolicy",
        ),
        KUBERNETES,
    )


def eks_control_plane(metadata: dict) -> Component:
    """The cluster's name, Kubernetes version and region."""
    return Component(
        "eks",
        "k8s",
        "EKS Control Plane",
        (
            f"{metadata['name']}, Kubernetes {metadata['version']}",
            f"AWS-managed, {metadata['region']}",
        ),
        KUBERNETES,
    )


def worker_nodes(general: dict) -> Component:
    """The general node group: instance type, count and bounds, what runs there."""
    general_type = general["instanceType"]
    return Component(
        "nodes",
        "k8s",
        "Worker Nodes",
        (
            f"{general['desiredCapacity']}x {general_type} ({_spec(general_type)})",
            f"node group '{general['name']}', "
            f"{_range(general['minSize'], general['maxSize'])} nodes",
            "gateway, workers, Kafka, Redis, monitoring",
        ),
        KUBERNETES,
    )


def gpu_node(gpu: dict) -> Component:
    """The GPU node group: instance type, count and bounds, its taint."""
    gpu_type = gpu["instanceType"]
    taints = ", ".join(f"{t['key']}={t['value']}:{t['effect']}" for t in gpu.get("taints", []))
    return Component(
        "gpunode",
        "k8s",
        "GPU Node",
        (
            f"{gpu['desiredCapacity']}x {gpu_type} ({_spec(gpu_type)})",
            f"node group '{gpu['name']}', {_range(gpu['minSize'], gpu['maxSize'])} nodes",
            f"taint {taints}" if taints else "no taint",
        ),
        GPU,
    )


def autoscaling(gw: dict, wk: dict, tr: dict) -> Component:
    """Which autoscaler scales the gateway, the workers and Triton, within what bounds."""
    scaling = []
    if gw["autoscaling"]["enabled"]:
        scaling.append(f"gateway HPA {_bounds(gw)}")
    mode = wk["autoscaling"]["mode"]
    if mode == "keda":
        scaling.append(f"workers KEDA {_bounds(wk)} on consumer lag")
    elif mode == "hpa":
        scaling.append(f"workers HPA {_bounds(wk)} on CPU")
    if tr["autoscaling"]["enabled"]:
        scaling.append(
            f"Triton KEDA {_bounds(tr)}"
            f" on queue time > {tr['autoscaling']['queueTimeThresholdMs']} ms"
        )
    scaling.append("cluster-autoscaler adds nodes")
    return Component("autoscaling", "k8s", "Auto-scaling Configuration", tuple(scaling), KUBERNETES)


# --- 3 · AI processing layer: the pods on the GPU node -------------------------------------------


def ai_processing_layer(tr: dict, pbtxt: str) -> list[Component]:
    """Triton's pods, the inference runtime, the dynamic batcher and the model optimisation."""
    return [
        stable_diffusion_pods(tr),
        gpu_inference(tr["model"]),
        batch_queues(tr["model"], pbtxt),
        model_optimization(tr["tensorrt"]),
    ]


def stable_diffusion_pods(tr: dict) -> Component:
    """Triton's pods: model, pod count (or KEDA bounds), GPUs, where the weights come from."""
    if tr["autoscaling"]["enabled"]:
        tr_pods = f"{_bounds(tr)} pods"
    else:
        tr_pods = _plural(tr["replicaCount"], "pod")
    return Component(
        "sdpods",
        "gpu",
        "Custom Stable Diffusion Pods",
        (
            f"NVIDIA Triton, model {tr['modelName']}",
            f"{tr_pods}, {tr['gpus']} GPU each",
            f"weights from {tr['modelRepository']['source'].upper()}, startup probe",
        ),
        GPU,
    )


def gpu_inference(model: dict) -> Component:
    """The model's runtime and instance kind."""
    return Component(
        "inference",
        "gpu",
        "GPU-accelerated Inference",
        (
            f"runtime {model['runtime']}, {model['instanceKind']}",
            "text encoder, UNet denoise loop, VAE",
        ),
        GPU,
    )


def batch_queues(model: dict, pbtxt: str) -> Component:
    """Triton's dynamic batcher: the values' overrides, else the committed config.pbtxt's."""
    max_batch = model["maxBatchSize"] or _pbtxt_int(pbtxt, "max_batch_size")
    delay_us = model["maxQueueDelayUs"]
    if delay_us is None:
        delay_us = _pbtxt_int(pbtxt, "max_queue_delay_microseconds") or 0
    return Component(
        "batching",
        "gpu",
        "Batch Processing Queues",
        (
            "Triton dynamic batcher",
            f"max batch {max_batch}, queue delay {delay_us / 1000:g} ms",
        ),
        GPU,
    )


def model_optimization(tensorrt: dict) -> Component:
    """The ONNX export and whether TensorRT engines are built at start."""
    return Component(
        "optimize",
        "gpu",
        "Model Optimization Layer",
        (
            "ONNX export + parity check vs. torch",
            "TensorRT engines: " + ("built on the T4 at start" if tensorrt["build"] else "off"),
        ),
        GPU,
    )


# --- 4 · Message queue layer ---------------------------------------------------------------------


def message_queue_layer(kafka: dict, wk: dict) -> list[Component]:
    """The Kafka cluster, its topics and persistence, and the workers that consume them."""
    return [
        kafka_cluster(kafka),
        topic_routing(kafka),
        message_persistence(kafka),
        kafka_workers(wk),
    ]


def kafka_cluster(kafka: dict) -> Component:
    """Strimzi's brokers and controllers, or the external MSK cluster."""
    if kafka["mode"] != "strimzi":
        details: tuple[str, ...] = (
            "external (Amazon MSK)",
            f"topic replication {kafka['external']['topicReplication']}",
        )
    else:
        # As the chart's helpers: replication min(3, brokers), min.insync.replicas one less.
        s = kafka["strimzi"]
        replication = min(3, s["brokers"])
        details = (
            f"Strimzi, Kafka {s['version']}",
            f"{_plural(s['brokers'], 'broker')} + {s['controllers']} KRaft controllers",
            f"replication {replication}, min.insync.replicas {max(1, replication - 1)}",
        )
    return Component("kafka", "mq", "Apache Kafka Cluster", details, KAFKA)


def topic_routing(kafka: dict) -> Component:
    """The topics' names (first three, then the rest) and their partitions."""
    topics = kafka["topics"]
    prefix = kafka["topicPrefix"]
    names = [t["name"].removeprefix(prefix) for t in topics]
    return Component(
        "topics",
        "mq",
        "Topic-based Routing",
        (
            f"{prefix}{{{','.join(names[:3])}}}",
            f"+ {', '.join(names[3:])}",
            f"{sum(t['partitions'] for t in topics)} partitions in all",
        ),
        KAFKA,
    )


def message_persistence(kafka: dict) -> Component:
    """Where the brokers keep messages, for how long, and the producer's guarantees."""
    if kafka["mode"] == "strimzi":
        persistence = f"broker volumes {kafka['strimzi']['brokerStorageSize']} gp3 each"
    else:
        persistence = "MSK broker storage"
    days = sorted({round(t.get("retentionMs", 0) / 86_400_000) for t in kafka["topics"]})
    return Component(
        "persistence",
        "mq",
        "Message Persistence",
        (
            persistence,
            f"retention {days[0]}-{days[-1]} days",
            "acks=all, idempotent producer" if kafka["idempotence"] else "acks=all",
        ),
        KAFKA,
    )


def kafka_workers(wk: dict) -> Component:
    """The workers' consumer group and pod count (or KEDA/HPA bounds)."""
    mode = wk["autoscaling"]["mode"]
    if mode == "keda":
        wk_pods = f"{_bounds(wk)} pods (KEDA)"
    elif mode == "hpa":
        wk_pods = f"{_bounds(wk)} pods (HPA)"
    else:
        wk_pods = _plural(wk["replicaCount"], "pod")
    return Component(
        "workers",
        "mq",
        "Kafka Workers (High-throughput)",
        (
            f"consumer group {wk['consumerGroup']}",
            wk_pods,
            "gRPC to Triton; retry + dead-letter topics",
        ),
        KAFKA,
    )


# --- 5 · Data & monitoring layer, and the CDN ----------------------------------------------------


def data_layer(redis: dict, sc: dict, assets: dict) -> list[Component]:
    """Redis, the gp3 StorageClass and the asset store."""
    return [redis_store(redis), persistent_storage(sc), asset_store(assets)]


def redis_store(redis: dict) -> Component:
    """The state Redis: replicated in the cluster (master and replicas), or ElastiCache; the
    result cache runs on a Redis of its own (allkeys-lru)."""
    if redis["mode"] != "replicated":
        details: tuple[str, ...] = (
            "external: ElastiCache Multi-AZ",
            "job state, keys, limits: noeviction",
            "result cache: own Redis, allkeys-lru",
        )
    else:
        r = redis["replicated"]
        replicas = r["replicas"] - 1
        details = (
            f"{r['replicas']} pods: 1 master + {_plural(replicas, 'replica')}"
            if replicas
            else "1 pod: master only, no replica",
            f"job state: noeviction, AOF, {r['maxmemory']}",
            "result cache: own Redis, allkeys-lru",
        )
    return Component("redis", "data", "Redis (replication)", details, STORAGE)


def persistent_storage(sc: dict) -> Component:
    """The chart's gp3 StorageClass (IOPS, throughput, encryption), or the cluster default."""
    if sc["create"]:
        ebs: tuple[str, ...] = (
            f"StorageClass {sc['name']}",
            f"EBS gp3, {_thousands(sc['iops'])} IOPS, {sc['throughput']} MB/s",
            ("encrypted, " if sc["encrypted"] else "") + f"reclaim {sc['reclaimPolicy']}",
        )
    else:
        ebs = ("cluster default StorageClass",)
    return Component("ebs", "data", "Persistent Storage (EBS gp3)", ebs, STORAGE)


def asset_store(assets: dict) -> Component:
    """Where the images go: an S3 bucket and prefix, or a gp3 volume."""
    if assets["mode"] == "s3":
        return Component(
            "assets",
            "data",
            "Asset Store (S3)",
            (
                f"s3://{assets['s3']['bucket'] or '<bucket>'}/{assets['s3']['prefix']}",
                "content-addressed PNG/WebP",
            ),
            STORAGE,
        )
    return Component(
        "assets",
        "data",
        "Asset Store (gp3 volume)",
        (
            f"PVC {assets['pvc']['size']} at {assets['pvc']['mountPath']}",
            "content-addressed PNG/WebP",
        ),
        STORAGE,
    )


def monitoring_layer(mon: dict, files: MonitoringFiles) -> list[Component]:
    """Prometheus, Grafana and Alertmanager."""
    return [prometheus(mon, files), grafana(mon, files), alertmanager(files)]


def prometheus(mon: dict, files: MonitoringFiles) -> Component:
    """What Prometheus scrapes, how often, and how many alert rules it evaluates."""
    scrape = (
        "ServiceMonitors + PodMonitor"
        if mon["serviceMonitors"]["enabled"]
        else "no ServiceMonitors"
    )
    return Component(
        "prometheus",
        "monitoring",
        "Prometheus Monitoring",
        (
            f"{scrape}, every {mon['serviceMonitors']['interval']}",
            f"{len(files.alerts)} alert rules in {files.rule_files} files"
            if mon["prometheusRules"]["enabled"]
            else "rules not rendered",
        ),
        MONITORING,
    )


def grafana(mon: dict, files: MonitoringFiles) -> Component:
    """The Grafana dashboards' titles and count."""
    dashboards = files.dashboards
    return Component(
        "grafana",
        "monitoring",
        "Grafana Dashboards",
        (
            ", ".join(d.removeprefix("Forge ") for d in dashboards),
            f"{len(dashboards)} dashboards"
            + ("" if mon["dashboards"]["enabled"] else " (not rendered)"),
        ),
        MONITORING,
    )


def alertmanager(files: MonitoringFiles) -> Component:
    """Alertmanager's routing and receivers."""
    return Component(
        "alertmanager",
        "monitoring",
        "AlertManager Notifications",
        ("routes by severity", "receivers: " + ", ".join(files.receivers)),
        MONITORING,
    )


def cdn(assets: dict) -> Component:
    """The public base URL the images are served from (CloudFront), or the gateway."""
    cdn_url = assets["publicBaseUrl"] or "gateway /assets/ (no CDN)"
    return Component(
        "cdn", "cdn", "CDN (CloudFront)", (cdn_url, "ETag, immutable caching"), LOAD_BALANCER
    )


# --- DOT ------------------------------------------------------------------------------------------

# Clusters: id -> (parent, label, colour, style). Order matters: it is the drawing order.
GROUPS: dict[str, tuple[str | None, str, str, str]] = {
    "public": (None, "PUBLIC EDGE · internet  |  1 · User & API layer", PUBLIC_EDGE, "edge"),
    "private": (None, "PRIVATE SERVICES · EKS private subnets, NetworkPolicies", TEXT, "boundary"),
    "api": ("private", "1 · User & API layer (gateway pods)", API, "layer"),
    "k8s": ("private", "2 · Kubernetes cluster layer", KUBERNETES, "layer"),
    "ai": ("private", "3 · AI processing layer", GPU, "layer"),
    "gpu": ("ai", "GPU NODE · tainted, only Triton", GPU, "gpu"),
    "mq": ("private", "4 · Message queue layer", KAFKA, "layer"),
    "dm": ("private", "5 · Data & monitoring layer", STORAGE, "layer"),
    "data": ("dm", "Data", STORAGE, "sub"),
    "monitoring": ("dm", "Monitoring", MONITORING, "sub"),
    "cdn": (None, "PUBLIC EDGE · CDN", PUBLIC_EDGE, "edge"),
}


# The column (rank, left to right) of each cluster's components.
COLUMNS: dict[str, int] = {
    "public": 0,
    "api": 1,
    "k8s": 2,
    "gpu": 3,
    "ai": 3,
    "mq": 4,
    "data": 5,
    "monitoring": 5,
    "cdn": 6,
}


def _tint(colour: str, amount: float) -> str:
    """The colour mixed with white: amount 0 is white, 1 the colour."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(255 - (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _e(text: str) -> str:
    """Text escaped for Graphviz's HTML-like labels."""
    return html.escape(text, quote=True)


def _font(text: str, size: int, colour: str = TEXT, bold: bool = False) -> str:
    """Escaped text in Graphviz's HTML-like <font> markup."""
    body = f"<b>{_e(text)}</b>" if bold else _e(text)
    return f'<font point-size="{size}" color="{colour}">{body}</font>'


def _td(content: str, **attrs: str) -> str:
    """A <td> cell; a trailing underscore in an attribute name is dropped."""
    extra = "".join(f' {k.rstrip("_")}="{v}"' for k, v in attrs.items())
    return f"<td{extra}>{content}</td>"


def _table(rows: list[str], **attrs: str) -> str:
    """An HTML-like label: one <tr> per row of cells."""
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f"<<table{extra}>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>>"


def _node_label(c: Component) -> str:
    """A component's box: its title in bold, then its detail lines."""
    rows = [_td(_font(c.title, 13, bold=True), align="left")]
    rows += [_td(_font(d, 10, MUTED), align="left") for d in c.details if d]
    return _table(rows, border="0", cellborder="0", cellspacing="0", cellpadding="1")


def _flow_label(step: int, text: str, colour: str) -> str:
    """A data-flow edge's label: the step number in a coloured badge, then the text."""
    badge = _td(_font(str(step), 11, "white", bold=True), bgcolor=colour, style="rounded")
    return _table(
        [badge + _td(_font(text, 10))], border="0", cellborder="0", cellspacing="2", cellpadding="2"
    )


PANEL = {"border": "1", "color": "#bdc3c7", "cellborder": "0", "bgcolor": "white"}


def _perf_label(arch: Architecture) -> str:
    """The performance panel: perf/RESULTS.md's rows by section, the seed's claims, and what
    RESULTS.md lists as not measured."""

    def row(cells: list[str], bg: str, bold: bool = False) -> str:
        return "".join(
            _td(_font(cell, 10, bold=bold), align="left" if i == 0 else "center", bgcolor=bg)
            for i, cell in enumerate(cells)
        )

    def heading(text: str, colour: str) -> str:
        return _td(_font(text, 11, "white", bold=True), colspan="3", align="left", bgcolor=colour)

    def stripe(i: int) -> str:
        return "white" if i % 2 == 0 else "#f8f9f9"

    note = (
        "ours from perf/RESULTS.md (2-core CPU VM, tiny model, 25 steps, 128x128),"
        " beside the seed's claims"
    )
    rows = [
        _td(_font("Performance", 16, bold=True), colspan="3", align="left"),
        _td(_font(note, 10, MUTED), colspan="3", align="left"),
        row(["figure", "value", "kind"], "#ecf0f1", bold=True),
    ]
    section = None
    for i, p in enumerate(arch.perf):
        if p.section != section:
            section = p.section
            rows.append(heading("Ours · " + section, GPU if p.kind == "measured" else KAFKA))
        rows.append(row([p.figure, p.value, p.kind], stripe(i)))
    rows.append(heading("The seed's claims (one T4; not measured here)", MONITORING))
    for i, (figure, value) in enumerate(SEED_CLAIMS):
        rows.append(row([figure, value, SEED_CLAIM_KIND], stripe(i)))
    for text in arch.not_measured:
        short = "Not measured: " + text.split(":")[0] + "."
        rows.append(_td(_font(short, 9, MUTED), colspan="3", align="left"))
    return _table(rows, cellspacing="0", cellpadding="4", **PANEL)


def _legend_label(arch: Architecture) -> str:
    """The legend: the colour scheme, the boundaries' dashed frames, and the source files."""
    swatches = [
        (KUBERNETES, "Kubernetes"),
        (GPU, "GPU processing"),
        (KAFKA, "Kafka streaming"),
        (STORAGE, "Storage"),
        (MONITORING, "Monitoring"),
        (LOAD_BALANCER, "Load balancers / CDN"),
        (API, "API"),
    ]
    boundaries = [
        (PUBLIC_EDGE, "public edge (internet-facing)"),
        (TEXT, "private services (default-deny policies)"),
        (GPU, "GPU node (tainted)"),
    ]
    rows = [_td(_font("Legend", 14, bold=True), colspan="2", align="left")]
    rows += [
        _td("", bgcolor=c, width="24", height="14", fixedsize="true")
        + _td(_font(name, 10), align="left")
        for c, name in swatches
    ]
    rows += [
        _td(_font("- -", 12, c, bold=True), align="center") + _td(_font(name, 10), align="left")
        for c, name in boundaries
    ]
    sources = "<br/>".join(
        _font(s, 9, MUTED) for s in ["Drawn by `make diagram` from:", *arch.sources]
    )
    rows.append(_td(sources, colspan="2", align="left"))
    return _table(rows, cellspacing="2", cellpadding="3", **PANEL)


CLUSTER_STYLES = {
    # style name: (graphviz style, pen width, fill tint or None for a fixed background)
    "edge": ("dashed,rounded,filled", 2.5, 0.05),
    "boundary": ("dashed,rounded,filled", 2.5, 0.02),
    "gpu": ("dashed,rounded,filled", 2.5, 0.14),
    "sub": ("rounded,filled", 1.5, 0.10),
    "layer": ("rounded,filled", 2.0, 0.08),
}


def to_dot(arch: Architecture) -> str:
    """The DOT source of the picture: the nested clusters with their components, the columns,
    the numbered data flow and the other links, the performance panel and the legend."""
    out = graph_header(arch)
    by_group: dict[str, list[Component]] = {}
    for c in arch.components:
        by_group.setdefault(c.group, []).append(c)
    for group, (parent, *_rest) in GROUPS.items():
        if parent is None:
            out += cluster_lines(group, by_group, "  ")
    out += column_lines(arch)
    out += flow_lines(arch)
    out += link_lines(arch)
    out.append(f'  perf [id="performance", shape=plain, label={_perf_label(arch)}];')
    out.append(f'  legend [id="legend", shape=plain, label={_legend_label(arch)}];')
    out.append("}")
    return "\n".join(out) + "\n"


def graph_header(arch: Architecture) -> list[str]:
    """The digraph's opening: title, subtitle and the default graph, node and edge attributes."""
    title = _font("Crafterse Forge · Option 3: Custom Kubernetes Deployment", 26, bold=True)
    subtitle = _font(
        f"Stable Diffusion on NVIDIA Triton, EKS cluster {arch.name}; drawn from the Helm"
        " chart's values, the eksctl cluster and perf/RESULTS.md",
        13,
        MUTED,
    )
    return [
        "digraph forge {",
        "  graph [rankdir=LR, newrank=true, nodesep=0.25, ranksep=0.55, pad=0.4,"
        f' bgcolor="white", fontname="{FONT}", splines=spline,'
        f" label=<{title}<br/>{subtitle}>, labelloc=t, labeljust=l];",
        '  node [shape=box, style="rounded,filled", fillcolor="white",'
        f' fontname="{FONT}", penwidth=2, margin="0.12,0.06"];',
        f'  edge [fontname="{FONT}", color="{MUTED}", arrowsize=0.7, penwidth=1.3];',
    ]


def cluster_lines(group: str, by_group: dict[str, list[Component]], indent: str) -> list[str]:
    """One cluster (a boundary, layer or sub-group): its frame, its components, and the
    clusters nested in it, drawn in GROUPS order."""
    _parent, label, colour, style = GROUPS[group]
    gv_style, pen, tint = CLUSTER_STYLES[style]
    size = 15 if style in ("edge", "boundary", "layer") else 12
    out = [
        f"{indent}subgraph cluster_{group} {{",
        f'{indent}  graph [style="{gv_style}", color="{colour}", penwidth={pen},'
        f' fillcolor="{_tint(colour, tint)}", label=<{_font(label, size, colour, bold=True)}>,'
        " labeljust=l, margin=14];",
    ]
    for c in by_group.get(group, []):
        label_html = _node_label(c)
        out.append(
            f'{indent}  {c.id} [id="component-{c.id}", color="{c.colour}", label={label_html}];'
        )
    for child, (parent, *_rest) in GROUPS.items():
        if parent == group:
            out += cluster_lines(child, by_group, indent + "  ")
    out.append(f"{indent}}}")
    return out


def column_lines(arch: Architecture) -> list[str]:
    """Columns, left to right: each a rank of its own (rank=same), kept in order by invisible
    edges; the real edges do not move nodes between columns (constraint=false). The
    performance panel and the legend make the last column."""
    columns: dict[int, list[str]] = {}
    for c in arch.components:
        columns.setdefault(COLUMNS[c.group], []).append(c.id)
    columns[max(columns) + 1] = ["perf", "legend"]
    out = ["  perf -> legend [style=invis];"]
    order = sorted(columns)
    for col in order:
        out.append("  { rank=same; " + "; ".join(columns[col]) + "; }")
    for a, b in itertools.pairwise(order):
        out.append(f"  {columns[a][0]} -> {columns[b][0]} [style=invis, weight=10];")
    return out


def flow_lines(arch: Architecture) -> list[str]:
    """The numbered data-flow edges, each in its target's colour (monitoring's a darker grey)
    with a numbered badge; a step's second edge gets an id with its target."""
    colours = {c.id: c.colour for c in arch.components}
    seen: set[int] = set()
    out = []
    for f in arch.flows:
        flow_id = f"flow-{f.step}" if f.step not in seen else f"flow-{f.step}-{f.dst}"
        seen.add(f.step)
        colour = colours[f.dst] if colours[f.dst] != MONITORING else "#7f8c8d"
        out.append(
            f'  {f.src} -> {f.dst} [id="{flow_id}", color="{colour}", penwidth=2.2,'
            f" constraint=false, label={_flow_label(f.step, f.label, colour)}];"
        )
    return out


def link_lines(arch: Architecture) -> list[str]:
    """The unnumbered links, dashed, with their label if any."""
    out = []
    for src, dst, label in arch.links:
        attrs = 'style="dashed", constraint=false'
        if label:
            attrs += f", label=<{_font(label, 10, MUTED)}>"
        out.append(f"  {src} -> {dst} [{attrs}];")
    return out


def render(
    root: Path = ROOT,
    out_dir: Path | None = None,
    values_files: tuple[str, ...] | list[str] = DEFAULT_VALUES,
    formats: tuple[str, ...] = ("svg", "png"),
    dot: str | None = None,
) -> list[Path]:
    """Write architecture.dot and one file per format into out_dir; returns the images."""
    dot = dot or shutil.which("dot")
    if not dot:
        raise FileNotFoundError(
            "Graphviz `dot` is not installed (Debian: apt-get install graphviz)"
        )
    out_dir = out_dir or root / "docs/images"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = to_dot(build_architecture(root, values_files))
    written = []
    for fmt in formats:
        target = out_dir / f"architecture.{fmt}"
        extra = ["-Gdpi=110"] if fmt == "png" else []
        subprocess.run(
            [dot, f"-T{fmt}", *extra, "-o", str(target)], input=source.encode(), check=True
        )
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m helm.diagram`: render the diagram (or print its DOT source)."""
    parser = argparse.ArgumentParser(
        prog="python -m helm.diagram", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <root>/docs/images")
    parser.add_argument(
        "--values",
        action="append",
        default=None,
        help="values file layered on helm/forge/values.yaml, relative to the root "
        f"(repeatable; default: {' '.join(DEFAULT_VALUES)})",
    )
    parser.add_argument(
        "--format",
        action="append",
        default=None,
        choices=["svg", "png", "pdf"],
        help="output format (repeatable; default: svg and png)",
    )
    parser.add_argument("--print-dot", action="store_true", help="print the DOT source and exit")
    args = parser.parse_args(argv)
    values = tuple(args.values) if args.values else DEFAULT_VALUES
    if args.print_dot:
        sys.stdout.write(to_dot(build_architecture(args.root, values)))
        return 0
    for path in render(args.root, args.out_dir, values, tuple(args.format or ("svg", "png"))):
        print(path)
    return 0
