"""What a test can see of a running Triton, so that it asserts on what happened, never on how
long it took: the model's counters, its queue, requests that keep it busy until released, and
a witness that counts the steps of a generation running beside it.

- `settle(triton)`: the counters once everything sent before has finished and been counted;
  `later.since(earlier)` is exactly the traffic in between (the barriers excluded).
- `pending(triton)` / `wait_pending(triton, n)`: requests waiting in the model's queue
  (Triton's `nv_inference_pending_request_count`): with one model instance and no queue delay,
  a request waits there exactly while the instance runs something else.
- `Hold(triton)`: full batches that keep a one-instance model busy until `release()`, so that a
  request sent meanwhile is known to be in flight, waiting, for as long as the test needs.
- `Witness`: the pipeline core in this process, generating beside Triton and counting its
  steps: an event ("finished its steps") that marks how far the same work gets meanwhile.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from gateway.triton_client import (
    MODEL_NAME,
    STREAM_MODEL_NAME,
    ImageParams,
    generate,
    make_inputs,
)
from launcher.triton import Triton
from tests.polling import wait_until

POLL_S = 0.02


@dataclass(frozen=True)
class Counts:
    """The model's statistics: requests (rows) inferred, executions, executions by batch size."""

    inferences: int
    executions: int
    batches: dict[int, int] = field(default_factory=dict)
    barrier_rows: int = 0  # the rows of one barrier (settle); 0 for a plain reading

    def minus(self, other: Counts) -> Counts:
        sizes = set(self.batches) | set(other.batches)
        batches = {s: self.batches.get(s, 0) - other.batches.get(s, 0) for s in sizes}
        return Counts(
            self.inferences - other.inferences,
            self.executions - other.executions,
            {s: n for s, n in batches.items() if n},
        )

    def since(self, earlier: Counts) -> Counts:
        """The traffic between two settled readings: this one's barrier taken out."""
        assert self.barrier_rows, "since() compares settled readings (settle())"
        barrier = Counts(self.barrier_rows, 1, {self.barrier_rows: 1})
        return self.minus(earlier).minus(barrier)


def counts(triton: Triton) -> Counts:
    """The model's statistics as Triton reports them now."""
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        (model,) = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"]
    return Counts(
        int(model.get("inference_count", 0)),
        int(model.get("execution_count", 0)),
        {
            int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
            for b in model.get("batch_stats", [])
        },
    )


def served_config(triton: Triton) -> dict[str, Any]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        return dict(client.get_model_config(MODEL_NAME, as_json=True)["config"])


def max_batch_size(triton: Triton) -> int:
    return int(served_config(triton)["max_batch_size"])


def settle(triton: Triton) -> Counts:
    """The counters once everything sent to the model before this call has finished and been
    counted (e.g. a cancelled request of an earlier test, still stopping).

    A barrier, one full batch (max_batch_size rows, so the batcher never merges it with another
    request), queues behind everything sent before. The model has one instance, which counts an
    execution before it starts the next, so once the barrier is counted, all that ran before it
    is. The returned reading includes the barrier; `since()` takes it out.
    """
    rows = max_batch_size(triton)
    before = counts(triton)
    barrier = ImageParams(prompt="a settling barrier", seed=0, steps=1, width=64, height=64)
    generate(triton.grpc_url, [barrier] * rows)

    def barrier_counted() -> Counts | None:
        now = counts(triton)
        full = now.batches.get(rows, 0) - before.batches.get(rows, 0)
        return now if now.inferences - before.inferences >= rows and full >= 1 else None

    now = wait_until("Triton to count the barrier", barrier_counted)
    return Counts(now.inferences, now.executions, now.batches, barrier_rows=rows)


PENDING = re.compile(
    r'^nv_inference_pending_request_count\{[^}]*model="' + MODEL_NAME + r'"[^}]*\} (\S+)$',
    re.MULTILINE,
)


def metrics_text(triton: Triton) -> str:
    """Triton's /metrics, as it reads now."""
    with urllib.request.urlopen(f"http://{triton.metrics_url}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def pending(triton: Triton) -> int:
    """Requests in the model's queue, not yet handed to an instance."""
    found = PENDING.search(metrics_text(triton))
    assert found, "Triton reports no nv_inference_pending_request_count for the model"
    return int(float(found.group(1)))


STEPS = re.compile(r'^forge_denoising_steps_total\{model="([a-z_]+)"\} (\S+)$', re.MULTILINE)


def steps_done(triton: Triton, model: str = STREAM_MODEL_NAME) -> int:
    """The model's count of denoising steps (one per image per step), from Triton's metrics."""
    return int(float(dict(STEPS.findall(metrics_text(triton)))[model]))


def wait_pending(triton: Triton, n: int, what: str = "") -> None:
    """Until the model's queue holds `n` requests, read so twice in a row (a request is briefly
    queued on its way to an idle instance; a state the test waits for lasts)."""
    seen: list[int] = []

    def steady() -> bool:
        seen.append(pending(triton))
        return seen[-2:] == [n, n]

    wait_until(f"{n} request(s) waiting in Triton's queue{': ' + what if what else ''}", steady)


class Calls:
    """Asynchronous gRPC requests of one test, their outcomes recorded as they arrive."""

    def __init__(self, triton: Triton) -> None:
        self.client = grpcclient.InferenceServerClient(triton.grpc_url)
        self.outcomes: dict[str, tuple[Any, Any]] = {}
        self.at_arrival: dict[str, Any] = {}
        self.sent: list[Any] = []

    def send(
        self, name: str, rows: list[ImageParams], on_arrival: Callable[[], Any] | None = None
    ) -> Any:
        """Send `rows` as one request; `on_arrival()` is recorded the moment its answer comes."""

        def done(result: Any, error: Any) -> None:
            if on_arrival is not None:
                self.at_arrival[name] = on_arrival()
            self.outcomes[name] = (result, error)

        call = self.client.async_infer(
            MODEL_NAME,
            make_inputs(grpcclient, rows),
            callback=done,
        )
        self.sent.append(call)
        return call

    def wait(self, name: str) -> tuple[Any, Any]:
        outcome: tuple[Any, Any] = wait_until(
            f"the answer to {name}", lambda: self.outcomes.get(name)
        )
        return outcome

    def close(self) -> None:
        """Cancel what is still running (a failed test leaves nothing behind), and close."""
        for call in self.sent:
            call.cancel()
        self.client.close()


class Hold:
    """Keeps a one-instance model busy until `release()`: two full batches of long requests,
    one running and one queued (so the hold is seen: one request waiting). A request sent
    while held waits behind them, in flight, for as long as the test needs. Released, both
    are cancelled and stop at their next step."""

    def __init__(self, triton: Triton) -> None:
        config = served_config(triton)
        parameters = {k: v.get("string_value", "") for k, v in config["parameters"].items()}
        size = min(256, int(parameters["max_size"]))
        long = ImageParams(
            prompt="a blocking boulder",
            seed=0,
            steps=int(parameters["max_steps"]),
            width=size,
            height=size,
        )
        self.triton = triton
        self.calls = Calls(triton)
        self.rows = [long] * int(config["max_batch_size"])
        self.blockers: list[Any] = []

    def __enter__(self) -> Hold:
        self.blockers = [self.calls.send(f"blocker {i}", self.rows) for i in range(2)]
        wait_pending(self.triton, 1, "one blocker runs, the other waits")
        return self

    def release(self) -> None:
        for blocker in self.blockers:
            blocker.cancel()
        self.blockers = []

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.calls.close()


class Witness:
    """`request` generated in this process by the pipeline core on `weights`, on a thread: the
    same work as a request sent to Triton, counting its denoising steps as it goes.

    The core asks `is_cancelled()` before every step: that is the count, and the way to stop
    the witness early. `finished` is set once it has run all its steps."""

    def __init__(self, weights: Path, request: Any) -> None:
        from tests.conftest import make_core

        self.steps_started = 0
        self.finished = threading.Event()
        self._stop = threading.Event()
        self.request = request
        core = make_core(weights)
        row = core.row(request, is_cancelled=self._next_step)
        self._thread = threading.Thread(target=self._run, args=(core, row), daemon=True)

    def _next_step(self) -> bool:
        self.steps_started = min(self.steps_started + 1, self.request.steps)
        return self._stop.is_set()

    def _run(self, core: Any, row: Any) -> None:
        (image,) = core.generate([row])
        if image is not None:
            self.finished.set()

    def start(self) -> None:
        """Start, and return once the first step is under way."""
        self._thread.start()
        wait_until("the witness's first step", lambda: self.steps_started >= 1)

    def stop(self) -> None:
        """Stop at the next step (if started) and wait for the thread."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
