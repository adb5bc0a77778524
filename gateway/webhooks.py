"""Job callbacks, signed as Standard Webhooks specifies, delivered with retries."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from gateway.schemas import JobStatus

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """The receiver answered with a non-2xx status."""

    pass


def signed_headers(secret: str, msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature (HMAC over id, timestamp, body)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }


async def deliver(
    url: str, job: JobStatus, secret: str, *, attempts: int, timeout_s: float
) -> None:
    """POST the finished job; retried with backoff on network errors and non-2xx answers."""
    body = job.model_dump_json()
    msg_id = f"msg_{job.id}_{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=30),
            retry=retry_if_exception_type((httpx.HTTPError, DeliveryFailed)),
            reraise=True,
        ):
            with attempt:
                headers = signed_headers(secret, msg_id, body, datetime.now(UTC))
                reply = await client.post(url, content=body, headers=headers)
                if not reply.is_success:
                    raise DeliveryFailed(f"{url} answered {reply.status_code}")
    log.info("delivered %s to %s", job.id, url)
