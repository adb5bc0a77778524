"""The soak's figures, from what its clients saw, the asset folder and the services' logs.

Definitions are those of perf/soak.py's docstring; every function here is pure but for
reading files.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perf.soak_faults import Fault
from perf.soak_load import TERMINAL, Call, Ledger

KEY = re.compile(r"^[0-9a-f]{64}\.(png|webp)$")
EXAMPLES = 20  # at most this many ids or calls listed per figure


def overlaps(call: Call, windows: Iterable[tuple[float, float]]) -> bool:
    """Whether the call's span meets any fault window."""
    return any(call.start < end and call.end > start for start, end in windows)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (inclusive method), None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    """`value` rounded, None kept."""
    return None if value is None else round(value, digits)


def latency(calls: list[Call], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Sync latency (answered 200) inside and outside the fault windows, in seconds."""
    ok = [c for c in calls if c.route == "sync" and c.status == 200]
    outside = [c.end - c.start for c in ok if not overlaps(c, windows)]
    every = [c.end - c.start for c in ok]
    return {
        "p99_outside_faults_s": rounded(percentile(outside, 99)),
        "latency": {
            "sync_200_outside_faults": len(outside),
            "p50_outside_faults_s": rounded(percentile(outside, 50)),
            "sync_200_all": len(every),
            "p50_all_s": rounded(percentile(every, 50)),
            "p99_all_s": rounded(percentile(every, 99)),
            "max_all_s": rounded(max(every, default=None)),
        },
    }


def server_errors(calls: list[Call], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Unexpected 5xx (anything but 503 with Retry-After) and connection errors, by route."""
    unexpected = [
        c for c in calls if c.status is not None and c.status >= 500 and not c.retry_after
    ]
    unanswered = [c for c in calls if c.status is None]
    answered_503 = [c for c in calls if c.status == 503 and c.retry_after]
    return {
        "unexpected_5xx": {
            "count": len(unexpected),
            "by_route_and_status": dict(Counter(f"{c.route} {c.status}" for c in unexpected)),
            "outside_fault_windows": sum(not overlaps(c, windows) for c in unexpected),
            "examples": [
                {"route": c.route, "status": c.status, "at": round(c.start, 1), "body": c.error}
                for c in unexpected[:EXAMPLES]
            ],
        },
        "connection_errors": {
            "count": len(unanswered),
            "by_route": dict(Counter(c.route for c in unanswered)),
            "outside_fault_windows": sum(not overlaps(c, windows) for c in unanswered),
            "kinds": dict(Counter(c.error.split(":")[0] for c in unanswered)),
        },
        "answered_503_with_retry_after": {
            "count": len(answered_503),
            "by_route": dict(Counter(c.route for c in answered_503)),
        },
        "http_calls": dict(Counter(c.route for c in calls)),
    }


def job_figures(ledger: Ledger) -> dict[str, Any]:
    """Accepted, succeeded, failed (with reasons) and unfinished jobs and sync requests."""
    accepted = ledger.accepted_jobs()
    succeeded = [j for j in accepted if j.status == "succeeded"]
    failed = [j for j in accepted if j.status == "failed"]
    unfinished = [j for j in accepted if j.status not in TERMINAL]
    reasons = Counter(
        str(item.get("error") or "no reason given")[:160]
        for job in failed
        for item in job.items
        if item.get("status") == "failed"
    )
    sync_ok = [r for r in ledger.sync if r.result is not None]
    items = sum(len(j.images) for j in accepted)
    return {
        "accepted": {
            "jobs": len(accepted),
            "job_items": items,
            "sync": len(sync_ok),
            "total": len(accepted) + len(sync_ok),
        },
        "succeeded": {
            "jobs": len(succeeded),
            "job_items": sum(len(j.images) for j in succeeded),
            "sync": len(sync_ok),
        },
        "failed": {
            "jobs": len(failed),
            "reasons": dict(reasons),
            "job_ids": [j.job_id for j in failed][:EXAMPLES],
        },
        "not_accepted": {
            "jobs": sum(1 for j in ledger.jobs if j.job_id is None),
            "job_submissions": [
                {"key": j.key, "status": j.status, "attempts": j.attempts}
                for j in ledger.jobs
                if j.job_id is None
            ][:EXAMPLES],
            "sync": sum(1 for r in ledger.sync if r.result is None),
            "sync_final_statuses": dict(
                Counter(str(r.last_status) for r in ledger.sync if r.result is None)
            ),
        },
        "unfinished_jobs": [
            {"job_id": j.job_id, "status": j.status, "vanished": j.vanished} for j in unfinished
        ],
    }


def callback_figures(ledger: Ledger) -> dict[str, Any]:
    """Finished jobs without a delivered callback, and deliveries per webhook-id."""
    finished = [j for j in ledger.accepted_jobs() if j.status in TERMINAL]
    delivered_jobs = {d.job_id for d in ledger.deliveries}
    missing = [j.job_id for j in finished if j.job_id not in delivered_jobs]
    per_id = Counter(d.webhook_id for d in ledger.deliveries)
    known = {j.job_id for j in ledger.accepted_jobs()}
    ids_per_job: dict[str, set[str]] = {}
    for d in ledger.deliveries:
        ids_per_job.setdefault(d.job_id, set()).add(d.webhook_id)
    return {
        "count": len(missing),
        "job_ids": missing[:EXAMPLES],
        "finished_jobs_with_callback": len(finished),
        "deliveries": len(ledger.deliveries),
        "webhook_ids": len(per_id),
        "deliveries_per_webhook_id": {
            str(n): count for n, count in sorted(Counter(per_id.values()).items())
        },
        "webhook_ids_delivered_more_than_once": [i for i, n in per_id.items() if n > 1][:EXAMPLES],
        "jobs_with_several_webhook_ids": sum(len(ids) > 1 for ids in ids_per_job.values()),
        "bad_signatures": sum(not d.signature_ok for d in ledger.deliveries),
        "deliveries_for_jobs_never_answered_202": sorted(
            {d.job_id for d in ledger.deliveries if d.job_id not in known}
        )[:EXAMPLES],
        "status_mismatches": sum(
            1
            for j in finished
            for d in ledger.deliveries
            if d.job_id == j.job_id and d.status != j.status
        ),
    }


def stored_assets(asset_dir: Path) -> dict[str, Any]:
    """The asset files: keys of whole files, damaged ones (bytes not matching the key),
    scratch files left by an interrupted write, anything else."""
    keys, damaged, scratch, other = set(), [], [], []
    for path in sorted(p for p in asset_dir.rglob("*") if p.is_file()):
        if KEY.match(path.name):
            if hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".")[0]:
                keys.add(path.name)
            else:
                damaged.append(path.name)
        elif path.name.endswith(".tmp"):
            scratch.append(path.name)
        else:
            other.append(path.name)
    return {"keys": keys, "damaged": damaged, "scratch": scratch, "other": other}


def asset_figures(stored: dict[str, Any], referenced: set[str]) -> dict[str, Any]:
    """duplicate_assets: stored files whose key no request of the soak accounts for."""
    extra = sorted(stored["keys"] - referenced)
    return {
        "count": len(extra),
        "keys": extra[:EXAMPLES],
        "stored_files": len(stored["keys"]),
        "accounted_keys": len(referenced),
        "damaged_files": stored["damaged"][:EXAMPLES],
        "scratch_files_left": len(stored["scratch"]),
        "other_files": stored["other"][:EXAMPLES],
    }


def log_errors(state_dir: Path) -> dict[str, dict[str, int]]:
    """Per service log of the stack: ERROR lines by logger, and tracebacks."""
    found = {}
    for log in sorted(state_dir.rglob("*.log")):
        text = log.read_text(errors="replace")
        counts = Counter(
            f"ERROR {match[1]}" for match in re.finditer(r" ERROR (\S+) ", text, re.MULTILINE)
        )
        counts["tracebacks"] = text.count("Traceback (most recent call last)")
        if sum(counts.values()):
            found[str(log.relative_to(state_dir))] = dict(counts)
    return found


def ledger_dump(ledger: Ledger, faults: list[Fault]) -> dict[str, Any]:
    """Everything the clients saw, for looking into a finding (the state folder keeps it)."""
    with ledger.lock:
        return {
            "calls": [
                [c.route, round(c.start, 3), round(c.end, 3), c.status, c.error, c.retry_after]
                for c in ledger.calls
            ],
            "jobs": [
                {
                    "key": j.key,
                    "job_id": j.job_id,
                    "status": j.status,
                    "attempts": j.attempts,
                    "images": j.images,
                    "items": j.items,
                    "finished_at": j.finished_at,
                }
                for j in ledger.jobs
            ],
            "sync_not_answered_200_first_time": [
                {"body": r.body, "attempts": r.attempts, "last_status": r.last_status}
                for r in ledger.sync
                if r.attempts > 1 or r.result is None
            ],
            "deliveries": [vars(d) for d in ledger.deliveries],
            "faults": [vars(f) for f in faults],
        }


def fault_figures(faults: list[Fault], started: float) -> dict[str, Any]:
    """Faults per kind, and each one's timing relative to the start of the load."""
    return {
        "faults": dict(Counter(f.kind for f in faults)),
        "fault_log": [
            {
                "service": f.service,
                "pid": f.pid,
                "killed_at_s": round(f.killed_at - started, 1),
                "held_down_s": f.hold_s,
                "restart_s": f.restart_s,
                "children_left_behind": f.left_behind,
            }
            for f in faults
        ],
    }
