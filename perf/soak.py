"""`make soak`: steady load while services are killed and restarted; is anything lost?

The stack: `python -m launcher up --free-ports` (triton, redis, broker, gateway, worker) under
a state folder of its own (var/soak/run-<time>/, kept for its logs), plus a second worker
(`python -m launcher add worker`). The gateway and workers run at the shipped settings except:
a webhook secret (a fresh whsec_ value), a rate limit that never gets in the way, callbacks
allowed to the soak's own receiver on 127.0.0.1, and a short sweeper (FORGE_SWEEP_EVERY_S=5,
FORGE_STUCK_AFTER_S=60), so that messages a broker restart loses are sent again within the run.

For `--soak-s` seconds (SOAK_S in the Makefile, 600 by default):
- sync load: two clients call `POST /v1/images` (64x64, 4 steps, a seed of its own each),
  one after the other; a request not answered 200 is sent again with the same body after
  Retry-After (at most 5 s) or 1 s, until answered (a 4xx other than 429 is final);
- async load: a job of 1 to 3 images every 1.5 s (`POST /v1/jobs` with an Idempotency-Key,
  retried with the same key for up to a minute until 202) with a `callback_url` at a local
  threaded HTTP server that records every delivery (its webhook-id, its signature checked
  against the secret) and answers 204; a poller reads every accepted job until it finishes;
- faults, one at a time with 15 s between them: SIGKILL of Triton (the first time held down
  60 s, later 2-6 s), Redis, the broker (in memory: it comes back empty), a worker (each in
  turn) and the gateway, each started again by `python -m launcher start NAME` after the hold
  (perf/soak_faults.py: only the stack's recorded processes, verified before the kill).

Then the load stops and the drain waits (up to `--drain-s`, 300 s) until every accepted job
has finished and every finished job's callback has arrived. Requests whose outcome the
clients never saw are sent again (same body) to learn their image's key; the assets are
checked; `launcher down` stops the stack, also after an error or Ctrl-C. perf/results/
soak.json gets, at the top level:

- `faults`: faults per kind (`fault_log`: each one's timing);
- `accepted`: jobs answered 202 (and their images) and sync requests answered 200;
- `succeeded`, `failed`: accepted jobs by final status (failed with each item's reason);
  a sync request answered 200 is a success;
- `lost`: accepted jobs not finished after the drain (or gone: 404), plus images answered
  200 (sync) or in a succeeded job whose asset `GET /assets/{key}` does not serve with the
  bytes its key names;
- `duplicate_assets`: asset files in the stack's store whose key no request of the soak
  accounts for. A request's key is its 200's (sync) or its item's result (job); for a
  request whose result the clients never saw (given up after a connection error or a 5xx,
  a submission never answered 202, an item that failed or never finished) it is the key a
  request of the same body returns after the drain. Every request has a seed of its own
  and the model makes the same bytes for the same body, so with nothing wrong every stored
  file is accounted for; one left over is an image stored under a second key (the same
  item made with other bytes) or work that no request explains;
- `missing_callbacks`: finished jobs whose callback never reached the receiver (it answers
  every delivery 204), with deliveries per webhook-id;
- `unexpected_5xx`: every 5xx any client saw other than 503 with Retry-After;
  `connection_errors` (no answer at all) are counted apart, they are not 5xx;
- `p99_outside_faults_s`: p99 of the sync calls answered 200 whose span meets no fault
  window (kill to restart plus 10 s);
- `log_errors`: ERROR lines (by logger) and tracebacks per service log; `ok`: no loss, no
  duplicate asset, no missing callback, no unexpected 5xx, no damaged file, and no callback
  for a job whose submission was never answered 202 (a job the client was told had failed).
The exit status is 1 when `ok` is false.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf import soak_report  # noqa: E402
from perf.soak_faults import Injector, launcher, reap_left_behind, status  # noqa: E402
from perf.soak_load import (  # noqa: E402
    TERMINAL,
    Ledger,
    Receiver,
    job_load,
    poll_jobs,
    sync_load,
)

SERVICES = "triton,redis,broker,gateway,worker"
SWEEPER = {"FORGE_SWEEP_EVERY_S": "5", "FORGE_STUCK_AFTER_S": "60"}
SYNC_CLIENTS = 2
SYNC_PAUSE_S = 0.1
JOB_EVERY_S = 1.5
POLL_EVERY_S = 1.0
GAP_S = 15.0
RECONCILE_S = 180.0  # at most this long to learn the keys of requests with unseen results
RESULTS = ROOT / "perf" / "results" / "soak.json"
SUMMARY = (
    "faults",
    "accepted",
    "succeeded",
    "failed",
    "lost",
    "duplicate_assets",
    "missing_callbacks",
    "unexpected_5xx",
    "connection_errors",
    "p99_outside_faults_s",
    "ok",
)


def say(text: str) -> None:
    """A progress line, with the time."""
    print(f"{datetime.now().strftime('%H:%M:%S')} {text}", flush=True)


def stack_env(secret: str, receiver_port: int) -> dict[str, str]:
    """The FORGE_ settings of the soak's gateway and workers (the rest as shipped)."""
    return {
        "FORGE_WEBHOOK_SECRET": secret,
        "FORGE_DEV_WEBHOOK_SECRET": secret,  # the dev key's signing secret, where per key
        "FORGE_RATE_LIMIT": "1000000/minute",
        "FORGE_CALLBACK_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "FORGE_CALLBACK_PORTS": f"[{receiver_port}]",
        **SWEEPER,
    }


def start_stack(state_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """`launcher up` with the soak's services and settings, then a second worker."""
    args = ["up", f"--state-dir={state_dir}", f"--services={SERVICES}", "--free-ports", "--json"]
    launcher(*args, *(f"--env={k}={v}" for k, v in env.items()))
    launcher("add", "worker", f"--state-dir={state_dir}")
    return status(state_dir)


class Load:
    """The client threads: sync clients and the job submitter stop with `stop_load`, the
    poller with `stop_poll` (after the drain)."""

    def __init__(self, ledger: Ledger, base_url: str, api_key: str, callback_url: str) -> None:
        self.ledger = ledger
        self.stop_load, self.stop_poll = threading.Event(), threading.Event()
        auth = {"Authorization": f"Bearer {api_key}"}
        self.clients: list[httpx.Client] = []

        def client(timeout: float) -> httpx.Client:
            self.clients.append(httpx.Client(base_url=base_url, headers=auth, timeout=timeout))
            return self.clients[-1]

        targets: list[tuple[Any, tuple[Any, ...]]] = [
            (sync_load, (ledger, client(130), self.stop_load, SYNC_PAUSE_S))
            for _ in range(SYNC_CLIENTS)
        ]
        targets.append((job_load, (ledger, client(30), self.stop_load, callback_url, JOB_EVERY_S)))
        targets.append((poll_jobs, (ledger, client(30), self.stop_poll, POLL_EVERY_S)))
        targets.append((report_progress, (ledger, self.stop_poll)))
        self.threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]

    def start(self) -> None:
        """Start every client."""
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every client (waiting up to `timeout` for each), retried submissions too."""
        self.ledger.abort.set()
        self.stop_load.set()
        self.stop_poll.set()
        for thread in self.threads:
            thread.join(timeout)
        for c in self.clients:
            c.close()


def progress(ledger: Ledger) -> str:
    """One line of counts."""
    accepted = ledger.accepted_jobs()
    done = sum(j.status in TERMINAL for j in accepted)
    synced = sum(r.result is not None for r in ledger.sync)
    return (
        f"sync 200: {synced}; jobs accepted {len(accepted)}, finished {done}; "
        f"callbacks {len(ledger.deliveries)}"
    )


def report_progress(ledger: Ledger, stop: threading.Event, every_s: float = 30.0) -> None:
    """Print the counts every `every_s` until `stop`."""
    while not stop.wait(every_s):
        say(progress(ledger))


def undelivered(ledger: Ledger) -> tuple[int, int]:
    """(accepted jobs not finished, plus one while submissions are retried; finished jobs
    whose callback has not arrived)."""
    accepted = ledger.accepted_jobs()
    with ledger.lock:
        delivered = {d.job_id for d in ledger.deliveries}
    pending = sum(j.status not in TERMINAL and not j.vanished for j in accepted)
    pending += not ledger.submitting_done.is_set()  # a submission still being retried
    missing = sum(j.status in TERMINAL and j.job_id not in delivered for j in accepted)
    return pending, missing


def drain(ledger: Ledger, drain_s: float) -> float:
    """Wait until every accepted job finished and its callback arrived, or `drain_s`."""
    start = time.monotonic()
    last = 0.0
    while time.monotonic() - start < drain_s:
        pending, missing = undelivered(ledger)
        if not pending and not missing:
            break
        if time.monotonic() - last > 15:
            say(f"draining: {pending} jobs unfinished, {missing} callbacks awaited")
            last = time.monotonic()
        time.sleep(1.0)
    return round(time.monotonic() - start, 1)


def reissue(c: httpx.Client, ledger: Ledger, body: dict[str, Any], deadline: float) -> str | None:
    """The key a sync request of `body` gets now (tried until `deadline`), or None."""
    from perf.soak_load import call, final_refusal, pause_after

    while time.monotonic() < deadline:
        reply = call(ledger, c, "reissue", "POST", "/v1/images", json=body)
        if reply is not None and reply.status_code == 200:
            return str(reply.json()["id"])
        if reply is not None and final_refusal(reply.status_code):
            return None
        time.sleep(pause_after(reply))
    return None


def seen_keys(ledger: Ledger) -> tuple[set[str], set[str], list[dict[str, Any]]]:
    """(keys of sync 200s, keys of succeeded job items, bodies whose result was not seen)."""
    sync_keys = {str(r.result["id"]) for r in ledger.sync if r.result is not None}
    job_keys: set[str] = set()
    unseen = [r.body for r in ledger.sync if r.result is None]
    for job in ledger.jobs:
        results = {item["index"]: item.get("result") for item in job.items}
        for index, body in enumerate(job.images):
            result = results.get(index)
            if result:
                job_keys.add(str(result["id"]))
            else:
                unseen.append(body)
    return sync_keys, job_keys, unseen


def unserved(c: httpx.Client, ledger: Ledger, keys: set[str]) -> list[str]:
    """The keys whose asset the gateway does not serve with the bytes the key names."""
    import hashlib

    from perf.soak_load import call

    missing = []
    for key in sorted(keys):
        reply = call(ledger, c, "asset", "GET", f"/assets/{key}")
        served = reply is not None and reply.status_code == 200
        if not served or hashlib.sha256(reply.content).hexdigest() != key.split(".")[0]:
            missing.append(key)
    return missing


def account(c: httpx.Client, ledger: Ledger, state: dict[str, Any]) -> dict[str, Any]:
    """The figures that need the running stack: assets served, unseen keys learnt, store."""
    sync_keys, job_keys, unseen = seen_keys(ledger)
    deadline = time.monotonic() + RECONCILE_S
    learnt = {key for body in unseen if (key := reissue(c, ledger, body, deadline))}
    say(f"learnt {len(learnt)} keys of {len(unseen)} requests whose result was not seen")
    not_served_sync = unserved(c, ledger, sync_keys)
    not_served_jobs = unserved(c, ledger, job_keys)
    stored = soak_report.stored_assets(Path(state["env"]["FORGE_ASSET_DIR"]))
    return {
        "not_served_sync": not_served_sync,
        "not_served_jobs": not_served_jobs,
        "assets": soak_report.asset_figures(stored, sync_keys | job_keys | learnt),
        "unseen_requests": len(unseen),
        "unseen_keys_learnt": len(learnt),
    }


def report(
    ledger: Ledger, injector: Injector, accounted: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """perf/results/soak.json's content."""
    faults = soak_report.fault_figures(injector.faults, run["load_started"])
    windows = [f.window() for f in injector.faults]
    jobs = soak_report.job_figures(ledger)
    errors = soak_report.server_errors(ledger.calls, windows)
    unfinished = jobs.pop("unfinished_jobs")
    lost = {
        "count": len(unfinished)
        + len(accounted["not_served_sync"])
        + len(accounted["not_served_jobs"]),
        "jobs_unfinished": unfinished[: soak_report.EXAMPLES],
        "sync_assets_not_served": accounted["not_served_sync"][: soak_report.EXAMPLES],
        "job_assets_not_served": accounted["not_served_jobs"][: soak_report.EXAMPLES],
    }
    figures: dict[str, Any] = {
        **faults,
        **jobs,
        "lost": lost,
        "duplicate_assets": accounted["assets"],
        "missing_callbacks": soak_report.callback_figures(ledger),
        **errors,
        **soak_report.latency(ledger.calls, windows),
        "reconciled": {
            "requests_without_a_seen_result": accounted["unseen_requests"],
            "keys_learnt_by_asking_again": accounted["unseen_keys_learnt"],
        },
    }
    figures["ok"] = not (
        lost["count"]
        or figures["duplicate_assets"]["count"]
        or figures["duplicate_assets"]["damaged_files"]
        or figures["missing_callbacks"]["count"]
        or figures["unexpected_5xx"]["count"]
        or figures["missing_callbacks"]["deliveries_for_jobs_never_answered_202"]
    )
    return {
        "benchmark": "make soak (perf/soak.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "soak_s": run["soak_s"],
        "drain_s": run["drain_s"],
        "drained_in_s": run["drained_in_s"],
        "state_dir": run["state_dir"],
        "settings": run["settings"],
        **figures,
        "orphans_killed_at_end": run["orphans_killed_at_end"],
        "log_errors": soak_report.log_errors(Path(run["state_dir"])),
    }


def soak(
    args: argparse.Namespace, state_dir: Path, ledger: Ledger, receiver: Receiver
) -> dict[str, Any]:
    """Start the stack, load it through the faults, drain, account; the report."""
    env = stack_env(receiver.secret, receiver.port)
    injector = Injector(state_dir, GAP_S, seed=args.seed)
    say(f"stack under {state_dir}")
    say(
        "short sweeper settings, so that messages a broker restart loses are sent again within "
        "the run: " + ", ".join(f"{k}={v}" for k, v in SWEEPER.items()) + " (shipped: 30, 900)"
    )
    try:
        state = start_stack(state_dir, env)
        gateway = state["services"]["gateway"]["url"]
        load = Load(ledger, gateway, state["dev_api_key"], receiver.url)
        started, until = time.time(), time.monotonic() + args.soak_s
        load.start()
        say(
            f"load for {args.soak_s:g} s: {SYNC_CLIENTS} sync clients, jobs every {JOB_EVERY_S:g} s"
        )
        try:
            injector.run(until, load.stop_load, say)
            load.stop_load.wait(max(0.0, until - time.monotonic()))
            load.stop_load.set()
            say(f"load stopped: {progress(ledger)}; draining up to {args.drain_s:g} s")
            drained = drain(ledger, args.drain_s)
            load.stop_poll.set()
            with httpx.Client(
                base_url=gateway,
                headers={"Authorization": f"Bearer {state['dev_api_key']}"},
                timeout=130,
            ) as c:
                accounted = account(c, ledger, status(state_dir))
        finally:
            load.stop()
    finally:
        say("launcher down")
        launcher("down", f"--state-dir={state_dir}")
        orphans = reap_left_behind(injector.faults, state_dir)
        if orphans:
            say(f"killed processes the killed services left behind: {orphans}")
    run = {
        "load_started": started,
        "soak_s": args.soak_s,
        "drain_s": args.drain_s,
        "drained_in_s": drained,
        "state_dir": str(state_dir),
        "settings": {k: v for k, v in env.items() if "SECRET" not in k},
        "orphans_killed_at_end": orphans,
    }
    dump = state_dir / "soak-ledger.json"
    dump.write_text(json.dumps(soak_report.ledger_dump(ledger, injector.faults)) + "\n")
    say(f"what the clients saw: {dump}")
    return report(ledger, injector, accounted, run)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the soak like Ctrl-C: the stack is stopped first."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; write its results; 0 if nothing was lost, duplicated or missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--soak-s", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--drain-s", type=float, default=300.0, help="most seconds of drain")
    parser.add_argument("--state-dir", type=Path, help="default var/soak/run-<UTC time>")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=5, help="the order of the faults")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    state_dir = (args.state_dir or ROOT / "var" / "soak" / f"run-{stamp}").resolve()
    ledger = Ledger(random.Random())
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    try:
        with Receiver(ledger, secret) as receiver:
            results = soak(args, state_dir, ledger, receiver)
    except KeyboardInterrupt:
        print(f"interrupted; the stack is stopped (its logs: {state_dir})", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key in SUMMARY:
        value = results[key]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if not isinstance(v, list) or len(v) < 6}
        print(f"{key:22s} {json.dumps(value)}")
    print(f"results: {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
