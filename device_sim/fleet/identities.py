"""Which devices a fleet run registers, and the TLS identity of each, without token searches.

Devices come from the state directory's registry (`hsm-setup fleet create` / `device
create`), selected by ID prefix or by a file of PKCS#11 URIs / registration IDs. Slot ids
are looked up once per run in a short-lived child process: python-pkcs11 must not
initialise SoftHSM in the fleet process (see runner.py), and slot ids recorded at creation
can change when tokens are re-initialised. The same child logs in once to each token the
run uses before any device starts: a wrong PIN then costs one failed login, not one per
device (tokens lock their PIN after a few wrong tries), and the run registers nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from device_sim.device import chain_builder
from device_sim.device.transport_https import TlsIdentity
from device_sim.fleet.runner import FleetDevice
from device_sim.common.errors import UserError
from hsm_setup import devices as registry
from hsm_setup import module
from hsm_setup.uri import Pkcs11Uri


def select_records(home: Path, *, prefix: str | None = None, list_file: str | None = None,
                   limit: int | None = None) -> list[registry.DeviceRecord]:
    """Registry records by ID prefix (all when None) or named one per line in `list_file`."""
    if list_file:
        records = [_record_for(home, line) for line in _list_lines(list_file)]
    else:
        records = registry.list_devices(home, prefix=prefix)
    if limit is not None:
        records = records[:limit]
    if not records:
        where = f"with prefix {prefix!r} " if prefix else ""
        raise UserError(f"no devices {where}in {registry.db_path(home)}: create them with "
                        "'hsm-setup fleet create --count N --prefix P --ca NAME'")
    return records


def _list_lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read device list {path}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


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


def fleet_devices(records: list[registry.DeviceRecord], *, home: Path, module_path: str, pin: str,
                  slots: dict[str, int], chain_to: str = chain_builder.ROOT,
                  chain_files=()) -> list[FleetDevice]:
    """A TLS identity per record; the chain above the leaf is built once per issuing CA.

    Logs in once to each token first (see `token_slots`): a wrong PIN stops here."""
    labels = tuple(dict.fromkeys(r.token_label for r in records))
    slots = {**slots, **token_slots(module_path, home, pin=pin, labels=labels)}
    ca_parts: dict[str, bytes] = {}
    out = []
    for record in records:
        slot = slots.get(record.token_label)
        if slot is None:
            raise UserError(f"token {record.token_label!r} of device {record.registration_id} is not "
                            "present: check --module and the state directory")
        leaf = record.certificate_x509()
        if record.ca_name not in ca_parts:
            candidates = chain_builder.gather_candidates(home, files=chain_files, extra=record.chain_x509())
            chain = chain_builder.build_chain(leaf, candidates, chain_to)
            ca_parts[record.ca_name] = chain_builder.to_pem(chain[1:])
        chain_pem = chain_builder.to_pem([leaf]) + ca_parts[record.ca_name]
        out.append(FleetDevice(record.registration_id, TlsIdentity(
            module_path=module_path, key_label=record.label, chain_pem=chain_pem, pin=pin,
            slot_id=slot, token_label=record.token_label)))
    return out


if __name__ == "__main__":  # the child of `token_slots`
    print(json.dumps(_answer_token_slots(json.loads(sys.stdin.read()))))
