"""All settings in one place, read from the environment (prefix STEMSEG_) or a .env file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import UserError
from service.model.presets import OFFICIAL_WEIGHTS  # torch-free

# Ways to run the network (service.model.engines) and the torch engine's speed options, as the
# settings and the CLI offer them; service.model.engine_spec checks how they combine.
EngineKind = Literal["torch", "onnxruntime", "onnxruntime-trt", "tensorrt"]
Autocast = Literal["off", "bf16", "fp16"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]

# --- Outputs: the one default set the CLI, the API and STEMSEG_FORMATS share -------------
OUTPUT_FORMATS = ("ytvis", "davis", "mots", "overlay")
DEFAULT_FORMATS = OUTPUT_FORMATS  # every format unless STEMSEG_FORMATS or --format says fewer


def parse_formats(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated (or listed) output names, validated, duplicates dropped, order kept."""
    names = [f.strip() for f in (value.split(",") if isinstance(value, str) else value) if f.strip()]
    unknown = [f for f in names if f not in OUTPUT_FORMATS]
    if unknown or not names:
        raise ValueError(f"formats must be a comma-separated subset of {','.join(OUTPUT_FORMATS)}, "
                         f"not {','.join(names) if names else 'nothing'}")
    return tuple(dict.fromkeys(names))


# --- Weights: the one resolver the API, the worker and the CLI call -------------------------
# The model we train and ship (weights/MODEL_CARD.md). service/model/shipped links to weights/, so a
# checkout and an installed wheel (which carries the files as package data) find it at the same place.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "model" / "shipped" / "lite.safetensors"
SHIPPED_CARD = SHIPPED_WEIGHTS.with_name("MODEL_CARD.md")

def default_weights_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stemseg" / "weights"


def fetched_weights_path(name: str, weights_dir: Path) -> Path:
    """Where `stemseg weights fetch NAME` keeps an official checkpoint (and `--weights NAME` finds it)."""
    return Path(weights_dir) / f"{name}.pth"


class WeightsNotFound(UserError, ValueError):
    """The configured weights name no file; the message says how to get one (one line)."""


def resolve_weights(value: str | Path | None, weights_dir: Path | None = None) -> Path:
    """A weights setting to a file: a path, an official name fetched into weights_dir, or (unset) the
    shipped model."""
    weights_dir = weights_dir or default_weights_dir()
    if value is None or str(value) == "":
        if SHIPPED_WEIGHTS.is_file():
            return SHIPPED_WEIGHTS
        raise WeightsNotFound("the shipped model (service/model/shipped/lite.safetensors) is missing from this "
                              "installation: reinstall stemseg-serve or pass --weights PATH")
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if str(value) in OFFICIAL_WEIGHTS:
        fetched = fetched_weights_path(str(value), weights_dir)
        if fetched.is_file():
            return fetched
        raise WeightsNotFound(f"official weights '{value}' are not fetched: run `stemseg weights fetch {value}` "
                              f"(looked for {fetched})")
    if path.exists():
        raise WeightsNotFound(f"weights {path}: not a file")
    raise WeightsNotFound(f"weights {path}: no such file (a .pth or .safetensors path, or one of "
                          f"{', '.join(OFFICIAL_WEIGHTS)} after `stemseg weights fetch NAME`)")


class Settings(BaseSettings):
    # env_ignore_empty: `STEMSEG_WEIGHTS=` in a .env or ConfigMap means unset, not Path(".").
    model_config = SettingsConfigDict(env_prefix="STEMSEG_", env_file=".env", extra="ignore", env_ignore_empty=True)

    weights: Path | None = Field(None, description="Weights file (.pth or .safetensors) or an official name "
                                                   "(davis, youtube_vis, kitti_mots) fetched into weights_dir; "
                                                   "default: the shipped lite model")
    weights_dir: Path = Field(default_factory=default_weights_dir,
                              description="Where `stemseg weights fetch` puts official checkpoints "
                                          "(default ~/.cache/stemseg/weights)")
    preset: str | None = Field(None, description="Preset name; inferred from the weights when unset")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_frame_pixels: int = Field(4096 * 2160, gt=0, description="Larger frames are refused (width x height)")
    data_dir: Path = Field(Path("./stemseg-data"), description="Uploads, clip results and outputs")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description=(
        "redis:// or rediss:// (one server), redis+cluster://HOST:PORT[,HOST:PORT...] (Redis Cluster), "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (the master Sentinel names)"))
    redis_prefix: str = Field("stemseg", min_length=1, description="Namespace of every Redis key (no braces: "
                                                                   "they would move the keys' hash tags)")

    @field_validator("redis_prefix")
    @classmethod
    def _no_braces(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError("STEMSEG_REDIS_PREFIX may not contain { or }: they would move the keys' hash tags")
        return v

    @field_validator("redis_url")
    @classmethod
    def _known_redis_url(cls, v: str) -> str:
        from service.jobs.redis_url import parse_redis_url

        parse_redis_url(v)  # ValueError names what is wrong
        return v
    api_keys: str = Field("", description="Comma-separated API keys; empty disables authentication")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Uploads above this are refused (413)")
    clips_per_task: int = Field(8, ge=1, description="Consecutive clips one worker task processes")
    render_frames_per_task: int = Field(
        120, ge=1, description="Frames one output task renders (DAVIS PNGs, overlay segment, text parts); "
                               "a job's output tasks run on every worker at once")
    output_processes: int = Field(0, ge=0, description="`stemseg segment`: processes writing the outputs at once "
                                                       "(0: one per CPU core)")
    lock_ttl_s: float = Field(20.0, gt=0, description="A job's stitch/finish lock lapses this long after its "
                                                      "holder stops renewing it (it renews every third of it)")
    visibility_timeout_s: float = Field(60.0, gt=0,
                                        description="A task held this long without a heartbeat is redelivered")
    max_deliveries: int = Field(3, ge=1, description="Deliveries of one task before its job fails")
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="Jobs, their keys and files expire after this")
    formats: str = Field(",".join(DEFAULT_FORMATS),
                         description="Outputs written when none are asked for (CLI --format, API ?formats=)")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: str) -> str:
        return ",".join(parse_formats(v))

    # --- Job lifecycle, limits and faults (owned by service/jobs and service/api) ---
    max_frames: int = Field(20_000, ge=1, description="Videos with more frames are refused (413)")
    max_duration_s: float = Field(3600.0, gt=0, description="Videos longer than this are refused (413)")
    probe_budget_s: float = Field(30.0, gt=0, description="Longest the API may spend reading one upload (probe, "
                                                          "and remux of a raw stream) before refusing it (413)")
    max_container_samples: int = Field(1_000_000, ge=1, description="MP4/MOV uploads whose sample tables, and AVI "
                                       "uploads whose indexes, list more entries in all tracks are refused (413) "
                                       "before FFmpeg indexes them")
    probe_cache_bytes: int = Field(64 * 1024**2, ge=0, description="Bytes of video indexes a worker keeps between "
                                                                   "tasks (least recently used dropped first)")
    max_active_jobs: int = Field(100, ge=0, description="Unfinished jobs per API key (429 above); 0: no quota")
    rate_limit_jobs: int = Field(60, ge=0, description="Uploads one API key may send per rate window (429); 0: off")
    rate_window_s: int = Field(60, ge=1, description="Length of the rate-limit window in seconds")
    max_event_streams: int = Field(256, ge=0, description="Open /events streams per API process (503 above)")
    api_threads: int = Field(40, ge=1, description="Threads of an API process for blocking work (Redis calls, "
                                                   "probing); each may hold one Redis connection")
    max_concurrent_probes: int = Field(4, ge=1, description="Uploads an API process probes at once, on threads of "
                                       "their own (503 with Retry-After above)")
    probe_wait_s: float = Field(30.0, ge=0, description="How long an upload waits for a free probe slot before "
                                "503 (a burst of small uploads is queued, not refused)")
    max_probes_per_key: int = Field(2, ge=1, description="Of those, how many one API key may hold (503 above; "
                                    "ignored when API keys are off)")
    redis_pool_margin: int = Field(16, ge=1, description="Redis connections per pool beyond the API threads or "
                                                         "event streams (admission checks, the lifespan)")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Request line and headers larger than this are "
                                                                  "refused (431)")
    header_timeout_s: float = Field(10.0, gt=0, description="A connection that has not sent a request's headers "
                                                            "within this is closed (408)")
    sse_keepalive_s: float = Field(15.0, gt=0, description="Comment line sent on an idle event stream")
    sse_max_s: float = Field(3600.0, gt=0,
                             description="An event stream ends after this; clients resume with Last-Event-ID")
    upload_idle_timeout_s: float = Field(30.0, gt=0,
                                         description="An upload that sends nothing for this long is dropped (408)")
    redis_timeout_s: float = Field(1.0, gt=0, description="Connect and reply timeout of every Redis call")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 when Redis is unreachable")
    sweep_interval_s: float = Field(60.0, gt=0,
                                    description="How often a worker runs the sweeper (one worker at a time)")
    sweep_grace_s: float = Field(600.0, ge=0, description="Files without a job record are deleted once this old")
    webhook_hosts: str = Field("127.0.0.1,localhost,[::1]", description="host or host:port a callback_url may name "
                               "(comma-separated; a host alone allows its scheme's default port only; IPv6 as "
                               "[v6] or [v6]:port)")

    @field_validator("webhook_hosts", "source_hosts", "stream_hosts")
    @classmethod
    def _host_lists(cls, v: str) -> str:
        from service.jobs.targets import parse_allowed  # standard library only

        parse_allowed([h for h in v.split(",")])
        return v
    source_hosts: str = Field("", description="host or host:port a job's `source` URL may name (comma-separated, "
                              "as STEMSEG_WEBHOOK_HOSTS); empty: jobs by reference are refused")
    source_private_nets: str = Field("", description="CIDRs a source host may resolve to although private, loopback "
                                     "or link-local (comma-separated); empty: only public addresses")
    source_buckets: str = Field("", description="buckets an s3:// source may name (comma-separated); empty: none")
    s3_endpoint_url: str = Field("", description="S3 API endpoint of s3:// sources and of the job store "
                                 "(MinIO, SeaweedFS, Ceph, GCS's "
                                 "XML API); empty: AWS. Credentials: the standard AWS chain (AWS_* variables, "
                                 "profiles, roles)")
    storage_url: str = Field("", description="s3://BUCKET[/PREFIX]: keep uploads, clip results and outputs in "
                             "that S3-compatible bucket (endpoint STEMSEG_S3_ENDPOINT_URL, the standard AWS "
                             "credential chain), so the API and the workers share no directory; empty: "
                             "STEMSEG_DATA_DIR")

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str) -> str:
        if v:
            from service.jobs.s3_storage import parse_storage_url  # boto3 is imported only when used

            parse_storage_url(v)
        return v
    s3_timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout of each request to the "
                                "job store (STEMSEG_STORAGE_URL)")
    s3_attempts: int = Field(3, ge=1, description="Attempts per request to the job store (boto3's standard "
                             "retries) before it counts as down")
    s3_part_bytes: int = Field(8 * 1024**2, ge=5 * 1024**2, description="Part size of multipart uploads to the "
                               "job store (S3's minimum is 5 MiB); an upload holds at most one part in memory")
    cache_bytes: int = Field(4 * 1024**3, ge=0, description="Bytes of local copies of job videos a worker keeps "
                             "(with STEMSEG_STORAGE_URL; least recently used dropped first), so it reads a "
                             "job's video from the store once, not once per task")
    results_redirect: bool = Field(False, description="With STEMSEG_STORAGE_URL: result files (overlay, MOTS, "
                                   "/files) answer 307 to a presigned URL of the object instead of being "
                                   "streamed through the API")
    results_url_ttl_s: int = Field(300, ge=1, le=7 * 24 * 3600, description="Lifetime of those presigned URLs")
    source_timeout_s: float = Field(300.0, gt=0, description="Longest fetch of a job's source, start to end")
    source_idle_timeout_s: float = Field(15.0, gt=0, description="A source that sends nothing for this long "
                                         "is cut off")

    @field_validator("source_private_nets")
    @classmethod
    def _source_nets(cls, v: str) -> str:
        from service.jobs.sources import parse_nets

        parse_nets(v)
        return v

    webhook_secret: str = Field("", description="HMAC-SHA256 key of webhook signatures; empty: unsigned")
    webhook_attempts: int = Field(5, ge=1, description="Deliveries of one webhook before giving up")
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry delay of a webhook; doubles per attempt")
    webhook_timeout_s: float = Field(5.0, gt=0, description="Timeout of one webhook delivery")
    worker_concurrency: int = Field(1, ge=1, description="Tasks one worker runs at once (threads sharing one engine)")

    # --- GPU serving: which engine the worker runs and how it keeps the GPU fed ---
    engine: EngineKind = Field("torch", description="torch, onnxruntime, onnxruntime-trt or tensorrt (as --engine)")
    onnx_dir: Path | None = Field(None, description="Graphs of `stemseg export onnx`; needed by every engine but torch")
    trt_cache: Path | None = Field(None, description="Native TensorRT engine cache (default ONNX_DIR/trt-engines)")
    autocast: Autocast = Field("off", description="torch engine: off, bf16 or fp16 autocast (off keeps the fp32 "
                                                  "outputs)")
    torch_compile: CompileMode = Field("off", description="torch engine: off, default, reduce-overhead (CUDA graphs) "
                                                          "or max-autotune (torch.compile modes)")
    tf32: bool = Field(False, description="torch engine on CUDA: TF32 matmuls and convolutions")
    batch_max_size: int = Field(0, ge=0, description="Cross-task dynamic batching: most frames (backbone) or clips "
                                               "(heads) in one forward; 0 or 1 disables it")
    batch_max_delay_ms: float = Field(5.0, ge=0, description="Dynamic batching: longest a request waits for others")
    clips_per_forward: int = Field(1, ge=1, description="Consecutive clips whose heads run as one batch")

    # --- Live sources (service/video/live.py): streams and cameras read at their own pace ---
    live_rtsp_transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP over TCP (interleaved) or UDP")
    live_open_timeout_s: float = Field(10.0, gt=0, description="A live source that does not open within this is "
                                                               "an error (or a failed reconnect attempt)")
    live_read_timeout_s: float = Field(10.0, gt=0, description="A live source that sends nothing for this long "
                                                               "has dropped: it is reconnected")
    live_reconnect_attempts: int = Field(3, ge=0, description="Reconnects tried after a live source drops or "
                                                              "ends before it counts as ended (0: end at once)")
    live_reconnect_backoff_s: float = Field(1.0, ge=0, description="Wait before the first reconnect; doubles per "
                                                                   "failed attempt")
    live_reconnect_backoff_max_s: float = Field(10.0, ge=0, description="Longest wait between reconnects")
    live_backlog: Literal["drop", "buffer"] = Field(
        "drop", description="When the model falls behind a live source: drop whole clips of arriving frames "
                            "(counted; tracks restart after the gap), or stop reading until the queue has room")
    live_queue_bytes: int = Field(256 * 1024**2, ge=1, description="Decoded frames of a live source waiting for "
                                  "the model, in bytes (one frame always fits); the backlog policy applies above")
    stream_hosts: str = Field("", description="host or host:port a live stream's URL may name (comma-separated, as "
                              "STEMSEG_SOURCE_HOSTS; its private addresses only inside STEMSEG_SOURCE_PRIVATE_NETS); "
                              "empty: no live streams")

    live_queue_frames: int = Field(32, ge=1, description="... and in frames (1.3 s at 25 fps): what bounds "
                                   "the latency a backlog adds under the drop policy")

    # --- Live streams in the service (service/jobs/streams.py, service/jobs/stream_worker.py) ---
    max_streams_per_key: int = Field(2, ge=0, description="Unfinished live streams per API key (429 above); "
                                     "0: no limit")
    stream_duration_s: float = Field(3600.0, gt=0, description="A live stream's max_duration_s when the request "
                                     "gives none")
    stream_max_duration_s: float = Field(24 * 3600.0, gt=0, description="The largest max_duration_s a request "
                                         "may ask for (422 above)")
    worker_streams: int = Field(1, ge=0, description="Live streams one worker runs at once (each on a thread of "
                                "its own, sharing the engine); 0: the worker takes no streams")
    worker_streams_take_files: bool = Field(False, description="A worker running a live stream also takes file "
                                            "tasks (off: the stream keeps the worker's engine to itself)")

    @property
    def source_bucket_list(self) -> list[str]:
        return [b.strip() for b in self.source_buckets.split(",") if b.strip()]

    @property
    def source_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.source_hosts.split(",") if h.strip()]

    @property
    def stream_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.stream_hosts.split(",") if h.strip()]

    @property
    def webhook_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip()]

    @property
    def redis_pool_sizes(self) -> tuple[int, int]:
        """Connections of an API process's (sync, async) Redis pools: one per thread that can
        run a Redis call (the API threads and the probe threads), one per event stream, and a
        margin each."""
        return (self.api_threads + self.max_concurrent_probes + self.redis_pool_margin,
                self.max_event_streams + self.redis_pool_margin)

    @property
    def format_list(self) -> tuple[str, ...]:
        return parse_formats(self.formats)

    @property
    def weights_path(self) -> Path:
        """The file the weights setting names (see resolve_weights); raises WeightsNotFound."""
        return resolve_weights(self.weights, self.weights_dir)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when a GPU is usable, else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available")
    return name
