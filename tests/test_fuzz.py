"""A few hundred malformed uploads of the kinds an attacker tries: no 5xx, every refusal is
problem+json naming no server path, and nothing is left on disk."""

from __future__ import annotations

from collections import Counter
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
                    max_upload_bytes=300_000, rate_limit_jobs=0, max_frames=200)


def _cases(tmp_path: Path, rng: np.random.Generator) -> list[tuple[str, dict]]:
    good = tmp_path / "good.mp4"
    make_video(good, 8, 160, 120)
    mkv = tmp_path / "good.mkv"
    make_video(mkv, 12, 64, 48, codec="libvpx-vp9")
    audio = tmp_path / "a.m4a"
    make_audio_only(audio)
    data, mkv_data = good.read_bytes(), mkv.read_bytes()
    mp4 = "video/mp4"
    cases: list[tuple[str, dict]] = []

    def multipart(name: str, body: bytes, ctype: str = mp4, filename: str = "v.mp4") -> dict:
        return {"files": {"file": (filename, body, ctype)}}

    # Cut anywhere, including inside the trailing moov box (the old AttributeError).
    for cut in sorted(set(rng.integers(1, len(data), 150).tolist()) | set(range(len(data) - 600, len(data), 20))):
        cases.append(("mp4 cut", multipart("file", data[:cut])))
    for cut in rng.integers(1, len(mkv_data), 20).tolist():
        cases.append(("mkv cut", multipart("file", mkv_data[:cut])))
    for _ in range(80):  # bit flips and overwritten runs
        b = bytearray(data)
        for pos in rng.integers(0, len(b), int(rng.integers(1, 40))):
            b[pos] = int(rng.integers(0, 256))
        cases.append(("mp4 corrupted", {"content": bytes(b), "headers": {"content-type": mp4}}))
    for n in (1, 7, 100, 5000, 299_999):
        cases.append(("random bytes", multipart("file", rng.bytes(n))))
    cases.append(("audio only", multipart("file", audio.read_bytes())))
    cases.append(("empty", multipart("file", b"")))
    cases.append(("empty raw", {"content": b"", "headers": {"content-type": mp4}}))
    cases.append(("too large", {"content": b"\0" * 400_000, "headers": {"content-type": mp4}}))
    cases.append(("too large, lying length", {"content": b"\0" * 400_000, "headers": {"content-type": mp4,
                                                                                      "content-length": "10"}}))
    for ctype in ("application/json", "text/plain", "image/png", "", "multipart/mixed; boundary=x", "video",
                  "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=\"\"",
                  "application/x-www-form-urlencoded", "video/mp4; charset=\x7f", "ü/ü".encode()):
        cases.append((f"content-type {ctype!r}", {"content": data, "headers": {"content-type": ctype}}))
    boundary = "xyz"
    bodies = {
        "no file field": f"--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\n"
                         f"hi\r\n--{boundary}--\r\n",
        "no closing boundary": f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                               "filename=\"a\"\r\n\r\nabc",
        "garbage": "this is not multipart at all",
        "header only": f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n",
        "many parts": "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n"
                              for i in range(50)) + f"--{boundary}--\r\n",
        "huge header": f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{'a' * 70000}\""
                       f"\r\n\r\nabc\r\n--{boundary}--\r\n",
        "bad header line": f"--{boundary}\r\n\x00\x01\x02\r\n\r\nabc\r\n--{boundary}--\r\n",
    }
    for name, body in bodies.items():
        cases.append((f"multipart {name}", {"content": body.encode("latin-1"),
                                            "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}))
    for filename in ("../../etc/passwd", "ключ.mp4", "\x00\x01.mp4", "a" * 5000, "C:\\x\\y.mp4", ""):
        cases.append(("odd filename", multipart("file", data[: len(data) // 2], filename=filename)))
    for params in ({"formats": ""}, {"formats": "ytvis,,"}, {"formats": "png"}, {"min_dim": "0"},
                   {"min_dim": "99999999999999999999"}, {"preset": "davis"}, {"preset": "x" * 100},
                   {"callback_url": "http://169.254.169.254/latest"}, {"callback_url": "file:///etc/passwd"},
                   {"callback_url": "http://[::1"}, {"callback_url": "http://u:p@127.0.0.1/"}):
        cases.append((f"params {list(params)}", {**multipart("file", data), "params": params}))
    return cases


def test_malformed_uploads(settings, tmp_path: Path) -> None:
    cases = _cases(tmp_path, np.random.default_rng(12))
    assert len(cases) >= 300
    outcomes: Counter = Counter()
    accepted = []
    with TestClient(create_app(settings, model_cfg=get_preset("kitti_mots"))) as c:
        for kind, kwargs in cases:
            r = c.post("/v1/jobs", **kwargs)
            outcomes[(kind.split(" ")[0], r.status_code)] += 1
            assert r.status_code < 500, (kind, r.status_code, r.text)
            if r.status_code == 202:  # a cut that lost only trailing metadata is still a whole video
                accepted.append(r.json()["id"])
                continue
            assert r.headers["content-type"] == "application/problem+json", (kind, r.text)
            body = r.json()
            assert body["status"] == r.status_code and body["detail"], (kind, body)
            assert str(settings.data_dir) not in r.text and str(tmp_path) not in r.text, (kind, body)
        for job_id in accepted:
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
    print(sorted(outcomes.items()))
    assert not any((settings.data_dir / "jobs").iterdir()), list((settings.data_dir / "jobs").rglob("*"))
