"""Job callbacks, signed as Standard Webhooks specifies: one delivery attempt.

Retries across minutes and hours, and across worker restarts, are the outbox's
(`gateway.callbacks`). An attempt follows no redirects and reads at most a bounded part of
the receiver's answer, so a receiver cannot hold a worker or fill its memory.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from gateway.schemas import JobStatus


class DeliveryFailed(Exception):
    """The receiver answered with a non-2xx status."""


def signed_headers(secrets: list[str], msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature: one HMAC over id, timestamp and
    body per secret, space-separated (during a rotation a receiver holds either secret)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(msg_id, now, body) for s in secrets),
        "content-type": "application/json",
    }


async def deliver_once(
    client: httpx.AsyncClient,
    url: str,
    connect_to: str,
    job: JobStatus,
    secrets: list[str],
    msg_id: str,
    *,
    max_response_bytes: int,
) -> None:
    """POST the job to `url` once, connecting to the address `connect_to` (checked by the
    caller) whatever the name resolves to now; DeliveryFailed for a non-2xx answer, httpx
    errors as raised.

    The request keeps the URL's host in its Host header and, over TLS, in SNI and the
    certificate check. At most `max_response_bytes` of the answer are read; the rest is
    dropped with the connection.
    """
    body = job.model_dump_json()
    target = httpx.URL(url)
    pinned = target.copy_with(host=connect_to)
    headers = {
        **signed_headers(secrets, msg_id, body, datetime.now(UTC)),
        "host": target.netloc.decode("ascii"),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    request = client.build_request(
        "POST", pinned, content=body, headers=headers, extensions=extensions
    )
    reply = await client.send(request, stream=True)
    try:
        read = 0
        async for chunk in reply.aiter_raw():
            read += len(chunk)
            if read >= max_response_bytes:
                break
    finally:
        await reply.aclose()
    if not reply.is_success:
        raise DeliveryFailed(f"{url} answered {reply.status_code}")
