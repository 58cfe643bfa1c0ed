"""RFC 7512 PKCS#11 URIs: `pkcs11:token=...;object=...;id=%01%02?pin-source=...`.

Parsing and printing live here so every area names token objects the same way.
A URI never prints its `pin-value`: the PIN is kept for the caller, not for logs.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import quote, unquote_to_bytes

from device_sim.common.errors import UserError

SCHEME = "pkcs11:"

# RFC 7512 section 2.3: path attributes (before "?") and query attributes (after).
_PATH_FIELDS = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "object": "object",
    "type": "type",
    "id": "id",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "slot-id": "slot_id",
}
_QUERY_FIELDS = {
    "pin-source": "pin_source",
    "pin-value": "pin_value",
    "module-name": "module_name",
    "module-path": "module_path",
}
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")

# Characters printed as themselves (RFC 7512 pk11-pchar / pk11-qchar minus the
# separators); everything else is percent-encoded.
_PATH_SAFE = "-._~:[]@!$'()*+,=&"
_QUERY_SAFE = "-._~:[]@!$'()*+,=/?|"


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    """The attributes of one PKCS#11 URI; None means "not given" (matches anything)."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    pin_source: str | None = None
    pin_value: str | None = dataclasses.field(default=None, repr=False)
    module_name: str | None = None
    module_path: str | None = None
    # Vendor ("x-...") attributes, kept in order so they print back unchanged.
    vendor: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Pkcs11Uri":
        """Parse an RFC 7512 URI; raise UserError naming the part that is wrong."""
        text = text.strip()
        if not text[: len(SCHEME)].lower() == SCHEME:
            raise UserError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {_redact(text)}")
        body = text[len(SCHEME):]
        path, _, query = body.partition("?")
        values: dict[str, object] = {}
        vendor: list[tuple[str, str]] = []
        for part in _split(path, ";"):
            _take(part, _PATH_FIELDS, values, vendor)
        for part in _split(query, "&"):
            _take(part, _QUERY_FIELDS, values, vendor)
        return cls(**values, vendor=tuple(vendor))

    def to_string(self, *, include_pin: bool = False) -> str:
        """The URI text; `pin-value` only when explicitly asked for."""
        path = []
        for name, field in _PATH_FIELDS.items():
            value = getattr(self, field)
            if value is None:
                continue
            if field == "id":
                path.append("id=" + "".join(f"%{b:02X}" for b in value))
            else:
                path.append(f"{name}={quote(str(value), safe=_PATH_SAFE.replace('&', ''))}")
        path += [f"{k}={quote(v, safe=_PATH_SAFE)}" for k, v in self.vendor]
        query = []
        for name, field in _QUERY_FIELDS.items():
            value = getattr(self, field)
            if value is None or (field == "pin_value" and not include_pin):
                continue
            query.append(f"{name}={quote(str(value), safe=_QUERY_SAFE)}")
        text = SCHEME + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.to_string()

    def as_dict(self) -> dict:
        """JSON-friendly view (id as hex, no PIN value)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value in (None, ()) or field.name == "pin_value":
                continue
            out[field.name] = value.hex() if field.name == "id" else value
        if self.pin_value is not None:
            out["pin_value"] = "(hidden)"
        return out


def _split(text: str, sep: str) -> list[str]:
    return [p for p in text.split(sep) if p] if text else []


def _take(part: str, fields: dict[str, str], values: dict, vendor: list) -> None:
    name, eq, raw = part.partition("=")
    name = name.lower()
    if not eq:
        raise UserError(f"PKCS#11 URI attribute {name!r} has no '=value'")
    decoded = unquote_to_bytes(raw)
    if name in fields:
        field = fields[name]
        if field in values:
            raise UserError(f"PKCS#11 URI repeats attribute {name!r}")
        values[field] = _convert(field, name, decoded)
    elif name.startswith("x-"):
        vendor.append((name, decoded.decode("utf-8", "replace")))
    else:
        raise UserError(f"unknown PKCS#11 URI attribute {name!r} (RFC 7512 names only, or x-...)")


def _convert(field: str, name: str, decoded: bytes):
    if field == "id":
        return decoded
    try:
        value = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from None
    if field == "slot_id":
        if not value.isdigit():
            raise UserError(f"PKCS#11 URI slot-id must be a decimal number, got {value!r}")
        return int(value)
    if field == "type" and value not in OBJECT_TYPES:
        raise UserError(f"PKCS#11 URI type must be one of {', '.join(OBJECT_TYPES)}, got {value!r}")
    return value


def _redact(text: str) -> str:
    """Drop a pin-value from text that goes into an error message."""
    head, sep, query = text.partition("?")
    if not sep:
        return text
    kept = [p for p in query.split("&") if not p.lower().startswith("pin-value=")]
    return head + ("?" + "&".join(kept) if kept else "")
