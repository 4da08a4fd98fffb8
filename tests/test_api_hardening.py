"""The API under hostile load, against real processes (API, Redis): probes on threads of their
own so /healthz never waits for them, event-stream slots reserved before the first await,
downloads racing a DELETE, pipelined heads during a long response."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from service_env import ServiceEnv
from videos import make_video

from service.config import Settings
from service.jobs.targets import parse_allowed
from service.jobs.webhooks import check_callback_url

PROBLEM = "application/problem+json"


@pytest.fixture
def make_env(tmp_path: Path, small_weights: Path):
    envs: list[ServiceEnv] = []

    def make(**settings: str) -> ServiceEnv:
        env = ServiceEnv(tmp_path / f"env{len(envs)}", small_weights, **settings)
        env.data.mkdir(parents=True)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _clean_logs(env: ServiceEnv) -> None:
    text = env.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert str(env.data) not in text, text[-3000:]


def _slow_to_probe(boxes: int = 4_000_000) -> bytes:
    # An MP4 head then millions of empty top-level boxes: each is skipped by its size, so the
    # probe walks until STEMSEG_PROBE_BUDGET_S ends it (413).
    return struct.pack(">I4s8s", 16, b"ftyp", b"isom\0\0\2\0") + struct.pack(">I4s", 8, b"free") * boxes


def test_probes_do_not_starve_healthz(make_env) -> None:
    # One API thread and one probe slot: were probes run on the shared pool, the slow probe below
    # would hold its only thread and every sync route would wait for it.
    env = make_env(STEMSEG_API_THREADS="1", STEMSEG_PROBE_BUDGET_S="8", STEMSEG_RATE_LIMIT_JOBS="0",
                   STEMSEG_MAX_CONCURRENT_PROBES="1", STEMSEG_MAX_PROBES_PER_KEY="1", STEMSEG_API_KEYS="ka,kb",
                   STEMSEG_PROBE_WAIT_S="0")
    env.start_api()
    answers: dict[str, httpx.Response] = {}
    answered: dict[str, float] = {}

    def upload(name: str, key: str, body: bytes) -> None:
        answers[name] = httpx.post(f"{env.base}/v1/jobs", content=body, timeout=60,
                                   headers={"content-type": "application/octet-stream", "x-api-key": key})
        answered[name] = time.monotonic()

    slow = threading.Thread(target=upload, args=("a1", "ka", _slow_to_probe(12_000_000)))
    slow.start()
    # Until the upload is in (96 MB on loopback, or as parts to an object store) and probing, for
    # the 8 s budget.
    deadline = time.monotonic() + 60
    while "stemseg_probes_in_flight 1.0" not in httpx.get(f"{env.base}/metrics", timeout=10).text:
        assert time.monotonic() < deadline and slow.is_alive(), "the slow upload was never probed"
        time.sleep(0.05)
    # Refused before their bodies are read (small bodies: were they admitted, they would be probed
    # in a moment and answered 400, not 503).
    for name, key in (("a2", "ka"), ("b1", "kb")):  # the same key again; another key
        t0 = time.monotonic()
        upload(name, key, _slow_to_probe(10))
        assert time.monotonic() - t0 < 1, (name, time.monotonic() - t0)  # 1.2-6.7 s with the probe on a thread
    started: dict[str, float] = {}
    for path in ("/healthz", "/readyz", "/v1/jobs"):
        t0 = started[path] = time.monotonic()
        r = httpx.get(f"{env.base}{path}", headers={"x-api-key": "kb"}, timeout=30)
        # A starved pool took 15 s; a probe on a thread of the API (sharing its GIL) 2.5 s.
        assert time.monotonic() - t0 < 1, (path, time.monotonic() - t0)
        assert r.status_code in (200, 503) if path == "/readyz" else r.status_code == 200
    slow.join(60)
    assert started["/readyz"] < answered["a1"]  # those asked while the probe ran (the 503s below too)
    for name, why in (("a2", "STEMSEG_MAX_PROBES_PER_KEY"), ("b1", "STEMSEG_MAX_CONCURRENT_PROBES")):
        r = answers[name]
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM and r.headers["retry-after"], r.text
        assert why in r.json()["detail"]
    assert answers["a1"].status_code == 413 and "STEMSEG_PROBE_BUDGET_S" in answers["a1"].json()["detail"]
    assert env.stored_jobs() == []  # the refused uploads left nothing
    _clean_logs(env)


def test_a_burst_waits_for_probe_slots_instead_of_503(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_MAX_CONCURRENT_PROBES="1", STEMSEG_PROBE_WAIT_S="30")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    body = video.read_bytes()
    codes: list[int] = []

    def upload() -> None:
        codes.append(httpx.post(f"{env.base}/v1/jobs", content=body, timeout=60,
                                headers={"content-type": "application/octet-stream"}).status_code)

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert codes == [202] * 8  # one slot, eight at once: each waited its turn
    _clean_logs(env)


def test_event_stream_cap_holds_under_a_burst(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_SSE_KEEPALIVE_S="60", STEMSEG_MAX_EVENT_STREAMS="100",
                   STEMSEG_REDIS_POOL_MARGIN="4")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job_id = httpx.post(f"{env.base}/v1/jobs", content=video.read_bytes(),
                        headers={"content-type": "application/octet-stream"}).json()["id"]
    out: list[tuple[int, str]] = []

    async def main() -> None:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        release = asyncio.Event()
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            async def one(path: str) -> None:
                async with client.stream("GET", f"{env.base}{path}") as r:
                    if r.status_code == 200:
                        lines = r.aiter_lines()
                        first = [await anext(lines) for _ in range(2)]  # id:, event:
                        out.append((200, first[1]))
                        await release.wait()
                    else:
                        out.append((r.status_code, (await r.aread()).decode()))

            # streams of no job first: each slot comes back (a 404 must not keep one)
            await asyncio.gather(*[one(f"/v1/jobs/{'0' * 32}/events") for _ in range(20)])
            tasks = [asyncio.create_task(one(f"/v1/jobs/{job_id}/events")) for _ in range(200)]
            deadline = time.monotonic() + 60
            while len(out) < 220 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            release.set()
            await asyncio.gather(*tasks)
        # every slot was given back: 100 streams open again at once
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            again: list[int] = []
            gate = asyncio.Event()

            async def hold() -> None:
                async with client.stream("GET", f"{env.base}/v1/jobs/{job_id}/events") as r:
                    again.append(r.status_code)
                    await gate.wait()

            held = [asyncio.create_task(hold()) for _ in range(100)]
            while len(again) < 100 and time.monotonic() < deadline + 30:
                await asyncio.sleep(0.1)
            gate.set()
            await asyncio.gather(*held)
            assert again.count(200) == 100, Counter(again)

    asyncio.run(main())
    statuses = Counter(s for s, _ in out)
    assert statuses == {200: 100, 503: 100, 404: 20}, statuses
    assert all("event streams are open" in text for s, text in out if s == 503), [t for s, t in out if s == 503][:3]
    assert all("error" not in text for s, text in out if s == 200)
    _clean_logs(env)


# --- webhook allow-list ----------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["127.0.0.1:80a", "[::1]:x", "::1:8080", "host:99999", "host:0", "[::1",
                                   "[not-v6]:80", "a b", "[::1]8080"])
def test_a_bad_webhook_hosts_entry_stops_start_up_with_one_line(tmp_path: Path, entry: str) -> None:
    env = {**os.environ, "STEMSEG_WEBHOOK_HOSTS": f"localhost,{entry}", "STEMSEG_DATA_DIR": str(tmp_path)}
    for command in ("serve", "worker") if entry == "::1:8080" else ("serve",):
        p = subprocess.run([sys.executable, "-m", "service.cli", command], check=False, env=env,
                           capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (command, p.returncode, p.stderr[-2000:])
        assert "STEMSEG_WEBHOOK_HOSTS" in lines[0] and repr(entry) in lines[0], lines[0]


def test_webhook_hosts_parse_strictly() -> None:
    assert parse_allowed(["127.0.0.1", "LocalHost:8080", "[::1]", "[::1]:9000", "hooks.internal.", "svc_a"]) == {
        ("127.0.0.1", None), ("localhost", 8080), ("::1", None), ("::1", 9000), ("hooks.internal", None),
        ("svc_a", None)}
    assert check_callback_url("http://[::1]/hook", Settings().webhook_host_list) is None  # the default list


def test_a_narrowed_allow_list_is_checked_again_at_delivery(make_env, tmp_path: Path) -> None:
    hits: list[bytes] = []
    receiver = socket.socket()
    receiver.bind(("127.0.0.1", 0))
    receiver.listen()
    port = receiver.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = receiver.accept()
            except OSError:
                return
            with conn:
                hits.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    env = make_env(STEMSEG_RATE_LIMIT_JOBS="0", STEMSEG_WEBHOOK_HOSTS=f"127.0.0.1:{port}",
                   STEMSEG_WEBHOOK_BACKOFF_S="0")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    r = httpx.post(f"{env.base}/v1/jobs", content=video.read_bytes(), params={"callback_url":
                   f"http://127.0.0.1:{port}/hook", "formats": "ytvis"},
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    env.env["STEMSEG_WEBHOOK_HOSTS"] = "localhost"  # the list is narrowed before a worker ends the job
    env.start_worker()
    job_id = r.json()["id"]
    job = env.wait(job_id)
    deadline = time.monotonic() + 30
    while not (job.get("webhook") or {}).get("attempts") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{env.base}/v1/jobs/{job_id}").json()
    receiver.close()
    assert job["status"] == "succeeded"
    assert job["webhook"]["delivered"] is False and [a["error"] for a in job["webhook"]["attempts"]] == \
        ["not allowed"], job["webhook"]
    assert hits == []
    _clean_logs(env)


# --- downloads racing a DELETE, pipelined heads ----------------------------------------------------

@pytest.mark.parametrize("range_header", [None, "bytes=0-3", "bytes=2-", "items=0-1"])
def test_a_download_whose_file_is_gone_is_404_problem(tmp_path: Path, range_header: str | None, monkeypatch) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.api import problems
    from service.api.ranges import RangedFile

    path = tmp_path / "jobs" / "j" / "out" / "mots.txt"
    app = FastAPI()
    app.state.settings = Settings()
    problems.install(app)
    app.get("/f")(lambda: RangedFile(path, media_type="text/plain"))
    headers = {"range": range_header} if range_header else {}
    with TestClient(app) as c:
        r = c.get("/f", headers=headers)  # deleted before the request (DELETE, sweeper)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, r.text
        assert str(tmp_path) not in r.text and "gone" in r.json()["detail"]
        path.parent.mkdir(parents=True)
        path.write_text("0123456789")
        assert c.get("/f", headers=headers).status_code in (200, 206)

        import starlette.responses

        real_open = starlette.responses.anyio.open_file

        async def deleted_meanwhile(*args, **kwargs):  # between the stat and the open
            path.unlink(missing_ok=True)
            return await real_open(*args, **kwargs)

        monkeypatch.setattr(starlette.responses.anyio, "open_file", deleted_meanwhile)
        try:
            r = c.get("/f", headers=headers)
        except Exception as e:  # noqa: BLE001 (a cut body is what the client sees; no server error)
            assert "FileNotFoundError" not in type(e).__name__, e
        else:
            assert r.status_code in (200, 206) and len(r.content) < 10


def test_a_pipelined_head_during_a_long_response_gets_no_408_inside_it(make_env, tmp_path: Path) -> None:
    env = make_env(STEMSEG_HEADER_TIMEOUT_S="1", STEMSEG_SSE_MAX_S="3", STEMSEG_RATE_LIMIT_JOBS="0")
    env.start_api()
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job_id = httpx.post(f"{env.base}/v1/jobs", content=video.read_bytes(),
                        headers={"content-type": "application/octet-stream"}).json()["id"]
    port = int(env.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        t0 = time.monotonic()
        s.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.3)  # the stream is under way
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a pipelined head, never finished
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - t0
    stream, _, after = out.partition(b"\r\n0\r\n\r\n")  # the end of the chunked event stream
    assert b"408" not in stream, out[:2000]  # nothing written into the event stream
    assert after, out[-2000:]  # the stream ran to its end (STEMSEG_SSE_MAX_S)...
    assert b"HTTP/1.1 408 " in after and elapsed > 3, (elapsed, after[-500:])  # ...then the head's clock ran
    _clean_logs(env)
