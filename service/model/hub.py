"""The authors' released checkpoints, one command away: `stemseg weights fetch NAME`.

The names and URLs are `service.model.presets.OFFICIAL`. A download
goes to a hidden `.NAME.pth.part` beside the target and resumes from its length with an HTTP
Range request; the finished file must load strictly into the preset it is named after (every key
and shape, service.model.checkpoint) before it is renamed into place, so a truncated, corrupt or
wrong file never sits where `--weights NAME` would find it.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from service.config import fetched_weights_path
from service.errors import UserError
from service.model.presets import OFFICIAL

CHUNK = 1 << 20


class FetchError(UserError, RuntimeError):
    """A download that could not be completed or verified (one-line message)."""


target_path = fetched_weights_path


def _cause(e: BaseException) -> str:
    """Why a download failed, in words (urllib's own text is often a bare errno)."""
    reason = getattr(e, "reason", e)
    if isinstance(reason, socket.gaierror):
        return "the server's name could not be resolved (no network, or no DNS)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "the server did not answer in time"
    if isinstance(reason, ConnectionRefusedError):
        return "the server refused the connection"
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError)):
        return "the connection was dropped"
    if isinstance(reason, ssl.SSLError):
        return f"the TLS handshake failed ({getattr(reason, 'reason', None) or reason})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _way_out(target: Path) -> str:
    return f"pass --url MIRROR, or download the file yourself and put it at {target}"


def _open(url: str, offset: int, timeout: float, target: Path):
    request = urllib.request.Request(url, headers={"User-Agent": "stemseg-serve"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is already whole
            return None
        raise FetchError(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}; "
                         f"{_way_out(target)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"cannot download {url}: {_cause(e)}; {_way_out(target)}") from None


def fetch(name: str, to_dir: Path, *, url: str | None = None, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """Download the official checkpoint `name` into to_dir/NAME.pth, resuming a partial download,
    and keep it only if it loads strictly into its preset. Returns the path."""
    from tqdm import tqdm

    from service.model.checkpoint import CheckpointError, load_model

    if name not in OFFICIAL:
        raise FetchError(f"unknown checkpoint {name!r}; choose from {', '.join(OFFICIAL)}")
    url = url or OFFICIAL[name].url
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"{url}: only http:// and https:// URLs can be fetched")
    to_dir = Path(to_dir)
    to_dir.mkdir(parents=True, exist_ok=True)
    target = target_path(name, to_dir)
    if target.exists() or target.is_symlink():
        # Never replaced: it may be the user's own file of that name (a fine-tuned davis.pth, say).
        try:
            load_model(target, preset=name)
        except CheckpointError:
            raise FetchError(f"{target} exists and is not a valid {name} checkpoint: move it or choose "
                             "another --to") from None
        return target  # already fetched
    part = to_dir / f".{target.name}.part"
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset, timeout, target)
    if response is not None:
        with response:
            if offset and response.status != 206:  # the server ignored Range: start again
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            with open(part, "ab" if offset else "wb") as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                    disable=not progress, file=sys.stderr) as bar:
                try:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:  # the partial file stays for the next run
                    raise FetchError(f"{url}: download interrupted ({_cause(e)}); run the command again to resume, "
                                     f"or {_way_out(target)}") from None
                f.flush()
                os.fsync(f.fileno())
            if total is not None and part.stat().st_size != total:
                raise FetchError(f"{url}: got {part.stat().st_size} of {total} bytes; run the command again to resume")
    try:
        load_model(part, preset=name)
    except CheckpointError as e:
        part.unlink(missing_ok=True)  # ours, and useless: the next run must start over
        first = " ".join(ln.strip() for ln in str(e).splitlines()[:2]).replace(str(part), url)
        raise FetchError(f"downloaded file is not a valid {name} checkpoint, removed: {first}") from None
    os.replace(part, target)
    return target


__all__ = ["FetchError", "fetch", "target_path"]
