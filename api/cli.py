"""Admin and serving commands: `driftsafe serve api`, `tenants create`, `keys create|revoke`."""

from __future__ import annotations

import sys

from store.db import migrate, session_scope
from store.keys import create_key, create_tenant, revoke_key, tenant_by_name
from store.settings import get_settings


def serve_api(args) -> int:
    import uvicorn

    settings = get_settings()
    migrate(settings)  # the schema is current before the first request
    workers = getattr(args, "workers", 1) or 1
    if workers > 1:
        # N processes need the app as an import string: each builds its own from the same
        # DRIFTSAFE_* environment (its own engine pool and broker connection).
        uvicorn.run("api.app:create_app", factory=True, workers=workers, host=args.host,
                    port=args.port, log_level=args.log_level)
        return 0
    from api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def tenants_create(args) -> int:
    settings = get_settings()
    migrate(settings)
    try:
        with session_scope(settings) as s:
            tenant = create_tenant(s, args.name)
            key_row, key = create_key(s, settings.hmac_key(), tenant)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"tenant {tenant.name} ({tenant.id}) created; API key id {key_row.id}")
    print("the key below is shown once; store it now:")
    print(key)
    return 0


def keys_create(args) -> int:
    settings = get_settings()
    migrate(settings)
    with session_scope(settings) as s:
        tenant = tenant_by_name(s, args.tenant)
        if tenant is None:
            print(f"error: no tenant named {args.tenant!r}", file=sys.stderr)
            return 1
        key_row, key = create_key(s, settings.hmac_key(), tenant)
    print(f"API key id {key_row.id} for tenant {args.tenant}; shown once:")
    print(key)
    return 0


def keys_revoke(args) -> int:
    settings = get_settings()
    migrate(settings)
    try:
        with session_scope(settings) as s:
            revoke_key(s, args.key_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
