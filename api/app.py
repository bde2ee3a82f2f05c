"""The FastAPI application: routers, error envelope, upload limit, shared services on app.state."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.auth import KeyCache, RateLimiter
from api.routes import files, health, jobs, models
from store.artifacts import ArtifactStore
from store.db import session_factory
from store.queue import Sender, make_celery
from store.settings import Settings, get_settings

DESCRIPTION = """OpenAI's fine-tuning protocol, plus driftsafe's extensions: `self_distillation`
and `frozen_groups` methods, LoRA or full adapters, known-fact hallucination scoring (`evaluation`)
and adapter downloads. Point the `openai` client at this server with `base_url`."""


class UploadLimit:
    """Refuse request bodies over the limit before they are read whole (413 in the envelope).

    Checks Content-Length up front and counts streamed bytes for chunked uploads. The limit is the
    file limit plus room for multipart framing; the route enforces the file limit exactly.
    """

    SLACK = 64 * 1024

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes + self.SLACK

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        response = errors.envelope(413, f"Request body exceeds {self.max_bytes - self.SLACK} "
                                        "bytes.", param="file", code="file_too_large")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(response.body)).encode())]})
        await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="driftsafe", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.sessions = session_factory(settings)
    app.state.artifacts = ArtifactStore(settings.artifacts_dir)
    app.state.celery = make_celery(settings)
    app.state.sender = Sender(app.state.celery, settings)
    app.state.keys = KeyCache(settings.hmac_key(), settings.key_cache_seconds)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    errors.install(app)
    for module in (files, jobs, models, health):
        app.include_router(module.router)
    from api.routes import webhooks
    app.include_router(webhooks.router)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    return app
