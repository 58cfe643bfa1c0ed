"""Query bodies and paging of the service API's list operations.

A query body is `{"query": "*"}` (or `SELECT * FROM ...`); pages are asked for with
`x-ms-max-item-count` and continued with the `x-ms-continuation` token of the previous
answer, which is the last ID of that page, base64url-encoded.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from .. import errors
from ..errors import DpsError, Reply
from ..json_body import json_object

DEFAULT_PAGE = 100
MAX_PAGE = 10_000
_QUERY_ALL = re.compile(r"^\s*(\*|select\s+\*\s+from\s+\w+)\s*$", re.IGNORECASE)


def check_query(body: bytes) -> None:
    """DpsError 400 unless the body asks for everything (the only query supported)."""
    data = json_object(body, required=False)
    query = data.get("query", "*")
    if not isinstance(query, str) or not _QUERY_ALL.match(query):
        raise DpsError(errors.BAD_REQUEST, 'only the query "*" (or SELECT * FROM ...) is '
                       "supported by the emulator")


def page_args(headers: Mapping[str, str]) -> tuple[str, int]:
    """(ID to start after, page size) from the paging headers."""
    raw_count = headers.get("x-ms-max-item-count") or str(DEFAULT_PAGE)
    try:
        count = int(raw_count)
    except ValueError:
        raise DpsError(errors.BAD_REQUEST, "x-ms-max-item-count must be an integer") from None
    if not 1 <= count <= MAX_PAGE:
        raise DpsError(errors.BAD_REQUEST, f"x-ms-max-item-count must be 1..{MAX_PAGE}")
    token = headers.get("x-ms-continuation") or ""
    try:
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else ""
    except (ValueError, binascii.Error):
        raise DpsError(errors.BAD_REQUEST, "x-ms-continuation is not a token this service "
                       "issued") from None
    return after, count


def paged(items: list, keys: list[str], count: int, item_type: str) -> Reply:
    """One page of `items` (fetched with one more than `count` to know if more follow)."""
    headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(count)}
    if len(items) > count:
        items, keys = items[:count], keys[:count]
        headers["x-ms-continuation"] = base64.urlsafe_b64encode(keys[-1].encode()).decode()
    return Reply(200, items, headers)
