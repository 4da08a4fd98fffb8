"""All settings in one place, read from the environment (prefix STEMSEG_) or a .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEMSEG_", env_file=".env", extra="ignore")

    weights: Path | None = Field(None, description="Weights file used when none is given (.pth or .safetensors)")
    preset: str | None = Field(None, description="Preset name; inferred from the weights when unset")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_frame_pixels: int = Field(4096 * 2160, description="Larger frames are refused (width x height)")
    data_dir: Path = Field(Path("./stemseg-data"), description="Uploads, clip results and outputs")
    redis_url: str = "redis://127.0.0.1:6379/0"


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
