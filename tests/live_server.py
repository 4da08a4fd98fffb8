"""Serve a video file live on loopback at its own pace, as a camera or an encoder would: MPEG-TS
over HTTP (one GET, or every GET) or over UDP datagrams. A real server for tests/test_live.py.

    python tests/live_server.py http VIDEO.ts --seconds 2.0 [--once]      # prints "port N"
    python tests/live_server.py udp VIDEO.ts --seconds 2.0 --port N --delay 1.0
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

CHUNK = 7 * 188  # seven MPEG-TS packets: what FFmpeg's own udp output sends per datagram


def paced(data: bytes, seconds: float):
    """The bytes in chunks, each sent when its share of `seconds` has passed (FFmpeg's -re, by bytes)."""
    start = time.monotonic()
    for pos in range(0, len(data), CHUNK):
        wait = start + seconds * pos / len(data) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield data[pos:pos + CHUNK]


def serve_http(data: bytes, seconds: float, once: bool, stall: float | None, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0
            for chunk in paced(data, seconds):
                if stall is not None and sent >= len(data) // 2:
                    time.sleep(stall)  # a stream that stops sending without closing
                    return
                self.wfile.write(chunk)
                sent += len(chunk)

        def log_message(self, *args) -> None:
            pass

    HTTPServer.allow_reuse_address = True  # restarted on its port by a test
    server = HTTPServer(("127.0.0.1", port), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    if once:
        server.handle_request()
    else:
        server.serve_forever()


def _bound(port: int) -> bool:
    """Whether a local UDP socket is bound to `port` (Linux: /proc/net/udp)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                if any(line.split()[1].endswith(f":{port:04X}") for line in list(f)[1:]):
                    return True
        except OSError:
            continue
    return False


def serve_udp(data: bytes, seconds: float, port: int, delay: float, garbage: bool) -> None:
    print("ready", flush=True)
    # A datagram sent before the reader binds is lost: start once it listens (or after `delay`
    # where /proc cannot tell), as a camera streaming to a receiver that is already up.
    deadline = time.monotonic() + 120
    while not _bound(port) and time.monotonic() < deadline and os.path.exists("/proc/net/udp"):
        time.sleep(0.05)
    time.sleep(delay)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if garbage:
        sock.sendto(b"\x00garbage that is not MPEG-TS" * 20, ("127.0.0.1", port))
    for chunk in paced(data, seconds):
        sock.sendto(chunk, ("127.0.0.1", port))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("protocol", choices=["http", "udp"])
    p.add_argument("video")
    p.add_argument("--seconds", type=float, required=True, help="how long sending the whole file takes")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--once", action="store_true", help="http: answer one GET, then exit")
    p.add_argument("--stall", type=float, help="http: stop sending halfway for this long, then close")
    p.add_argument("--garbage", action="store_true", help="udp: one datagram of garbage first")
    args = p.parse_args()
    with open(args.video, "rb") as f:
        data = f.read()
    if args.protocol == "http":
        serve_http(data, args.seconds, args.once, args.stall, args.port)
    else:
        serve_udp(data, args.seconds, args.port, args.delay, args.garbage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
