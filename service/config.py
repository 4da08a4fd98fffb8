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

    # --- GPU serving (issue 14): which engine the worker runs and how it keeps the GPU fed ---
    engine: str = Field("torch", description="torch, onnxruntime, onnxruntime-trt or tensorrt (as --engine)")
    onnx_dir: Path | None = Field(None, description="Graphs of `stemseg export onnx`; needed by every engine but torch")
    trt_cache: Path | None = Field(None, description="Native TensorRT engine cache (default ONNX_DIR/trt-engines)")
    autocast: str = Field("off", description="torch engine: off, bf16 or fp16 autocast (off keeps the fp32 outputs)")
    torch_compile: str = Field("off", description="torch engine: off, default, reduce-overhead (CUDA graphs) or "
                                                  "max-autotune (torch.compile modes)")
    tf32: bool = Field(False, description="torch engine on CUDA: TF32 matmuls and convolutions")
    batch_max_size: int = Field(0, description="Cross-task dynamic batching: most frames (backbone) or clips "
                                               "(heads) in one forward; 0 or 1 disables it")
    batch_max_delay_ms: float = Field(5.0, description="Dynamic batching: longest a request waits for others")
    clips_per_forward: int = Field(1, description="Consecutive clips whose heads run as one batch")
    decode_prefetch: int = Field(4, description="Clip windows decoded ahead of the network (0: decode inline)")

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
