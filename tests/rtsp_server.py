"""A real RTSP server on loopback (GStreamer's gst-rtsp-server) playing an MPEG-TS file's H.264
at its own pace, as a camera would: every client gets the file from its first frame, its
packets unchanged. Run by the system Python, which has PyGObject (python3-gi and
gir1.2-gst-rtsp-server-1.0); tests/test_live.py skips RTSP where it cannot start.

    /usr/bin/python3 tests/rtsp_server.py VIDEO.ts PORT     # prints "ready", then serves rtsp://127.0.0.1:PORT/live
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer


def main() -> int:
    video, port = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f"( filesrc location={video} ! tsdemux ! h264parse ! rtph264pay name=pay0 pt=96 "
                       "config-interval=-1 )")
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on port {port}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
