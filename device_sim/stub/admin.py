"""Client of the emulator's service API (what `device-sim stub ca|group|enroll|registration` use).

It finds the server through `<home>/stub/endpoint.json` (written by `stub serve`) or an
explicit service URL, trusts the emulator's CA file, and signs each request with a SAS
token made from the service key file. The key itself is never printed.

Paths follow the real services (docs/x509-rules.md, "CA certificates and proof of
possession" and "Service API"): certificates as in ARM (`/certificates/{name}`,
`.../generateVerificationCode`, `.../verify`), enrollments and registrations as in the DPS
service API; `/emulator/...` paths are the emulator's own (docs/emulator.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import requests

from device_sim.common import dps
from device_sim.common.errors import UserError
from device_sim.common.suggest import did_you_mean
from device_sim.common.x509util import load_certificate_file, to_pem
from device_sim.stub.layout import StateLayout, read_service_key
from device_sim.stub.core import sas

API_VERSION = dps.SERVICE_API_VERSION
EXIT_SERVICE_ERROR = 3  # the service answered with an error
EXIT_UNREACHABLE = 4  # no emulator answering


@dataclass(frozen=True)
class Endpoint:
    service_url: str
    ca_cert: Path
    service_key_file: Path
    service_host: str = "localhost"


def find_endpoint(home: Path, service_url: str | None = None) -> Endpoint:
    """Where the service API is: `--service-url` (with the home's CA and key files) or the
    endpoint file a running `stub serve --home` wrote."""
    layout = StateLayout.of(home)
    endpoint_file = layout.endpoint
    recorded: dict = {}
    if endpoint_file.exists():
        try:
            recorded = json.loads(endpoint_file.read_text())
        except (OSError, ValueError):
            recorded = {}
    url = service_url or recorded.get("service_url")
    if not url:
        raise UserError(
            f"no running emulator found under {home} (no {endpoint_file}); start one with "
            f"`device-sim stub serve --home {home}` or pass --service-url",
            exit_code=EXIT_UNREACHABLE, code="unreachable",
        )
    ca_cert = Path(recorded.get("ca_cert") or layout.ca_cert)
    key_file = Path(recorded.get("service_key_file") or layout.service_key)
    for path, what in ((ca_cert, "server CA file"), (key_file, "service key file")):
        if not path.exists():
            raise UserError(f"{what} {path} is missing; point --home at the emulator's state directory")
    return Endpoint(url.rstrip("/"), ca_cert, key_file, recorded.get("service_host", "localhost"))


def read_certificate_pem(path: str | Path) -> str:
    """The first certificate of a PEM or DER file, as PEM text."""
    return to_pem(load_certificate_file(path)[:1]).decode("ascii")


class ServiceClient:
    """Thin, typed calls of the service API; every error becomes a one-line UserError."""

    def __init__(self, endpoint: Endpoint, timeout: float = 15.0):
        self.endpoint = endpoint
        self.key = read_service_key(endpoint.service_key_file)
        self.timeout = timeout
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    # -- plumbing

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None,
             ok: tuple[int, ...] = (200, 201, 204)) -> requests.Response:
        token = sas.make_token(self.endpoint.service_host, self.key)
        all_headers = {"Authorization": token, "Accept": "application/json"}
        all_headers.update(headers or {})
        try:
            response = self.session.request(
                method, self.endpoint.service_url + path, params={"api-version": API_VERSION},
                json=body, headers=all_headers, timeout=self.timeout,
                # Per request, not on the session: requests lets $REQUESTS_CA_BUNDLE /
                # $CURL_CA_BUNDLE override a session's `verify`, but not an explicit one.
                verify=str(self.endpoint.ca_cert),
            )
        except requests.exceptions.SSLError as exc:
            raise UserError(f"TLS to {self.endpoint.service_url} failed ({_short(exc)}); is "
                            f"{self.endpoint.ca_cert} the CA of this emulator?", EXIT_UNREACHABLE,
                            code="tls") from None
        except requests.exceptions.RequestException as exc:
            raise UserError(f"no emulator answering at {self.endpoint.service_url} ({_short(exc)}); "
                            "start it with `device-sim stub serve`", EXIT_UNREACHABLE,
                            code="unreachable") from None
        if response.status_code not in ok:
            text = _error_text(method, path, response)
            if response.status_code == 404:
                text += self._suggestion(path)
            raise UserError(text, EXIT_SERVICE_ERROR, code=_error_slug(response))
        return response

    def _suggestion(self, path: str) -> str:
        """' (did you mean X?)' when a named CA, enrollment or registration is unknown and a
        known name is close; nothing when none is, or listing fails too."""
        match = _NAMED_PATH.fullmatch(path)
        if not match:
            return ""
        kind, name = match.group(1), unquote(match.group(2))
        try:
            if kind == "certificates":
                known = [r.get("name", "") for r in self.ca_list()]
            elif kind == "registrations":
                known = [r.get("registrationId", "") for r in self.registration_list()]
            else:
                key = "enrollmentGroupId" if kind == "enrollmentGroups" else "registrationId"
                known = [r.get(key, "") for r in self.list_records(kind)]
        except UserError:
            return ""
        return did_you_mean(name, known)

    def json(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        response = self.call(method, path, body, headers)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{method} {path}: the service answered with non-JSON", EXIT_SERVICE_ERROR) from None

    def _etag_headers(self, path: str) -> dict:
        record = self.json("GET", path)
        etag = (record or {}).get("etag")
        return {"If-Match": etag} if etag else {}

    # -- CA certificates

    def ca_upload(self, name: str, pem: str, verified: bool) -> dict:
        """Upload, or replace the certificate already stored under `name` (ARM needs its etag)."""
        path = f"/certificates/{_seg(name)}"
        body = {"properties": {"certificate": pem, "isVerified": verified}}
        existing = self.call("GET", path, ok=(200, 404))
        headers = {}
        if existing.status_code == 200 and existing.json().get("etag"):
            headers["If-Match"] = existing.json()["etag"]
        return self.json("PUT", path, body, headers)

    def ca_code(self, name: str) -> dict:
        path = f"/certificates/{_seg(name)}"
        return self.json("POST", f"{path}/generateVerificationCode", None, self._etag_headers(path))

    def ca_verify(self, name: str, pem: str) -> dict:
        path = f"/certificates/{_seg(name)}"
        return self.json("POST", f"{path}/verify", {"certificate": pem}, self._etag_headers(path))

    def ca_get(self, name: str) -> dict:
        return self.json("GET", f"/certificates/{_seg(name)}")

    def ca_list(self) -> list:
        result = self.json("GET", "/certificates")
        return result.get("value", []) if isinstance(result, dict) else (result or [])

    def ca_delete(self, name: str) -> None:
        path = f"/certificates/{_seg(name)}"
        self.json("DELETE", path, None, self._etag_headers(path))

    # -- enrollment groups and individual enrollments

    def put_record(self, kind: str, record_id: str, record: dict) -> dict:
        return self.json("PUT", f"/{kind}/{_seg(record_id)}", record)

    def get_record(self, kind: str, record_id: str) -> dict:
        return self.json("GET", f"/{kind}/{_seg(record_id)}")

    def list_records(self, kind: str) -> list:
        return self.json("POST", f"/{kind}/query", {"query": "*"}) or []

    def delete_record(self, kind: str, record_id: str) -> None:
        self.json("DELETE", f"/{kind}/{_seg(record_id)}")

    def set_provisioning_status(self, kind: str, record_id: str, status: str) -> dict:
        """GET, change provisioningStatus, PUT back with the etag (the SDKs' update flow;
        the service keeps the stored certificate when its `info` comes back unchanged)."""
        record = self.get_record(kind, record_id)
        record.pop("registrationState", None)
        record["provisioningStatus"] = status
        headers = {"If-Match": record["etag"]} if record.get("etag") else {}
        return self.json("PUT", f"/{kind}/{_seg(record_id)}", record, headers)

    # -- registration records

    def registration_get(self, registration_id: str) -> dict:
        return self.json("GET", f"/registrations/{_seg(registration_id)}")

    def registration_delete(self, registration_id: str) -> None:
        self.json("DELETE", f"/registrations/{_seg(registration_id)}")

    def registration_list(self, group_id: str | None = None) -> list:
        """Every registration record (of one enrollment group when `group_id` is given),
        following the continuation tokens page by page."""
        if group_id is None:
            return self._all_pages("/emulator/registrations/query", {"query": "*"})
        return self._all_pages(f"/registrations/{_seg(group_id)}/query", None)

    def _all_pages(self, path: str, body: dict | None) -> list:
        items: list = []
        headers = {"x-ms-max-item-count": "1000"}
        while True:
            response = self.call("POST", path, body, headers)
            try:
                page = response.json()
            except ValueError:
                raise UserError(f"POST {path}: the service answered with non-JSON",
                                EXIT_SERVICE_ERROR) from None
            items.extend(page if isinstance(page, list) else [])
            token = response.headers.get("x-ms-continuation")
            if not token:
                return items
            headers["x-ms-continuation"] = token

    # -- overview

    def status(self) -> dict:
        return self.json("GET", "/emulator/status") or {}

    # -- fault plan (docs/emulator.md, "Fault plans")

    def faults_show(self) -> dict | None:
        return (self.json("GET", "/emulator/faults") or {}).get("plan")

    def faults_set(self, plan: dict) -> dict | None:
        return (self.json("PUT", "/emulator/faults", plan) or {}).get("plan")

    def faults_clear(self) -> None:
        self.json("DELETE", "/emulator/faults")


def read_fault_plan(path: str | Path) -> dict:
    """A plan file as JSON, checked here first so a bad field is named before any call."""
    from device_sim.stub.core.faults import FaultPlanError, parse_plan

    try:
        return parse_plan(Path(path).read_bytes()).source
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    except FaultPlanError as exc:
        raise UserError(f"{path}: {exc}") from None


WEBHOOK_API_VERSION = dps.SERVICE_API_VERSION  # what the webhook's records are shaped by


def allocation_fields(policy: str | None, webhook_url: str | None,
                      webhook_api_version: str | None = None) -> dict:
    """`allocationPolicy` and, for `custom`, the `customAllocationDefinition` of a record."""
    if policy is None:
        return {}
    fields: dict = {"allocationPolicy": policy}
    if webhook_url is not None:
        fields["customAllocationDefinition"] = {
            "webhookUrl": webhook_url, "apiVersion": webhook_api_version or WEBHOOK_API_VERSION}
    return fields


def group_record(group_id: str, ca_ref: str | None, cert_pem: str | None, disabled: bool,
                 hubs: list[str], allocation: dict | None = None) -> dict:
    if ca_ref:
        x509_attestation = {"caReferences": {"primary": ca_ref}}
    else:
        x509_attestation = {"signingCertificates": {"primary": {"certificate": cert_pem}}}
    record = {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509", "x509": x509_attestation},
        "provisioningStatus": dps.DISABLED if disabled else dps.ENABLED,
    }
    if hubs:
        record["iotHubs"] = hubs
    record.update(allocation or {})
    return record


def enrollment_record(registration_id: str, cert_pem: str, device_id: str | None, disabled: bool,
                      hubs: list[str], allocation: dict | None = None) -> dict:
    record = {
        "registrationId": registration_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert_pem}}}},
        "provisioningStatus": dps.DISABLED if disabled else dps.ENABLED,
    }
    if device_id:
        record["deviceId"] = device_id
    if hubs:
        record["iotHubs"] = hubs
    record.update(allocation or {})
    return record


_NAMED_PATH = re.compile(r"/(certificates|enrollmentGroups|enrollments|registrations)/([^/?]+)")

# What the service says, in its API's terms, and what to type instead with our verbs.
_SERVICE_HINTS = (
    ("call generateVerificationCode first",
     "no verification code is pending for {name}: run `device-sim stub ca code {name}`, then "
     "`hsm-setup ca verification-cert {name} --code CODE --out FILE` and "
     "`device-sim stub ca verify {name} FILE`"),
    ("subject CN is not the current verification code",
     "the verification certificate's CN is not {name}'s current code (each `stub ca code` "
     "makes a new one): run `device-sim stub ca code {name}` and "
     "`hsm-setup ca verification-cert {name} --code CODE --out FILE` again"),
    ("not signed by this CA certificate's private key",
     "the verification certificate is not signed by {name}'s key: make it with "
     "`hsm-setup ca verification-cert {name} --code CODE` for the same CA"),
    ("If-Match does not",
     "{name} changed while this command ran (etag mismatch); run it again"),
)


def _error_slug(response: requests.Response) -> str:
    """`not_found`, `conflict`, ... from the HTTP status (errorCode numbers are DPS's, not
    stable words)."""
    slugs = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
             409: "conflict", 412: "precondition_failed", 429: "throttled"}
    return slugs.get(response.status_code, "service_error")


def _seg(value: str) -> str:
    return quote(value, safe="")


def _short(exc: Exception) -> str:
    """The innermost reason of a requests error, without the connection-pool wrapping."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for marker in ("certificate verify failed: ", "] ", "Caused by "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.rstrip(")'\"")[:160]


def _error_text(method: str, path: str, response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        hint = _service_hint(path, str(body["message"]))
        if hint:
            return hint
        return f"{method} {path.split('?')[0]}: {response.status_code} {body.get('errorCode', '')}: {body['message']}"
    return f"{method} {path}: HTTP {response.status_code} {response.reason}"


def _service_hint(path: str, message: str) -> str | None:
    match = _NAMED_PATH.match(path)
    name = unquote(match.group(2)) if match else "NAME"
    for marker, hint in _SERVICE_HINTS:
        if marker in message:
            return hint.format(name=name)
    return None
