"""The name of every file an output directory holds, in one place: the writers, the assembly
step, the API's download routes and the tests all take them from here."""

from __future__ import annotations

NAMES = {"ytvis": "results.json", "davis": "davis", "mots": "mots.txt", "overlay": "overlay.mp4"}
MANIFEST = "stemseg-output.json"


def davis_frame(f: int) -> str:
    """A DAVIS index PNG's name inside NAMES["davis"]."""
    return f"{f:05d}.png"
