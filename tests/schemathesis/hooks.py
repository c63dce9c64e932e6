"""Schemathesis hooks: a check that no caller reaches another user's data."""
import os

import schemathesis

CALLER = os.environ.get("ST_CALLER", "")


@schemathesis.check
def no_access_across_users(ctx, response, case):
    """A non-admin caller naming another user's id must never get a 2xx."""
    path = case.path or ""
    if not path.startswith("/api/users/{id}"):
        return None
    target = (case.path_parameters or {}).get("id")
    if target is not None and target != CALLER and 200 <= response.status_code < 300:
        raise AssertionError(
            f"{case.method} {path} with id={target!r} answered {response.status_code} to {CALLER!r}"
        )
    return None
