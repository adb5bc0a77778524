"""Monitoring as files: promtool and amtool checks, promtool unit tests, dashboards as data.

The rule files, dashboards and alertmanager.yml under helm/forge/files/monitoring are the one
source of truth: the Helm chart ships them and the local Prometheus loads them. Nothing here
starts a service; tests/test_monitoring_live.py runs them against the live stack.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.prometheus import alertmanager_config, prometheus_config

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "helm" / "forge" / "files" / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*.test.yml"))
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
ALERTMANAGER = MONITORING / "alertmanager.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/crafterse/forge/blob/main/docs/runbook.md#"

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool missing (Debian package prometheus)"
)
needs_amtool = pytest.mark.skipif(
    not Path(AMTOOL).exists(), reason="amtool missing (Debian package prometheus-alertmanager)"
)


def run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}"
    return done.stdout


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every query of every panel."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((board["uid"], panel["title"], target["expr"]))
    return found


# --- promtool / amtool -----------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_every_rule_file() -> None:
    assert {p.name for p in RULE_FILES} >= {
        "forge-availability.yml",
        "forge-slo.yml",
        "forge-triton.yml",
        "forge-jobs.yml",
    }
    out = run(PROMTOOL, "check", "rules", *map(str, RULE_FILES))
    assert out.count("SUCCESS") == len(RULE_FILES), out


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    out = run(PROMTOOL, "test", "rules", *(p.name for p in RULE_TESTS), cwd=MONITORING / "tests")
    assert out.count("SUCCESS") == len(RULE_TESTS), out


def test_every_rule_file_has_unit_tests_and_every_alert_fires_and_stays_silent() -> None:
    """Each alert appears in the promtool tests at least once firing and once silent."""
    fired: set[str] = set()
    silent: set[str] = set()
    tested_files = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        tested_files |= {(path.parent / f).resolve() for f in doc["rule_files"]}
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else silent).add(case["alertname"])
                for alert in case["exp_alerts"]:
                    # promtool compares annotations exactly: the templates render in the tests.
                    assert set(alert["exp_annotations"]) == {
                        "summary",
                        "description",
                        "runbook_url",
                    }, (path.name, test["name"])
    assert tested_files == {p.resolve() for p in RULE_FILES}
    names = set(alerts())
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


@needs_promtool
def test_generated_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = prometheus_config(
        {"triton": ["127.0.0.1:8002"], "gateway": ["127.0.0.1:8080"], "worker": ["127.0.0.1:9300"]},
        alertmanagers=["127.0.0.1:9093"],
    )
    assert [c["job_name"] for c in config["scrape_configs"]] == ["triton", "gateway", "worker"]
    assert config["rule_files"] == [str(p) for p in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = run(PROMTOOL, "check", "config", str(path))
    assert "SUCCESS" in out and f"{len(RULE_FILES)} rule files found" in out, out
    with pytest.raises(ValueError, match="unknown jobs"):
        prometheus_config({"tritonserver": ["127.0.0.1:8002"]})


@needs_amtool
def test_amtool_checks_the_alertmanager_config(tmp_path: Path) -> None:
    run(AMTOOL, "check-config", str(ALERTMANAGER))
    local = tmp_path / "alertmanager.yml"
    local.write_text(alertmanager_config("http://127.0.0.1:9/hook"))
    run(AMTOOL, "check-config", str(local))
    assert (
        yaml.safe_load(local.read_text())["route"]
        == yaml.safe_load(ALERTMANAGER.read_text())["route"]
    )


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (("severity=critical", "alertname=TritonDown"), "pager"),
        (("severity=critical", "alertname=ErrorBudgetBurnFast"), "pager"),
        (("severity=warning", "alertname=GPUMemoryHigh"), "chat"),
        (("alertname=Unlabelled",), "chat"),
    ],
)
def test_alerts_route_by_severity(labels: tuple[str, ...], receiver: str) -> None:
    out = run(AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert out.split()[-1] == receiver, out


def test_every_alert_severity_has_a_route_and_webhook_receiver() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    routed = {m for r in config["route"]["routes"] for m in r["matchers"]}
    for name, alert in alerts().items():
        assert f'severity="{alert["labels"]["severity"]}"' in routed, name
    for receiver in config["receivers"]:
        assert receiver["webhook_configs"], receiver["name"]
        for hook in receiver["webhook_configs"]:
            assert ".invalid/" in hook["url"], "only placeholders in the repository"


# --- alerts: annotations and runbook -----------------------------------------------------------


def test_every_alert_has_summary_description_with_value_severity_and_runbook() -> None:
    sections = set(re.findall(r"^## (\w+)$", RUNBOOK.read_text(), flags=re.M))
    for name, alert in alerts().items():
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        notes = alert["annotations"]
        assert notes["summary"], name
        assert "$value" in notes["description"], name
        assert notes["runbook_url"] == RUNBOOK_URL + name.lower(), name
        assert name in sections, f"docs/runbook.md has no section for {name}"
    assert sections == set(alerts()), "runbook sections without an alert"


def test_the_seed_targets_are_alerted_on() -> None:
    names = set(alerts())
    assert {
        "TritonDown",
        "TritonModelNotReady",
        "ScrapeTargetDown",
        "RedisUnreachable",
        "ErrorBudgetBurnFast",
        "ErrorBudgetBurnSustained",
        "GenerationErrorRatioHigh",
        "GenerationLatencyP95High",
        "TritonPendingRequestsGrowing",
        "ConsumerLagGrowing",
        "DeadLettersAppearing",
        "GPUMemoryHigh",
        # The workers' own state: paused, committing, the callback outbox, the sweeper.
        "WorkersPaused",
        "OffsetCommitsFailing",
        "CallbacksGivenUp",
        "SweeperRequeuing",
        "JobItemsExpired",
        "BrokerUnreachable",
    } <= names
    by_name = alerts()
    assert "> 30" in by_name["GenerationLatencyP95High"]["expr"]
    assert "> 0.9" in by_name["GPUMemoryHigh"]["expr"]
    fast, slow = by_name["ErrorBudgetBurnFast"]["expr"], by_name["ErrorBudgetBurnSustained"]["expr"]
    assert "rate1h > 14.4" in fast and "rate5m > 14.4" in fast
    assert "rate6h > 6" in slow and "rate30m > 6" in slow
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    assert "/ 0.005" in recorded["forge:error_budget_burn_rate:rate1h"]
    for q in ("p50", "p95", "p99"):
        assert "forge_generation_seconds_bucket" in recorded[f"forge:generation_seconds:{q}_rate5m"]


# --- dashboards as data ---------------------------------------------------------------------


def test_dashboards_are_grafana_dashboards_on_the_datasource_variable() -> None:
    assert {p.stem for p in DASHBOARDS} == {"forge-overview", "forge-triton", "forge-kafka-jobs"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["title"] and board["schemaVersion"] >= 36
        uids.add(board["uid"])
        (variable,) = board["templating"]["list"]
        assert variable == {**variable, "name": "datasource", "type": "datasource"}
        assert variable["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel["description"], panel
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
                # Only the datasource is a variable: every query runs as-is in Prometheus.
                assert "$" not in target["expr"], (panel["title"], target["expr"])
    assert len(uids) == len(DASHBOARDS)


def test_dashboards_show_what_the_issue_asks_for() -> None:
    text = {p.stem: p.read_text() for p in DASHBOARDS}
    overview = text["forge-overview"]
    for needed in (
        "forge:generation_seconds:p50_rate5m",
        "forge:generation_seconds:p95_rate5m",
        "forge:generation_seconds:p99_rate5m",
        "forge:images_per_hour_per_gpu:rate5m",
        "forge:cache_hits:ratio_rate5m",
        "forge:generation_errors:ratio_rate5m",
        "forge:availability:ratio_rate5m",
        "forge:error_budget_burn_rate:rate1h",
        "status:forge_http_requests:rate5m",
        "forge_open_streams",
        "forge_time_to_first_preview_seconds_bucket",
        "forge_streams_cancelled_total",
        "forge_job_items_cancelled_total",
        "forge_content_policy_total",
        "forge_denoising_steps_total",
    ):
        assert needed in overview, needed
    for needed in (
        "forge:triton_queue_seconds:mean_rate5m",
        "forge:triton_compute_seconds:mean_rate5m",
        "forge:triton_batch_size:mean_rate5m",
        "forge:gpu_utilization:avg",
        "gpu_uuid:forge_gpu_memory_used:ratio",
    ):
        assert needed in text["forge-triton"], needed
    for needed in (
        "topic:forge_consumer_lag:sum",
        "topic_outcome:forge_jobs:rate5m",
        "topic:forge_job_retries:rate5m",
        "reason:forge_dead_letters:increase1h",
        "forge:workers_paused:sum",
        "forge:commit_failures:rate5m",
        "outcome:forge_callbacks:rate5m",
        "action:forge_swept:increase1h",
    ):
        assert needed in text["forge-kafka-jobs"], needed


def test_dashboards_use_only_recorded_or_exported_names() -> None:
    """A recorded name in a dashboard must be one the rule files record (no typos)."""
    recorded = {r["record"] for r in rules() if "record" in r}
    for uid, title, expr in dashboard_exprs():
        for name in re.findall(r"[a-zA-Z_]*:[a-zA-Z0-9_:]+", expr):
            assert name in recorded, f"{uid} / {title}: {name} is not recorded"


def test_topic_regexes_match_every_consumed_topic() -> None:
    """The rules' and dashboards' topic regexes (ConsumerLagGrowing, the lag stat) match every
    topic the workers consume, each tier's retry topic included, and not results or dead
    letters."""
    from gateway.topics import Topics

    topics = Topics("forge.jobs.")
    exprs = [r["expr"] for r in rules()] + [expr for _, _, expr in dashboard_exprs()]
    patterns = {p for expr in exprs for p in re.findall(r'topic=~"([^"]+)"', expr)}
    assert patterns
    for pattern in patterns:
        regex = re.compile(pattern.replace("\\\\", "\\"))  # a PromQL string: \\ is one \
        for topic in topics.consumed:
            assert regex.fullmatch(topic), (pattern, topic)
        for topic in (topics.results, topics.dead_letter):
            assert not regex.fullmatch(topic), (pattern, topic)
