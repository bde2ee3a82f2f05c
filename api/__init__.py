"""HTTP only: routes, wire schemas, auth, errors. Never imports torch."""
