"""The emulator's service (management) API: CA certificates, enrollments, registrations.

`ServiceApi` (in `api.py`) is the one entry the network edges use; the other modules each
hold one resource (docs/emulator.md, "Service API"):

| module | what |
|---|---|
| `api.py` | `ServiceApi.handle`: SAS authentication, api-version, routing |
| `certificates.py` | CA certificate resources: upload, verification code, proof of possession |
| `validation.py` | what an enrollment or enrollment group document must hold |
| `enrollments.py` | individual enrollments and enrollment groups: CRUD and query |
| `bulk.py` | bulk create / update / delete of entries |
| `registrations.py` | registration records: get, delete, per-group and whole-instance lists |
| `status.py` | the emulator's overview (counts) |
| `preconditions.py`, `paging.py` | If-Match and query paging rules the resources share |
"""

from device_sim.common.dps import SERVICE_API_VERSION

from .api import ServiceApi

__all__ = ["SERVICE_API_VERSION", "ServiceApi"]
