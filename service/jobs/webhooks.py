"""Webhooks: a POST to the job's `callback_url` when it succeeds or fails.

The body is the job's JSON (id, status, error, tracks, links). With `webhook_secret` set it is
signed as Stripe and GitHub do: `X-Stemseg-Signature: sha256=HMAC_SHA256(secret, f"{ts}.{body}")`
with the Unix time in `X-Stemseg-Timestamp`, so a receiver can check both origin and age
(replays). A delivery that fails (connection error, timeout, non-2xx) is retried with
exponential backoff up to `webhook_attempts` times; every attempt is recorded on the job
(`webhook.attempts`) as its status code, "connection failed", "timed out" or, for a target the
allow-list no longer names (it is checked again at delivery), "not allowed"; `webhook_timeout_s`
bounds a whole attempt, not each socket read. Targets are listed as host:port
(service.jobs.targets). Delivery runs in a thread of the worker that ended the job: if that
worker dies mid-retry, the remaining attempts are lost (the job's state is still right).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from service.jobs.deadline import cut_at
from service.jobs.record import JobRecord
from service.jobs.targets import check_target, split_url

log = logging.getLogger("stemseg.webhooks")

TIMESTAMP_HEADER = "X-Stemseg-Timestamp"
SIGNATURE_HEADER = "X-Stemseg-Signature"
_DEFAULT_PORTS = {"http": 80, "https": 443}
CONNECTION_FAILED = "connection failed"
TIMED_OUT = "timed out"
NOT_ALLOWED = "not allowed"  # the host or port left STEMSEG_WEBHOOK_HOSTS after the job was made


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def check_callback_url(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be used as a callback (None: it may). Only http(s) to a listed host and
    port (a host listed alone: its scheme's default port), so the service can be turned neither
    into a proxy into the network it runs in nor into a scanner of a host's ports."""
    parts = split_url(url, "callback_url")
    if isinstance(parts, str):
        return parts
    return check_target(parts, "callback_url", _DEFAULT_PORTS, allowed_hosts, "STEMSEG_WEBHOOK_HOSTS")


def _post(url: str, data: bytes, headers: dict[str, str], deadline_s: float) -> int:
    """POST and return the status; the whole attempt (connect, send, the answer's status line
    and headers) ends at `deadline_s`: a receiver trickling bytes is cut off then (TimeoutError)."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, port, timeout=deadline_s, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=deadline_s)
    try:
        with cut_at(conn, deadline_s) as expired:
            try:
                conn.connect()
                if expired.is_set():
                    raise TimeoutError
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request("POST", target, body=data, headers=headers)
                status = conn.getresponse().status
                if expired.is_set():
                    raise TimeoutError
                return status
            except Exception:
                if expired.is_set():
                    raise TimeoutError from None
                raise
    finally:
        conn.close()


def payload(job: JobRecord) -> dict[str, Any]:
    jid = job.id
    return {"id": jid, "status": job.status.value, "error": job.error, "tracks": job.tracks,
            "finished_at": job.finished_at,
            "links": {"self": f"/v1/jobs/{jid}", "result": f"/v1/jobs/{jid}/result"}}


class Notifier:
    """Delivers one job's webhook with retries, recording each attempt through `record`."""

    def __init__(self, secret: str, attempts: int, backoff_s: float, timeout_s: float,
                 allowed_hosts: list[str] | None = None) -> None:
        self.secret, self.attempts, self.backoff_s, self.timeout_s = secret, attempts, backoff_s, timeout_s
        # Checked again at delivery: a job stored before the list was narrowed keeps its old URL.
        self.allowed_hosts = allowed_hosts

    def deliver(self, url: str, body: dict[str, Any], record: Any) -> bool:
        """Up to `attempts` POSTs, each bounded as a whole by `timeout_s`. An attempt records the
        status code, or "connection failed" / "timed out": never what the peer said, which would
        tell a tenant what listens where."""
        data = json.dumps(body).encode()
        delay = self.backoff_s
        tries: list[dict[str, Any]] = []
        if self.allowed_hosts is not None and check_callback_url(url, self.allowed_hosts):
            log.warning("webhook to %r not sent: no longer allowed (STEMSEG_WEBHOOK_HOSTS)", _where(url))
            tries.append({"at": time.time(), "status": None, "error": NOT_ALLOWED})
            try:
                record({"url": url, "delivered": False, "attempts": tries})
            except Exception as e:  # noqa: BLE001 (as below)
                log.warning("could not record webhook attempt 1 to %r (%s)", _where(url), type(e).__name__)
            return False
        for n in range(1, self.attempts + 1):
            attempt: dict[str, Any] = {"at": time.time(), "status": None, "error": None}
            try:
                ts = str(int(time.time()))
                headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, "User-Agent": "stemseg-serve"}
                if self.secret:
                    headers[SIGNATURE_HEADER] = signature(self.secret, ts, data)
                attempt["status"] = _post(url, data, headers, self.timeout_s)
            except TimeoutError:
                attempt["error"] = TIMED_OUT
            except Exception as e:  # noqa: BLE001 (refused, reset, TLS, a malformed answer: one outcome)
                attempt["error"] = CONNECTION_FAILED
                log.info("webhook attempt %d to %r: %s", n, _where(url), type(e).__name__)
            ok = attempt["status"] is not None and 200 <= attempt["status"] < 300
            tries.append(attempt)
            try:
                record({"url": url, "delivered": ok, "attempts": tries})
            except Exception as e:  # noqa: BLE001 (recording must not end the deliveries)
                log.warning("could not record webhook attempt %d to %r (%s)", n, _where(url), type(e).__name__)
            if ok:
                return True
            if n < self.attempts:
                time.sleep(delay)
                delay *= 2
        log.warning("webhook to %r failed %d times", _where(url), self.attempts)
        return False

    def deliver_in_background(self, url: str, body: dict[str, Any], record: Any) -> threading.Thread:
        t = threading.Thread(target=self._safe, args=(url, body, record), daemon=True, name="webhook")
        t.start()
        return t

    def _safe(self, url: str, body: dict[str, Any], record: Any) -> None:
        try:
            self.deliver(url, body, record)
        except Exception as e:  # noqa: BLE001 (a webhook must never take a worker down)
            log.error("webhook to %r: %s", _where(url), type(e).__name__)


def _where(url: str) -> str:
    """scheme://host:port of a callback, for logs (the path and query are the tenant's)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or _DEFAULT_PORTS.get(parts.scheme, '')}"
    except ValueError:
        return "an invalid URL"
