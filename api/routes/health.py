"""/healthz: is the database reachable, is the broker reachable."""

from fastapi import APIRouter, Request
from sqlalchemy import text

from api.responses import JSONResponse
from api.schemas import Health

router = APIRouter(tags=["health"])


def _database_ok(request: Request) -> str:
    try:
        with request.app.state.sessions() as s:
            s.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:  # noqa: BLE001 - report, don't raise
        return f"unreachable: {type(e).__name__}"


def _broker_ok(request: Request) -> str:
    try:
        with request.app.state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"unreachable: {type(e).__name__}"


@router.get("/healthz", summary="Database and broker reachability",
            responses={200: {"model": Health},
                       503: {"model": Health,
                             "description": "The database or broker is unreachable"}})
def healthz(request: Request):
    checks = {"database": _database_ok(request), "broker": _broker_ok(request)}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **checks},
                        status_code=200 if ok else 503)
