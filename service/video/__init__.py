"""Video input: probing, streaming decode in clip windows, and seeking for workers."""

from service.video.decode import (
    DEFAULT_MAX_PIXELS,
    Frame,
    VideoError,
    VideoInfo,
    iter_clip_windows,
    iter_frame_range,
    iter_frames,
    probe,
    read_frames,
)

__all__ = ["DEFAULT_MAX_PIXELS", "Frame", "VideoError", "VideoInfo", "iter_clip_windows", "iter_frame_range",
           "iter_frames", "probe", "read_frames"]
