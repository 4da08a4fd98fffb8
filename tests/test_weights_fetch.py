"""`stemseg weights fetch` against a local HTTP server serving synthetic-recipe checkpoints in
the official format: progress, resume with HTTP Range, strict load check, atomic rename, and
`--weights NAME` finding the result."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.cli import main
from service.config import get_settings, resolve_weights
from service.model.hub import FetchError, fetch
from service.model.presets import OFFICIAL


class _Server:
    """Serves files by name; honours Range unless told not to; can cut a response short."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.cut_after: int | None = None  # bytes of the next response before the connection drops
        self.ranges = True
        self.requests: list[str | None] = []


@contextmanager
def http_server() -> Iterator[tuple[_Server, str]]:
    state = _Server()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = state.files.get(self.path.lstrip("/"))
            if path is None:
                self.send_error(404)
                return
            data = path.read_bytes()
            asked = self.headers.get("Range")
            state.requests.append(asked)
            start = int(asked.split("=")[1].rstrip("-")) if asked and state.ranges else 0
            if start >= len(data) and asked and state.ranges:
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if state.cut_after is not None:
                body, state.cut_after = body[: state.cut_after], None
                self.wfile.write(body)
                self.wfile.flush()
                self.connection.shutdown(2)  # the connection drops mid-download
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def weights_dir(monkeypatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("STEMSEG_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("STEMSEG_WEIGHTS_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield tmp_path / "cache"
    get_settings.cache_clear()


def test_the_urls_are_the_original_readmes() -> None:
    base = "https://omnomnom.vision.rwth-aachen.de/data/STEm-Seg/models/"
    assert {n: c.url for n, c in OFFICIAL.items()} == {n: f"{base}{n}.pth" for n in ("davis", "youtube_vis",
                                                                                       "kitti_mots")}


@pytest.mark.slow
def test_fetch_resumes_verifies_and_is_found_by_name(official_weights, weights_dir: Path, capsys) -> None:
    with http_server() as (server, base):
        server.files["davis.pth"] = official_weights("davis")
        size = official_weights("davis").stat().st_size
        server.cut_after = size // 3
        assert main(["weights", "fetch", "davis", "--url", f"{base}/davis.pth"]) == 2
        assert "run the command again to resume" in capsys.readouterr().err
        part = weights_dir / ".davis.pth.part"
        assert part.stat().st_size == size // 3 and not (weights_dir / "davis.pth").exists()
        assert main(["weights", "fetch", "davis", "--url", f"{base}/davis.pth", "--no-progress"]) == 0
        assert server.requests[-1] == f"bytes={size // 3}-"  # resumed, not restarted
        target = weights_dir / "davis.pth"
        assert target.read_bytes() == official_weights("davis").read_bytes() and not part.exists()
        assert "--weights davis" in capsys.readouterr().out
    assert resolve_weights("davis", weights_dir) == target
    assert main(["weights", "list"]) == 0
    assert f"fetched: {target}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_server_ignoring_range_restarts_the_download(official_weights, tmp_path: Path) -> None:
    with http_server() as (server, base):
        server.files["k.pth"] = official_weights("kitti_mots")
        server.ranges = False
        part = tmp_path / "to" / ".kitti_mots.pth.part"
        part.parent.mkdir()
        part.write_bytes(b"stale bytes from somewhere else")
        path = fetch("kitti_mots", tmp_path / "to", url=f"{base}/k.pth", progress=False)
        assert path.read_bytes() == official_weights("kitti_mots").read_bytes()


@pytest.mark.slow
def test_a_file_that_does_not_load_strictly_is_not_kept(official_weights, tmp_path: Path) -> None:
    to = tmp_path / "to"
    with http_server() as (server, base):
        server.files["wrong.pth"] = official_weights("kitti_mots")  # a real checkpoint, of another preset
        with pytest.raises(FetchError, match="not a valid davis checkpoint"):
            fetch("davis", to, url=f"{base}/wrong.pth", progress=False)
        assert list(to.iterdir()) == []  # neither the target nor a part file
        with pytest.raises(FetchError, match="HTTP 404"):
            fetch("davis", to, url=f"{base}/missing.pth", progress=False)
        assert list(to.iterdir()) == []


def test_an_existing_file_of_that_name_is_never_replaced(official_weights, tmp_path: Path) -> None:
    to = tmp_path / "to"
    to.mkdir()
    mine = to / "kitti_mots.pth"
    mine.write_bytes(b"my own notes, not a checkpoint")
    with http_server() as (server, base):
        server.files["k.pth"] = official_weights("kitti_mots")
        with pytest.raises(FetchError, match="exists and is not a valid kitti_mots checkpoint"):
            fetch("kitti_mots", to, url=f"{base}/k.pth", progress=False)
        assert mine.read_bytes() == b"my own notes, not a checkpoint" and list(to.iterdir()) == [mine]
        mine.unlink()
        fetch("kitti_mots", to, url=f"{base}/k.pth", progress=False)
        server.files.clear()  # a second fetch finds the checkpoint in place and downloads nothing
        assert fetch("kitti_mots", to, url=f"{base}/k.pth", progress=False) == mine


@pytest.mark.parametrize("url, cause", [
    ("http://stemseg-no-such-host.invalid/davis.pth", "could not be resolved"),
    (None, "refused the connection"),
])
def test_an_unreachable_server_names_the_url_the_cause_and_the_way_out(tmp_path: Path, url, cause, capsys) -> None:
    if url is None:  # a port nothing listens on
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/davis.pth"
    to = tmp_path / "to"
    assert main(["weights", "fetch", "davis", "--to", str(to), "--url", url, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Errno" not in err
    assert url in err and cause in err and "--url MIRROR" in err and str(to / "davis.pth") in err
