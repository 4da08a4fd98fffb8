"""The FastAPI application: `create_app()`; served by `stemseg serve`.

The API process never imports torch: it plans clips from the served model's preset
(`service.jobs.model_info`) and leaves the network to the workers.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from service.api import problems
from service.api.deps import Services
from service.api.routes import files, health, jobs, streams, web
from service.config import Settings, get_settings
from service.jobs import probing
from service.jobs.model_info import served_model_of
from service.model.presets import ModelConfig


def create_app(settings: Settings | None = None, model_cfg: ModelConfig | None = None) -> FastAPI:
    settings = settings or get_settings()
    if model_cfg is None:
        model_cfg = served_model_of(settings)
    services = Services.connect(settings, model_cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Blocking work (sync routes, run_in_threadpool) runs on this many threads, the sync
        # Redis pool is sized to match (Settings.redis_pool_sizes).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        # The probes' forkserver starts (and imports PyAV) now, not in the first upload's time.
        await anyio.to_thread.run_sync(probing.warm_up)
        yield
        await services.aredis.aclose()
        services.redis.close()

    # /docs and /redoc are web.py's, from vendored assets: FastAPI's own load them from a CDN.
    app = FastAPI(title="stemseg-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None,
                  description="STEm-Seg video instance segmentation: upload a video, poll the job, fetch tracks. "
                              "Every error is application/problem+json (RFC 9457). When the service has API "
                              "keys (STEMSEG_API_KEYS), send one as `X-API-Key: KEY` or "
                              "`Authorization: Bearer KEY`. The upload page is at `/`.")
    app.state.settings = settings
    app.state.model_cfg = model_cfg
    app.state.services = services
    problems.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(streams.router)
    app.include_router(web.router)
    app.mount(web.STATIC_URL, web.static_files(), name="static")
    return app
