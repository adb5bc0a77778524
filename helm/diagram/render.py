"""Render the architecture diagram from the deployment's own files.

Sources, all read at render time so the picture cannot drift from what is deployed:

- helm/forge/values.yaml merged with the values files given (default: helm/values/production.yaml):
  which components are enabled, replicas, autoscaling bounds, Kafka brokers, Redis replicas,
  the gp3 StorageClass's IOPS and throughput, asset storage, monitoring switches;
- helm/eks/cluster.yaml: node groups (instance types, counts, autoscaling bounds, taints);
- helm/forge/files/monitoring/: alert rules, Grafana dashboards, Alertmanager receivers;
- model_repository/stable_diffusion/config.pbtxt: the dynamic batcher's defaults;
- perf/RESULTS.md: every row of its tables (figure, value, kind), shown beside the seed's claims.

The layout follows the seed (shared/seed/000_f829f1d025566563.txt): five layers left to right,
its colour scheme, the 11-step data flow numbered on the edges, and the security boundaries
(public edge, private services, the tainted GPU node).
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
    name: str
    components: list[Component] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # unnumbered: src, dst, label
    perf: list[PerfRow] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def component(self, cid: str) -> Component:
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
    match = re.search(rf"^\s*{key}\s*:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _thousands(value: Any) -> str:
    return f"{int(value):,}"


def _range(lo: Any, hi: Any) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _node_group(cluster: dict, label: str) -> dict:
    for group in cluster.get("managedNodeGroups", []) + cluster.get("nodeGroups", []):
        if group.get("labels", {}).get("forge.crafterse.io/node") == label:
            return dict(group)
    raise ValueError(
        f"helm/eks/cluster.yaml has no node group labelled forge.crafterse.io/node={label}"
    )


def _spec(instance_type: str) -> str:
    return INSTANCE_TYPES.get(instance_type, "see AWS instance types")


def _bounds(component: dict) -> str:
    """minReplicas-maxReplicas of a component's autoscaling values."""
    return _range(component["autoscaling"]["minReplicas"], component["autoscaling"]["maxReplicas"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- the model of the picture -------------------------------------------------------------------


def build_architecture(
    root: Path = ROOT, values_files: tuple[str, ...] | list[str] = DEFAULT_VALUES
) -> Architecture:
    v = load_values(root, values_files)
    cluster = yaml.safe_load((root / "helm/eks/cluster.yaml").read_text())
    general = _node_group(cluster, "general")
    gpu = _node_group(cluster, "gpu")
    pbtxt = (root / "model_repository/stable_diffusion/config.pbtxt").read_text()
    monitoring_dir = root / "helm/forge/files/monitoring"
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
    add = arch.components.append

    gw, wk, tr = v["gateway"], v["workers"], v["triton"]
    kafka, redis, sc, mon = v["kafka"], v["redis"], v["storageClass"], v["monitoring"]
    assets = v["forge"]["assets"]

    # 1 · User & API layer: the public edge, then the gateway pods.
    add(
        Component(
            "client",
            "public",
            "Game Client (Web/Mobile)",
            ("game build tools, the forge web page", "HTTPS + API key (Bearer)"),
            API,
        )
    )
    ingress = gw["ingress"]
    if ingress["enabled"]:
        tls = "TLS from ACM, " + ingress["sslPolicy"] if ingress["certificateArn"] else "HTTP only"
        add(
            Component(
                "alb",
                "public",
                "Load Balancer (AWS ALB)",
                (f"{ingress['scheme']}, target type ip", tls, "health check /readyz"),
                LOAD_BALANCER,
            )
        )
    else:
        add(
            Component(
                "alb",
                "public",
                "Load Balancer: none",
                ("gateway.ingress.enabled=false", "kubectl port-forward"),
                LOAD_BALANCER,
            )
        )
    if gw["autoscaling"]["enabled"]:
        gw_pods = (
            f"{_bounds(gw)} pods (HPA, {gw['autoscaling']['targetCPUUtilizationPercentage']}% CPU)"
        )
    else:
        gw_pods = _plural(gw["replicaCount"], "pod")
    add(
        Component(
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
    )
    add(
        Component(
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
    )

    # 2 · Kubernetes cluster layer.
    add(
        Component(
            "svc",
            "k8s",
            "Kubernetes Service (Triton)",
            (
                f"ClusterIP, gRPC :{tr['service']['grpcPort']}",
                "NetworkPolicy: gateway and workers only"
                if v["networkPolicy"]["enabled"]
                else "no NetworkPolicy",
            ),
            KUBERNETES,
        )
    )

    add(
        Component(
            "eks",
            "k8s",
            "EKS Control Plane",
            (
                f"{cluster['metadata']['name']}, Kubernetes {cluster['metadata']['version']}",
                f"AWS-managed, {cluster['metadata']['region']}",
            ),
            KUBERNETES,
        )
    )
    general_type = general["instanceType"]
    add(
        Component(
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
    )
    gpu_type = gpu["instanceType"]
    taints = ", ".join(f"{t['key']}={t['value']}:{t['effect']}" for t in gpu.get("taints", []))
    add(
        Component(
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
    )
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
    add(Component("autoscaling", "k8s", "Auto-scaling Configuration", tuple(scaling), KUBERNETES))
    # 3 · AI processing layer: the pods on the GPU node.
    if tr["autoscaling"]["enabled"]:
        tr_pods = f"{_bounds(tr)} pods"
    else:
        tr_pods = _plural(tr["replicaCount"], "pod")
    add(
        Component(
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
    )
    add(
        Component(
            "inference",
            "gpu",
            "GPU-accelerated Inference",
            (
                f"runtime {tr['model']['runtime']}, {tr['model']['instanceKind']}",
                "text encoder, UNet denoise loop, VAE",
            ),
            GPU,
        )
    )
    max_batch = tr["model"]["maxBatchSize"] or _pbtxt_int(pbtxt, "max_batch_size")
    delay_us = tr["model"]["maxQueueDelayUs"]
    if delay_us is None:
        delay_us = _pbtxt_int(pbtxt, "max_queue_delay_microseconds") or 0
    add(
        Component(
            "batching",
            "gpu",
            "Batch Processing Queues",
            (
                "Triton dynamic batcher",
                f"max batch {max_batch}, queue delay {delay_us / 1000:g} ms",
            ),
            GPU,
        )
    )

    add(
        Component(
            "optimize",
            "gpu",
            "Model Optimization Layer",
            (
                "ONNX export + parity check vs. torch",
                "TensorRT engines: "
                + ("built on the T4 at start" if tr["tensorrt"]["build"] else "off (issue 7)"),
            ),
            GPU,
        )
    )
    # 4 · Message queue layer.
    topics = kafka["topics"]
    if kafka["mode"] == "strimzi":
        s = kafka["strimzi"]
        replication = min(2, s["brokers"])
        add(
            Component(
                "kafka",
                "mq",
                "Apache Kafka Cluster",
                (
                    f"Strimzi, Kafka {s['version']}",
                    f"{_plural(s['brokers'], 'broker')} + {s['controllers']} KRaft controllers",
                    f"topic replication {replication}",
                ),
                KAFKA,
            )
        )
        persistence = f"broker volumes {s['brokerStorageSize']} gp3 each"
    else:
        add(
            Component(
                "kafka",
                "mq",
                "Apache Kafka Cluster",
                (
                    "external (Amazon MSK)",
                    f"topic replication {kafka['external']['topicReplication']}",
                ),
                KAFKA,
            )
        )
        persistence = "MSK broker storage"
    prefix = kafka["topicPrefix"]
    names = [t["name"].removeprefix(prefix) for t in topics]
    add(
        Component(
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
    )
    days = sorted({round(t.get("retentionMs", 0) / 86_400_000) for t in topics})
    add(
        Component(
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
    )
    if mode == "keda":
        wk_pods = f"{_bounds(wk)} pods (KEDA)"
    elif mode == "hpa":
        wk_pods = f"{_bounds(wk)} pods (HPA)"
    else:
        wk_pods = _plural(wk["replicaCount"], "pod")
    add(
        Component(
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
    )

    # 5 · Data & monitoring layer.
    if redis["mode"] == "replicated":
        r = redis["replicated"]
        replicas = r["replicas"] - 1
        add(
            Component(
                "redis",
                "data",
                "Redis (replication)",
                (
                    f"{r['replicas']} pods: 1 master + {_plural(replicas, 'replica')}"
                    if replicas
                    else "1 pod: master only, no replica",
                    f"AOF on gp3, maxmemory {r['maxmemory']}",
                    "cache, job state, rate limits",
                ),
                STORAGE,
            )
        )
    else:
        add(
            Component(
                "redis",
                "data",
                "Redis (replication)",
                ("external: ElastiCache Multi-AZ", "cache, job state, rate limits"),
                STORAGE,
            )
        )
    if sc["create"]:
        ebs: tuple[str, ...] = (
            f"StorageClass {sc['name']}",
            f"EBS gp3, {_thousands(sc['iops'])} IOPS, {sc['throughput']} MB/s",
            ("encrypted, " if sc["encrypted"] else "") + f"reclaim {sc['reclaimPolicy']}",
        )
    else:
        ebs = ("cluster default StorageClass",)
    add(Component("ebs", "data", "Persistent Storage (EBS gp3)", ebs, STORAGE))
    if assets["mode"] == "s3":
        add(
            Component(
                "assets",
                "data",
                "Asset Store (S3)",
                (
                    f"s3://{assets['s3']['bucket'] or '<bucket>'}/{assets['s3']['prefix']}",
                    "content-addressed PNG/WebP",
                ),
                STORAGE,
            )
        )
    else:
        add(
            Component(
                "assets",
                "data",
                "Asset Store (gp3 volume)",
                (
                    f"PVC {assets['pvc']['size']} at {assets['pvc']['mountPath']}",
                    "content-addressed PNG/WebP",
                ),
                STORAGE,
            )
        )
    scrape = (
        "ServiceMonitors + PodMonitor"
        if mon["serviceMonitors"]["enabled"]
        else "no ServiceMonitors"
    )
    add(
        Component(
            "prometheus",
            "monitoring",
            "Prometheus Monitoring",
            (
                f"{scrape}, every {mon['serviceMonitors']['interval']}",
                f"{len(alerts)} alert rules in {len(rule_files)} files"
                if mon["prometheusRules"]["enabled"]
                else "rules not rendered",
            ),
            MONITORING,
        )
    )
    add(
        Component(
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
    )
    add(
        Component(
            "alertmanager",
            "monitoring",
            "AlertManager Notifications",
            ("routes by severity", "receivers: " + ", ".join(receivers)),
            MONITORING,
        )
    )
    cdn_url = assets["publicBaseUrl"] or "gateway /assets/ (no CDN)"
    add(
        Component(
            "cdn", "cdn", "CDN (CloudFront)", (cdn_url, "ETag, immutable caching"), LOAD_BALANCER
        )
    )

    # Within a column, top to bottom: Kafka's persistence above the cluster it belongs to.
    top_down = {"persistence": 0, "kafka": 1, "topics": 2, "workers": 3}
    arch.components.sort(key=lambda c: (c.group != "mq", top_down.get(c.id, 0)))

    # The seed's data flow, step by step, on our components.
    arch.flows = [
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
    ]
    arch.links = [
        ("api", "auth", ""),
        ("inference", "batching", ""),
        ("kafka", "topics", ""),
        ("topics", "workers", ""),
        ("persistence", "kafka", ""),
        ("redis", "ebs", "volumes"),
        ("eks", "nodes", ""),
        ("nodes", "gpunode", ""),
        ("autoscaling", "gpunode", ""),
    ]
    return arch


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
    return html.escape(text, quote=True)


def _font(text: str, size: int, colour: str = TEXT, bold: bool = False) -> str:
    """Escaped text in Graphviz's HTML-like <font> markup."""
    body = f"<b>{_e(text)}</b>" if bold else _e(text)
    return f'<font point-size="{size}" color="{colour}">{body}</font>'


def _td(content: str, **attrs: str) -> str:
    extra = "".join(f' {k.rstrip("_")}="{v}"' for k, v in attrs.items())
    return f"<td{extra}>{content}</td>"


def _table(rows: list[str], **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f"<<table{extra}>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>>"


def _node_label(c: Component) -> str:
    rows = [_td(_font(c.title, 13, bold=True), align="left")]
    rows += [_td(_font(d, 10, MUTED), align="left") for d in c.details if d]
    return _table(rows, border="0", cellborder="0", cellspacing="0", cellpadding="1")


def _flow_label(step: int, text: str, colour: str) -> str:
    badge = _td(_font(str(step), 11, "white", bold=True), bgcolor=colour, style="rounded")
    return _table(
        [badge + _td(_font(text, 10))], border="0", cellborder="0", cellspacing="2", cellpadding="2"
    )


PANEL = {"border": "1", "color": "#bdc3c7", "cellborder": "0", "bgcolor": "white"}


def _perf_label(arch: Architecture) -> str:
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
        short = "Not measured yet: " + text.split(":")[0] + "."
        rows.append(_td(_font(short, 9, MUTED), colspan="3", align="left"))
    return _table(rows, cellspacing="0", cellpadding="4", **PANEL)


def _legend_label(arch: Architecture) -> str:
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
    title = _font("Crafterse Forge · Option 3: Custom Kubernetes Deployment", 26, bold=True)
    subtitle = _font(
        f"Stable Diffusion on NVIDIA Triton, EKS cluster {arch.name}; drawn from the Helm"
        " chart's values, the eksctl cluster and perf/RESULTS.md",
        13,
        MUTED,
    )
    out: list[str] = [
        "digraph forge {",
        "  graph [rankdir=LR, newrank=true, nodesep=0.25, ranksep=0.55, pad=0.4,"
        f' bgcolor="white", fontname="{FONT}", splines=spline,'
        f" label=<{title}<br/>{subtitle}>, labelloc=t, labeljust=l];",
        '  node [shape=box, style="rounded,filled", fillcolor="white",'
        f' fontname="{FONT}", penwidth=2, margin="0.12,0.06"];',
        f'  edge [fontname="{FONT}", color="{MUTED}", arrowsize=0.7, penwidth=1.3];',
    ]
    by_group: dict[str, list[Component]] = {}
    for c in arch.components:
        by_group.setdefault(c.group, []).append(c)

    def emit(group: str, indent: str) -> None:
        _parent, label, colour, style = GROUPS[group]
        gv_style, pen, tint = CLUSTER_STYLES[style]
        size = 15 if style in ("edge", "boundary", "layer") else 12
        out.append(f"{indent}subgraph cluster_{group} {{")
        out.append(
            f'{indent}  graph [style="{gv_style}", color="{colour}", penwidth={pen},'
            f' fillcolor="{_tint(colour, tint)}", label=<{_font(label, size, colour, bold=True)}>,'
            " labeljust=l, margin=14];"
        )
        for c in by_group.get(group, []):
            label_html = _node_label(c)
            out.append(
                f'{indent}  {c.id} [id="component-{c.id}", color="{c.colour}", label={label_html}];'
            )
        for child, (parent, *_rest) in GROUPS.items():
            if parent == group:
                emit(child, indent + "  ")
        out.append(f"{indent}}}")

    for group, (parent, *_rest) in GROUPS.items():
        if parent is None:
            emit(group, "  ")

    # Columns, left to right: each a rank of its own (rank=same), kept in order by invisible
    # edges; the real edges do not move nodes between columns (constraint=false).
    columns: dict[int, list[str]] = {}
    for c in arch.components:
        columns.setdefault(COLUMNS[c.group], []).append(c.id)
    columns[max(columns) + 1] = ["perf", "legend"]
    out.append("  perf -> legend [style=invis];")
    order = sorted(columns)
    for col in order:
        out.append("  { rank=same; " + "; ".join(columns[col]) + "; }")
    for a, b in itertools.pairwise(order):
        out.append(f"  {columns[a][0]} -> {columns[b][0]} [style=invis, weight=10];")

    colours = {c.id: c.colour for c in arch.components}
    seen: set[int] = set()
    for f in arch.flows:
        flow_id = f"flow-{f.step}" if f.step not in seen else f"flow-{f.step}-{f.dst}"
        seen.add(f.step)
        colour = colours[f.dst] if colours[f.dst] != MONITORING else "#7f8c8d"
        out.append(
            f'  {f.src} -> {f.dst} [id="{flow_id}", color="{colour}", penwidth=2.2,'
            f" constraint=false, label={_flow_label(f.step, f.label, colour)}];"
        )
    for src, dst, label in arch.links:
        attrs = 'style="dashed", constraint=false'
        if label:
            attrs += f", label=<{_font(label, 10, MUTED)}>"
        out.append(f"  {src} -> {dst} [{attrs}];")

    out.append(f'  perf [id="performance", shape=plain, label={_perf_label(arch)}];')
    out.append(f'  legend [id="legend", shape=plain, label={_legend_label(arch)}];')
    out.append("}")
    return "\n".join(out) + "\n"


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
