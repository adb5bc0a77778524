"""The architecture diagram (helm/diagram, `make diagram`): read the rendered SVG and find every
component of the seed, every step of its data flow, and every figure of the performance panel,
the figures equal to perf/RESULTS.md (parsed here on its own, not with the renderer's parser).
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SVG_NS = "{http://www.w3.org/2000/svg}"

pytestmark = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz `dot` is not installed (the Makefile's APT_PACKAGES has graphviz)",
)

# The seed's components (MAIN COMPONENTS), as the diagram titles them.
SEED_COMPONENTS = {
    "client": "Game Client (Web/Mobile)",
    "alb": "Load Balancer (AWS ALB)",
    "api": "Crafterse Backend API",
    "auth": "Authentication & Rate Limiting",
    "eks": "EKS Control Plane",
    "nodes": "Worker Nodes",
    "gpunode": "GPU Node",
    "autoscaling": "Auto-scaling Configuration",
    "sdpods": "Custom Stable Diffusion Pods",
    "inference": "GPU-accelerated Inference",
    "optimize": "Model Optimization Layer",
    "batching": "Batch Processing Queues",
    "kafka": "Apache Kafka Cluster",
    "topics": "Topic-based Routing",
    "persistence": "Message Persistence",
    "workers": "Kafka Workers (High-throughput)",
    "redis": "Redis (replication)",
    "ebs": "Persistent Storage (EBS gp3)",
    "assets": "Asset Store (S3)",
    "prometheus": "Prometheus Monitoring",
    "grafana": "Grafana Dashboards",
    "alertmanager": "AlertManager Notifications",
    "cdn": "CDN (CloudFront)",
    "svc": "Kubernetes Service (Triton)",
}
SEED_LAYERS = [
    "1 · User & API layer",
    "2 · Kubernetes cluster layer",
    "3 · AI processing layer",
    "4 · Message queue layer",
    "5 · Data & monitoring layer",
]
SEED_COLOURS = ["#3498db", "#27ae60", "#f39c12", "#9b59b6", "#95a5a6", "#17a2b8"]
SEED_CLAIMS = [
    ("generation speed (GPU-optimized)", "10-25 s"),
    ("throughput, single GPU", "500-1,000 images/hour"),
    ("throughput, multi-GPU potential", "5,000+ images/hour"),
    ("latency P50", "15 s"),
    ("latency P95", "30 s"),
    ("latency P99", "45 s"),
    ("cost", "$435/month"),
    ("uptime", "99.5%"),
]


def results_rows() -> list[tuple[str, str, str]]:
    """(figure, value, kind) of every table row in perf/RESULTS.md whose header names them."""
    rows = []
    header: list[str] | None = None
    for line in (ROOT / "perf/RESULTS.md").read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
        elif not re.fullmatch(r"[\s|:-]+", line):
            row = dict(zip(header, cells, strict=True))
            if {"figure", "value", "kind"} <= row.keys():
                rows.append((row["figure"], row["value"], row["kind"]))
    return rows


def merged_values(*files: str) -> dict:
    """helm/forge/values.yaml with the files merged over it, map by map."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    values = yaml.safe_load((ROOT / "helm/forge/values.yaml").read_text())
    for f in files:
        values = merge(values, yaml.safe_load((ROOT / f).read_text()))
    return values


def svg_texts(path: Path) -> tuple[Any, list[str]]:
    """The parsed SVG and every <text>, whitespace collapsed."""
    tree = ET.parse(path)
    texts = [
        " ".join((e.text or "").replace("\xa0", " ").split()) for e in tree.iter(SVG_NS + "text")
    ]
    return tree, texts


def group_texts(tree: Any, gid: str) -> list[str]:
    """Every <text> inside the <g> with this id (a component, a flow edge, the panel)."""
    for g in tree.iter(SVG_NS + "g"):
        if g.get("id") == gid:
            return [" ".join((t.text or "").split()) for t in g.iter(SVG_NS + "text")]
    raise AssertionError(f"no <g id={gid!r}> in the SVG")


@pytest.fixture(scope="module")
def production_svg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The diagram rendered from the production values, once for the module."""
    from helm.diagram import render

    out = tmp_path_factory.mktemp("diagram")
    (svg,) = render(ROOT, out, formats=("svg",))
    return svg


def test_every_seed_component_and_layer(production_svg: Path) -> None:
    """Each seed component in its box, each layer and boundary titled, each seed colour used."""
    tree, texts = svg_texts(production_svg)
    for cid, title in SEED_COMPONENTS.items():
        assert title in group_texts(tree, f"component-{cid}"), title
    for layer in SEED_LAYERS:
        assert any(t.startswith(layer) or layer in t for t in texts), layer
    for boundary in ("PUBLIC EDGE", "PRIVATE SERVICES", "GPU NODE"):
        assert any(t.startswith(boundary) for t in texts), boundary
    svg = production_svg.read_text()
    for colour in SEED_COLOURS:
        assert colour in svg, colour


def test_component_details_come_from_the_deployment(production_svg: Path) -> None:
    """Node groups, brokers, Redis replicas, gp3 figures and HPA bounds equal the files'."""
    values = merged_values("helm/values/production.yaml")
    cluster = yaml.safe_load((ROOT / "helm/eks/cluster.yaml").read_text())
    groups = {g["labels"]["forge.crafterse.io/node"]: g for g in cluster["managedNodeGroups"]}
    tree, texts = svg_texts(production_svg)
    joined = "\n".join(texts)

    nodes = " ".join(group_texts(tree, "component-nodes"))
    assert f"{groups['general']['desiredCapacity']}x {groups['general']['instanceType']}" in nodes
    assert groups["general"]["instanceType"] == "t3.medium"
    gpu = " ".join(group_texts(tree, "component-gpunode"))
    assert f"{groups['gpu']['desiredCapacity']}x {groups['gpu']['instanceType']}" in gpu
    assert "g4dn.xlarge" in gpu and "T4" in gpu

    brokers = values["kafka"]["strimzi"]["brokers"]
    assert brokers == 3  # replication 3, min.insync.replicas 2: one broker may be lost
    kafka = " ".join(group_texts(tree, "component-kafka"))
    assert f"{brokers} brokers" in kafka
    assert "replication 3, min.insync.replicas 2" in kafka
    replicas = values["redis"]["replicated"]["replicas"]
    assert f"{replicas} pods: 1 master + {replicas - 1} replica" in " ".join(
        group_texts(tree, "component-redis")
    )
    sc = values["storageClass"]
    assert f"{int(sc['iops']):,} IOPS, {sc['throughput']} MB/s" in joined
    assert "3,000 IOPS, 125 MB/s" in joined
    gw = values["gateway"]["autoscaling"]
    assert f"{gw['minReplicas']}-{gw['maxReplicas']} pods (HPA" in joined


def test_every_data_flow_step_is_an_edge(production_svg: Path) -> None:
    """Steps 1 to 11 are edges with their number and a description."""
    tree, _ = svg_texts(production_svg)
    for step in range(1, 12):
        texts = group_texts(tree, f"flow-{step}")
        assert texts[0] == str(step), (step, texts)
        assert len(texts) > 1 and texts[1], f"step {step} has no description"


def test_performance_panel_equals_results_md(production_svg: Path) -> None:
    """The panel holds RESULTS.md's rows and the seed's claims, each with its kind, and no more."""
    rows = results_rows()
    assert len(rows) >= 9, "perf/RESULTS.md lost its tables"
    tree, _ = svg_texts(production_svg)
    panel = group_texts(tree, "performance")
    for figure, value, kind in rows:
        assert figure in panel, f"RESULTS.md row {figure!r} is missing from the panel"
        i = panel.index(figure)
        assert panel[i + 1 : i + 3] == [value, kind], (figure, panel[i : i + 3])
    for figure, value in SEED_CLAIMS:
        i = panel.index(figure)
        assert panel[i + 1 : i + 3] == [value, "seed claim"], (figure, panel[i : i + 3])
    # Nothing in the panel's rows but RESULTS.md's rows and the seed's claims.
    kinds = [t for t in panel if t in ("measured", "projected", "seed claim")]
    assert len(kinds) == len(rows) + len(SEED_CLAIMS)


def test_the_picture_follows_the_values(tmp_path: Path) -> None:
    """Another values file, another picture: minimal.yaml has one broker and one Redis pod."""
    from helm.diagram import render

    values = merged_values("helm/values/minimal.yaml")
    (svg,) = render(ROOT, tmp_path, values_files=("helm/values/minimal.yaml",), formats=("svg",))
    tree, texts = svg_texts(svg)
    assert values["kafka"]["strimzi"]["brokers"] == 1
    assert "1 broker + 1 KRaft controllers" in " ".join(group_texts(tree, "component-kafka"))
    assert "1 pod: master only, no replica" in " ".join(group_texts(tree, "component-redis"))
    assert "Load Balancer: none" in texts
    assert "Asset Store (gp3 volume)" in texts


def test_committed_images_are_current(production_svg: Path) -> None:
    """docs/images/architecture.svg says what a fresh render says (run `make diagram`)."""
    committed = ROOT / "docs/images/architecture.svg"
    assert committed.is_file(), "run `make diagram`"
    assert (ROOT / "docs/images/architecture.png").is_file(), "run `make diagram`"
    assert svg_texts(committed)[1] == svg_texts(production_svg)[1], (
        "docs/images/architecture.svg is stale: run `make diagram`"
    )
