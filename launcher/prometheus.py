"""A local Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`).

The Prometheus configuration is generated from the scrape targets given (job names
`triton`, `gateway`, `worker`: the names the rule files select on) and loads the rule files
the Helm chart ships (helm/forge/files/monitoring/rules/*.yml), unchanged. The Alertmanager
loads the chart's alertmanager.yml with every webhook URL pointed at `webhook_url` (the
placeholders there never resolve).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.process import Managed, Service, ServiceError, free_port

MONITORING = Path(__file__).resolve().parents[1] / "helm" / "forge" / "files" / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
ALERTMANAGER_CONFIG = MONITORING / "alertmanager.yml"
JOBS = ("triton", "gateway", "worker")


def _binary(name: str, package: str) -> str:
    binary = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(binary).exists():
        raise ServiceError(f"{name} is not installed (Debian package {package})")
    return binary


def _get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def _ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as reply:
        return bool(reply.status == 200)


def prometheus_config(
    targets: dict[str, list[str]],
    *,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
    rule_files: list[Path] | None = None,
    alertmanagers: list[str] | None = None,
) -> dict[str, Any]:
    """prometheus.yml for `targets` ({job: ["host:port", ...]}), metrics at /metrics."""
    unknown = set(targets) - set(JOBS)
    if unknown:
        raise ValueError(f"unknown jobs {sorted(unknown)}: the rules know {JOBS}")
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval if _seconds(scrape_interval) < 10 else "10s",
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [
            str(p.resolve()) for p in (RULE_FILES if rule_files is None else rule_files)
        ],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": hosts}]}
            for job, hosts in targets.items()
            if hosts
        ],
    }
    if alertmanagers:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]
        }
    return config


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"unsupported duration {duration!r}")


def alertmanager_config(webhook_url: str | None = None, source: Path = ALERTMANAGER_CONFIG) -> str:
    """The chart's alertmanager.yml; with `webhook_url`, every receiver's webhook points there."""
    config = yaml.safe_load(source.read_text())
    if webhook_url is not None:
        for receiver in config["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = webhook_url
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class PrometheusServer(Managed):
    workdir: Path
    targets: dict[str, list[str]]
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    rule_files: list[Path] | None = None
    alertmanagers: list[str] = field(default_factory=list)
    retention: str = "2d"
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "prometheus.yml"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = prometheus_config(
            self.targets,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
            rule_files=self.rule_files,
            alertmanagers=self.alertmanagers,
        )
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_file

    def start(self, *, detached: bool = False) -> PrometheusServer:
        argv = [
            _binary("prometheus", "prometheus"),
            f"--config.file={self.write_config()}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]
        self.service = Service("prometheus", argv, self.workdir / "prometheus.log")
        self.service.start(detached=detached)
        self.service.wait_until(lambda: _ready(self.url), 60, "/-/ready")
        return self

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the "data" of a successful reply, else ServiceError."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = _get_json(f"{self.url}/api/v1/{path}{query}")
        if body.get("status") != "success":
            raise ServiceError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def describe(self) -> dict[str, str]:
        return {"url": self.url, "config": str(self.config_file)}


@dataclass
class AlertmanagerServer(Managed):
    workdir: Path
    webhook_url: str | None = None
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    source: Path = ALERTMANAGER_CONFIG
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, detached: bool = False) -> AlertmanagerServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "alertmanager.yml"
        config.write_text(alertmanager_config(self.webhook_url, self.source))
        argv = [
            _binary("prometheus-alertmanager", "prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--cluster.listen-address=",  # a single instance: no gossip port
            "--log.level=warn",
        ]
        self.service = Service("alertmanager", argv, self.workdir / "alertmanager.log")
        self.service.start(detached=detached)
        self.service.wait_until(lambda: _ready(self.url), 30, "/-/ready")
        return self

    def alerts(self) -> list[dict[str, Any]]:
        return list(_get_json(f"{self.url}/api/v2/alerts"))

    def describe(self) -> dict[str, str]:
        return {"url": self.url}
