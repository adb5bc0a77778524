"""The soak's clients and what they saw: sync and job load, job polling, a callback receiver.

Every HTTP call any client makes is recorded (`Call`: when, which route, the status or the
connection error, whether a 503 carried Retry-After), with what it was for: a sync request
(`SyncRequest`, retried with the same body after a 503 or a connection error, as a
well-behaved client does), a job (`Job`, submitted with an Idempotency-Key and retried with
the same key until answered 202), its polls, and the callbacks the receiver got
(`Delivery`). Each image asked for has a seed of its own, so every image the soak asks for
is a distinct content. The `Ledger` holds it all, behind one lock.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

PROMPT = "a soak-tested {} forged through every failure"
SPEC = {"steps": 4, "width": 64, "height": 64, "guidance_scale": 7.5, "scheduler": "euler"}
TERMINAL = ("succeeded", "failed")
RETRY_PAUSE_S = 1.0  # after a connection error or an answer without Retry-After
MAX_RETRY_AFTER_S = 5.0  # a client waits at most this long when told Retry-After
# How long a job submission is retried before it is given up: longer than the gateway holds
# an Idempotency-Key for a request in progress (triton_timeout_s + 60 s).
SUBMIT_PATIENCE_S = 240.0
SUBMITTERS = 8  # job submissions in progress at once, at most


@dataclass
class Call:
    """One HTTP call: route kind, start and end (epoch s), status (None: no answer)."""

    route: str  # sync, submit, poll, asset, reissue
    start: float
    end: float
    status: int | None
    error: str = ""  # the connection error, or the start of a 5xx body
    retry_after: bool = False


@dataclass
class SyncRequest:
    """One logical sync request: its body, and its result once answered 200."""

    body: dict[str, Any]
    result: dict[str, Any] | None = None
    attempts: int = 0
    last_status: int | None = None


@dataclass
class Job:
    """One job the soak submitted: its images, and what polling learned of it."""

    key: str  # the Idempotency-Key
    images: list[dict[str, Any]]
    attempts: list[int | str] = field(default_factory=list)  # statuses or connection errors
    job_id: str | None = None  # once answered 202
    status: str = ""
    items: list[dict[str, Any]] = field(default_factory=list)
    finished_at: float | None = None
    vanished: bool = False  # 404 after it was accepted


@dataclass
class Delivery:
    """One callback the receiver got."""

    webhook_id: str
    at: float
    job_id: str
    status: str
    signature_ok: bool


class Ledger:
    """Everything the clients saw; thread-safe appends, read after the load."""

    def __init__(self, rng: random.Random) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.sync: list[SyncRequest] = []
        self.jobs: list[Job] = []
        self.deliveries: list[Delivery] = []
        self.submitting_done = threading.Event()  # set once no job submission is in progress
        self.abort = threading.Event()  # the soak ends early: submissions stop retrying
        self._seeds = itertools.count(rng.randrange(2**40))

    def body(self, what: str) -> dict[str, Any]:
        """A request body with a seed no other request of the soak has."""
        with self.lock:
            seed = next(self._seeds)
        return {"prompt": PROMPT.format(what), "seed": seed, **SPEC}

    def add_call(self, call: Call) -> None:
        """Record one HTTP call."""
        with self.lock:
            self.calls.append(call)

    def accepted_jobs(self) -> list[Job]:
        """The jobs answered 202, so far."""
        with self.lock:
            return [j for j in self.jobs if j.job_id is not None]


def request(
    ledger: Ledger, c: httpx.Client, route: str, method: str, url: str, **kw: Any
) -> tuple[httpx.Response | None, Call]:
    """Make one call and record it: the response (None after a connection error), the record."""
    start = time.time()
    try:
        reply = c.request(method, url, **kw)
    except httpx.HTTPError as exc:
        failed = Call(route, start, time.time(), None, f"{type(exc).__name__}: {exc}"[:200])
        ledger.add_call(failed)
        return None, failed
    retry_after = reply.status_code == 503 and "retry-after" in reply.headers
    error = reply.text[:300] if reply.status_code >= 500 else ""
    record = Call(route, start, time.time(), reply.status_code, error, retry_after)
    ledger.add_call(record)
    return reply, record


def call(ledger: Ledger, c: httpx.Client, route: str, method: str, url: str, **kw: Any) -> Any:
    """`request`'s response alone (None after a connection error)."""
    return request(ledger, c, route, method, url, **kw)[0]


def pause_after(reply: httpx.Response | None) -> float:
    """How long a client waits before trying again after `reply`."""
    if reply is not None and "retry-after" in reply.headers:
        try:
            return min(float(reply.headers["retry-after"]), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    return RETRY_PAUSE_S


def final_refusal(status: int) -> bool:
    """A 4xx that sending again will not change (not 409 in progress, not 429 too many)."""
    return 400 <= status < 500 and status not in (409, 429)


def sync_load(ledger: Ledger, c: httpx.Client, stop: threading.Event, pause_s: float) -> None:
    """POST /v1/images until `stop`; a request not answered 200 is sent again, same body.

    A final refusal (a 4xx but 409 and 429) is recorded with its status.
    """
    while not stop.is_set():
        request = SyncRequest(ledger.body("sword"))
        with ledger.lock:
            ledger.sync.append(request)
        while not stop.is_set():
            request.attempts += 1
            reply = call(ledger, c, "sync", "POST", "/v1/images", json=request.body)
            request.last_status = reply.status_code if reply is not None else None
            if reply is not None and reply.status_code == 200:
                request.result = reply.json()
                break
            if reply is not None and final_refusal(reply.status_code):
                break
            stop.wait(pause_after(reply))
        stop.wait(pause_s)


def submit(ledger: Ledger, c: httpx.Client, job: Job, callback_url: str) -> None:
    """Submit `job`, retrying with its Idempotency-Key until 202 or SUBMIT_PATIENCE_S.

    Each attempt's answer (a status, or the connection error's name) lands in job.attempts.
    """
    body = {"images": job.images, "callback_url": callback_url}
    deadline = time.monotonic() + SUBMIT_PATIENCE_S
    while time.monotonic() < deadline and not ledger.abort.is_set():
        headers = {"Idempotency-Key": job.key}
        reply, record = request(ledger, c, "submit", "POST", "/v1/jobs", json=body, headers=headers)
        job.attempts.append(record.error.split(":")[0] if reply is None else reply.status_code)
        if reply is not None and reply.status_code == 202:
            job.job_id, job.status = reply.json()["id"], reply.json()["status"]
            return
        if reply is not None and final_refusal(reply.status_code):
            job.status = f"refused {reply.status_code}: {reply.text[:200]}"
            return
        ledger.abort.wait(pause_after(reply))
    job.status = "given up"


def job_load(
    ledger: Ledger, c: httpx.Client, stop: threading.Event, callback_url: str, every_s: float
) -> None:
    """A job of 1 to 3 images every `every_s` until `stop`, each with the callback URL.

    Submissions run on a pool of their own, so one retried for long does not hold the
    others back; those in progress at `stop` go on retrying (SUBMIT_PATIENCE_S at most).
    """
    rng = random.Random(11)
    with ThreadPoolExecutor(max_workers=SUBMITTERS, thread_name_prefix="submit") as pool:
        while not stop.is_set():
            job = Job(uuid.uuid4().hex, [ledger.body("axe") for _ in range(rng.randint(1, 3))])
            with ledger.lock:
                ledger.jobs.append(job)
            pool.submit(submit, ledger, c, job, callback_url)
            stop.wait(every_s)
    ledger.submitting_done.set()


def poll_jobs(ledger: Ledger, c: httpx.Client, stop: threading.Event, every_s: float) -> None:
    """GET each accepted, unfinished job every `every_s` until `stop`; record what it says."""
    while not stop.is_set():
        for job in ledger.accepted_jobs():
            if job.status in TERMINAL or job.vanished or stop.is_set():
                continue
            reply = call(ledger, c, "poll", "GET", f"/v1/jobs/{job.job_id}")
            if reply is None:
                break  # the gateway is away: wait for the next round
            if reply.status_code == 404:
                job.vanished = True
            elif reply.status_code == 200:
                status = reply.json()
                job.status, job.items = status["status"], status["items"]
                if job.status in TERMINAL:
                    job.finished_at = time.time()
        stop.wait(every_s)


class Receiver:
    """A threaded HTTP server that records every callback and answers 204."""

    def __init__(self, ledger: Ledger, secret: str) -> None:
        from standardwebhooks import Webhook

        self.secret = secret
        webhook = Webhook(secret)

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                try:
                    webhook.verify(raw, {k.lower(): v for k, v in self.headers.items()})
                    signed = True
                except Exception:  # any verification failure: recorded, still answered 2xx
                    signed = False
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                delivery = Delivery(
                    self.headers.get("webhook-id", ""),
                    time.time(),
                    str(body.get("id", "")),
                    str(body.get("status", "")),
                    signed,
                )
                with ledger.lock:
                    ledger.deliveries.append(delivery)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where callbacks go."""
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        """Start serving."""
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
