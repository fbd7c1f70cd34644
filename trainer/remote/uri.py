"""Storage URIs never carry credentials: a secret in `s3://KEY:SECRET@bucket` would be copied into config.yaml,
events, logs and error messages. Standard library only (config validation uses it)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from trainer.errors import ConfigError

_SECRET_QUERY = re.compile(r"secret|credential|signature|token|password|passwd|access.?key", re.IGNORECASE)


def has_credentials(uri: str) -> bool:
    """`user:password@` or `user@` before the host (a secret may hold '/', so it is looked for before the last
    '@' too), or a key, token or signature in the query string."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        return True
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "@" in rest
    return "@" in parts.netloc or bool(_SECRET_QUERY.search(parts.query))


def reject_credentials(uri: str | None, what: str) -> None:
    """ConfigError (exit 2) when `uri` holds credentials; the message repeats nothing of it."""
    if uri and has_credentials(uri):
        raise ConfigError(
            f"{what}: the URI holds credentials (user:password@ or a key in the query), which are not accepted "
            f"there; remove them, and give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or "
            f"a profile (checkpoint.s3.profile)"
        )
