"""What the API serves to a browser: the dashboard (/ui), the job report page, and the docs
(/docs), every script and stylesheet from the package itself, so a page needs no network beyond
this server (no CDN).

The pages carry no data and no key: the dashboard asks for a key, keeps it in sessionStorage and
sends it as a bearer header on the JSON routes. A report page holds its job's objects as they
came off those routes, as inert JSON that report.js reads; job fields are text a client wrote
(suffix, metadata), so the scripts put them into the page as text, never as markup, and the
Content-Security-Policy runs scripts from this server only.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from store.db import json_bytes

HERE = Path(__file__).parent
STATIC = "/ui/static"
SWAGGER = "/ui/swagger"
# 'self' only: no inline script, nothing from another host, no form posts anywhere (the key
# field is never submitted, so it can never land in a URL), no framing by other sites.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; "
                               "form-action 'none'; base-uri 'none'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _template(name: str) -> str:
    return (HERE / name).read_text()


def embedded_json(value) -> str:
    """JSON that cannot end the <script> element holding it, nor open a comment or CDATA, and
    that JSON.parse reads (no bare NaN: `json_bytes` writes null)."""
    return (json_bytes(value).decode().replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def report_page(request: Request, job: dict, events: list[dict], checkpoints: list[dict]) -> str:
    return (_template("report.html")
            .replace("{{title}}", html.escape(f"driftsafe · report {job['id']}"))
            .replace("{{static}}", html.escape(_root(request) + STATIC))
            .replace("{{data}}", embedded_json(
                {"job": job, "events": events, "checkpoints": checkpoints})))


def install(app: FastAPI) -> None:
    """The dashboard and the offline docs. The app must be made with docs_url=None (FastAPI's
    own /docs loads Swagger UI from a CDN) and redoc_url=None (so does ReDoc)."""
    from swagger_ui_bundle import swagger_ui_path  # swagger-ui-bundle-v2: swagger-ui-dist 5

    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="ui-static")
    app.mount(SWAGGER, StaticFiles(directory=str(swagger_ui_path)), name="ui-swagger")

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        return RedirectResponse(_root(request) + "/ui")

    @app.get("/ui", include_in_schema=False)
    async def dashboard(request: Request) -> HTMLResponse:
        page = _template("dashboard.html").replace("{{static}}",
                                                   html.escape(_root(request) + STATIC))
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png",
            # No badge asking validator.swagger.io about this document: nothing leaves the page.
            swagger_ui_parameters={"validatorUrl": None})
