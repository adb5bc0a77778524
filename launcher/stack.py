"""The local stack: the chosen services started in dependency order, recorded in a state file.

`up` starts any subset of triton, redis, broker, gateway, worker, alertmanager, prometheus
(in that order) under one state folder, each in its own subfolder with its log, and writes
`<state>/run/services.json` (a `StackState`): for each service its pid, creation time, log
and addresses, plus the dev API key and the FORGE_ settings the gateway and workers got.
`add_worker` starts one more worker from that file, `start_service` starts one recorded service
again (after a crash, as a supervisor would) on its recorded ports, `down` stops everything it
lists. Services are detached (their own session), so they outlive the command that started them.
One launcher command at a time per state folder.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from launcher.gateway import GatewayServer, WorkerServer
from launcher.kafka import KafkaBroker
from launcher.process import Managed, ServiceError, stop_pid
from launcher.prometheus import AlertmanagerServer, PrometheusServer, add_scrape_target
from launcher.redis import RedisServer
from launcher.settings import LauncherSettings
from launcher.triton import Triton

SERVICES = ("triton", "redis", "broker", "gateway", "worker", "alertmanager", "prometheus")
# What `start_service` can start again: the serving path (workers as "worker-N" too).
RESTARTABLE = ("triton", "redis", "broker", "gateway", "worker")
Restartable = Triton | RedisServer | KafkaBroker | GatewayServer | WorkerServer
# What the gateway and the workers need, and the setting that can name it instead.
NEEDS = {
    "gateway": {
        "triton": "FORGE_TRITON_GRPC_URL",
        "redis": "FORGE_REDIS_URL",
        "broker": "FORGE_KAFKA_BOOTSTRAP",
    },
    "worker": {
        "triton": "FORGE_TRITON_GRPC_URL",
        "redis": "FORGE_REDIS_URL",
        "broker": "FORGE_KAFKA_BOOTSTRAP",
    },
}


@dataclass
class StackState:
    """What `up` started, in start order, and how to reach it: the state file's content."""

    state_dir: str
    host: str
    dev_api_key: str
    env: dict[str, str]  # the FORGE_ settings the gateway and the workers were started with
    services: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def file(state_dir: Path) -> Path:
        """Where the state of the stack under `state_dir` is kept."""
        return LauncherSettings(state_dir=state_dir).run_file

    def save(self) -> Path:
        """Write the state file (owner-only: it holds the dev API key)."""
        path = self.file(Path(self.state_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        """The state under `state_dir`, or None when nothing is up there."""
        path = cls.file(state_dir)
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def alive(self) -> list[str]:
        """The recorded services whose process still runs (same pid, same creation time)."""
        import psutil

        names = []
        for name, record in self.services.items():
            try:
                process = psutil.Process(int(record["pid"]))
                same = abs(process.create_time() - float(record["started_at"])) < 0.5
                if same and process.status() != psutil.STATUS_ZOMBIE:
                    names.append(name)
            except psutil.NoSuchProcess:
                continue
        return names


def parse_services(text: str) -> list[str]:
    """Service names from "triton,redis,...", in start order; unknown names are an error."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; known: {', '.join(SERVICES)}")
    return [n for n in SERVICES if n in names]


def check_needs(services: Iterable[str], env: Mapping[str, str]) -> None:
    """Each gateway or worker needs triton, redis and the broker started, or named in env."""
    chosen = set(services)
    for service in chosen & set(NEEDS):
        for need, setting in NEEDS[service].items():
            if need not in chosen and setting not in env:
                raise ValueError(f"{service} needs {need}: add it, or --env {setting}=...")


class Stack:
    """Starts services of the local stack into one state folder and records them."""

    def __init__(
        self,
        settings: LauncherSettings,
        services: Iterable[str] = SERVICES,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Plan a stack: `settings` gives ports (0: any) and folders.

        `env` joins, and wins over, the FORGE_ settings the launcher gives the gateway and
        workers.
        """
        self.settings = settings
        self.services = [n for n in SERVICES if n in set(services)]
        self.extra_env = dict(env or {})
        check_needs(self.services, self.extra_env)
        dev_key = self.extra_env.get("FORGE_DEV_API_KEY") or settings.dev_api_key
        self.state = StackState(
            state_dir=str(settings.state_dir),
            host=settings.host,
            dev_api_key=dev_key or f"fk_dev_{secrets.token_urlsafe(24)}",
            env={},
        )
        self.started: dict[str, Managed] = {}
        self.triton: Triton | None = None
        self.redis: RedisServer | None = None
        self.broker: KafkaBroker | None = None
        self.scraped: dict[str, list[str]] = {}  # Prometheus's targets: {job: [host:port]}

    def _start(self, name: str, server: Any) -> Any:
        server.start(detached=True)
        self.started[name] = server
        self.state.services[name] = {**server.record(), **server.describe()}
        return server

    def up(self, *, load_model: bool = True) -> StackState:
        """Start the services in order and save the state; on a failure stop them and raise."""
        s, state = self.settings, self.settings.state_dir
        try:
            if "triton" in self.services:
                self.triton = self._start("triton", self._triton())
                self.scraped["triton"] = [self.triton.metrics_url]
                if load_model:
                    self.triton.load_served()
            if "redis" in self.services:
                # Persistent: the keys survive a restart of the local stack.
                redis = RedisServer(state / "redis", s.redis_port, s.host, persistent=True)
                self.redis = self._start("redis", redis)
            if "broker" in self.services:
                broker = KafkaBroker(state / "broker", port=s.kafka_port, host=s.host)
                self.broker = self._start("broker", broker)
            self.state.env = self._service_env()
            for name, kind, port in (
                ("gateway", GatewayServer, s.gateway_port),
                ("worker", WorkerServer, s.worker_metrics_port),
            ):
                if name in self.services:
                    server = kind(state / name, self.state.env, port=port, host=s.host)
                    self._start(name, server)
                    self.scraped[name] = [f"{s.host}:{server.port}"]
            self._start_monitoring()
        except BaseException:
            self.stop()
            raise
        self.state.save()
        s.dev_key_file.touch(mode=0o600)
        s.dev_key_file.write_text(self.state.dev_api_key + "\n")
        return self.state

    def _triton(self) -> Triton:
        s = self.settings
        return Triton(
            s.model_repository,
            s.state_dir / "triton",
            http_port=s.triton_http_port,
            grpc_port=s.triton_grpc_port,
            metrics_port=s.triton_metrics_port,
            host=s.host,
        )

    def _service_env(self) -> dict[str, str]:
        """FORGE_ settings for the gateway and workers: the started services' addresses."""
        env = {
            "FORGE_ASSET_DIR": str((self.settings.state_dir / "assets").resolve()),
            "FORGE_DEV_API_KEY": self.state.dev_api_key,
        }
        if self.triton is not None:
            env["FORGE_TRITON_GRPC_URL"] = self.triton.grpc_url
        if self.redis is not None:
            env["FORGE_REDIS_URL"] = self.redis.url
        if self.broker is not None:
            env["FORGE_KAFKA_BOOTSTRAP"] = self.broker.bootstrap
        return {**env, **self.extra_env}

    def _start_monitoring(self) -> None:
        """Alertmanager, then Prometheus on the chart's rules, scraping what was started."""
        s, state = self.settings, self.settings.state_dir
        alertmanagers = []
        if "alertmanager" in self.services:
            alertmanager = AlertmanagerServer(
                state / "alertmanager", s.alert_webhook_url, port=s.alertmanager_port, host=s.host
            )
            alertmanagers.append(self._start("alertmanager", alertmanager).address)
        if "prometheus" in self.services:
            prometheus = PrometheusServer(
                state / "prometheus",
                self.scraped,
                port=s.prometheus_port,
                host=s.host,
                alertmanagers=alertmanagers,
            )
            self._start("prometheus", prometheus)

    def stop(self) -> None:
        """Stop what this Stack started, last first (used when `up` fails half-way)."""
        for server in reversed(self.started.values()):
            server.stop()


def up(
    settings: LauncherSettings,
    services: Iterable[str] = SERVICES,
    env: Mapping[str, str] | None = None,
    *,
    load_model: bool = True,
) -> StackState:
    """Start `services` under settings.state_dir, unless a stack there is still running.

    A state file whose processes have all exited (a reboot, a crash) is replaced.
    """
    previous = StackState.load(settings.state_dir)
    if previous is not None and previous.alive():
        raise ServiceError(
            f"already up ({settings.run_file}): {', '.join(previous.alive())}; run down first"
        )
    return Stack(settings, services, env).up(load_model=load_model)


def add_worker(state_dir: Path, env: Mapping[str, str] | None = None) -> tuple[str, StackState]:
    """One more worker for the stack under `state_dir`, on any free metrics port.

    It gets the same FORGE_ settings as the first (plus `env`), joins the same consumer
    group, and Prometheus, when the stack has one, scrapes it from then on.
    """
    state = StackState.load(state_dir)
    if state is None:
        raise ServiceError(f"nothing is up under {state_dir}")
    check_needs(["worker"], state.env)
    n = 1 + sum(1 for name in state.services if name.split("-")[0] == "worker")
    name = "worker" if n == 1 else f"worker-{n}"
    worker = WorkerServer(state_dir / name, {**state.env, **(env or {})}, host=state.host)
    worker.start(detached=True)
    state.services[name] = {**worker.record(), **worker.describe()}
    if env:  # its own settings, for `start_service`
        state.services[name]["env"] = dict(env)
    state.save()
    prometheus = state.services.get("prometheus")
    if prometheus is not None:
        address = f"{state.host}:{worker.port}"
        add_scrape_target(Path(prometheus["config"]), prometheus["url"], "worker", address)
    return name, state


def _port(address: str) -> int:
    """The port of "host:port" or "http://host:port"."""
    port = urlsplit(address if "//" in address else f"//{address}").port
    if port is None:
        raise ValueError(f"no port in {address!r}")
    return port


def _server_again(state: StackState, name: str, record: Mapping[str, Any]) -> Restartable:
    """The server object for a recorded service, on its recorded ports, folder and log."""
    folder, host = Path(state.state_dir) / name, state.host
    kind = name.split("-")[0]
    if kind == "triton":
        repository = record.get("repository") or LauncherSettings().model_repository
        return Triton(
            Path(repository),
            folder,
            http_port=_port(record["http"]),
            grpc_port=_port(record["grpc"]),
            metrics_port=_port(record["metrics"]),
            host=host,
        )
    if kind == "redis":  # `up` always starts it persistent: its data comes back
        password = urlsplit(record["url"]).password or ""
        return RedisServer(folder, _port(record["url"]), host, persistent=True, password=password)
    if kind == "broker":  # in memory: it comes back empty
        return KafkaBroker(folder, port=_port(record["bootstrap"]), host=host)
    server_class = GatewayServer if kind == "gateway" else WorkerServer
    env = {**state.env, **record.get("env", {})}
    server = server_class(folder, env, port=_port(record["url"]), host=host)
    server.log_file = Path(record["log"])  # appended to, as by the first start
    return server


def start_service(state_dir: Path, name: str, *, load_model: bool = True) -> StackState:
    """Start the recorded service `name` again, after it died, as a supervisor would.

    It gets the ports, folder, log and settings it was first started with (a worker added
    with `add_worker`: its own name, e.g. worker-2), so its clients find it where they left
    it; Triton loads the model again unless `load_model` is false. Only the serving path can
    be started this way (triton, redis, broker, gateway, workers); a service still running is
    an error. The state file then records the new process.
    """
    state = StackState.load(state_dir)
    if state is None:
        raise ServiceError(f"nothing is up under {state_dir}")
    record = state.services.get(name)
    if record is None:
        known = ", ".join(state.services)
        raise ValueError(f"no service {name!r} under {state_dir}; known: {known}")
    if name.split("-")[0] not in RESTARTABLE:
        raise ValueError(f"{name} cannot be started again; these can: {', '.join(RESTARTABLE)}")
    if name in state.alive():
        raise ServiceError(f"{name} is still running (pid {record['pid']})")
    server = _server_again(state, name, record)
    server.start(detached=True)
    if isinstance(server, Triton) and load_model:
        try:
            server.load_served()
        except BaseException:
            server.stop()
            raise
    state.services[name] = {**record, **server.record(), **server.describe()}
    state.save()
    return state


def down(state_dir: Path) -> list[tuple[str, bool]]:
    """Stop every service the state under `state_dir` lists, last started first.

    Returns (name, whether it was running); a pid now used by another process is left alone.
    """
    state = StackState.load(state_dir)
    if state is None:
        return []
    stopped = [
        (name, stop_pid(int(record["pid"]), float(record.get("started_at", 0))))
        for name, record in reversed(state.services.items())
    ]
    StackState.file(state_dir).unlink()
    return stopped


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """["FORGE_X=1", ...] -> {"FORGE_X": "1"}."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env takes NAME=VALUE, not {pair!r}")
        env[key] = value
    return env
