"""If-Match against entity tags, as the service resources use it.

If-Match is optional except when replacing an existing CA certificate (ARM requires it
there); when given it must match (`*` matches any existing entity), else 412.
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import errors
from ..errors import DpsError


def etag_matches(if_match: str, etag: str) -> bool:
    """RFC 7232 If-Match against our etag; quotes and W/ are tolerated."""
    for candidate in if_match.split(","):
        value = candidate.strip()
        if value == "*":
            return True
        if value.startswith("W/"):
            value = value[2:]
        if value == etag or value.strip('"') == etag.strip('"'):
            return True
    return False


def check_if_match(headers: Mapping[str, str], etag: str | None, required: bool = False) -> None:
    """DpsError 412 unless the request's If-Match (if any, or `required`) names `etag`."""
    if_match = headers.get("if-match")
    if if_match is None:
        if required:
            raise DpsError(errors.PRECONDITION_FAILED,
                           "If-Match with the current etag is required to replace this entity")
        return
    if etag is None or not etag_matches(if_match, etag):
        raise DpsError(errors.PRECONDITION_FAILED, "Precondition failed: If-Match does not "
                       "match the current etag (fetch the entity again)")
