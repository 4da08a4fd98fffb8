"""All settings in one place, read from the environment (prefix STEMSEG_) or a .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Ways to run the network (service.model.engines), listed here so the CLI need not import torch.
ENGINES = ("torch", "onnxruntime", "onnxruntime-trt", "tensorrt")

# The model we train and ship (weights/MODEL_CARD.md); used when no weights are configured.
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "lite.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEMSEG_", env_file=".env", extra="ignore")

    weights: Path | None = Field(None, description="Weights file (.pth or .safetensors); default: the shipped lite model")
    preset: str | None = Field(None, description="Preset name; inferred from the weights when unset")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_frame_pixels: int = Field(4096 * 2160, description="Larger frames are refused (width x height)")
    data_dir: Path = Field(Path("./stemseg-data"), description="Uploads, clip results and outputs")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("stemseg", description="Namespace of every Redis key")
    api_keys: str = Field("", description="Comma-separated API keys; empty disables authentication")
    max_upload_bytes: int = Field(2 * 1024**3, description="Uploads above this are refused (413)")
    clips_per_task: int = Field(8, description="Consecutive clips one worker task processes")
    visibility_timeout_s: float = Field(60.0, description="A task held this long without a heartbeat is redelivered")
    max_deliveries: int = Field(3, description="Deliveries of one task before its job fails")
    job_ttl_s: int = Field(7 * 24 * 3600, description="Jobs, their keys and files expire after this")
    formats: str = Field("ytvis,davis,mots,overlay", description="Outputs the service writes per job")

    # --- Job lifecycle, limits and faults (issue 12; owned by service/jobs and service/api) ---
    max_frames: int = Field(20_000, description="Videos with more frames are refused (413)")
    max_duration_s: float = Field(3600.0, description="Videos longer than this are refused (413)")
    max_active_jobs: int = Field(100, description="Unfinished jobs per API key (429 above); 0: no quota")
    rate_limit_jobs: int = Field(60, description="Uploads one API key may send per rate window (429); 0: off")
    rate_window_s: int = Field(60, description="Length of the rate-limit window in seconds")
    max_event_streams: int = Field(256, description="Open /events streams per API process (503 above)")
    sse_keepalive_s: float = Field(15.0, description="Comment line sent on an idle event stream")
    sse_max_s: float = Field(3600.0, description="An event stream ends after this; clients resume with Last-Event-ID")
    upload_idle_timeout_s: float = Field(30.0, description="An upload that sends nothing for this long is dropped (408)")
    redis_timeout_s: float = Field(1.0, description="Connect and reply timeout of every Redis call")
    retry_after_s: int = Field(5, description="Retry-After sent with 503 when Redis is unreachable")
    sweep_interval_s: float = Field(60.0, description="How often a worker runs the sweeper (one worker at a time)")
    sweep_grace_s: float = Field(600.0, description="Files without a job record are deleted once this old")
    webhook_hosts: str = Field("127.0.0.1,localhost,::1", description="Hosts a callback_url may name (comma-separated)")
    webhook_secret: str = Field("", description="HMAC-SHA256 key of webhook signatures; empty: unsigned")
    webhook_attempts: int = Field(5, description="Deliveries of one webhook before giving up")
    webhook_backoff_s: float = Field(1.0, description="First retry delay of a webhook; doubles per attempt")
    webhook_timeout_s: float = Field(5.0, description="Timeout of one webhook delivery")
    worker_concurrency: int = Field(1, ge=1, description="Tasks one worker runs at once (threads sharing one engine)")

    @property
    def webhook_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip()]

    @property
    def weights_path(self) -> Path | None:
        """The configured weights, else the shipped default model when this checkout has it."""
        if self.weights is not None:
            return self.weights
        return SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else None

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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available")
    return name
