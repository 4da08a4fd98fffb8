"""The job lifecycle against the real Redis: state machine, plan, quota, TTLs, gauges, the
sweeper, and the worker's one outcome per task (in-process worker, real model and video)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from service_env import REDIS_URL, drop_prefix, in_process_worker, new_prefix
from videos import make_video

from service.config import Settings
from service.jobs.keys import Keys, valid_job_id
from service.jobs.lifecycle import JobPlan, Jobs, JobStatus, Limits, QuotaExceeded, RateLimited, Refused
from service.jobs.record import JobRecord
from service.jobs.redis_clients import sync_client
from service.jobs.s3_storage import S3Storage
from service.jobs.storage import LocalStorage
from service.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def r(store_url: str):
    client = sync_client(store_url)
    yield client
    client.close()


@pytest.fixture
def jobs(request: pytest.FixtureRequest, r, tmp_path: Path, store_url: str) -> Iterator[Jobs]:
    """Jobs on the data directory, or (tests marked `ON_BOTH_STORES`) on each job store in turn."""
    prefix = new_prefix()
    if getattr(request, "param", "local") == "s3":
        storage = S3Storage.from_settings(Settings(**request.getfixturevalue("s3_settings")))
    else:
        storage = LocalStorage(tmp_path / "data")
    yield Jobs(r, prefix, 1000, storage, visibility_timeout_s=3)
    drop_prefix(prefix, store_url)


# The lifecycle tests that touch the job's files run on both job stores.
ON_BOTH_STORES = pytest.mark.parametrize("jobs", ["local", "s3"], indirect=True)


def _plan(num_clips: int = 3) -> JobPlan:
    return JobPlan(preset="kitti_mots", clip_len=8, overlap=4, min_dim=None, num_clips=num_clips, clips_per_task=2)


def _create(jobs: Jobs, owner: str = "", quota: int = 0) -> str:
    job_id = jobs.new_id()
    jobs.storage.write(job_id, "video", b"not looked at here")
    jobs.create(jobs.new_record(job_id, owner, _plan(), num_frames=20, width=64, height=48, formats=["ytvis"]), quota)
    return job_id


def test_api_process_never_imports_torch(tmp_path: Path, redis_prefix: str) -> None:
    code = ("import sys\n"
            "from fastapi.testclient import TestClient\n"
            "from service.api.main import create_app\n"
            "from service.config import Settings\n"
            f"app = create_app(Settings(redis_url={REDIS_URL!r}, redis_prefix={redis_prefix!r}, "
            f"data_dir={str(tmp_path / 'data')!r}))\n"
            "TestClient(app).get('/healthz')\n"
            "assert app.state.model_cfg.name == 'lite', app.state.model_cfg.name\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_keys_and_ids() -> None:
    k = Keys("p")
    assert k.job("a" * 32) == "p:job:{" + "a" * 32 + "}" and k.events("x") == "p:job:{x}:events"
    # Hash tags: a job's keys in its id's slot, the shared keys in the prefix's.
    assert {k.job("x"), k.events("x"), k.lock("x"), k.timeline("x")} == {f"p:job:{{x}}{s}" for s in
                                                                         ("", ":events", ":lock", ":timeline")}
    assert all(key.startswith("{p}:") for key in (k.tasks, k.state("queued"), k.active("o"), k.owner_jobs("o"),
                                                  k.rate("o", 1), k.worker("w"), k.clip_stats, k.sweep))
    with pytest.raises(ValueError):
        Keys("a{b}")
    assert valid_job_id(uuid.uuid4().hex)
    for bad in ("", "nope", "a" * 31, "A" * 32, "a" * 32 + ":events", "../" + "a" * 29, "a" * 33):
        assert not valid_job_id(bad), bad


@ON_BOTH_STORES
def test_state_machine_counts_and_ttl_from_end(jobs: Jobs, r) -> None:
    a, b = _create(jobs, "o1"), _create(jobs, "o1")
    assert jobs.get(a).status == JobStatus.QUEUED and jobs.get(a).plan == _plan()
    assert jobs.counts() == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert jobs.queue.depth() == 4  # 3 clips in runs of 2, per job
    assert not jobs.finish(a, tracks=[{"id": 1}])  # queued cannot succeed without running
    assert jobs.start(a) and not jobs.start(a)
    r.expire(jobs.keys.job(a), 5)  # as if most of the TTL had passed while it ran
    lock = jobs.keys.lock(a)
    r.set(lock, "someone else", px=5000)
    assert not jobs.finish(a, tracks=[{"id": 1}], fence=(lock, "mine"))  # fenced: only the lock's holder
    r.set(lock, "mine", px=5000)
    assert jobs.finish(a, tracks=[{"id": 1}, {"id": 2}, {"id": 3}], fence=(lock, "mine"))
    assert not jobs.finish(a, tracks=[{"id": 1}], fence=(lock, "mine"))  # and only once
    assert jobs.get(a).tracks == 3
    events = [(e[1][b"type"], json.loads(e[1][b"data"])) for e in r.xrange(jobs.keys.events(a))]
    # The tracks are announced with the end, after it: never before, never without it.
    assert [k for k, _ in events] == [b"status", b"status", b"status", b"track", b"track", b"track"]
    assert events[2][1]["status"] == "succeeded" and [d["id"] for _, d in events[3:]] == [1, 2, 3]
    assert r.ttl(jobs.keys.job(a)) > 900 and r.ttl(jobs.keys.events(a)) > 900  # restarted at the end
    assert not jobs.fail(a, "late") and not jobs.start(a)  # final states are never left
    assert jobs.fail(b, "bad video")
    assert jobs.get(b).error == "bad video"
    assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    jobs.cancel(a)
    assert jobs.get(a) is None and a not in list(jobs.storage.jobs())
    assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 1, "cancelled": 0}
    kinds = [e[1][b"type"] for e in r.xrange(jobs.keys.events(b))]
    assert kinds == [b"status", b"status"]  # queued, failed
    # Every key of a job carries a TTL.
    for key in (k for pattern in jobs.keys.patterns for k in r.scan_iter(pattern)):
        name = key.decode()
        if ":state:" in name or name == jobs.keys.tasks:
            continue  # the stated exceptions (keys.py)
        assert r.ttl(key) > 0, name


def test_quota_rate_limit_and_listing(jobs: Jobs, r) -> None:
    ids = [_create(jobs, "k", quota=2) for _ in range(2)]
    with pytest.raises(QuotaExceeded):
        _create(jobs, "k", quota=2)
    jobs.check_quota("other", 2)  # other keys are not affected
    jobs.fail(ids[0], "x")  # an ended job frees its place
    _create(jobs, "k", quota=2)
    for _ in range(3):
        jobs.check_rate("k", 3, 60)
    with pytest.raises(RateLimited) as e:
        jobs.check_rate("k", 3, 60)
    assert 1 <= e.value.retry_after_s <= 61
    total, listed = jobs.list("k", 0, 10)
    assert total == 3 and {j.id for j in listed} >= set(ids[1:])
    r.delete(jobs.keys.job(ids[1]))  # as if expired
    total, listed = jobs.list("k", 0, 10)
    assert total == 2 and ids[1] not in {j.id for j in listed}


@ON_BOTH_STORES
def test_gauges_never_count_expired_jobs_and_sweeper_deletes_orphans(jobs: Jobs, r, tmp_path: Path) -> None:
    a, b = _create(jobs), _create(jobs)
    jobs.start(b)
    r.delete(jobs.keys.job(a), jobs.keys.job(b))  # both expired unfinished
    assert jobs.counts() == dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    jobs.storage.write("upload-" + uuid.uuid4().hex, "video", b"half an upload")
    alive = _create(jobs)
    young = jobs.sweep(grace_s=3600, consumer_idle_s=3600)
    assert young["job_dirs"] == 0 and young["expired_ids"] == 2  # young files are left alone
    assert r.scard(jobs.keys.state("queued")) == 1 and r.scard(jobs.keys.state("running")) == 0
    assert jobs.sweep(grace_s=-1, consumer_idle_s=3600)["job_dirs"] == 3
    assert sorted(jobs.storage.jobs()) == [alive]
    # A consumer that holds nothing and has been idle is removed; one holding a task is kept.
    jobs.queue.take("dead-worker", block_ms=10)
    jobs.queue.r.xgroup_createconsumer(jobs.keys.tasks, "workers", "idle-worker")
    assert jobs.sweep(grace_s=3600, consumer_idle_s=-1)["consumers"] == 1
    names = {c["name"].decode() for c in r.xinfo_consumers(jobs.keys.tasks, "workers")}
    assert names == {"dead-worker"}


def test_record_is_its_own_encoding_and_names_every_field(jobs: Jobs, r) -> None:
    a = _create(jobs, "o")
    raw = r.hgetall(jobs.keys.job(a))
    assert JobRecord.from_redis(raw) == jobs.get(a) and jobs.get(a).to_redis() == {
        k.decode(): v.decode() for k, v in raw.items()}
    with pytest.raises(ValueError, match="no field"):
        jobs.update(a, num_frame=3)  # a misspelt field never reaches Redis
    with pytest.raises(ValueError, match="state machine"):
        jobs.update(a, status="succeeded")  # only a transition writes the status
    with pytest.raises(ValueError, match="counter"):
        jobs.incr(a, "width")
    assert jobs.get(a).status == JobStatus.QUEUED and jobs.get(a).num_frames == 20


def test_change_whose_process_died_between_its_two_steps_is_reconciled(jobs: Jobs, r, monkeypatch) -> None:
    a = _create(jobs, "o", quota=1)
    jobs.start(a)
    real_move = jobs._move

    def died(*args) -> None:  # the job's side is written, the shared side never is
        raise ConnectionError("killed")

    monkeypatch.setattr(jobs, "_move", died)
    with pytest.raises(ConnectionError):
        jobs.fail(a, "x")
    monkeypatch.setattr(jobs, "_move", real_move)
    assert jobs.get(a).status == JobStatus.FAILED and r.sismember(jobs.keys.state("running"), a)
    assert jobs.counts()["running"] == 0  # unfinished states are counted by their records
    with pytest.raises(QuotaExceeded):  # the ended job still holds the quota, until the sweep
        jobs.check_quota("o", 1)
    assert jobs.sweep(grace_s=3600, consumer_idle_s=3600)["moved_ids"] == 1
    assert not r.sismember(jobs.keys.state("running"), a) and r.sismember(jobs.keys.state("failed"), a)
    assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 0, "failed": 1, "cancelled": 0}
    jobs.check_quota("o", 1)
    assert jobs.sweep(grace_s=3600, consumer_idle_s=3600)["moved_ids"] == 0


@ON_BOTH_STORES
def test_admit_refuses_over_limits_and_leaves_nothing(jobs: Jobs, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 30, 64, 48)
    cfg = get_preset("kitti_mots")

    def admit(limits: Limits) -> JobRecord:
        staging = "upload-" + uuid.uuid4().hex
        jobs.storage.write(staging, "video", video.read_bytes())
        return jobs.admit(staging, "", model=cfg, min_dim=None, clips_per_task=2, limits=limits, quota=0,
                          fields={"formats": ["ytvis"], "filename": "v.mp4"})

    with pytest.raises(Refused) as e:
        admit(Limits(10**9, 29, 1e9))
    assert e.value.status == 413 and "29" in e.value.detail and "MAX_FRAMES" in e.value.detail
    with pytest.raises(Refused) as e:
        admit(Limits(10**9, 10**6, 1.0))
    assert e.value.status == 413 and "MAX_DURATION_S" in e.value.detail
    with pytest.raises(Refused) as e:
        admit(Limits(100, 10**6, 1e9))
    assert e.value.status == 400 and str(tmp_path) not in e.value.detail and "the upload" in e.value.detail
    assert list(jobs.storage.jobs()) == []
    job = admit(Limits(10**9, 10**6, 1e9))
    assert job.plan == JobPlan(preset="kitti_mots", clip_len=8, overlap=4, min_dim=None, num_clips=7,
                               clips_per_task=2)
    assert jobs.get(job.id) == job
    assert list(jobs.storage.jobs()) == [job.id]


# -- the worker, in process ----------------------------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def worker(request: pytest.FixtureRequest, small_weights: Path, tmp_path: Path, store_url: str):
    """An in-process worker on each job store: the data directory, then S3 (a real SeaweedFS)."""
    store = request.getfixturevalue("s3_settings") if request.param == "s3" else {}
    with in_process_worker(small_weights, tmp_path / "data", "w-test", redis_url=store_url, **store) as w:
        yield w


def _admit(worker, video: Path, clip_len: int | None = None, overlap: int | None = None) -> str:
    from dataclasses import replace

    cfg = worker.engine.cfg
    if clip_len:
        cfg = replace(cfg, clip_len=clip_len, overlap=overlap)
    staging = "upload-" + uuid.uuid4().hex
    worker.storage.write(staging, "video", video.read_bytes())
    return worker.jobs.admit(staging, "", model=cfg, min_dim=None, clips_per_task=2,
                             limits=Limits(10**9, 10**6, 1e9), quota=0,
                             fields={"formats": ["ytvis"], "filename": "v.mp4"}).id


def _drain(worker, job_id: str, steps: int = 30) -> JobRecord:
    for _ in range(steps):
        job = worker.jobs.get(job_id)
        if job is None or job.final:
            return job
        worker.step()
    return worker.jobs.get(job_id)


def test_worker_runs_the_stored_plan(worker, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 13, 64, 48)
    job_id = _admit(worker, video, clip_len=6, overlap=2)  # not the model's 8/4: the plan wins
    job = _drain(worker, job_id)
    assert job.status == "succeeded", job
    assert job.num_clips == 3 and job.clips_done == 3 and job.frames_done == 13
    assert worker.jobs.counts()["succeeded"] == 1 and worker.jobs.queue.depth() == 0


def test_worker_outcomes_no_space_and_bad_video(worker, tmp_path: Path, monkeypatch) -> None:
    from service.jobs import worker as worker_module

    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job_id = _admit(worker, video)
    real_write = worker.storage.write

    def full_disk(job, name, data):  # what the kernel says when the volume is full
        if name.startswith("clips/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(job, name, data)

    monkeypatch.setattr(worker.storage, "write", full_disk)
    job = _drain(worker, job_id)
    assert job.status == "failed" and job.error == worker_module.NO_SPACE
    assert worker.jobs.queue.depth() == 0  # a failed task is acknowledged, not redelivered
    monkeypatch.setattr(worker.storage, "write", real_write)

    job_id = _admit(worker, video)
    # The file goes bad after admission (e.g. a disk error): the job fails naming the video, not a path.
    worker.storage.write(job_id, "video", b"garbage" * 100)
    from service.video.decode import clear_cache
    clear_cache()
    job = _drain(worker, job_id)
    assert job.status == "failed" and job.error.startswith("video:"), job
    assert str(worker.settings.data_dir) not in job.error


def test_deleted_running_job_leaves_no_files(worker, tmp_path: Path, monkeypatch) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 21, 64, 48)
    job_id = _admit(worker, video)
    real_write = worker.storage.write

    def delete_midway(job, name, data):  # the user deletes the job while its first clip is written
        real_write(job, name, data)
        if name.startswith("clips/"):
            worker.jobs.cancel(job)

    monkeypatch.setattr(worker.storage, "write", delete_midway)
    worker.step()
    assert worker.jobs.get(job_id) is None
    assert job_id not in list(worker.storage.jobs())
    for _ in range(4):  # its other tasks are skipped and leave nothing either
        worker.step()
    assert list(worker.storage.jobs()) == []
    assert worker.jobs.queue.depth() == 0


def test_stemseg_serve_process_has_no_torch(tmp_path: Path, lite_weights: Path) -> None:
    """The real `stemseg serve` process: no torch library mapped into it."""
    from service_env import ServiceEnv

    env = ServiceEnv(tmp_path, lite_weights)
    try:
        env.start_api()
        maps = Path(f"/proc/{env.procs[0].pid}/maps").read_text()
        assert "libtorch" not in maps and "torch/lib" not in maps
    finally:
        env.close()


def test_worker_concurrency_two_slots_share_one_engine(small_weights: Path, tmp_path: Path, redis_prefix: str) -> None:
    import threading
    import time

    from service.jobs.worker import Worker

    s = Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=tmp_path / "data",
                 weights=small_weights, device="cpu", visibility_timeout_s=3, clips_per_task=2, sweep_interval_s=3600,
                 worker_concurrency=2)
    w = Worker(s, name="w-two")
    executed_on: set[str] = set()
    real_execute = w.execute

    def execute(task):
        executed_on.add(threading.current_thread().name)
        return real_execute(task)

    w.execute = execute
    video = tmp_path / "v.mp4"
    make_video(video, 21, 64, 48)
    runner = threading.Thread(target=w.run, kwargs={"install_signals": False})
    try:
        runner.start()
        while not hasattr(w, "coordinator"):
            time.sleep(0.05)
        ids = [_admit(w, video) for _ in range(2)]
        deadline = time.monotonic() + 240
        while any(w.jobs.get(i).status not in ("succeeded", "failed") for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [w.jobs.get(i).status for i in ids] == ["succeeded"] * 2
        results = [w.storage.read(i, "out/results.json") for i in ids]
        assert results[0] == results[1]
        assert len(executed_on) == 2, executed_on  # both slots ran tasks, side by side on one engine
    finally:
        w.stopping.set()
        runner.join(30)
        client = redis.Redis.from_url(REDIS_URL)
        assert not {c["name"] for c in client.xinfo_consumers(Keys(s.redis_prefix).tasks, "workers")}  # deregistered
        client.close()


def test_worker_runs_the_sweeper(worker) -> None:
    orphan = uuid.uuid4().hex  # files of a job whose record expired
    worker.storage.write(orphan, "video", b"old")
    worker.settings.sweep_grace_s = -1
    worker._next_sweep = 0.0
    worker.step()
    assert list(worker.storage.jobs()) == []
    assert worker.r.ttl(worker.jobs.keys.sweep) > 0  # the lease: one worker sweeps per interval


def test_an_output_task_done_while_the_stitcher_holds_the_lease_still_finishes(worker, tmp_path: Path) -> None:
    # A worker with several slots: the stitcher queues the output tasks and, before it releases
    # the lease, another slot renders the (only) range and finds the lease held. The job must
    # still finish: the holder looks again once it has released the lease.
    video = tmp_path / "v.mp4"
    make_video(video, 12, 64, 48)
    job_id = _admit(worker, video)
    coordinator = worker.coordinator
    real = coordinator._hand_out_outputs
    ran: list[str] = []

    def hand_out_then_render_meanwhile(*args, **kwargs) -> None:
        real(*args, **kwargs)
        task = worker.queue.take(worker.consumers[0], block_ms=100)  # the output task, lease still held
        assert task is not None and task.kind == "outputs"
        worker.settle(task, worker.execute(task))
        ran.append(task.kind)
        assert not worker.jobs.get(job_id).final  # it could not finish: the lease is held

    coordinator._hand_out_outputs = hand_out_then_render_meanwhile
    job = _drain(worker, job_id)
    assert ran == ["outputs"]
    assert job.status == JobStatus.SUCCEEDED, job
