"""Shared dependencies: settings, Redis, job store, queue, storage, and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import redis
from fastapi import Depends, Request

from service.api.problems import Problem
from service.config import Settings
from service.jobs.queue import TaskQueue
from service.jobs.records import JobStore
from service.jobs.storage import LocalStorage


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    queue: TaskQueue
    storage: LocalStorage


    @classmethod
    def connect(cls, settings: Settings) -> Services:
        r = redis.Redis.from_url(settings.redis_url)
        return cls(settings, r, JobStore(r, settings.redis_prefix, settings.job_ttl_s),
                   TaskQueue(r, settings.redis_prefix, settings.visibility_timeout_s),
                   LocalStorage(settings.data_dir))


def services(request: Request) -> Services:
    return request.app.state.services


def caller(request: Request, svc: Services = Depends(services)) -> str:
    """The owner id of the caller: a hash of its API key, or "" when keys are off."""
    keys = svc.settings.api_key_list
    if not keys:
        return ""
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not any(hmac.compare_digest(given, k) for k in keys):
        raise Problem(401, "a valid API key is required (header X-API-Key or Authorization: Bearer)")
    return hashlib.sha256(given.encode()).hexdigest()[:24]
