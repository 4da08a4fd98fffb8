"""API behaviour that needs no worker: bad uploads, problem+json, API keys, listing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_env import REDIS_URL
from videos import make_audio_only, make_video

from service.api.main import create_app
from service.config import Settings
from service.model.presets import get_preset


@pytest.fixture
def settings(tmp_path: Path, redis_prefix: str) -> Settings:
    return Settings(redis_url=REDIS_URL, redis_prefix=redis_prefix, data_dir=tmp_path / "data",
                    max_upload_bytes=200_000, rate_limit_jobs=0)


def _client(settings: Settings, **overrides) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides), model_cfg=get_preset("kitti_mots")))


def _assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def _nothing_left(settings: Settings) -> None:
    jobs = settings.data_dir / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.rglob("*"))


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.mp4"
    make_video(good, 30, 64, 48)
    files = {
        "random": tmp_path / "random.mp4",
        "truncated": tmp_path / "truncated.mp4",
        "audio": tmp_path / "audio.m4a",
    }
    files["random"].write_bytes(np.random.default_rng(0).bytes(5000))
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])
    make_audio_only(files["audio"])
    return files


@pytest.mark.parametrize("kind", ["random", "truncated", "audio"])
def test_bad_uploads_are_400_problems_and_leave_nothing(settings, bad_files, kind: str) -> None:
    with _client(settings) as c:
        with bad_files[kind].open("rb") as f:
            r = c.post("/v1/jobs", files={"file": (bad_files[kind].name, f, "video/mp4")})
        _assert_problem(r, 400)
    _nothing_left(settings)


def test_empty_and_oversize_and_wrong_type(settings, tmp_path: Path) -> None:
    with _client(settings) as c:
        _assert_problem(c.post("/v1/jobs", files={"file": ("e.mp4", b"", "video/mp4")}), 422)
        _assert_problem(c.post("/v1/jobs", content=b"x" * 300_000, headers={"content-type": "video/mp4"}), 413)
        _assert_problem(c.post("/v1/jobs", content=b"{}", headers={"content-type": "text/plain"}), 415)
        _assert_problem(c.post("/v1/jobs", content=b"{}", headers={"content-type": "application/json"}), 422)
        _assert_problem(c.post("/v1/jobs", content=b"{" * 20_000, headers={"content-type": "application/json"}), 413)
        _assert_problem(c.post("/v1/jobs", content=b"[1", headers={"content-type": "application/json"}), 422)
        _assert_problem(c.get("/v1/jobs/nope"), 404)
        _assert_problem(c.get("/v1/jobs", params={"limit": 0}), 422)
    _nothing_left(settings)


def test_frame_size_limit(settings, tmp_path: Path) -> None:
    video = tmp_path / "big.mp4"
    make_video(video, 3, 128, 96)
    with _client(settings, max_frame_pixels=64 * 48) as c, video.open("rb") as f:
        _assert_problem(c.post("/v1/jobs", files={"file": ("big.mp4", f, "video/mp4")}), 400)
    _nothing_left(settings)


def test_raw_body_upload_and_api_key_isolation(settings, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    with _client(settings, api_keys="alpha,beta") as c:
        _assert_problem(c.post("/v1/jobs", content=video.read_bytes(), headers={"content-type": "video/mp4"}), 401)
        r = c.post("/v1/jobs", content=video.read_bytes(),
                   headers={"content-type": "video/mp4", "x-api-key": "alpha"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["video"]["num_frames"] == 9 and job["progress"]["clips_total"] == 2
        assert c.get(f"/v1/jobs/{job['id']}", headers={"x-api-key": "alpha"}).status_code == 200
        _assert_problem(c.get(f"/v1/jobs/{job['id']}", headers={"authorization": "Bearer beta"}), 404)
        assert c.get("/v1/jobs", headers={"x-api-key": "beta"}).json()["total"] == 0
        assert c.get("/v1/jobs", headers={"x-api-key": "alpha"}).json()["total"] == 1
        _assert_problem(c.get(f"/v1/jobs/{job['id']}/result", headers={"x-api-key": "alpha"}), 409)
        _assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers={"x-api-key": "beta"}), 404)
        assert c.delete(f"/v1/jobs/{job['id']}", headers={"x-api-key": "alpha"}).status_code == 204


def test_health_and_openapi(settings) -> None:
    with _client(settings) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        _assert_problem(c.get("/readyz"), 503)  # no worker heartbeat under this prefix
        spec = c.get("/openapi.json").json()
        paths = spec["paths"]
        for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/events",
                  "/v1/jobs/{job_id}/overlay.mp4", "/healthz", "/readyz", "/metrics"):
            assert p in paths, p
        assert "Job" in spec["components"]["schemas"]
        post = paths["/v1/jobs"]["post"]
        assert set(post["requestBody"]["content"]) == {"multipart/form-data", "video/*", "application/octet-stream",
                                                       "application/json"}
        assert post["requestBody"]["content"]["application/json"]["schema"]["required"] == ["source"]
        assert {"413", "415", "429", "503", "507"} <= set(post["responses"])
        get = paths["/v1/jobs/{job_id}"]["get"]
        assert list(get["responses"]["404"]["content"]) == ["application/problem+json"]
        assert "Retry-After" in get["responses"]["503"]["headers"]
        assert "409" in paths["/v1/jobs/{job_id}/result"]["get"]["responses"]


# -- hostile input ---------------------------------------------------------------------------------

def _multipart(data: bytes, boundary: str = "b0undary", name: str = "file") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"v.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def test_mp4_cut_inside_moov_is_400(settings, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 8, 160, 120)
    data = video.read_bytes()
    refused = 0
    with _client(settings) as c:
        for cut in range(len(data) - 700, len(data), 7):  # the moov box is at the end
            r = c.post("/v1/jobs", files={"file": ("v.mp4", data[:cut], "video/mp4")})
            if r.status_code == 202:  # only trailing metadata lost: still the whole video
                assert r.json()["video"]["num_frames"] == 8
                assert c.delete(f"/v1/jobs/{r.json()['id']}").status_code == 204
                continue
            body = _assert_problem(r, 400)
            assert str(settings.data_dir) not in body["detail"] and body["detail"].startswith("the upload: ")
            refused += 1
    assert refused > 50
    _nothing_left(settings)


def test_malformed_ids_offsets_and_headers_are_4xx(settings) -> None:
    with _client(settings, api_keys="alpha") as c:
        for bad in ("x" * 32 + ":events", "a" * 32 + ":events", "..", "%00", "A" * 32, "a" * 200):
            _assert_problem(c.get(f"/v1/jobs/{bad}", headers={"x-api-key": "alpha"}), 404)
            _assert_problem(c.get(f"/v1/jobs/{bad}/events", headers={"x-api-key": "alpha"}), 404)
            _assert_problem(c.delete(f"/v1/jobs/{bad}", headers={"x-api-key": "alpha"}), 404)
        for offset in ("99999999999999999999", "-1", "1e3", "1000001"):
            _assert_problem(c.get("/v1/jobs", params={"offset": offset}, headers={"x-api-key": "alpha"}), 422)
        assert c.get("/v1/jobs", params={"offset": 1_000_000}, headers={"x-api-key": "alpha"}).status_code == 200
        for raw in ("alphä".encode("latin-1"), "ключ".encode(), b"\xff\xfe", b"alpha" + b"\x85"):
            for header in ("x-api-key", "authorization"):
                value = raw if header == "x-api-key" else b"Bearer " + raw
                _assert_problem(c.get("/v1/jobs", headers={header: value}), 401)
        r = c.request("TRACE", "/v1/jobs")
        _assert_problem(r, 405)
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
        # An empty optional parameter means "not given".
        r = c.post("/v1/jobs", params={"preset": ""}, content=b"", headers={"content-type": "video/mp4",
                                                                            "x-api-key": "alpha"})
        _assert_problem(r, 422)
        assert "empty" in r.json()["detail"]
    _nothing_left(settings)


def test_chunked_uploads_are_cut_at_the_limit(settings, monkeypatch) -> None:
    """No Content-Length (chunked): counted as it streams; the file never grows past the limit.
    (test_faults checks against a real server that the client is stopped early too.)"""
    from service.jobs.storage import LocalStorage

    largest = {"n": 0}
    real_writer = LocalStorage.writer

    @contextlib.contextmanager
    def spying_writer(self, job_id, name):
        with real_writer(self, job_id, name) as f:
            yield f
            largest["n"] = max(largest["n"], f.tell())

    monkeypatch.setattr(LocalStorage, "writer", spying_writer)

    def chunks(body: bytes):
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    with _client(settings) as c:
        for body, ctype in ((_multipart(b"\0" * 5_000_000), "multipart/form-data; boundary=b0undary"),
                            (b"\0" * 5_000_000, "video/mp4")):
            r = c.post("/v1/jobs", content=chunks(body), headers={"content-type": ctype})
            assert "content-length" not in r.request.headers
            assert "200000" in _assert_problem(r, 413)["detail"]
    assert largest["n"] == 0  # cut before the block ended: never renamed into place
    _nothing_left(settings)


def test_frames_limit_quota_and_rate_limit(settings, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 30, 64, 48)
    data = video.read_bytes()
    with _client(settings, max_frames=29) as c:
        body = _assert_problem(c.post("/v1/jobs", content=data, headers={"content-type": "video/mp4"}), 413)
        assert "29" in body["detail"] and "STEMSEG_MAX_FRAMES" in body["detail"]
    _nothing_left(settings)
    with _client(settings, max_active_jobs=2, rate_limit_jobs=0) as c:
        for _ in range(2):
            assert c.post("/v1/jobs", content=data, headers={"content-type": "video/mp4"}).status_code == 202
        r = c.post("/v1/jobs", content=data, headers={"content-type": "video/mp4"})
        _assert_problem(r, 429)
        assert int(r.headers["retry-after"]) > 0
    with _client(settings, max_active_jobs=0, rate_limit_jobs=1, rate_window_s=3600) as c:
        r = c.post("/v1/jobs", content=data, headers={"content-type": "video/mp4"})
        assert r.status_code in (202, 429)  # the first of the window is accepted, unless the clock just ticked
        r = c.post("/v1/jobs", content=data, headers={"content-type": "video/mp4"})
        _assert_problem(r, 429)
        assert 0 < int(r.headers["retry-after"]) <= 3601


def test_event_stream_cap(settings, tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    with _client(settings, max_event_streams=1) as c:
        job = c.post("/v1/jobs", content=video.read_bytes(), headers={"content-type": "video/mp4"}).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines).startswith("id: ") and next(lines) == "event: status"
            assert next(lines) == 'data: {"status": "queued"}'
            r = c.get(f"/v1/jobs/{job['id']}/events")
            _assert_problem(r, 503)
            assert r.headers["retry-after"]
        c.delete(f"/v1/jobs/{job['id']}")


def test_redis_down_every_route_503_fast_and_nothing_on_disk(settings, tmp_path: Path) -> None:
    from service_env import free_port

    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    job = "a" * 32
    with _client(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job}"),
                             ("GET", f"/v1/jobs/{job}/result"), ("GET", f"/v1/jobs/{job}/overlay.mp4"),
                             ("GET", f"/v1/jobs/{job}/events"), ("DELETE", f"/v1/jobs/{job}"), ("POST", "/v1/jobs")):
            t0 = time.monotonic()
            kwargs = {"files": {"file": ("v.mp4", video.read_bytes(), "video/mp4")}} if method == "POST" else {}
            r = c.request(method, path, **kwargs)
            assert time.monotonic() - t0 < 2, path
            body = _assert_problem(r, 503)
            assert r.headers["retry-after"] and "Redis" in body["detail"], path
    _nothing_left(settings)


def test_api_key_bytes_are_compared_exactly() -> None:
    """Header bytes as a server receives them (TestClient's transport differs): a key followed
    by a byte that Python counts as whitespace (NEL, 0x85) is not the key."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.api.deps import caller
    from service.api.problems import Problem

    svc = SimpleNamespace(settings=Settings(api_keys="alpha"))

    def ask(name: bytes, value: bytes) -> str:
        return asyncio.run(caller(Request({"type": "http", "headers": [(name, value)]}), svc))

    assert ask(b"authorization", b"Bearer alpha") == ask(b"x-api-key", b"alpha")
    for name, value in ((b"authorization", b"Bearer alpha\x85"), (b"x-api-key", b"alpha\x85"),
                        (b"authorization", b"Bearer \xa0alpha"), (b"x-api-key", "alphä".encode())):
        with pytest.raises(Problem) as e:
            ask(name, value)
        assert e.value.status == 401


def test_default_formats_are_the_clis_and_follow_stemseg_formats(settings, tmp_path: Path) -> None:
    from service.config import DEFAULT_FORMATS

    video = tmp_path / "v.mp4"
    make_video(video, 9, 64, 48)
    body = {"content": video.read_bytes(), "headers": {"content-type": "video/mp4"}}
    with _client(settings) as c:
        assert c.post("/v1/jobs", **body).json()["options"]["formats"] == list(DEFAULT_FORMATS)
        assert c.post("/v1/jobs?formats=mots,ytvis", **body).json()["options"]["formats"] == ["mots", "ytvis"]
        _assert_problem(c.post("/v1/jobs?formats=ytvis,gif", **body), 422)
    with _client(settings, formats="davis") as c:
        assert c.post("/v1/jobs", **body).json()["options"]["formats"] == ["davis"]


def test_client_errors_are_400_and_setup_errors_500_and_neither_names_a_server_path(settings, tmp_path: Path,
                                                                                   caplog) -> None:
    """A video the client sent is its fault: 400, called what the user sent. Weights, presets and
    graphs the operator set up are not: a generic 500, the real message (with its paths) in the log."""
    from service.config import resolve_weights
    from service.jobs.model_info import served_model
    from service.model.engine_spec import EngineSpec
    from service.model.graph import graph_config
    from service.video import probe

    app = create_app(settings, model_cfg=get_preset("kitti_mots"))
    upload = settings.data_dir / "jobs" / "abc" / "video"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 4000)
    secret = tmp_path / "srv" / "secret"

    def bad_video() -> None:
        probe(upload)

    setup_faults = {
        "weights": lambda: resolve_weights("davis", secret / "weights"),
        "served": lambda: served_model(secret / "model.pth", None),
        "graphs": lambda: graph_config(secret / "graphs"),
        "engine": lambda: EngineSpec(kind="onnxruntime"),
    }
    app.add_api_route("/test/bad-video", bad_video)
    for name, fault in setup_faults.items():
        app.add_api_route(f"/test/{name}", fault)
    with TestClient(app) as c:
        r = c.get("/test/bad-video")
        body = _assert_problem(r, 400)
        assert body["detail"].startswith("the upload: ")
        assert str(settings.data_dir) not in r.text and "abc" not in r.text
        for name in setup_faults:
            caplog.clear()
            r = c.get(f"/test/{name}")
            body = _assert_problem(r, 500)
            assert body["detail"] == "the server is not set up to do this; the error has been logged", name
            assert "secret" not in r.text and "STEMSEG" not in r.text, name
            assert any("server setup error" in m for m in caplog.messages), name
            if name == "weights":  # the operator sees where it looked
                assert str(secret / "weights" / "davis.pth") in caplog.text
