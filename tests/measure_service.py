"""Attacks against a real `stemseg serve`, and how it holds up: outcomes, and GET latency under open streams.

    OMP_NUM_THREADS=1 .venv/bin/python tests/measure_service.py [--streams 100] [--gets 400]

Starts its own redis-server (free port, AOF) and API process, then prints a Markdown table
attack -> count -> outcome, and the p50/p99 of GET /v1/jobs/{id} with 0 and N open event
streams. Not a test (no assertions): the tests check each behaviour; this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from typing import Self

from service_env import ServiceEnv
from test_faults import PrivateRedis
from test_fuzz import _cases
from videos import make_video

from service.config import SHIPPED_WEIGHTS

KEY = {"x-api-key": "k1"}


def outcome(statuses: Counter) -> str:
    return ", ".join(f"{n}x {s}" + (" (still a decodable video)" if s == 202 else "")
                     for s, n in sorted(statuses.items()))


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


def get_latencies(base: str, job_id: str, n: int) -> list[float]:
    out = []
    with httpx.Client(headers=KEY, timeout=30) as c:
        for _ in range(50):  # warm-up (connection, first-call costs), not counted
            c.get(f"{base}/v1/jobs/{job_id}")
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.get(f"{base}/v1/jobs/{job_id}")
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


class Streams:
    """N clients holding /events open on a job that never ends (no worker)."""

    def __init__(self, base: str, job_id: str, n: int) -> None:
        self.base, self.job_id, self.n = base, job_id, n
        self.statuses: Counter = Counter()
        self.open = 0
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _one(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", f"{self.base}/v1/jobs/{self.job_id}/events") as r:
            self.statuses[r.status_code] += 1
            if r.status_code != 200:
                return
            self.open += 1
            lines = r.aiter_lines()
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(lines.__anext__(), 0.5)
                except TimeoutError:
                    continue
                except StopAsyncIteration:
                    return

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 10, max_keepalive_connections=self.n + 10)
        async with httpx.AsyncClient(headers=KEY, timeout=None, limits=limits) as client:
            await asyncio.gather(*(self._one(client) for _ in range(self.n)), return_exceptions=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while sum(self.statuses.values()) < self.n and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--gets", type=int, default=400)
    args = ap.parse_args()
    rows: list[tuple[str, int, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pr = PrivateRedis(tmp / "redis")
        pr.start()
        env = ServiceEnv(tmp, SHIPPED_WEIGHTS, STEMSEG_REDIS_URL=pr.url, STEMSEG_API_KEYS="k1,k2",
                         STEMSEG_MAX_UPLOAD_BYTES="2000000", STEMSEG_MAX_FRAMES="1000", STEMSEG_RATE_LIMIT_JOBS="0",
                         STEMSEG_MAX_ACTIVE_JOBS="500", STEMSEG_MAX_EVENT_STREAMS=str(max(args.streams, 120)))
        import redis
        env.redis = redis.Redis.from_url(pr.url)
        try:
            env.start_api()
            base = env.base
            c = httpx.Client(headers=KEY, timeout=60)
            video = tmp / "v.mp4"
            make_video(video, 9, 64, 48)
            job_id = c.post(f"{base}/v1/jobs", content=video.read_bytes(),
                            headers={"content-type": "video/mp4"}).json()["id"]

            # Malformed uploads (the fuzz test's cases).
            st: Counter = Counter()
            # (Not the one with a lying Content-Length: a real HTTP client refuses to send it.)
            cases = [c for c in _cases(tmp, np.random.default_rng(12)) if "content-length" not in
                     c[1].get("headers", {})]
            for _, kw in cases:
                kw = {**kw, "headers": {**kw.get("headers", {}), **KEY}}
                r = c.post(f"{base}/v1/jobs", **kw)
                st[r.status_code] += 1
                if r.status_code == 202:
                    c.delete(f"{base}/v1/jobs/{r.json()['id']}")
            rows.append(("malformed uploads (cut/corrupt MP4+WebM, bad multipart, types, names, params)",
                         len(cases), outcome(st)))

            good = tmp / "g.mp4"
            make_video(good, 8, 160, 120)
            data = good.read_bytes()
            st = Counter(c.post(f"{base}/v1/jobs", files={"file": ("v.mp4", data[:cut], "video/mp4")}).status_code
                         for cut in range(1657, 1762))
            rows.append(("mp4 cut inside its moov box", 105, outcome(st)))
            st = Counter(c.get(f"{base}/v1/jobs", params={"offset": "9" * n}).status_code for n in range(7, 27))
            rows.append(("GET /v1/jobs?offset=10^7..10^26", 20, outcome(st)))
            st = Counter(c.get(f"{base}/v1/jobs/{job_id}{s}").status_code for s in (":events", ":lock", "x", "/../x"))
            st.update(c.get(f"{base}/v1/jobs/{'a' * 32}:events").status_code for _ in range(16))
            rows.append(("job ids naming other keys (`:events`, `:lock`, ...)", 20, outcome(st)))
            st = Counter()
            for raw in ("ключ".encode(), b"\xff\xfe", "k1ä".encode("latin-1"), b"k1\x85", b"\x80" * 40):
                for h in ("x-api-key", "authorization"):
                    v = raw if h == "x-api-key" else b"Bearer " + raw
                    st[httpx.get(f"{base}/v1/jobs", headers={h: v}).status_code] += 1
            rows.append(("non-ASCII X-API-Key / Authorization", 10, outcome(st)))
            r = c.request("TRACE", f"{base}/v1/jobs")
            rows.append(("TRACE /v1/jobs", 1, f"{r.status_code}, Allow: {r.headers.get('allow')}"))

            sent = {"n": 0}

            def chunked():
                boundary = b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n\r\n"
                yield boundary
                for _ in range(4500):
                    sent["n"] += 65536
                    yield b"\0" * 65536

            try:
                r = c.post(f"{base}/v1/jobs", content=chunked(),
                           headers={"content-type": "multipart/form-data; boundary=zz"})
                res = str(r.status_code)
            except httpx.HTTPError as e:
                res = f"connection closed by server ({type(e).__name__})"
            staged = [p for p in (env.data / "jobs").iterdir() if p.name.startswith("upload-")]
            rows.append(("chunked multipart, 295 MB, limit 2 MB", 1,
                         f"{res}; client got to send {sent['n'] / 1e6:.0f} MB; uploads left on disk: {len(staged)}"))

            long = tmp / "long.mp4"
            make_video(long, 1500, 32, 32)
            r = c.post(f"{base}/v1/jobs", content=long.read_bytes(), headers={"content-type": "video/mp4"})
            rows.append((f"{long.stat().st_size / 1e3:.0f} kB file of 1,500 frames, STEMSEG_MAX_FRAMES=1000", 1,
                         f"{r.status_code}: {r.json()['detail']}"))

            with Streams(base, job_id, 0):
                idle = get_latencies(base, job_id, args.gets)
            with Streams(base, job_id, args.streams) as s:
                busy = get_latencies(base, job_id, args.gets)
                opened = s.open
            rows.append((f"{args.streams} concurrent /events streams", args.streams,
                         (f"{opened} open; GET job p50/p99 {percentiles(busy)[0]:.1f}/{percentiles(busy)[1]:.1f} ms "
                         f"(0 streams: {percentiles(idle)[0]:.1f}/{percentiles(idle)[1]:.1f} ms)")))

            pr.stop()
            st, worst = Counter(), 0.0
            for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"), ("GET", "/metrics"),
                                 ("GET", "/readyz"), ("GET", f"/v1/jobs/{job_id}/events"),
                                 ("DELETE", f"/v1/jobs/{job_id}"), ("POST", "/v1/jobs")):
                t0 = time.perf_counter()
                kw = {"content": data, "headers": {"content-type": "video/mp4", **KEY}} if method == "POST" else {}
                r = c.request(method, f"{base}{path}", **kw)
                worst = max(worst, time.perf_counter() - t0)
                st[f"{r.status_code} {r.headers['content-type'].split(';')[0]}"] += 1
            left = [p.name for p in (env.data / "jobs").iterdir() if p.name.startswith("upload-")]
            health = httpx.get(f"{base}/healthz").status_code
            rows.append(("Redis stopped: every route", 7, (f"{outcome(st)}; slowest {worst * 1000:.0f} ms; "
                         f"/healthz {health}; upload leftovers {len(left)}")))
            pr.start()
            c.close()
        finally:
            env.close()
            pr.stop()
    print("| attack | count | outcome |")
    print("| --- | --- | --- |")
    for a, n, o in rows:
        print(f"| {a} | {n} | {o} |")
    print(f"\nGET /v1/jobs/{{id}}, {args.gets} sequential requests: p50/p99 {percentiles(idle)[0]:.1f}/"
          f"{percentiles(idle)[1]:.1f} ms with 0 event streams, {percentiles(busy)[0]:.1f}/{percentiles(busy)[1]:.1f}"
          f" ms with {args.streams} open")


if __name__ == "__main__":
    main()
