"""The FastAPI application: `create_app()`; served by `stemseg serve`."""

from __future__ import annotations

from fastapi import FastAPI

from service.api import problems
from service.api.deps import Services
from service.api.routes import health, jobs
from service.config import Settings, get_settings
from service.model.checkpoint import load_model
from service.model.presets import ModelConfig, get_preset


def create_app(settings: Settings | None = None, model_cfg: ModelConfig | None = None) -> FastAPI:
    """The API process never runs the network; it only needs the model's preset for the clip
    plan, which it reads from the weights file (or takes as given)."""
    settings = settings or get_settings()
    if model_cfg is None and settings.preset:
        model_cfg = get_preset(settings.preset)
    if model_cfg is None:
        if settings.weights is None:
            raise RuntimeError("set STEMSEG_WEIGHTS or STEMSEG_PRESET: the API needs the model's preset to plan clips")
        model_cfg = load_model(settings.weights).cfg
    app = FastAPI(title="stemseg-serve", version="0.1.0",
                  description="STEm-Seg video instance segmentation: upload a video, poll the job, fetch tracks.")
    app.state.settings = settings
    app.state.model_cfg = model_cfg
    app.state.services = Services.connect(settings)
    problems.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    return app
