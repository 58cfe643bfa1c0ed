"""Shared access signature tokens for the service API (docs/x509-rules.md, "SAS tokens").

`SharedAccessSignature sr=<url-encoded resource URI>&sig=<url-encoded base64 HMAC-SHA256>
&se=<unix expiry>&skn=<policy>`; the signed text is the URL-encoded resource URI as it
appears in the token, a newline, and the expiry. The resource URI is a host name with an
optional path prefix; a token is good for every request path below it (matched
segment-wise, case-insensitively). The service SDKs put a connection string's HostName in
`sr` as they found it: `localhost:PORT` raw or `localhost%3APORT` encoded, so a request
may be checked against several resource hosts (`verify_token_for`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote, unquote

PREFIX = "SharedAccessSignature "
DEFAULT_POLICY = "provisioningserviceowner"


class SasError(ValueError):
    """The token is missing, malformed, expired, for another resource or badly signed."""


def _sign(key: bytes, encoded_resource: str, expiry: str) -> str:
    text = f"{encoded_resource}\n{expiry}".encode("utf-8")
    return base64.b64encode(hmac.new(key, text, hashlib.sha256).digest()).decode("ascii")


def make_token(resource_uri: str, key: bytes, policy: str = DEFAULT_POLICY,
               ttl: int = 3600, now: float | None = None) -> str:
    """A token for `resource_uri` (e.g. "localhost" or "mydps.example/enrollments")."""
    expiry = str(int((time.time() if now is None else now) + ttl))
    encoded = quote(resource_uri.lower(), safe="")
    sig = quote(_sign(key, encoded, expiry), safe="")
    return f"{PREFIX}sr={encoded}&sig={sig}&se={expiry}&skn={quote(policy, safe='')}"


def _fields(token: str) -> dict[str, str]:
    if not token.startswith(PREFIX):
        raise SasError("Authorization must be a SharedAccessSignature token")
    fields = {}
    for part in token[len(PREFIX):].strip().split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in fields:
            raise SasError("malformed SharedAccessSignature token")
        fields[name] = value
    missing = {"sr", "sig", "se"} - fields.keys()
    if missing:
        raise SasError(f"SharedAccessSignature token lacks {', '.join(sorted(missing))}")
    return fields


def _strip_scheme(uri: str) -> str:
    uri = uri.lower()
    for scheme in ("https://", "http://"):
        if uri.startswith(scheme):
            uri = uri[len(scheme):]
    return uri.rstrip("/")


def covers(token_resource: str, request_resource: str) -> bool:
    """True when the token's resource URI is the request's or a whole-segment prefix of it."""
    granted = _strip_scheme(unquote(token_resource))
    wanted = _strip_scheme(request_resource)
    return wanted == granted or wanted.startswith(granted + "/")


def verify_token(token: str | None, key: bytes, request_resource: str,
                 policy: str = DEFAULT_POLICY, now: float | None = None) -> None:
    """Raise SasError unless `token` is valid now for `request_resource` (host + path)."""
    verify_token_for(token, key, (request_resource,), policy, now)


def verify_token_for(token: str | None, key: bytes, request_resources: tuple[str, ...],
                     policy: str = DEFAULT_POLICY, now: float | None = None) -> None:
    """Raise SasError unless `token` is valid now for one of `request_resources` (the same
    request path under each host the service answers as)."""
    if not token:
        raise SasError("missing Authorization header with a SharedAccessSignature token")
    fields = _fields(token)
    try:
        expiry = int(fields["se"])
    except ValueError:
        raise SasError("SharedAccessSignature expiry (se) is not a number") from None
    if expiry <= (time.time() if now is None else now):
        raise SasError("SharedAccessSignature token has expired")
    if unquote(fields.get("skn", "")).lower() != policy.lower():
        raise SasError(f"SharedAccessSignature policy (skn) must be {policy}")
    if not any(covers(fields["sr"], resource) for resource in request_resources):
        raise SasError("SharedAccessSignature resource (sr) does not cover this request")
    given = unquote(fields["sig"]).encode("ascii", "replace")
    # Encoders differ (quote vs quote_plus, hex case), so accept the form as sent and the
    # canonical one.
    for encoded in {fields["sr"], quote(unquote(fields["sr"]), safe="")}:
        expected = _sign(key, encoded, fields["se"]).encode("ascii")
        if hmac.compare_digest(expected, given):
            return
    raise SasError("SharedAccessSignature signature does not match")
