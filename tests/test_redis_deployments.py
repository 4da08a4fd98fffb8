"""The service on a real Redis Cluster of three masters and behind a real Sentinel: API and
worker processes (`stemseg serve` / `stemseg worker`) given a `redis+cluster://` or
`redis+sentinel://` URL, a whole job with its events, a worker killed with SIGKILL mid-task, a
master stopped and started again mid-job. (The lifecycle tests of test_jobs.py run on the
cluster too: the `store_url` fixture.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from redis_cluster import LocalCluster, cluster_port, start_server
from service_env import ServiceEnv
from videos import make_video

from service.jobs.keys import Keys
from service.jobs.redis_url import CLUSTER, SENTINEL, SINGLE, parse_redis_url


def _env(tmp_path: Path, weights: Path, url: str) -> ServiceEnv:
    return ServiceEnv(tmp_path, weights, STEMSEG_REDIS_URL=url)


def _upload(env: ServiceEnv, path: Path) -> str:
    with path.open("rb") as f:
        r = httpx.post(f"{env.base}/v1/jobs", files={"file": (path.name, f, "video/mp4")}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _tracks(env: ServiceEnv, job_id: str) -> list[dict]:
    r = httpx.get(f"{env.base}/v1/jobs/{job_id}/result", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tracks"]


def test_redis_urls_name_the_deployment() -> None:
    assert parse_redis_url("redis://127.0.0.1:6379/3").kind == SINGLE
    c = parse_redis_url("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001")
    assert (c.kind, c.nodes, c.password) == (CLUSTER, (("10.0.0.1", 7000), ("10.0.0.2", 7001)), "secret")
    s = parse_redis_url("rediss+sentinel://a:26379,b:26380/mymaster/2")
    assert (s.kind, s.nodes, s.service, s.db, s.tls) == (SENTINEL, (("a", 26379), ("b", 26380)), "mymaster", 2, True)
    for bad in ("http://x", "redis+cluster://h:1/0", "redis+cluster://h", "redis+sentinel://h:1",
                "redis+sentinel://h:1/m/x", "redis+cluster://:pw@h:99999"):
        with pytest.raises(ValueError) as e:
            parse_redis_url(bad)
        assert "pw" not in str(e.value)  # a password is never echoed


def test_job_on_a_cluster_spreads_jobs_and_keeps_each_jobs_keys_together(redis_cluster: LocalCluster,
                                                                          tmp_path: Path, small_weights: Path) -> None:
    video = tmp_path / "clip.mp4"
    make_video(video, 21, 64, 48)
    env = _env(tmp_path, small_weights, redis_cluster.url)
    try:
        env.start_api()
        env.start_worker()
        ids = [_upload(env, video) for _ in range(3)]
        jobs = [env.wait(i) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
        assert all(j["progress"]["frames_done"] == 21 for j in jobs)
        assert _tracks(env, ids[0]) == _tracks(env, ids[1])
        events = httpx.get(f"{env.base}/v1/jobs/{ids[0]}/events", timeout=30).text
        assert "event: frame" in events and "event: track" in events and "event: end" in events
        listed = httpx.get(f"{env.base}/v1/jobs").json()
        assert listed["total"] == 3 and {j["id"] for j in listed["items"]} == set(ids)
        metrics = httpx.get(f"{env.base}/metrics").text
        assert 'stemseg_jobs{state="succeeded"} 3.0' in metrics and 'stemseg_jobs{state="running"} 0.0' in metrics
        assert httpx.get(f"{env.base}/readyz").json()["workers"] == 1
        # A job's keys sit on one master (its id's slot), the shared keys on the prefix's.
        k = Keys(env.prefix)
        for i in ids:
            assert len({redis_cluster.master_of(key) for key in (k.job(i), k.events(i), k.timeline(i))}) == 1
        assert len({redis_cluster.master_of(key) for key in (k.tasks, k.state("succeeded"), k.active(""))}) == 1
        assert httpx.delete(f"{env.base}/v1/jobs/{ids[2]}").status_code == 204
        assert not env.redis.exists(k.job(ids[2]), k.events(ids[2]))
        assert not env.redis.sismember(k.state("succeeded"), ids[2])
    finally:
        env.close()


@pytest.mark.slow
def test_worker_killed_mid_task_on_a_cluster_job_still_succeeds_with_same_tracks(
        redis_cluster: LocalCluster, tmp_path: Path, small_weights: Path) -> None:
    video = tmp_path / "long.mp4"
    make_video(video, 45, 64, 48)
    env = _env(tmp_path, small_weights, redis_cluster.url)
    try:
        env.start_api()
        undisturbed = env.start_worker()
        first = env.wait(_upload(env, video))
        assert first["status"] == "succeeded"
        expected = _tracks(env, first["id"])
        undisturbed.terminate()
        undisturbed.wait(30)

        victim = env.start_worker()
        job_id = _upload(env, video)
        deadline = time.monotonic() + 120
        while httpx.get(f"{env.base}/v1/jobs/{job_id}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)  # mid-task: its task stays pending in the group
        victim.wait(10)
        env.start_worker()  # takes the orphaned task over (XAUTOCLAIM) after the visibility timeout
        job = env.wait(job_id)
        assert job["status"] == "succeeded", job
        assert _tracks(env, job_id) == expected
        timeline = env.redis.lrange(Keys(env.prefix).timeline(job_id), 0, -1)
        assert any(b'"deliveries": 2' in e for e in timeline)  # the redelivered task is on record
    finally:
        env.close()


@pytest.mark.slow
def test_master_restarted_mid_job_api_503_then_job_completes(tmp_path: Path, small_weights: Path) -> None:
    # A cluster of its own: its master goes down and comes back.
    cluster = LocalCluster(tmp_path / "cluster")
    video = tmp_path / "v.mp4"
    make_video(video, 45, 64, 48)
    env = None
    try:
        cluster.start()
        env = _env(tmp_path, small_weights, cluster.url)
        env.start_api()
        worker = env.start_worker()
        job_id = _upload(env, video)
        deadline = time.monotonic() + 120
        while httpx.get(f"{env.base}/v1/jobs/{job_id}").json()["progress"]["clips_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        master = cluster.master_of(Keys(env.prefix).job(job_id))
        cluster.stop_node(master)  # mid-job: the job's slot has no master

        r = httpx.get(f"{env.base}/v1/jobs/{job_id}", timeout=10)
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
        assert int(r.headers["retry-after"]) > 0
        time.sleep(4)  # past the node timeout: the whole cluster says CLUSTERDOWN; the worker waits
        assert worker.poll() is None
        r = httpx.get(f"{env.base}/metrics", timeout=10)
        assert r.status_code == 503, r.text

        cluster.start_node(master)  # same port, same append-only file and nodes.conf
        cluster.wait_ok()
        job = env.wait(job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["progress"]["frames_done"] == 45
        assert worker.poll() is None
        metrics = httpx.get(f"{env.base}/metrics").text
        assert 'stemseg_jobs{state="running"} 0.0' in metrics and 'stemseg_jobs{state="queued"} 0.0' in metrics
    finally:
        if env is not None:
            env.close()
        cluster.close()


def test_job_behind_sentinel(tmp_path: Path, small_weights: Path) -> None:
    """`redis+sentinel://`: the API and the worker ask a real Sentinel (`redis-server --sentinel`)
    where the master is."""
    master, sentinel = cluster_port(), cluster_port()
    procs = [start_server(master, tmp_path / "master.log", "--dir", str(tmp_path))]
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor stemseg 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds stemseg 2000\n")
    env = _env(tmp_path, small_weights, f"redis+sentinel://127.0.0.1:{sentinel}/stemseg/0")
    try:
        procs.append(start_server(sentinel, tmp_path / "sentinel.log", "--sentinel", conf=conf))
        video = tmp_path / "clip.mp4"
        make_video(video, 21, 64, 48)
        env.start_api()
        env.start_worker()
        job_id = _upload(env, video)
        job = env.wait(job_id)
        assert job["status"] == "succeeded", job
        events = httpx.get(f"{env.base}/v1/jobs/{job_id}/events", timeout=30).text
        assert "event: track" in events and "event: end" in events
        direct = redis.Redis(host="127.0.0.1", port=master)  # the data is on the master Sentinel named
        assert direct.exists(Keys(env.prefix).job(job_id))
        direct.close()
    finally:
        env.close()
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest.mark.slow
def test_sentinel_failover_mid_job_the_job_completes_on_the_promoted_replica(tmp_path: Path,
                                                                             small_weights: Path) -> None:
    """The master stopped mid-job: Sentinel promotes its replica and the API and worker, asking
    Sentinel again, carry the job on there."""
    master, replica, sentinel = cluster_port(), cluster_port(), cluster_port()
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    procs = {"master": start_server(master, tmp_path / "master.log", "--appendonly", "yes",
                                    "--dir", str(tmp_path / "m")),
             "replica": start_server(replica, tmp_path / "replica.log", "--appendonly", "yes",
                                     "--dir", str(tmp_path / "r"), "--replicaof", "127.0.0.1", str(master))}
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor stemseg 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds stemseg 1000\nsentinel failover-timeout stemseg 5000\n")
    env = _env(tmp_path, small_weights, f"redis+sentinel://127.0.0.1:{sentinel}/stemseg/0")
    try:
        procs["sentinel"] = start_server(sentinel, tmp_path / "sentinel.log", "--sentinel", conf=conf)
        video = tmp_path / "v.mp4"
        make_video(video, 45, 64, 48)
        env.start_api()
        worker = env.start_worker()
        job_id = _upload(env, video)
        deadline = time.monotonic() + 120
        while httpx.get(f"{env.base}/v1/jobs/{job_id}").json()["progress"]["clips_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs.pop("master").terminate()  # mid-job
        ask = redis.Redis(host="127.0.0.1", port=sentinel)
        deadline = time.monotonic() + 30
        while int(ask.sentinel_get_master_addr_by_name("stemseg")[1]) != replica:
            assert time.monotonic() < deadline, "Sentinel did not promote the replica"
            time.sleep(0.2)
        ask.close()
        job = env.wait(job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["progress"]["frames_done"] == 45 and worker.poll() is None
        assert "event: track" in httpx.get(f"{env.base}/v1/jobs/{job_id}/events", timeout=30).text
    finally:
        env.close()
        for p in procs.values():
            p.terminate()
            p.wait(10)
