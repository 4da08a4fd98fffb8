"""Attacks against a real `stemseg serve` (and a worker) and their numbers, for the README.

    OMP_NUM_THREADS=1 .venv/bin/python tests/measure_service.py [--streams 100] [--gets 400]
        [--battery all|base|hostile]

Starts its own redis-server (free port, AOF) and API process, then prints a Markdown table
attack -> count -> outcome, and the p50/p99 of GET /v1/jobs/{id} with 0 and N open event
streams. The `hostile` battery runs a second API (default limits) and a worker: uploads that
claim millions of frames (API RSS sampled every 50 ms while it refuses them), raw H.264 of
20,000 frames (time to read 44 frames at positions 0 .. 19,950 before and after admission's
remux), 250 event streams, huge and slow request heads, malformed Last-Event-IDs, webhook
targets on other ports and a trickling receiver, DELETEs during running tasks; then counts
5xx answers, tracebacks and data-directory paths in both processes' logs. Not a test (no
assertions): the tests check each behaviour; this measures.
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
from service.jobs.keys import Keys

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

    def __init__(self, base: str, job_id: str, n: int, key: dict[str, str] | None = None) -> None:
        self.base, self.job_id, self.n, self.key = base, job_id, n, KEY if key is None else key
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
        async with httpx.AsyncClient(headers=self.key, timeout=None, limits=limits) as client:
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


class RssSampler:
    """Peak and last RSS of a process, sampled every 50 ms from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            self.stop.wait(0.05)

    def __enter__(self) -> Self:
        self.peak = self.now()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def hostile(rows: list[tuple[str, int, str]], tmp: Path, redis_url: str) -> None:
    """The hostile battery (huge and raw uploads, event streams, heads, webhook targets, DELETE mid-task)
    against an API with the default limits and one worker."""
    import socket

    from videos import make_long_video

    from service.jobs.webhooks import Notifier
    from service.video import decode

    env = ServiceEnv(tmp / "hostile", SHIPPED_WEIGHTS, STEMSEG_REDIS_URL=redis_url, STEMSEG_RATE_LIMIT_JOBS="0",
                     STEMSEG_MAX_ACTIVE_JOBS="500", STEMSEG_WEBHOOK_HOSTS="127.0.0.1:9", STEMSEG_HEADER_TIMEOUT_S="2",
                     STEMSEG_CLIPS_PER_TASK="1")
    env.data.mkdir(parents=True)
    import redis
    env.redis = redis.Redis.from_url(redis_url)
    statuses: Counter = Counter()

    def post(path: Path, **params) -> httpx.Response:
        r = httpx.post(f"{env.base}/v1/jobs", content=path.read_bytes(), params=params, timeout=600,
                       headers={"content-type": "application/octet-stream"})
        statuses[r.status_code] += 1
        return r

    try:
        env.start_api()
        api = env.procs[0].pid
        base = env.base

        big = tmp / "5m.mp4"
        make_long_video(big, 5_000_000)
        with RssSampler(api) as rss:
            before = rss.now()
            t0 = time.perf_counter()
            r = post(big)
            took = time.perf_counter() - t0
        rows.append((f"MP4 of 5,000,000 frames ({big.stat().st_size / 1e6:.0f} MB), STEMSEG_MAX_FRAMES=20000", 1,
                     (f"{r.status_code} in {took:.1f} s (upload included): {r.json()['detail']}; API RSS "
                     f"{before:.0f} MB before, peak {rss.peak:.0f} MB (+{rss.peak - before:.0f} MB)")))
        big.unlink()

        many, raw_many = tmp / "300k.mp4", tmp / "1m.h264"
        make_long_video(many, 300_000)
        make_long_video(raw_many, 1_000_000)
        with RssSampler(api) as rss:
            start = rss.now()
            seen, slowest = Counter(), 0.0
            for i in range(20):
                t0 = time.perf_counter()
                seen[post(many if i % 2 == 0 else raw_many).status_code] += 1
                slowest = max(slowest, time.perf_counter() - t0)
            end = rss.now()
        rows.append(("20 refused uploads: MP4 of 300,000 frames and raw H.264 of 1,000,000 frames, alternating", 20,
                     (f"{outcome(seen)}; slowest {slowest:.2f} s; API RSS {start:.0f} -> {end:.0f} MB "
                     f"(peak {rss.peak:.0f} MB)")))

        # Raw H.264 of 20,000 frames: a worker's read of 44 frames at position p, on the upload as
        # sent (no timestamps: decoded from frame 0) and on what admission stored (remuxed).
        raw = tmp / "20k.h264"
        make_long_video(raw, 20_000, width=64, height=48)
        t0 = time.perf_counter()
        r = post(raw)
        admit_s = time.perf_counter() - t0
        stored_copy = tmp / "20k-stored.mkv"
        stored_copy.write_bytes((env.data / "jobs" / r.json()["id"] / "video").read_bytes())
        httpx.delete(f"{base}/v1/jobs/{r.json()['id']}")
        times: dict[str, list[str]] = {"as sent": [], "stored": []}
        for label, path in (("as sent", raw), ("stored", stored_copy)):
            for pos in (0, 5_000, 10_000, 19_950):
                decode.clear_cache()
                decode.read_frames(path, [pos])  # the index (a worker builds it once per video)
                t0 = time.perf_counter()
                decode.read_frames(path, list(range(pos, pos + 44)))
                times[label].append(f"{pos}: {time.perf_counter() - t0:.3f} s")
        rows.append(("raw H.264, 20,000 frames of 64x48: 44 frames read at position p", 1,
                     (f"{r.status_code}, admitted (remuxed to Matroska) in {admit_s:.1f} s; as sent "
                     f"{', '.join(times['as sent'])}; stored {', '.join(times['stored'])}")))

        video = tmp / "v.mp4"
        make_video(video, 9, 64, 48)
        job_id = post(video).json()["id"]
        with Streams(base, job_id, 250, key={}) as st:
            opened = st.open
            get = httpx.get(f"{base}/v1/jobs/{job_id}").status_code
        statuses.update(st.statuses)
        rows.append(("250 event streams at once (STEMSEG_MAX_EVENT_STREAMS=256)", 250,
                     f"{outcome(st.statuses)}; {opened} open; GET job meanwhile {get}"))

        port = int(base.rsplit(":", 1)[1])

        def raw_request(data: bytes, wait: float = 30) -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(wait)
                try:
                    sock.sendall(data)
                except OSError:
                    pass
                out = b""
                try:
                    while chunk := sock.recv(65536):
                        out += chunk
                except OSError:
                    pass
                return out

        answer: dict[str, bytes] = {}
        th = threading.Thread(target=lambda: answer.update(
            a=raw_request(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (128 << 20) + b"\r\n\r\n")))
        t0 = time.perf_counter()
        th.start()
        time.sleep(0.2)
        t1 = time.perf_counter()
        health = httpx.get(f"{base}/healthz", timeout=30).status_code
        health_ms = (time.perf_counter() - t1) * 1000
        th.join()
        rows.append(("128 MiB request header", 1, (f"{answer['a'][:12].decode()[9:]} after "
                     f"{time.perf_counter() - t0:.2f} s; /healthz meanwhile {health} in {health_ms:.0f} ms")))
        t0 = time.perf_counter()
        slow = raw_request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        rows.append(("request head never finished (slowloris), STEMSEG_HEADER_TIMEOUT_S=2", 1,
                     f"{slow[:12].decode()[9:]} after {time.perf_counter() - t0:.1f} s"))

        st2: Counter = Counter()
        for bad in ("9" * 5000, "1-" + "9" * 30, "18446744073709551616-0", "\u00b9-0", "1-x"):
            st2[httpx.get(f"{base}/v1/jobs/{job_id}/events", headers={"last-event-id": bad.encode()}).status_code] += 1
        statuses.update(st2)
        rows.append(("malformed Last-Event-ID (5,000 digits, over 64 bits, non-ASCII digits, ...)", 5, outcome(st2)))

        st3: Counter = Counter()
        urls = ["http://127.0.0.1:9/x\r\nInjected: 1", "http://127.0.0.1:9/a b", "http://127.0.0.1:9/\tx"]
        urls += [f"http://127.0.0.1:{p}/" for p in (22, 80, 5432, 6379, 8000, port)]
        for u in urls:
            st3[post(video, callback_url=u).status_code] += 1
        rows.append(("callback_url with CR LF / space / tab, or another port of the allowed host", len(urls),
                     outcome(st3)))

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()

        def trickle() -> None:
            conn, _ = lsock.accept()
            with conn:
                conn.recv(65536)
                try:
                    for b in b"HTTP/1.1 204 No Content\r\n\r\n":
                        conn.sendall(bytes([b]))
                        time.sleep(3)
                except OSError:
                    pass

        threading.Thread(target=trickle, daemon=True).start()
        got: list[dict] = []
        t0 = time.perf_counter()
        Notifier("", 1, 0, 5.0).deliver(f"http://127.0.0.1:{lsock.getsockname()[1]}/h", {"id": "x"}, got.append)
        rows.append(("webhook receiver sending one byte every 3 s, STEMSEG_WEBHOOK_TIMEOUT_S=5", 1,
                     f"attempt ended after {time.perf_counter() - t0:.1f} s: {got[-1]['attempts'][0]['error']}"))
        lsock.close()
        for p in (1, 6379):  # closed port, Redis: the attempt says no more than that it failed
            Notifier("", 1, 0, 2.0).deliver(f"http://127.0.0.1:{p}/", {"id": "x"}, got.append)
        rows.append(("webhook attempts to a closed port and to Redis", 2,
                     ", ".join(repr(g["attempts"][0]["error"]) for g in got[-2:])))

        env.start_worker()
        clip = tmp / "clip.mp4"
        make_video(clip, 60, 96, 64)
        deleted = 0
        for _ in range(5):
            jid = post(clip).json()["id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                job = httpx.get(f"{base}/v1/jobs/{jid}").json()
                if job["status"] == "running" and job["progress"]["clips_done"] >= 1:
                    break
                time.sleep(0.05)
            deleted += httpx.delete(f"{base}/v1/jobs/{jid}").status_code == 204
        time.sleep(8)  # what the worker does with the tasks it held, and with the redelivered ones
        pending = sum(g["pending"] for g in env.redis.xinfo_groups(Keys(env.prefix).tasks))
        rows.append(("DELETE while a task of the job runs", 5, (f"{deleted} deleted; tasks pending afterwards: "
                     f"{pending}")))
    finally:
        env.close()
    text = env.log_text()
    five = sum(n for s, n in statuses.items() if s >= 500)
    rows.append(("the battery above: API and worker logs", sum(statuses.values()),
                 (f"{five} x 5xx; {text.count('Traceback')} tracebacks; {text.count(str(env.data))} data-directory "
                 "paths in the logs")))



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--gets", type=int, default=400)
    ap.add_argument("--battery", choices=("all", "base", "hostile"), default="all")
    args = ap.parse_args()
    rows: list[tuple[str, int, str]] = []
    idle = busy = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.battery in ("all", "hostile"):
            pr = PrivateRedis(Path(tmp) / "redis-hostile")
            pr.start()
            try:
                hostile(rows, Path(tmp), pr.url)
            finally:
                pr.stop()
        if args.battery == "hostile":
            _print(rows, args, idle, busy)
            return
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
    _print(rows, args, idle, busy)


def _print(rows, args, idle, busy) -> None:
    print("| attack | count | outcome |")
    print("| --- | --- | --- |")
    for a, n, o in rows:
        print(f"| {a} | {n} | {o} |")
    if idle and busy:
        print(f"\nGET /v1/jobs/{{id}}, {args.gets} sequential requests: p50/p99 {percentiles(idle)[0]:.1f}/"
              f"{percentiles(idle)[1]:.1f} ms with 0 event streams, {percentiles(busy)[0]:.1f}/"
              f"{percentiles(busy)[1]:.1f} ms with {args.streams} open")


if __name__ == "__main__":
    main()
