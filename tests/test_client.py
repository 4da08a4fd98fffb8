"""The Python client and `stemseg submit` against the real service: `stemseg serve` and
`stemseg worker` processes on the real Redis (private key prefix), real encoded videos."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from service_env import ServiceEnv
from videos import make_video

from service.cli import main
from service.client import (
    AsyncClient,
    Client,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
)

pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []
KEY = "client-test-key"


@pytest.fixture(scope="module")
def weights(small_weights: Path) -> Path:
    return small_weights


@pytest.fixture(scope="module")
def service(tmp_path_factory, weights: Path):
    env = ServiceEnv(tmp_path_factory.mktemp("svc"), weights, STEMSEG_API_KEYS=f"{KEY},other-key")
    env.start_api()
    env.start_worker()
    yield env
    env.close()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    make_video(path, 21, 64, 48)
    return path


def _decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float64)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_submit_wait_result_download_and_list(service: ServiceEnv, video: Path, tmp_path: Path) -> None:
    with Client(service.base, api_key=KEY) as client:
        job = client.submit(video, formats=["ytvis", "mots"])
        assert job.status == "queued" and job.data["video"]["filename"] == "clip.mp4"
        assert job.data["warning"] is None  # kitti_mots: not a synthetic-only preset (lite's: tests/test_web.py)
        assert job.wait(timeout=180) is job and job.status == "succeeded"
        result = job.result()
        assert result["num_frames"] == 21 and all(len(t["segmentations"]) == 21 for t in result["tracks"])
        assert job.result("mots").strip()
        paths = job.download(tmp_path / "out")
        assert set(paths) == {"ytvis", "mots"} and paths["mots"].read_text() == job.result("mots")
        assert sorted(_tree(tmp_path / "out")) == ["mots.txt", "results.json", "stemseg-output.json"]
        with pytest.raises(Exception, match="--force"):  # segment's --out rules: a previous output stays
            job.download(tmp_path / "out")
        assert job.id in [j.id for j in client.jobs(limit=100)]
        with Client(service.base, api_key="other-key") as other, pytest.raises(NotFound):
            other.job(job.id)  # another key sees none of it
        job.delete()
        with pytest.raises(NotFound) as e:
            job.refresh()
        assert e.value.status == 404 and e.value.problem["title"] == "Not Found" and job.id in e.value.detail


def test_errors_are_typed_and_carry_the_problem(service: ServiceEnv, video: Path) -> None:
    with Client(service.base, api_key="wrong", retries=0) as client:
        with pytest.raises(Unauthorized) as e:
            client.jobs()
        assert "X-API-Key" in e.value.detail and e.value.problem["status"] == 401
    with Client(service.base, api_key=KEY, retries=0) as client:
        with pytest.raises(InvalidRequest) as e:
            client.submit(video, formats="json")
        assert e.value.title == "Unprocessable Content"
        assert "ytvis,davis,mots,overlay" in e.value.detail and "json" in e.value.detail
        with pytest.raises(NotFound):
            client.job("0" * 32)


class _CutEventStream(httpx.BaseTransport):
    """A real connection whose first event stream is cut after `cut` events, as a dropped
    connection would; records the Last-Event-ID of each stream request."""

    def __init__(self, cut: int) -> None:
        self.inner, self.cut, self.streams, self.last_ids = httpx.HTTPTransport(), cut, 0, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.streams += 1
        self.last_ids.append(request.headers.get("last-event-id"))
        if self.streams > 1:
            return response
        cut, stream = self.cut, response.stream

        class Cut(httpx.SyncByteStream):
            def __iter__(self):
                seen = 0
                for chunk in stream:
                    yield chunk
                    seen += chunk.count(b"\n\n")
                    if seen >= cut:
                        raise httpx.ReadError("connection dropped")

            def close(self) -> None:
                stream.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut(), request=request)


def test_events_resume_after_a_dropped_connection_with_last_event_id(service: ServiceEnv, video: Path) -> None:
    with Client(service.base, api_key=KEY) as client:
        job = client.submit(video, formats=["ytvis"]).wait(timeout=180)
        whole = list(job.events())
    assert whole[-1].type == "end" and sum(e.type == "frame" for e in whole) == 21
    transport = _CutEventStream(cut=5)
    with Client(service.base, api_key=KEY, transport=transport) as client:
        resumed = list(client.job(job.id).events())
    assert transport.streams == 2 and transport.last_ids[0] is None
    assert transport.last_ids[1] == resumed[4].id  # resumed after the last event it had
    assert [(e.id, e.type, e.data) for e in resumed] == [(e.id, e.type, e.data) for e in whole]


def test_async_client_submits_follows_and_downloads(service: ServiceEnv, video: Path, tmp_path: Path) -> None:
    async def run() -> tuple[list[tuple[int, int]], dict, list[str]]:
        seen: list[tuple[int, int]] = []
        async with AsyncClient(service.base, api_key=KEY) as client:
            job = await client.submit(video.read_bytes(), formats="ytvis,davis", filename="bytes.mp4")
            await job.wait(timeout=180, progress=lambda done, total: seen.append((done, total)))
            result = await job.result()
            await job.download(tmp_path / "async-out")
            types = [e.type async for e in job.events()]
            queued = await client.submit(video)
            await queued.cancel()
            try:
                await client.job(queued.id)
            except NotFound:
                types.append("cancelled-gone")
            return seen, result, types

    seen, result, types = asyncio.run(run())
    assert seen[-1] == (21, 21) and result["tracks"]
    assert (tmp_path / "async-out" / "davis" / "00020.png").is_file()
    assert types[-2:] == ["end", "cancelled-gone"]


def test_429_is_retried_after_retry_after(tmp_path: Path, weights: Path, video: Path) -> None:
    # Windows are fixed (epoch // 10 s): the first upload starts just after a window opens, so its
    # admission (a probe in a child process) fits in it on a loaded machine and the second upload
    # is counted in the same window.
    env = ServiceEnv(tmp_path, weights, STEMSEG_RATE_LIMIT_JOBS="1", STEMSEG_RATE_WINDOW_S="10")
    try:
        env.start_api()  # no worker: the jobs stay queued
        with Client(env.base, retries=0) as client:
            time.sleep(10 - time.time() % 10 + 0.05)
            client.submit(video)
            with pytest.raises(RateLimited) as e:
                client.submit(video)
            assert e.value.retry_after is not None and 0 < e.value.retry_after <= 10 and e.value.detail
        with Client(env.base, retries=3) as client:
            start = time.monotonic()
            job = client.submit(video)  # waits out the window, then the upload is sent again, whole
            assert time.monotonic() - start >= 0.5 and job.status == "queued"
            assert job.data["video"]["num_frames"] == 21
    finally:
        env.close()


def test_submit_writes_the_folder_segment_writes(service: ServiceEnv, video: Path, weights: Path,
                                                 tmp_path: Path, capsys) -> None:
    """`stemseg submit` against the service equals `stemseg segment` here: the same files, the same bytes
    (the overlay: the same frames up to the encoder's noise)."""
    served, local = tmp_path / "served", tmp_path / "local"
    assert main(["submit", str(video), "--server", service.base, "--api-key", KEY, "--out", str(served),
                 "--no-progress"]) == 0
    assert f"-> {served}" in capsys.readouterr().out
    assert main(["segment", str(video), "--weights", str(weights), "--device", "cpu", "--out", str(local),
                 "--no-progress"]) == 0
    served_files, local_files = _tree(served), _tree(local)
    assert sorted(served_files) == sorted(local_files)
    assert {"results.json", "mots.txt", "overlay.mp4", "stemseg-output.json", "davis/00000.png"} <= set(local_files)
    # Every file byte for byte but the overlay, whose encoder (libx264) reads uninitialised memory:
    # its frames are compared decoded, at the encoder's noise level.
    overlays = served_files.pop("overlay.mp4"), local_files.pop("overlay.mp4")
    assert served_files == local_files
    frames = [_decoded(data) for data in overlays]
    assert frames[0].shape == frames[1].shape == (21, 48, 64, 3)
    mse = float(((frames[0] - frames[1]) ** 2).mean())
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 30, mse
    # the same --out rules: a previous output only with --force, a missing parent never made
    assert main(["submit", str(video), "--server", service.base, "--api-key", KEY, "--out", str(served),
                 "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["submit", str(video), "--server", service.base, "--api-key", KEY, "--out",
                 str(tmp_path / "no" / "such" / "dir"), "--no-progress"]) == 2
    assert not (tmp_path / "no").exists()


def test_submit_usage_errors_are_one_line(service: ServiceEnv, video: Path, tmp_path: Path, capsys) -> None:
    assert main(["submit", str(video), "--server", service.base, "--api-key", "wrong", "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "401" in err and "API key" in err
    assert main(["submit", str(video), "--server", service.base, "--api-key", KEY, "--no-wait",
                 "--no-progress"]) == 0
    job_id = capsys.readouterr().out.strip()
    with Client(service.base, api_key=KEY) as client:
        assert client.job(job_id).wait(timeout=180).status == "succeeded"
    assert main(["submit", str(tmp_path / "missing.mp4"), "--server", service.base]) == 2
    assert "missing.mp4: no such file" in capsys.readouterr().err
    assert main(["submit", str(video), "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_an_output_folder_that_lost_files_is_410_not_a_listing_of_what_is_left(service: ServiceEnv,
                                                                                video: Path) -> None:
    with Client(service.base, api_key=KEY) as client:
        job = client.submit(video, formats=["ytvis", "mots"]).wait(timeout=180)
    headers = {"X-API-Key": KEY}
    files = f"{service.base}/v1/jobs/{job.id}/files"
    assert httpx.get(files, headers=headers).status_code == 200
    out = service.data / "jobs" / job.id / "out"
    (out / "mots.txt").unlink()  # a file the manifest lists
    r = httpx.get(files, headers=headers)
    assert r.status_code == 410 and r.headers["content-type"] == "application/problem+json"
    assert "gone" in r.json()["detail"] and str(service.data) not in r.text
    (out / "stemseg-output.json").unlink()  # the manifest itself
    for url in (files, f"{files}/results.json"):
        assert httpx.get(url, headers=headers).status_code == 410, url
