"""How fast `stemseg` reports a mistake: the best of N wall times of each bad invocation, as JSON.

    python bench/cli_errors.py [--repeat 3]

Each must exit 2 with one line on stderr; the times include the interpreter's start.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "examples" / "sample.mp4")
CASES = {
    "unknown option": ["segment", SAMPLE, "--bogus"],
    "option out of range": ["segment", SAMPLE, "--min-iou", "3"],
    "missing video": ["segment", "/no/such/video.mp4"],
    "missing weights": ["segment", SAMPLE, "--weights", "/no/such.pth"],
    "weights not fetched": ["bench", SAMPLE, "--weights", "davis", "--preset", "davis"],
    "--out parent missing": ["segment", SAMPLE, "--out", "/no/such/dir/out"],
    "submit without --server": ["submit", SAMPLE],
    "unknown checkpoint": ["weights", "fetch", "nope"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    report = {}
    for name, argv in CASES.items():
        best, line = float("inf"), ""
        for _ in range(args.repeat):
            start = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True, text=True,
                               cwd=ROOT, env={"PATH": "/usr/bin:/bin", "STEMSEG_SERVER": "", "PYTHONPATH": str(ROOT)},
                               check=False)
            best = min(best, time.perf_counter() - start)
            line = p.stderr.strip()
            if p.returncode != 2 or len(line.splitlines()) != 1:
                raise SystemExit(f"{name}: exit {p.returncode}, stderr {p.stderr!r}")
        report[name] = {"seconds": round(best, 3), "stderr": line}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
