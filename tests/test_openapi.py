"""The OpenAPI document tells the truth: schemathesis generates requests from it (valid and
invalid) against the real app and Redis, with a bounded budget per operation, and every
response must be a documented status with a documented media type and schema, never a 5xx."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_env import REDIS_URL, drop_prefix, new_prefix

from service.api.main import create_app
from service.config import Settings
from service.jobs.keys import Keys
from service.jobs.lifecycle import JobPlan
from service.jobs.stream_record import StreamStatus
from service.model.presets import get_preset

# Per operation and mode: about 500 cases in all; raise it for a longer run.
EXAMPLES_PER_OPERATION = int(os.environ.get("STEMSEG_SCHEMATHESIS_EXAMPLES", "25"))
STATUSES: Counter = Counter()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    s = Settings(redis_url=REDIS_URL, redis_prefix=new_prefix(),
                 data_dir=Path(tmp_path_factory.mktemp("data")), max_upload_bytes=100_000, rate_limit_jobs=0)
    app = create_app(s, model_cfg=get_preset("kitti_mots"))
    # A live worker's heartbeat, so /readyz answers 200 (its 503 is for a service without workers).
    redis.Redis.from_url(REDIS_URL).set(Keys(s.redis_prefix).worker("schemathesis"), 1, ex=3600)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.app = app
    yield schema
    drop_prefix(s.redis_prefix)
    leftovers = [p for p in (s.data_dir / "jobs").iterdir() if p.name.startswith("upload-")]
    assert leftovers == [], leftovers


def _run(operation, mode: GenerationMode, failures: list[str], **fixed) -> int:
    seen = {"n": 0}

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        seen["n"] += 1
        try:
            response = case.call_and_validate(checks=CHECKS)
            STATUSES[(operation.label, response.status_code)] += 1
        except (AssertionError, FailureGroup) as e:  # collect: one run reports every failure
            failures.append(f"{operation.label} [{mode.value}]: {type(e).__name__}: {str(e)[:400]}")

    try:
        check()
    except Unsatisfiable:  # nothing to negate (an operation without parameters)
        assert mode == GenerationMode.NEGATIVE
    return seen["n"]


# Loops over the operations here rather than with schemathesis' pytest plugin, which does not
# load under this pytest version.
def test_api_matches_its_openapi(api_schema) -> None:
    failures: list[str] = []
    cases = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases += _run(operation, mode, failures)
    # Random ids only ever meet 404: once more on a real (failed) job, DELETE last.
    jobs = api_schema.app.state.services.jobs
    job_id = jobs.new_id()
    jobs.storage.write(job_id, "video", b"x")
    jobs.create(jobs.new_record(job_id, "", JobPlan("kitti_mots", 8, 4, None, 1, 8), num_frames=3, width=64,
                                height=48, formats=["ytvis"]))
    jobs.fail(job_id, "seeded for the OpenAPI test")
    with_id = sorted((r.ok() for r in api_schema.get_all_operations() if "{job_id}" in r.ok().path),
                     key=lambda op: op.method == "delete")
    for operation in with_id:
        cases += _run(operation, GenerationMode.POSITIVE, failures, path_parameters={"job_id": job_id})
    # And on a real (failed) live stream.
    streams = api_schema.app.state.services.streams
    stream = streams.create("", "http://127.0.0.1:9/x.ts", ["ytvis"], 60.0, "kitti_mots", 0)
    streams.transition(stream.id, StreamStatus.FAILED, error="seeded for the OpenAPI test")
    with_stream = sorted((r.ok() for r in api_schema.get_all_operations() if "{stream_id}" in r.ok().path),
                         key=lambda op: op.method == "delete")
    assert with_stream
    for operation in with_stream:
        cases += _run(operation, GenerationMode.POSITIVE, failures, path_parameters={"stream_id": stream.id})
    print(f"{cases} cases:", sorted(STATUSES.items()))
    assert cases > 300
    assert failures == [], "\n".join(failures[:30])
