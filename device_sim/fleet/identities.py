"""Which devices a fleet run registers, and the TLS identity of each, without token searches.

Devices come from the state directory's registry (`hsm-setup fleet create` / `device
create`), selected by ID prefix or by a file of PKCS#11 URIs / registration IDs, and are
streamed: `Selection` reads the registry a page at a time (or the list file a line at a
time) and `DeviceStream` makes each device's TLS identity when the runner asks for it, so
a run's memory does not grow with its devices (docs/fleet.md, "Memory"). Slot ids
are looked up once per run in a short-lived child process: python-pkcs11 must not
initialise SoftHSM in the fleet process (see runner.py), and slot ids recorded at creation
can change when tokens are re-initialised. The same child logs in once to each token the
run uses before any device starts: a wrong PIN then costs one failed login, not one per
device (tokens lock their PIN after a few wrong tries), and the run registers nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from device_sim.device import chain_builder
from device_sim.device.transport_https import TlsIdentity
from device_sim.fleet.runner import FleetDevice
from device_sim.common.errors import UserError
from hsm_setup import devices as registry
from hsm_setup import module
from hsm_setup.uri import Pkcs11Uri


class Selection:
    """The registry records a run registers, read again each time it is iterated (paged
    SQL reads, or the list file line by line): nothing per device stays in memory.

    `tokens` (label -> (devices, first registration ID)) comes from one count query, or one
    pass over the list file that also checks every entry before any device starts."""

    def __init__(self, home: Path, *, prefix: str | None = None, list_file: str | None = None,
                 limit: int | None = None):
        self.home, self.prefix, self.list_file, self.limit = Path(home), prefix, list_file, limit
        if list_file:
            self.tokens = self._list_file_tokens()
        else:
            self.tokens = registry.tokens_of(self.home, prefix=prefix, limit=limit)
        self.count = sum(count for count, _ in self.tokens.values())
        if not self.count:
            where = f"with prefix {prefix!r} " if prefix else ""
            raise UserError(f"no devices {where}in {registry.db_path(home)}: create them with "
                            "'hsm-setup fleet create --count N --prefix P --ca NAME'")

    def __iter__(self) -> Iterator[registry.DeviceRecord]:
        if not self.list_file:
            return registry.iter_devices(self.home, prefix=self.prefix, limit=self.limit)
        return itertools.islice((_record_for(self.home, line) for line in _list_lines(self.list_file)),
                                self.limit)

    def __len__(self) -> int:
        return self.count

    def _list_file_tokens(self) -> dict[str, tuple[int, str]]:
        return _count_tokens(itertools.islice((_record_for(self.home, line) for line in _list_lines(self.list_file)),
                                              self.limit))


def select_records(home: Path, *, prefix: str | None = None, list_file: str | None = None,
                   limit: int | None = None) -> list[registry.DeviceRecord]:
    """The records of a `Selection` as a list (a caller that shares them out, e.g. per worker)."""
    return list(Selection(home, prefix=prefix, list_file=list_file, limit=limit))


def _list_lines(path: str) -> Iterator[str]:
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read device list {path}: {exc.strerror}") from None
    with handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _record_for(home: Path, entry: str) -> registry.DeviceRecord:
    """A registry record for a registration ID or a PKCS#11 URI naming one (object / id)."""
    if not entry.lower().startswith("pkcs11:"):
        return registry.lookup_device(home, entry)
    uri = Pkcs11Uri.parse(entry)
    if uri.object:
        record = registry.find_device(home, uri.object)
        if record and (uri.token in (None, record.token_label)) and (uri.id in (None, record.key_id)):
            return record
    raise UserError(f"{entry}: no device of the state directory matches this URI (fleet runs use "
                    "identities made by hsm-setup; register others one by one with 'device-sim register')")


def token_slots(module_path: str, home: Path, *, pin: str | None = None,
                labels: list[str] | tuple[str, ...] = ()) -> dict[str, int]:
    """Token label -> slot id, asked of the module in a child process (see module docstring).

    With `pin`, the child also logs in to each token of `labels`, once, and stops at the
    first refusal: UserError naming the token (wrong PIN, locked, expired, absent).
    """
    # awscrt initialises the module in this process later and SoftHSM reads its
    # configuration then; the child inherits it too.
    os.environ.update(module.softhsm_environment(module_path, home))
    request = json.dumps({"module": module_path, "home": str(home), "pin": pin, "labels": list(labels)})
    child = subprocess.run([sys.executable, "-m", __name__], input=request,  # the PIN never in argv
                           capture_output=True, text=True, timeout=300)
    try:
        answer = json.loads(child.stdout)
    except ValueError:
        lines = child.stderr.strip().splitlines()
        raise UserError(f"cannot list the tokens of {module_path}: {lines[-1] if lines else 'no reason given'}") from None
    if "error" in answer:
        raise UserError(answer["error"])
    return {label: int(slot) for label, slot in answer["slots"].items()}


def _answer_token_slots(request: dict) -> dict:
    from hsm_setup import tokens
    from hsm_setup.context import Pkcs11Context

    try:
        with Pkcs11Context(Path(request["home"])) as ctx:
            library = ctx.library(request["module"])
            slots = {t.label: t.slot_id for t in tokens.list_tokens(library)}
            if request.get("pin") is not None:
                for label in request["labels"]:
                    if label in slots:  # an absent token is reported per device, as before
                        tokens.session(library, label, request["pin"])
    except UserError as exc:
        return {"error": str(exc)}
    return {"slots": slots}


class DeviceStream:
    """A TLS identity per record of a selection, made as the runner asks for the next one;
    the chain above the leaf is built once per issuing CA. `token_counts` tells the
    runner's TokenLogins how many devices each token has (runner.token_key -> n)."""

    def __init__(self, records: Selection | list[registry.DeviceRecord], *, home: Path, module_path: str,
                 pin: str, slots: dict[str, int], chain_to: str = chain_builder.ROOT, chain_files=()):
        self.records, self.home, self.module_path, self.pin = records, Path(home), module_path, pin
        self.slots, self.chain_to, self.chain_files = slots, chain_to, chain_files
        self._ca_parts: dict[str, bytes] = {}
        self.token_counts = Counter({(module_path, slots[label], label): count
                                     for label, (count, _) in _tokens(records).items()})

    def __iter__(self) -> Iterator[FleetDevice]:
        for record in self.records:
            yield self.device(record)

    def __len__(self) -> int:
        return len(self.records)

    def device(self, record: registry.DeviceRecord) -> FleetDevice:
        slot = self.slots.get(record.token_label)
        if slot is None:  # a token that went away after the run was checked
            raise UserError(_absent(record.token_label, record.registration_id))
        leaf = record.certificate_x509()
        if record.ca_name not in self._ca_parts:
            candidates = chain_builder.gather_candidates(self.home, files=self.chain_files, extra=record.chain_x509())
            chain = chain_builder.build_chain(leaf, candidates, self.chain_to)
            self._ca_parts[record.ca_name] = chain_builder.to_pem(chain[1:])
        chain_pem = chain_builder.to_pem([leaf]) + self._ca_parts[record.ca_name]
        return FleetDevice(record.registration_id, TlsIdentity(
            module_path=self.module_path, key_label=record.label, chain_pem=chain_pem, pin=self.pin,
            slot_id=slot, token_label=record.token_label))


def stream_devices(records: Selection | list[registry.DeviceRecord], *, home: Path, module_path: str, pin: str,
                   slots: dict[str, int], chain_to: str = chain_builder.ROOT, chain_files=()) -> DeviceStream:
    """The run's devices, streamed. Logs in once to each token first (see `token_slots`):
    a wrong PIN, or a token that is not present, stops here, before any device starts."""
    tokens = _tokens(records)
    slots = {**slots, **token_slots(module_path, home, pin=pin, labels=tuple(tokens))}
    for label, (_, first) in tokens.items():
        if label not in slots:
            raise UserError(_absent(label, first))
    return DeviceStream(records, home=home, module_path=module_path, pin=pin, slots=slots,
                        chain_to=chain_to, chain_files=chain_files)


def fleet_devices(records: list[registry.DeviceRecord], **kwargs) -> list[FleetDevice]:
    """`stream_devices` as a list (a caller that shares the devices out)."""
    return list(stream_devices(records, **kwargs))


def _tokens(records: Selection | list[registry.DeviceRecord]) -> dict[str, tuple[int, str]]:
    return records.tokens if isinstance(records, Selection) else _count_tokens(records)


def _count_tokens(records) -> dict[str, tuple[int, str]]:
    """Token label -> (devices, first registration ID), in one pass."""
    counts: Counter = Counter()
    first: dict[str, str] = {}
    for record in records:
        counts[record.token_label] += 1
        first.setdefault(record.token_label, record.registration_id)
    return {label: (counts[label], first[label]) for label in first}


def _absent(label: str, registration_id: str) -> str:
    return (f"token {label!r} of device {registration_id} is not present: check --module and the "
            "state directory")


if __name__ == "__main__":  # the child of `token_slots`
    print(json.dumps(_answer_token_slots(json.loads(sys.stdin.read()))))
