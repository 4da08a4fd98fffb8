"""Several jobs at once through one engine, with and without cross-job dynamic batching.

    python bench/concurrent_jobs.py VIDEO [VIDEO ...] [--weights W] [--device D] [--min-dim N]
        [--batch-max-size 16] [--batch-max-delay-ms 5] [--autocast bf16] [--json OUT]

Each video is one job on its own thread (what a worker with several task threads does); the
same jobs run once sharing the bare engine and once through a DynamicBatcher. Reports wall
time, aggregate frames/s, the batcher's forwards, and how far each job's tracks moved (frames
identical, matched-track IoU against its unbatched run).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _job(engine, video: str) -> tuple[int, list]:
    from service.pipeline.session import open_video

    v = open_video(video, engine)
    frames = [(f.index, f.track_ids, f.rles) for f in v.propagate()]
    return v.info.num_frames, (frames, v.result())


def run_jobs(engine, videos: list[str]) -> tuple[float, int, list]:
    results: list = [None] * len(videos)
    errors: list = []

    def work(i: int) -> None:
        try:
            results[i] = _job(engine, videos[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(videos))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, sum(r[0] for r in results), [r[1] for r in results]


def main(argv: list[str] | None = None) -> int:
    import torch

    from service.config import SHIPPED_WEIGHTS
    from service.evaluation.agreement import track_agreement
    from service.model.batching import DynamicBatcher
    from service.model.checkpoint import load_model
    from service.model.engines import TorchEngine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="+")
    p.add_argument("--weights", default=str(SHIPPED_WEIGHTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-dim", type=int)
    p.add_argument("--autocast", default="off")
    p.add_argument("--batch-max-size", type=int, default=16)
    p.add_argument("--batch-max-delay-ms", type=float, default=5.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model = load_model(args.weights, device=args.device)
    if args.min_dim:
        model.cfg = model.cfg.with_min_dim(args.min_dim)
    engine = TorchEngine(model, autocast=args.autocast)
    alone_s, frames, alone = run_jobs(engine, args.videos)
    batcher = DynamicBatcher(engine, args.batch_max_size, args.batch_max_delay_ms / 1000)
    batched_s, _, batched = run_jobs(batcher, args.videos)
    batcher.close()
    report = {
        "videos": len(args.videos), "frames": frames, "device": args.device, "torch_threads": torch.get_num_threads(),
        "preset": model.cfg.name, "min_dim": model.cfg.min_dim, "autocast": args.autocast,
        "unbatched": {"seconds": round(alone_s, 2), "frames_per_second": round(frames / alone_s, 2)},
        "batched": {"seconds": round(batched_s, 2), "frames_per_second": round(frames / batched_s, 2),
                    "max_batch": args.batch_max_size, "max_delay_ms": args.batch_max_delay_ms,
                    "forwards": batcher.stats.forwards, "requests": batcher.stats.requests,
                    "items": batcher.stats.items},
        "speedup": round(alone_s / batched_s, 3),
        # Batched 3-D convolutions may round differently from N=1 ones (about 1e-5 on the CPU),
        # which can move a pixel across a clustering threshold: count and weigh what differs.
        "frames_identical": [sum(a == b for a, b in zip(x[0], y[0])) for x, y in zip(alone, batched)],
        "frames_per_job": [len(x[0]) for x in alone],
        "matched_track_iou": [track_agreement(x[1], y[1])["mean_matched_iou"] for x, y in zip(alone, batched)],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
