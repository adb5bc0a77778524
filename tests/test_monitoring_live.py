"""The monitoring files against the live stack: a real Prometheus (1 s scrape and evaluation,
the chart's rule files unchanged) scraping the real Triton, gateway and workers; a real
Alertmanager (the chart's alertmanager.yml, webhooks pointed at a receiver in the test).

- Every recording rule evaluates without error and returns data, and so does every query of
  every dashboard panel, after traffic that exercises each path (sync, cache hit, invalid
  input, rate limit, readiness, jobs that succeed, retry, dead-letter and are cancelled).
- Triton stopped: TritonDown (the production rule, `for: 1m`) fires in Prometheus and
  Alertmanager delivers it to the webhook through the `pager` (critical) route.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from launcher.gateway import WorkerServer
from launcher.prometheus import RULE_FILES, AlertmanagerServer, PrometheusServer
from launcher.triton import Triton
from tests.conftest import DEV_KEY, JobsStack
from tests.polling import wait_until

MONITORING = Path(__file__).resolve().parents[1] / "helm" / "forge" / "files" / "monitoring"
SMALL = {"steps": 2, "width": 64, "height": 64}

# Series this machine cannot produce, and why. A query may come back empty only if it reads
# one of these; the test also checks that they really are absent (on a GPU machine they are
# present, and then every query that reads them must return data too).
EXPECTED_ABSENT = {
    "nv_gpu_utilization": "GPU metrics need NVML and a GPU; Triton here runs on the CPU",
    "nv_gpu_memory_used_bytes": "GPU metrics need NVML and a GPU; Triton here runs on the CPU",
    "nv_gpu_memory_total_bytes": "GPU metrics need NVML and a GPU; Triton here runs on the CPU",
}


def recording_rules() -> dict[str, str]:
    """record name -> expr (names recorded by several rules joined with `or`)."""
    found: dict[str, list[str]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    found.setdefault(rule["record"], []).append(f"({rule['expr']})")
    return {name: " or ".join(exprs) for name, exprs in found.items()}


def expand(expr: str, recorded: dict[str, str]) -> str:
    """The expression with recorded names replaced by what they record (to see raw metrics)."""
    for _ in range(6):
        expr = re.sub(
            r"[a-zA-Z_]*:[a-zA-Z0-9_:]+", lambda m: recorded.get(m.group(0), m.group(0)), expr
        )
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    found = []
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append(
                    (f"{board['uid']} / {panel['title']} / {target['refId']}", target["expr"])
                )
    return found


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample that is a number (a NaN draws nothing in Grafana)."""
    return any(sample["value"][1] != "NaN" for sample in result)


def allowed_empty(expr: str, recorded: dict[str, str]) -> str | None:
    raw = expand(expr, recorded)
    for name, reason in EXPECTED_ABSENT.items():
        if re.search(rf"\b{name}\b", raw):
            return reason
    return None


# --- traffic ------------------------------------------------------------------------------


def drive_traffic(
    stack: JobsStack, worker_ok: WorkerServer, broken: WorkerServer, prometheus: PrometheusServer
) -> None:
    assert stack.gateway is not None
    auth = {"Authorization": f"Bearer {DEV_KEY}"}
    with httpx.Client(base_url=stack.gateway.url, headers=auth, timeout=60) as c:
        # Jobs first, on the worker whose model fails on them: retried, then (on the good
        # worker) done.
        broken.start()
        scrape_workers(prometheus, stack, broken)
        retry_job = c.post("/v1/jobs", json={"images": [{"prompt": "a patient mace", **SMALL}]})
        assert retry_job.status_code == 202, retry_job.text
        wait_until(
            "retries in two scrapes (a rate) seen by Prometheus",
            lambda: prometheus.query(
                'count_over_time(forge_job_retries_total{job="worker"}[1m]) > 1'
            ),
            90,
        )
        broken.kill()  # its retry item goes to the good worker
        worker_ok.start()
        scrape_workers(prometheus, stack, broken, worker_ok)
        bulk = c.post(
            "/v1/admin/keys", json={"name": "mon-bulk", "scopes": ["generate"], "tier": "bulk"}
        )
        assert bulk.status_code == 201, bulk.text
        # Two rounds, each seen by a scrape before the next: a counter series is born at its
        # first event, so a rate needs a second round to rise in. Each round makes exactly one
        # 429 for the bulk key and two job items on the worker, so the scraped counts of both
        # processes say which rounds Prometheus has seen.
        for round_ in range(2):
            one_round(c, bulk.json()["key"], round_)
            wait_until(
                f"round {round_} scraped",
                lambda n=round_ + 1: (
                    prometheus.query(
                        f'sum(forge_rate_limited_total{{job="gateway",tier="bulk"}}) >= {n}'
                    )
                    and prometheus.query(
                        f'sum(forge_job_queue_wait_seconds_count{{job="worker"}}) >= {2 * n}'
                    )
                ),
                60,
            )
        wait_until(
            f"job {retry_job.json()['id']} done",
            lambda: (
                c.get(f"/v1/jobs/{retry_job.json()['id']}").json()["status"]
                in {"succeeded", "failed"}
            ),
            120,
        )


def scrape_workers(prometheus: PrometheusServer, stack: JobsStack, *workers: WorkerServer) -> None:
    """Point Prometheus at Triton, the gateway and `workers` (their ports exist once started)."""
    assert stack.gateway is not None
    prometheus.set_targets(
        {
            "triton": [f"{stack.triton.host}:{stack.triton.metrics_port}"],
            "gateway": [f"{stack.gateway.host}:{stack.gateway.port}"],
            "worker": [f"{w.host}:{w.port}" for w in workers],
        }
    )


# Valid for the gateway, refused by the model (Triton INVALID_ARG): only the model counts
# CLIP tokens, and this prompt has 82.
TOO_MANY_TOKENS = "axe " * 80


def streams(c: httpx.Client, round_: int) -> None:
    """A streamed image with previews, read to its result; one left after its first event
    (a cancelled stream, when the model has not finished it by then)."""
    events = {"Accept": "text/event-stream"}
    body = {"prompt": f"a streamed sabre {round_}", **SMALL}
    with c.stream(
        "POST", "/v1/images", json=body, headers=events, params={"preview_every": 1}
    ) as reply:
        assert reply.status_code == 200 and "event: result" in reply.read().decode()
    body = {"prompt": f"an abandoned pike {round_}", "steps": 150, "width": 256, "height": 256}
    with c.stream("POST", "/v1/images", json=body, headers=events) as reply:
        assert next(reply.iter_lines()).startswith("event: progress")


def one_round(c: httpx.Client, bulk_key: str, round_: int) -> None:
    # Sync requests, some concurrent (batching); a repeated seed (cache hit); a size outside
    # the contract (the gateway's 422); a prompt the model refuses (Triton INVALID_ARG);
    # readiness checks; a bulk key over its tier (429); streamed requests.
    threads = [
        threading.Thread(
            target=c.post,
            args=("/v1/images",),
            kwargs={"json": {"prompt": f"blade {round_} {i}", **SMALL}},
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(2):
        reply = c.post("/v1/images", json={"prompt": "a cached bow", "seed": 11, **SMALL})
        assert reply.status_code == 200, reply.text
    assert c.post("/v1/images", json={"prompt": "odd", "width": 72, "steps": 2}).status_code == 422
    assert c.post("/v1/images", json={"prompt": TOO_MANY_TOKENS, **SMALL}).status_code == 422
    for _ in range(3):
        c.get("/readyz")
    streams(c, round_)
    limited = c.post(
        "/v1/images",
        json={"prompt": "a huge hammer", "steps": 150, "width": 1024, "height": 1024},
        headers={"Authorization": f"Bearer {bulk_key}"},
    )
    assert limited.status_code == 429, limited.text
    # Jobs on the good worker: one that succeeds, one the model refuses (dead letter).
    ids = [
        c.post("/v1/jobs", json={"images": [body]}).json()["id"]
        for body in (
            {"prompt": f"a queued axe {round_}", **SMALL},
            {"prompt": f"{TOO_MANY_TOKENS}{round_}", **SMALL},
        )
    ]
    # A long job its client cancels at once (its items queued or just started).
    long = {"prompt": f"a dropped flail {round_}", "steps": 150, "width": 256, "height": 256}
    dropped = c.post("/v1/jobs", json={"images": [long, long]}).json()["id"]
    assert c.delete(f"/v1/jobs/{dropped}").json()["status"] == "cancelled"
    for job_id in ids:
        wait_until(
            f"job {job_id} done",
            lambda j=job_id: c.get(f"/v1/jobs/{j}").json()["status"] in {"succeeded", "failed"},
            120,
        )


# --- tests -------------------------------------------------------------------------------


@pytest.fixture
def monitored(
    jobs_stack: JobsStack, failing_triton: Triton, tmp_path: Path
) -> Iterator[tuple[PrometheusServer, JobsStack]]:
    gateway = jobs_stack.start_gateway(FORGE_RATE_LIMIT_BY_TIER='{"bulk": "10/minute"}')
    broken = WorkerServer(  # its model fails on these images: the item is retried
        jobs_stack.workdir,
        jobs_stack.env(
            FORGE_TRITON_GRPC_URL=failing_triton.grpc_url,
            FORGE_RETRY_BACKOFF_S="0.2",
            FORGE_MAX_ATTEMPTS="50",
        ),
    )
    worker_ok = WorkerServer(jobs_stack.workdir, jobs_stack.env())
    jobs_stack.workers += [broken, worker_ok]  # stopped by the fixture
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        {
            "triton": [f"{jobs_stack.triton.host}:{jobs_stack.triton.metrics_port}"],
            "gateway": [f"{gateway.host}:{gateway.port}"],
        },
        scrape_interval="1s",
        evaluation_interval="1s",
    ).start()
    try:
        drive_traffic(jobs_stack, worker_ok, broken, prometheus)
        yield prometheus, jobs_stack
    finally:
        prometheus.stop()


def test_every_recording_rule_and_dashboard_query_returns_data(
    monitored: tuple[PrometheusServer, JobsStack],
) -> None:
    prometheus, _ = monitored
    recorded = recording_rules()
    for name, reason in EXPECTED_ABSENT.items():
        assert prometheus.query(name) == [], f"{name} is present: drop it from EXPECTED_ABSENT"
        assert reason

    # Rules evaluate every second; wait until each recorded series exists (or is allowed not to).
    def missing() -> list[str]:
        return [
            name
            for name, expr in recorded.items()
            if not has_data(prometheus.query(name)) and not allowed_empty(expr, recorded)
        ]

    try:
        wait_until("every recording rule to return data", lambda: not missing(), 60, every=1)
    except AssertionError:
        pytest.fail(f"recording rules without data: {missing()}")
    groups = prometheus.api("rules")["groups"]
    assert {g["file"] for g in groups} == {str(p) for p in RULE_FILES}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    dead = []
    for where, expr in dashboard_queries():
        result = prometheus.query(expr)  # a PromQL error raises here, naming the query
        if not has_data(result) and not allowed_empty(expr, recorded):
            dead.append(f"{where}: {expr}")
    assert dead == [], "dashboard panels without data:\n" + "\n".join(dead)

    # What the data says: the traffic above is visible in the objectives.
    def value(expr: str) -> float:
        (sample,) = prometheus.query(expr)
        return float(sample["value"][1])

    assert value("forge:triton_up") == 1 and value("forge:triton_model_ready") == 1
    p95 = value("forge:generation_seconds:p95_rate5m")
    assert math.isfinite(p95) and p95 > 0  # a quantile of the traffic's durations, not a limit
    assert value("forge:images_per_hour:rate5m") > 0
    assert 0 < value("forge:cache_hits:ratio_rate5m") < 1
    assert 0 <= value("forge:generation_errors:ratio_rate5m") < 1
    assert value("sum(reason:forge_dead_letters:increase1h)") >= 1
    assert value('sum(rate(forge_rate_limited_total{tier="bulk"}[5m]))') > 0
    assert value("sum(forge_job_items_cancelled_total)") >= 1


def webhook_receiver() -> tuple[ThreadingHTTPServer, list[dict[str, Any]]]:
    """An Alertmanager webhook endpoint of this test's own, and the messages it received."""
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Hook), received


def instant(text: str) -> datetime:
    """An RFC 3339 time of Prometheus or Alertmanager, to the millisecond (the precision of
    the alerts Prometheus sends; its API gives nanoseconds)."""
    text = re.sub(r"(\.\d{1,3})\d*", r"\1", text).replace("Z", "+00:00")
    moment = datetime.fromisoformat(text)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_triton_stopped_fires_triton_down_through_alertmanager_to_the_webhook(
    repository: Path, tmp_path: Path
) -> None:
    receiver, received = webhook_receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    own = Triton(repository, tmp_path / "triton").start()  # no model: only its process matters
    alertmanager = AlertmanagerServer(
        tmp_path / "alertmanager", webhook_url=f"http://127.0.0.1:{receiver.server_port}/hook"
    ).start()
    prometheus = PrometheusServer(
        tmp_path / "prometheus",
        {"triton": [f"{own.host}:{own.metrics_port}"]},
        scrape_interval="1s",
        evaluation_interval="1s",
        alertmanagers=[alertmanager.address],
    ).start()
    try:
        wait_until("Triton scraped", lambda: prometheus.query("forge:triton_up == 1"), 30)

        def triton_down() -> list[dict[str, Any]]:
            return [
                a
                for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "TritonDown"
            ]

        assert not triton_down()
        (rule,) = [
            r
            for g in prometheus.api("rules")["groups"]
            for r in g["rules"]
            if r["name"] == "TritonDown"
        ]
        assert rule["type"] == "alerting" and rule["duration"] == 60  # for: 1m
        own.stop()
        states: list[str] = []  # TritonDown's states in Prometheus, in the order seen

        def delivered() -> list[dict[str, Any]]:
            for alert in triton_down():
                if not states or states[-1] != alert["state"]:
                    states.append(alert["state"])
            return [
                alert
                for message in received
                for alert in message["alerts"]
                if message["receiver"] == "pager"
                and alert["labels"]["alertname"] == "TritonDown"
                and alert["status"] == "firing"
            ]

        # A deadline for the wait only: for: 1m, the route's group wait, scrapes and ticks.
        (alert, *_) = wait_until("TritonDown at the webhook", delivered, 600, every=1)
        # It was pending before it fired, and fired no sooner than its `for` after it became
        # active: Alertmanager's startsAt is when Prometheus fired it.
        assert states[0] == "pending", states
        (firing,) = triton_down()
        assert firing["state"] == "firing"
        held = instant(alert["startsAt"]) - instant(firing["activeAt"])
        assert held >= timedelta(seconds=60), (alert["startsAt"], firing["activeAt"])
        assert alert["labels"]["severity"] == "critical"
        assert "forge:triton_up = 0" in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].endswith("docs/runbook.md#tritondown")
        assert any(a["labels"]["alertname"] == "TritonDown" for a in alertmanager.alerts())
    finally:
        prometheus.stop()
        alertmanager.stop()
        own.stop()
        receiver.shutdown()
        receiver.server_close()
