"""The browser side of the API, served by the app itself with no CDN and no build step: the
upload page at `/` (service/api/static/), Swagger UI at `/docs` and ReDoc at `/redoc` from
vendored copies (service/api/static/vendor/, each with its licence), so all three work on a
machine without internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
STATIC_URL = "/static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    # no-cache: an upgraded server's page is fetched again, never an old one against a new API
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="stemseg-serve API",
                               swagger_js_url=f"{STATIC_URL}/vendor/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url=f"{STATIC_URL}/vendor/swagger-ui/swagger-ui.css",
                               swagger_favicon_url=f"{STATIC_URL}/vendor/swagger-ui/favicon-32x32.png",
                               oauth2_redirect_url=None,
                               # no validator badge: it would be fetched from validator.swagger.io
                               swagger_ui_parameters={"persistAuthorization": False, "validatorUrl": None})


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="stemseg-serve API",
                          redoc_js_url=f"{STATIC_URL}/vendor/redoc/redoc.standalone.js",
                          redoc_favicon_url=f"{STATIC_URL}/vendor/swagger-ui/favicon-32x32.png",
                          with_google_fonts=False)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)
