"""Webhooks: a POST to the job's `callback_url` when it succeeds or fails.

The body is the job's JSON (id, status, error, tracks, links). With `webhook_secret` set it is
signed as Stripe and GitHub do: `X-Stemseg-Signature: sha256=HMAC_SHA256(secret, f"{ts}.{body}")`
with the Unix time in `X-Stemseg-Timestamp`, so a receiver can check both origin and age
(replays). A delivery that fails (connection error, timeout, non-2xx) is retried with
exponential backoff up to `webhook_attempts` times; every attempt is recorded on the job
(`webhook.attempts`). Delivery runs in a thread of the worker that ended the job: if that
worker dies mid-retry, the remaining attempts are lost (the job's state is still right).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("stemseg.webhooks")

TIMESTAMP_HEADER = "X-Stemseg-Timestamp"
SIGNATURE_HEADER = "X-Stemseg-Signature"


class _Refuse(urllib.request.HTTPRedirectHandler):
    """A 3xx is a failed delivery, not a hop: following it would reach hosts the allow-list never saw."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def check_callback_url(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be used as a callback (None: it may). Only http(s) to listed hosts,
    so the service cannot be turned into a proxy into the network it runs in."""
    if len(url) > 2048:
        return "callback_url is longer than 2048 characters"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return "callback_url is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "callback_url must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "callback_url must not carry credentials"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host not in allowed_hosts:
        return f"callback_url's host {host!r} is not allowed (STEMSEG_WEBHOOK_HOSTS)"
    return None


def payload(job: dict[str, Any]) -> dict[str, Any]:
    jid = job["id"]
    return {"id": jid, "status": job["status"], "error": job.get("error"), "tracks": job.get("tracks"),
            "finished_at": job.get("finished_at"),
            "links": {"self": f"/v1/jobs/{jid}", "result": f"/v1/jobs/{jid}/result"}}


class Notifier:
    """Delivers one job's webhook with retries, recording each attempt through `record`."""

    def __init__(self, secret: str, attempts: int, backoff_s: float, timeout_s: float) -> None:
        self.secret, self.attempts, self.backoff_s, self.timeout_s = secret, attempts, backoff_s, timeout_s

    def deliver(self, url: str, body: dict[str, Any], record: Any) -> bool:
        data = json.dumps(body).encode()
        delay = self.backoff_s
        tries: list[dict[str, Any]] = []
        for n in range(1, self.attempts + 1):
            ts = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, "User-Agent": "stemseg-serve"}
            if self.secret:
                headers[SIGNATURE_HEADER] = signature(self.secret, ts, data)
            attempt: dict[str, Any] = {"at": time.time(), "status": None, "error": None}
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with _NO_REDIRECTS.open(req, timeout=self.timeout_s) as resp:
                    attempt["status"] = resp.status
            except urllib.error.HTTPError as e:
                attempt["status"] = e.code
            except (urllib.error.URLError, OSError, ValueError) as e:
                attempt["error"] = str(getattr(e, "reason", e))[:200]
            ok = attempt["status"] is not None and 200 <= attempt["status"] < 300
            tries.append(attempt)
            record({"url": url, "delivered": ok, "attempts": tries})
            if ok:
                return True
            if n < self.attempts:
                time.sleep(delay)
                delay *= 2
        log.warning("webhook to %s failed %d times", url, self.attempts)
        return False

    def deliver_in_background(self, url: str, body: dict[str, Any], record: Any) -> threading.Thread:
        t = threading.Thread(target=self._safe, args=(url, body, record), daemon=True, name="webhook")
        t.start()
        return t

    def _safe(self, url: str, body: dict[str, Any], record: Any) -> None:
        try:
            self.deliver(url, body, record)
        except Exception:  # a webhook must never take a worker down
            log.exception("webhook to %s", url)
