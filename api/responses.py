"""The API's JSON response: Starlette's, rendered by `store.db.json_bytes` (pydantic-core).

A page of twenty jobs is about 44 KB of JSON; the standard library's encoder took a fifth of
such a list request, pydantic-core's (already installed for FastAPI) takes a quarter of that.
Non-finite floats become null rather than invalid JSON.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse

from store.db import json_bytes


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)
