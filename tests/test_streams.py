"""Live streams in the service (/v1/streams): the real API and worker processes, the real Redis,
and a real MPEG-TS source served over HTTP on loopback at its own pace (tests/live_server.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from service_env import REDIS_URL, ServiceEnv, drop_prefix, free_port, new_prefix
from videos import make_video

from service.client import Client
from service.config import SHIPPED_WEIGHTS
from service.jobs.redis_clients import sync_client
from service.jobs.storage import LocalStorage
from service.jobs.stream_record import StreamStatus
from service.jobs.streams import StreamLimit, Streams

ROOT = Path(__file__).resolve().parent
FPS = 25
K1, K2 = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}


@contextmanager
def _source(video: Path, port: int, seconds: float) -> Iterator[subprocess.Popen]:
    """The video over HTTP at its pace, from its start on every GET (a camera that restarts)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "live_server.py"), "http", str(video), "--seconds",
                             str(seconds), "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("port"), "the MPEG-TS server did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-videos")
    out = {"short": root / "short.ts", "long": root / "long.ts"}
    make_video(out["short"], 60, 96, 64, container="mpegts", fps=FPS)
    make_video(out["long"], 400, 96, 64, container="mpegts", fps=FPS)
    return out


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def env(tmp_path: Path, port: int):
    e = ServiceEnv(tmp_path, SHIPPED_WEIGHTS, STEMSEG_API_KEYS="k1,k2", STEMSEG_STREAM_HOSTS=f"127.0.0.1:{port}",
                   STEMSEG_SOURCE_PRIVATE_NETS="127.0.0.1/32", STEMSEG_LIVE_RECONNECT_ATTEMPTS="0",
                   STEMSEG_LIVE_BACKLOG="buffer", STEMSEG_LIVE_OPEN_TIMEOUT_S="5")
    yield e
    e.close()


def _create(env: ServiceEnv, port: int, name: str, headers=K1, **body) -> httpx.Response:
    return httpx.post(f"{env.base}/v1/streams", json={"url": f"http://127.0.0.1:{port}/{name}", **body},
                      headers=headers, timeout=30)


def _get(env: ServiceEnv, sid: str, headers=K1) -> dict:
    r = httpx.get(f"{env.base}/v1/streams/{sid}", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(env: ServiceEnv, sid: str, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _get(env, sid)
        if until(rec):
            return rec
        time.sleep(0.2)
    raise TimeoutError(f"stream {sid}: {rec}")


def _ended(rec: dict) -> bool:
    return rec["status"] in ("stopped", "ended", "failed")


def _events(env: ServiceEnv, sid: str) -> list[tuple[str, dict]]:
    """Every event of an ended stream (the SSE stream ends with `end`)."""
    text = httpx.get(f"{env.base}/v1/streams/{sid}/events", headers=K1, timeout=60).text
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_a_stream_runs_to_its_end_with_the_files_tracks(env: ServiceEnv, port: int, videos, tmp_path: Path) -> None:
    env.start_api()
    env.start_worker()
    with _source(videos["short"], port, 60 / FPS):
        r = _create(env, port, "short.ts", formats=["ytvis", "davis", "mots"])
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert r.headers["location"] == f"/v1/streams/{sid}" and r.json()["status"] == "queued"
        # Another key's stream is no stream.
        for method in ("get", "delete"):
            assert getattr(httpx, method)(f"{env.base}/v1/streams/{sid}", headers=K2).status_code == 404
        assert httpx.get(f"{env.base}/v1/streams/{sid}/events", headers=K2).status_code == 404
        assert httpx.get(f"{env.base}/v1/streams/{sid}").status_code == 401
        running = _wait(env, sid, lambda rec: rec["progress"]["frames_seen"] > 0 or _ended(rec))
        assert running["status"] == "running" and running["tenure"] == 1
        rec = _wait(env, sid, _ended)
    # The source's end (an HTTP body without a length ends, to FFmpeg, as a read failure).
    assert rec["status"] == "ended" and rec["ended_by"] not in ("deleted", "max_duration_s"), rec
    p = rec["progress"]
    assert p["frames_seen"] == p["frames_read"] == 60 and p["frames_dropped"] == p["clips_dropped"] == 0
    assert p["latency_s"] > 0 and p["frames_per_second"] > 0
    assert rec["gaps"] == [] and [o["frames"] for o in rec["outputs"]] == [60]
    events = _events(env, sid)
    kinds = [k for k, _ in events]
    assert kinds[0] == "status" and kinds[-1] == "end" and events[-1][1] == {"status": "ended"}
    frames = [d for k, d in events if k == "frame"]
    assert [f["frame"] for f in frames] == list(range(60)) and all(f["latency_s"] >= 0 for f in frames)
    tracks = [d for k, d in events if k == "track"]
    # The outputs are the CLI's on the same file: the folder `stemseg segment` writes.
    out = env.data / "jobs" / f"stream-{sid}" / rec["outputs"][0]["path"]
    cli = tmp_path / "cli"
    from service.cli import main
    assert main(["segment", str(videos["short"]), "--weights", str(SHIPPED_WEIGHTS), "--out", str(cli),
                 "--device", "cpu", "--no-progress", "--format", "ytvis", "davis", "mots"]) == 0
    for name in ("results.json", "mots.txt"):
        assert (out / name).read_bytes() == (cli / name).read_bytes(), name
    assert sorted(p.name for p in (out / "davis").iterdir()) == sorted(p.name for p in (cli / "davis").iterdir())
    kept = json.loads((cli / "results.json").read_text())
    assert len(tracks) == len(kept) and rec["outputs"][0]["tracks"] == len(kept)
    # Each frame event's masks are the outputs': the kept tracks' RLE per frame, under the same ids.
    for entry in kept:
        for f, seg in enumerate(entry["segmentations"]):
            if seg is not None:
                assert seg["counts"] in {t["rle"]["counts"] for t in frames[f]["tracks"]}
    metrics = httpx.get(f"{env.base}/metrics").text
    assert 'stemseg_streams{state="running"} 0.0' in metrics and "stemseg_stream_queue_depth 0.0" in metrics


def test_delete_stops_a_running_stream_and_keeps_what_was_written(env: ServiceEnv, port: int, videos) -> None:
    env.start_api()
    env.start_worker()
    with _source(videos["long"], port, 400 / FPS):
        sid = _create(env, port, "long.ts", formats=["ytvis", "davis", "overlay"]).json()["id"]
        rec = _wait(env, sid, lambda rec: rec["progress"]["frames_seen"] >= 20 or _ended(rec))
        assert rec["status"] == "running", rec
        metrics = httpx.get(f"{env.base}/metrics").text
        assert f'stemseg_stream_frames_seen{{stream="{sid}"}}' in metrics
        assert f'stemseg_stream_latency_seconds_count{{stream="{sid}"}}' in metrics
        # The worker running the stream takes no file task meanwhile (STEMSEG_WORKER_STREAMS_TAKE_FILES).
        clip = env.tmp / "clip.mp4"
        make_video(clip, 9, 64, 48)
        with clip.open("rb") as f:
            job = httpx.post(f"{env.base}/v1/jobs", files={"file": ("clip.mp4", f, "video/mp4")}, headers=K1,
                             params={"formats": "ytvis"}, timeout=60).json()["id"]
        time.sleep(2)
        assert httpx.get(f"{env.base}/v1/jobs/{job}", headers=K1).json()["status"] == "queued"
        r = httpx.delete(f"{env.base}/v1/streams/{sid}", headers=K1)
        assert r.status_code == 202 and r.json()["status"] in ("stopping", "stopped"), r.text
        rec = _wait(env, sid, _ended, timeout=60)
    assert rec["status"] == "stopped" and rec["ended_by"] == "deleted", rec
    n = rec["outputs"][0]["frames"]
    assert 20 <= n < 400 and n == rec["progress"]["frames_seen"]
    out = env.data / "jobs" / f"stream-{sid}" / rec["outputs"][0]["path"]
    assert len(list((out / "davis").iterdir())) == n and (out / "overlay.mp4").stat().st_size > 0
    assert all(len(e["segmentations"]) == n for e in json.loads((out / "results.json").read_text()))
    assert json.loads((out / "stemseg-output.json").read_text())["files"]
    # ... and served file by file, as a job's output folder.
    [listed] = httpx.get(f"{env.base}/v1/streams/{sid}/files", headers=K1).json()["outputs"]
    assert listed["tenure"] == 1 and listed["formats"] == ["ytvis", "davis", "overlay"]
    assert len(listed["files"]) == n + 3  # PNGs, results.json, overlay.mp4, the manifest
    for f in listed["files"][-3:]:
        r = httpx.get(f"{env.base}{f['url']}", headers=K1)
        assert r.status_code == 200 and r.content == (out / f["path"]).read_bytes(), f
    assert httpx.get(f"{env.base}{listed['files'][0]['url']}", headers=K2).status_code == 404
    for bad in ("segments/0001/../../../../etc/passwd", "segments/0001/nothing.png", "stemseg-output.json"):
        assert httpx.get(f"{env.base}/v1/streams/{sid}/files/{bad}", headers=K1).status_code == 404, bad
    events = _events(env, sid)
    assert events[-1] == ("end", {"status": "stopped"})
    assert [d["frame"] for k, d in events if k == "frame"] == list(range(n))
    assert _get(env, sid)["status"] == "stopped"  # kept until it expires
    assert env.wait(job, headers=K1)["status"] == "succeeded"  # the stream over, the worker takes files again
    assert not list((env.data / "jobs" / f"stream-{sid}").glob(".recording-*"))  # the overlay's copy is gone


def test_max_duration_is_honoured(env: ServiceEnv, port: int, videos) -> None:
    env.start_api()
    env.start_worker()
    with _source(videos["long"], port, 400 / FPS), Client(env.base, api_key="k1") as client:
        stream = client.stream(f"http://127.0.0.1:{port}/long.ts", formats=["ytvis"], max_duration_s=1.5)
        events = list(stream.events())  # the Python client follows the events until `end`
        rec = stream.refresh().data
    assert events[-1].type == "end" and events[-1].data == {"status": "ended"}
    assert sum(1 for e in events if e.type == "frame") == rec["progress"]["frames_seen"] > 0
    assert rec["status"] == "ended" and rec["ended_by"] == "max_duration_s", rec
    # Frames arrive at the source's pace: 1.5 s of a 25 fps stream (give or take the start's burst).
    assert 25 <= rec["progress"]["frames_read"] <= 60
    assert rec["max_duration_s"] == 1.5 and rec["finished_at"] - rec["started_at"] < 30


@pytest.mark.slow
def test_a_killed_worker_is_taken_over_after_the_visibility_timeout_with_a_gap(env: ServiceEnv, port: int,
                                                                               videos) -> None:
    env.start_api()
    victim = env.start_worker()
    with _source(videos["long"], port, 400 / FPS):
        sid = _create(env, port, "long.ts", formats=["ytvis"]).json()["id"]
        before = _wait(env, sid, lambda rec: rec["progress"]["frames_seen"] >= 16 or _ended(rec))
        assert before["status"] == "running", before
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        env.start_worker()
        rec = _wait(env, sid, lambda rec: rec["tenure"] == 2 and rec["progress"]["frames_seen"] > before[
            "progress"]["frames_seen"] + 16 or _ended(rec))
        assert time.monotonic() - killed_at >= 3  # not before the visibility timeout (3 s here)
        assert rec["status"] == "running", rec
        assert httpx.delete(f"{env.base}/v1/streams/{sid}", headers=K1).status_code == 202
        rec = _wait(env, sid, _ended, timeout=60)
    assert rec["status"] == "stopped" and rec["tenure"] == 2
    [gap] = rec["gaps"]
    assert gap["cause"] == "worker lost" and gap["tenure"] == 1 and gap["after_frame"] >= 16
    # The lost tenure wrote no outputs; the second's continue the frame numbers.
    [out] = rec["outputs"]
    assert out["tenure"] == 2 and out["first_frame"] == gap["after_frame"]
    events = _events(env, sid)
    frames = [d for k, d in events if k == "frame"]
    numbers = [f["frame"] for f in frames]
    assert numbers == list(range(len(numbers))) and len(numbers) == rec["progress"]["frames_seen"]
    assert ("gap", gap) in events
    first = {t["id"] for f in frames if f["tenure"] == 1 for t in f["tracks"]}
    second = {t["id"] for f in frames if f["tenure"] == 2 for t in f["tracks"]}
    assert first and second and min(second) > max(first)  # new track ids after the gap


@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_writes_its_part_and_hands_the_stream_on(env: ServiceEnv, port: int,
                                                                             videos) -> None:
    env.start_api()
    first = env.start_worker()
    with _source(videos["long"], port, 400 / FPS):
        sid = _create(env, port, "long.ts", formats=["ytvis", "davis"]).json()["id"]
        before = _wait(env, sid, lambda rec: rec["progress"]["frames_seen"] >= 16 or _ended(rec))
        assert before["status"] == "running", before
        first.terminate()
        assert first.wait(60) == 0
        rec = _get(env, sid)
        assert rec["status"] == "running" and rec["gaps"][-1]["cause"] == "worker stopped"
        [part] = rec["outputs"]  # the stopped worker's frames, written before it exited
        assert part["tenure"] == 1 and part["frames"] == rec["progress"]["frames_seen"] == rec["gaps"][-1][
            "after_frame"]
        env.start_worker()
        rec = _wait(env, sid, lambda rec: rec["tenure"] == 2 and rec["progress"]["frames_seen"] > part["frames"] + 16
                    or _ended(rec))
        assert httpx.delete(f"{env.base}/v1/streams/{sid}", headers=K1).status_code == 202
        rec = _wait(env, sid, _ended, timeout=60)
    assert rec["status"] == "stopped" and [g["cause"] for g in rec["gaps"]] == ["worker stopped"]
    one, two = rec["outputs"]
    assert (one["tenure"], two["tenure"]) == (1, 2) and two["first_frame"] == one["frames"]
    assert one["frames"] + two["frames"] == rec["progress"]["frames_seen"]
    root = env.data / "jobs" / f"stream-{sid}"
    for part in (one, two):
        assert len(list((root / part["path"] / "davis").iterdir())) == part["frames"]


@pytest.mark.slow
def test_a_worker_whose_stream_was_taken_over_stops_without_ending_it(env: ServiceEnv, port: int, videos) -> None:
    """What a worker cut off from Redis past the visibility timeout finds when it is back: another
    tenure in the record (made here by hand). It stops publishing, writes and acknowledges nothing."""
    env.start_api()
    env.start_worker()
    r = sync_client(env.redis_url)
    streams = Streams(r, env.prefix, 3600, LocalStorage(env.data))
    with _source(videos["long"], port, 400 / FPS):
        sid = _create(env, port, "long.ts", formats=["ytvis"]).json()["id"]
        before = _wait(env, sid, lambda rec: rec["progress"]["frames_seen"] >= 16 or _ended(rec))
        assert before["status"] == "running", before
        streams.take_over(sid, "elsewhere", None)  # tenure 2, whose worker is then lost
        # The first worker stops; after the visibility timeout its own free slot takes the stream
        # over from the lost tenure 2, as any worker would.
        rec = _wait(env, sid, lambda rec: rec["tenure"] == 3 and rec["progress"]["frames_seen"] > before[
            "progress"]["frames_seen"] + 16 or _ended(rec))
        assert rec["status"] == "running", rec
        assert httpx.delete(f"{env.base}/v1/streams/{sid}", headers=K1).status_code == 202
        rec = _wait(env, sid, _ended, timeout=60)
    r.close()
    assert rec["status"] == "stopped"
    assert [(g["cause"], g["tenure"]) for g in rec["gaps"]] == [("worker lost", 2)]
    assert [o["tenure"] for o in rec["outputs"]] == [3]  # the superseded tenure wrote nothing
    frames = [d for k, d in _events(env, sid) if k == "frame"]
    assert [f["frame"] for f in frames] == list(range(len(frames))) == list(range(rec["progress"]["frames_seen"]))
    assert {f["tenure"] for f in frames} == {1, 3}
    assert "was taken over by another worker" in env.log_text()


def test_a_stream_on_an_object_store_serves_its_outputs_from_there(tmp_path: Path, port: int, videos,
                                                                    s3_settings: dict[str, str]) -> None:
    """The job store in S3 (a real SeaweedFS): the outputs are published there, nothing is left in
    the data directory, and the API serves them."""
    env = ServiceEnv(tmp_path, SHIPPED_WEIGHTS, STEMSEG_STREAM_HOSTS=f"127.0.0.1:{port}",
                     STEMSEG_SOURCE_PRIVATE_NETS="127.0.0.1/32", STEMSEG_LIVE_RECONNECT_ATTEMPTS="0",
                     STEMSEG_LIVE_BACKLOG="buffer", STEMSEG_STORAGE_URL=s3_settings["storage_url"],
                     STEMSEG_S3_ENDPOINT_URL=s3_settings["s3_endpoint_url"])
    try:
        env.start_api()
        env.start_worker()
        with _source(videos["short"], port, 60 / FPS):
            sid = _create(env, port, "short.ts", headers={}, formats=["ytvis", "davis", "overlay"]).json()["id"]
            deadline = time.monotonic() + 120
            while (rec := httpx.get(f"{env.base}/v1/streams/{sid}").json())["status"] not in ("ended", "failed"):
                assert time.monotonic() < deadline, rec
                time.sleep(0.3)
        assert rec["status"] == "ended" and [o["frames"] for o in rec["outputs"]] == [60], rec
        [listed] = httpx.get(f"{env.base}/v1/streams/{sid}/files").json()["outputs"]
        names = [f["path"] for f in listed["files"]]
        assert len(names) == 60 + 3 and names[-1] == "stemseg-output.json"
        by_name = {f["path"]: f for f in listed["files"]}
        results = httpx.get(f"{env.base}{by_name['results.json']['url']}")
        assert results.status_code == 200 and len(results.content) == by_name["results.json"]["size"]
        assert all(len(e["segmentations"]) == 60 for e in results.json())
        overlay = httpx.get(f"{env.base}{by_name['overlay.mp4']['url']}")
        assert overlay.status_code == 200 and len(overlay.content) == by_name["overlay.mp4"]["size"] > 0
        assert not (env.data / "jobs" / f"stream-{sid}").exists()  # all of it is in the bucket
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# Admission, in process (no worker: the streams stay queued).

class _CountingListener:
    """A TCP port that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@contextmanager
def _app(tmp_path: Path, **settings) -> Iterator[TestClient]:
    from service.api.main import create_app
    from service.config import Settings
    from service.model.presets import get_preset

    s = Settings(redis_url=REDIS_URL, redis_prefix=new_prefix(), data_dir=tmp_path / "data", **settings)
    try:
        with TestClient(create_app(s, model_cfg=get_preset("lite"))) as client:
            yield client
    finally:
        drop_prefix(s.redis_prefix)


def test_urls_the_policy_refuses_are_422_and_never_connected_to(tmp_path: Path) -> None:
    listener = _CountingListener()
    url = f"http://127.0.0.1:{listener.port}/x.ts"
    with _app(tmp_path) as client:  # the default: no hosts, no streams
        r = client.post("/v1/streams", json={"url": url})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert "not enabled" in r.json()["detail"]
    with _app(tmp_path, stream_hosts=f"127.0.0.1:{listener.port}") as client:
        for body, words in (({"url": url}, "private"),  # listed, but loopback is not in the private nets
                            ({"url": f"http://127.0.0.1:{listener.port + 1}/x.ts"}, "not allowed"),
                            ({"url": "file:///etc/passwd"}, "URL with a host"),
                            ({"url": url, "formats": ["gif"]}, "formats"),
                            ({"url": url, "max_duration_s": 10**9}, "STEMSEG_STREAM_MAX_DURATION_S"),
                            ({"url": url, "extra": 1}, "extra")):
            r = client.post("/v1/streams", json=body)
            assert r.status_code == 422 and words in r.json()["detail"], (body, r.text)
        r = client.post("/v1/streams", content=b"url=x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
    listener.sock.close()
    assert listener.connections == 0


def test_streams_per_key_are_limited(tmp_path: Path) -> None:
    port = free_port()
    with _app(tmp_path, api_keys="k1,k2", stream_hosts=f"127.0.0.1:{port}", source_private_nets="127.0.0.1/32",
              max_streams_per_key=1) as client:
        body = {"url": f"http://127.0.0.1:{port}/a.ts"}
        first = client.post("/v1/streams", json=body, headers=K1)
        assert first.status_code == 201, first.text
        r = client.post("/v1/streams", json=body, headers=K1)
        assert r.status_code == 429 and "STEMSEG_MAX_STREAMS_PER_KEY" in r.json()["detail"]
        assert r.headers["retry-after"]
        assert client.post("/v1/streams", json=body, headers=K2).status_code == 201  # the limit is per key
        # A queued stream deleted is stopped at once, and frees its place.
        sid = first.json()["id"]
        r = client.delete(f"/v1/streams/{sid}", headers=K1)
        assert r.status_code == 202 and r.json()["status"] == "stopped" and r.json()["ended_by"] == "deleted"
        assert client.post("/v1/streams", json=body, headers=K1).status_code == 201
        assert client.get(f"/v1/streams/{sid}", headers=K1).json()["status"] == "stopped"
        assert client.get("/v1/streams/not-an-id", headers=K1).status_code == 404


def test_the_state_machine_never_leaves_a_final_state_and_frees_the_owners_place(tmp_path: Path,
                                                                                 store_url: str) -> None:
    """On one Redis and on a Redis Cluster (every script and transaction within one slot)."""
    prefix = new_prefix()
    r = sync_client(store_url)
    try:
        _state_machine(Streams(r, prefix, 60, LocalStorage(tmp_path)), r)
    finally:
        r.close()
        drop_prefix(prefix, store_url)


def _state_machine(streams: Streams, r) -> None:
    a = streams.create("o", "http://127.0.0.1:9/a.ts", ["ytvis"], 10.0, "lite", 1)
    with pytest.raises(StreamLimit):
        streams.create("o", "http://127.0.0.1:9/b.ts", ["ytvis"], 10.0, "lite", 1)
    assert not streams.transition(a.id, StreamStatus.ENDED)  # queued cannot end: it never ran
    assert not streams.transition(a.id, StreamStatus.STOPPING)
    assert streams.transition(a.id, StreamStatus.RUNNING)
    assert streams.stop(a.id).status == StreamStatus.STOPPING  # a running one is asked to stop
    assert streams.stop(a.id).status == StreamStatus.STOPPING  # ... once: its worker moves it on
    assert [s.id for s in streams.unfinished()] == [a.id]
    assert streams.transition(a.id, StreamStatus.STOPPED)
    for status in (StreamStatus.RUNNING, StreamStatus.ENDED, StreamStatus.FAILED, StreamStatus.STOPPING):
        assert not streams.transition(a.id, status)
    rec = streams.get(a.id)
    assert rec.status == StreamStatus.STOPPED and rec.ended_by == "deleted" and rec.finished_at
    assert 0 < r.ttl(streams.keys.stream(a.id)) <= 60
    assert streams.unfinished() == []
    b = streams.create("o", "http://127.0.0.1:9/b.ts", ["ytvis"], 10.0, "lite", 1)  # its place is free again
    assert streams.queue.depth() == 2  # a's entry is acknowledged by the worker that finds it ended
    with pytest.raises(ValueError, match="state machine"):
        streams.update(b.id, status="running")
    # Events and counters in one step, on streams that hash to other slots too.
    for rec in (b, *(streams.create(f"o{i}", "http://127.0.0.1:9/c.ts", ["ytvis"], 10.0, "lite", 1)
                     for i in range(5))):
        streams.events(rec.id, [("frame", {"frame": 0}), ("frame", {"frame": 1})], frames_seen=2, next_track_id=3)
        got = streams.get(rec.id)
        assert (got.frames_seen, got.next_track_id) == (2, 3)
        assert [e[1][b"type"] for e in r.xrange(streams.keys.stream_events(rec.id))] == [b"status", b"frame", b"frame"]
    streams.r.delete(streams.keys.stream(b.id))
    streams.events(b.id, [("frame", {"frame": 2})], frames_seen=3)  # gone: nothing is resurrected
    assert not r.exists(streams.keys.stream(b.id))


def test_workers_lost_in_a_row_without_progress_fail_the_stream(tmp_path: Path) -> None:
    """Takeovers are bounded by crashes without progress (STEMSEG_MAX_DELIVERIES), not by their number."""
    from service_env import in_process_worker

    port = free_port()  # nothing listens there
    with in_process_worker(SHIPPED_WEIGHTS, tmp_path / "data", "w1", max_deliveries=3, worker_streams=1,
                           live_open_timeout_s=2) as w:
        streams, consumer = w.streams, w.stream_consumers[0]

        def taken_over(gaps: list[dict]) -> object:
            rec = streams.create("", f"http://127.0.0.1:{port}/x.ts", ["ytvis"], 60.0, w.engine.cfg.name, 0)
            assert streams.transition(rec.id, StreamStatus.RUNNING)
            streams.update(rec.id, gaps=gaps, tenure=len(gaps) + 1, frames_seen=90)
            task = streams.queue.take(consumer, block_ms=100)
            assert task is not None and task.job_id == rec.id
            assert w.stream_runner.execute(task, consumer) is True
            streams.queue.done(task.id)
            return streams.get(rec.id)

        # Tenure 1 published frames 0-89; tenures 2 and 3 were lost at frame 90, and so was 4 (the
        # record's): three in a row without a frame.
        gaps = [{"after_frame": 90, "cause": "worker lost", "at": float(t), "tenure": t} for t in (1, 2, 3)]
        failed = taken_over(gaps)
        assert failed.status == StreamStatus.FAILED and "3 workers in a row" in failed.error
        assert failed.gaps == gaps  # no takeover recorded
        # Tenure 2 made progress (40 -> 90): two in a row only, so it is taken over (and fails to
        # open the source, which is another failure).
        gaps = [{"after_frame": 40, "cause": "worker lost", "at": 1.0, "tenure": 1},
                {"after_frame": 90, "cause": "worker lost", "at": 2.0, "tenure": 2},
                {"after_frame": 90, "cause": "worker lost", "at": 3.0, "tenure": 3}]
        other = taken_over(gaps)
        assert other.status == StreamStatus.FAILED and "cannot open" in other.error, other.error
        assert len(other.gaps) == 4 and other.gaps[-1]["tenure"] == 4 and other.tenure == 5


def test_the_async_client_creates_follows_and_stops_a_stream(tmp_path: Path) -> None:
    import asyncio

    from service.api.main import create_app
    from service.client import AsyncClient, InvalidRequest
    from service.config import Settings
    from service.model.presets import get_preset

    port = free_port()
    s = Settings(redis_url=REDIS_URL, redis_prefix=new_prefix(), data_dir=tmp_path / "data",
                 stream_hosts=f"127.0.0.1:{port}", source_private_nets="127.0.0.1/32")
    app = create_app(s, model_cfg=get_preset("lite"))

    async def run() -> None:
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app)) as client:
            stream = await client.stream(f"http://u:secret@127.0.0.1:{port}/a.ts", formats=["mots"],
                                         max_duration_s=30)
            assert stream.status == "queued" and stream.data["url"] == f"http://u:***@127.0.0.1:{port}/a.ts"
            assert stream.data["formats"] == ["mots"] and stream.data["max_duration_s"] == 30
            assert (await stream.stop()).status == "stopped"  # no worker took it: stopped at once
            events = [e async for e in stream.events()]
            assert [(e.type, e.data.get("status")) for e in events] == [
                ("status", "queued"), ("status", "stopped"), ("end", "stopped")]
            assert (await stream.refresh()).data["ended_by"] == "deleted"
            with pytest.raises(InvalidRequest, match="not allowed"):
                await client.stream(f"http://127.0.0.1:{port + 1}/a.ts")
        await app.state.services.aredis.aclose()

    try:
        asyncio.run(run())
    finally:
        drop_prefix(s.redis_prefix)
