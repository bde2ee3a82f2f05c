"""The API's responses: JSON (Starlette's, rendered by `store.db.json_bytes`, pydantic-core) and
file downloads (`Download`).

A page of twenty jobs is about 44 KB of JSON; the standard library's encoder took a fifth of
such a list request, pydantic-core's (already installed for FastAPI) takes a quarter of that.
Non-finite floats become null rather than invalid JSON.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.responses import JSONResponse as _StarletteJSONResponse

from store.db import json_bytes


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


class Download(FileResponse):
    """A file streamed from disk, in byte ranges when asked (206: a large adapter's download can
    resume). A Range header it cannot parse is ignored, as RFC 9110 allows: the whole file, 200
    (Starlette answered it with a plain-text 400, outside the error envelope). A range that
    starts past the end is 416 in the envelope, with Content-Range: bytes */size, unless an
    If-Range names another version of the file: then the whole file, as RFC 9110 says."""

    async def __call__(self, scope, receive, send) -> None:
        headers = Headers(scope=scope)
        asked, if_range = headers.get("range"), headers.get("if-range")
        if asked is not None and scope.get("method") in ("GET", "HEAD"):
            if self.stat_result is None:  # Starlette's own stat, done once: its ETag too
                self.stat_result = os.stat(self.path)
                self.set_stat_headers(self.stat_result)
            if if_range is not None and not self._should_use_range(if_range):
                # The client's copy is stale: the whole file, 200, whatever the range says.
                return await super().__call__(scope, receive, send)
            size = self.stat_result.st_size
            try:
                self._parse_range_header(asked, size)
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
            except RangeNotSatisfiable:
                from api.errors import envelope

                response = envelope(416, f"The range '{asked[:100]}' starts past the end of the "
                                         f"file ({size} bytes).", param="Range",
                                    code="range_not_satisfiable",
                                    headers={"Content-Range": f"bytes */{size}"})
                return await response(scope, receive, send)
        await super().__call__(scope, receive, send)


def download_responses(media_type: str) -> dict:
    """What a `Download` route answers besides errors its dependencies declare (api.openapi)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {200: {"content": {media_type: binary}},
            206: {"description": "The byte ranges a Range header asked for (several come as "
                                 "multipart/byteranges)",
                  "content": {media_type: binary, "multipart/byteranges": binary}},
            416: {"description": "The Range header's range starts past the end of the file"}}
