"""A local Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`).

The Prometheus configuration is generated from the scrape targets given (job names
`triton`, `gateway`, `worker`: the names the rule files select on) and loads the rule files
the Helm chart ships (helm/forge/files/monitoring/rules/*.yml), unchanged. The Alertmanager
loads the chart's alertmanager.yml with every webhook URL pointed at `webhook_url` (the
placeholders there never resolve).

Ports: both bind port 0 when asked (Go's listener), so a port left at 0 is given by the
kernel and read from the process's own listening socket (`start_reporting_port`). Their
external URLs then name port 0; only links inside alerts use them.
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

from launcher.process import Managed, Service, ServiceError, start_reporting_port

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


def _ready(host: str, port: int) -> bool:
    with urllib.request.urlopen(f"http://{host}:{port}/-/ready", timeout=1) as reply:
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
    """Seconds in a Prometheus duration such as "15s" or "1m"."""
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


def reload(url: str) -> None:
    """Make the Prometheus at `url` re-read its config file (--web.enable-lifecycle)."""
    request = urllib.request.Request(f"{url}/-/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        if reply.status != 200:
            raise ServiceError(f"prometheus reload: HTTP {reply.status}")


def add_scrape_target(config_file: Path, url: str, job: str, address: str) -> None:
    """Add `address` (host:port) to `job` in a running Prometheus's config, and reload it."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}: the rules know {JOBS}")
    config = yaml.safe_load(config_file.read_text())
    scrapes = config.setdefault("scrape_configs", [])
    entry = next((c for c in scrapes if c["job_name"] == job), None)
    if entry is None:
        entry = {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": []}]}
        scrapes.append(entry)
    entry["static_configs"][0]["targets"].append(address)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    reload(url)


@dataclass
class PrometheusServer(Managed):
    """Prometheus on the chart's rule files, scraping `targets`; `port` 0: any, read back."""

    workdir: Path
    targets: dict[str, list[str]]
    port: int = 0
    host: str = "127.0.0.1"
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    rule_files: list[Path] | None = None
    alertmanagers: list[str] = field(default_factory=list)
    retention: str = "2d"
    service: Service | None = None

    @property
    def url(self) -> str:
        """http://host:port."""
        return f"http://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        """The generated prometheus.yml."""
        return self.workdir / "prometheus.yml"

    def write_config(self) -> Path:
        """Write prometheus.yml for the current targets; returns its path."""
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

    def _service(self, port: int) -> Service:
        argv = [
            _binary("prometheus", "prometheus"),
            f"--config.file={self.write_config()}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]
        return Service("prometheus", argv, self.workdir / "prometheus.log")

    def start(self, *, detached: bool = False) -> PrometheusServer:
        """Start Prometheus and wait until our process answers /-/ready."""
        self.service, self.port = start_reporting_port(
            self._service,
            self.port,
            lambda port: _ready(self.host, port),
            timeout=60,
            what="/-/ready",
            detached=detached,
        )
        return self

    def set_targets(self, targets: dict[str, list[str]]) -> None:
        """Scrape `targets` from now on: rewrite the config and reload it (no restart)."""
        self.targets = targets
        self.write_config()
        reload(self.url)

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
        """Where it listens, and its config file."""
        return {"url": self.url, "config": str(self.config_file)}


@dataclass
class AlertmanagerServer(Managed):
    """Alertmanager with the chart's routes; `port` 0: any, read back at start."""

    workdir: Path
    webhook_url: str | None = None
    port: int = 0
    host: str = "127.0.0.1"
    source: Path = ALERTMANAGER_CONFIG
    service: Service | None = None

    @property
    def url(self) -> str:
        """http://host:port."""
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as Prometheus's alerting config names it."""
        return f"{self.host}:{self.port}"

    def _service(self, port: int) -> Service:
        config = self.workdir / "alertmanager.yml"
        config.write_text(alertmanager_config(self.webhook_url, self.source))
        argv = [
            _binary("prometheus-alertmanager", "prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{port}",
            "--cluster.listen-address=",  # a single instance: no gossip port
            "--log.level=warn",
        ]
        return Service("alertmanager", argv, self.workdir / "alertmanager.log")

    def start(self, *, detached: bool = False) -> AlertmanagerServer:
        """Start Alertmanager and wait until our process answers /-/ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.service, self.port = start_reporting_port(
            self._service,
            self.port,
            lambda port: _ready(self.host, port),
            timeout=30,
            what="/-/ready",
            detached=detached,
        )
        return self

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts it holds (API v2)."""
        return list(_get_json(f"{self.url}/api/v2/alerts"))

    def describe(self) -> dict[str, str]:
        """Where it listens."""
        return {"url": self.url}
