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

import functools
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from device_sim.device import chain_builder
from device_sim.device.transport_https import TlsIdentity
from device_sim.fleet import token_views
from device_sim.fleet.runner import FleetDevice, TokenSwitch
from device_sim.common.errors import UserError
from hsm_setup import devices as registry
from hsm_setup import module
from hsm_setup.uri import Pkcs11Uri


# Token objects one initialisation of the slot child loads (~3 per identity, ~9 KB each).
LISTING_OBJECTS = 3000


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


def ask_tokens(module_path: str, home: Path, *, pin: str | None = None,
               labels: list[str] | tuple[str, ...] = ()) -> dict[str, dict]:
    """{"slots": label -> slot id, "serials": label -> serial number}, asked of the module
    in a child process (see the module docstring).

    With `pin`, the child also logs in to each token of `labels`, once, and stops at the
    first refusal: UserError naming the token (wrong PIN, locked, expired, absent).
    """
    # awscrt initialises the module in this process later and SoftHSM reads its
    # configuration then; the child inherits it too.
    os.environ.update(module.softhsm_environment(module_path, home))
    known = registry.token_serials(home) if labels else {}  # to look at these tokens first, in order
    request = json.dumps({"module": module_path, "home": str(home), "pin": pin, "labels": list(labels),
                          "serials": [known[label] for label in labels if label in known]})
    child = subprocess.run([sys.executable, "-m", __name__], input=request,  # the PIN never in argv
                           capture_output=True, text=True, timeout=300)
    try:
        answer = json.loads(child.stdout)
    except ValueError:
        lines = child.stderr.strip().splitlines()
        raise UserError(f"cannot list the tokens of {module_path}: {lines[-1] if lines else 'no reason given'}") from None
    if "error" in answer:
        raise UserError(answer["error"])
    return {"slots": {label: int(slot) for label, slot in answer["slots"].items()},
            "serials": answer.get("serials", {})}


def _answer_token_slots(request: dict) -> dict:
    """The child's answer. With SoftHSM it looks at the tokens through views of a few
    hundred token directories at a time (token_views.py), so this child's memory does not
    grow with the state directory either; each token is still logged in to at most once."""
    from hsm_setup import tokens
    from hsm_setup.context import Pkcs11Context

    home, module_path = Path(request["home"]), request["module"]
    wanted = request["labels"] if request.get("pin") is not None else []
    slots: dict[str, int] = {}
    serials: dict[str, str] = {}
    try:
        for conf in _listing_views(home, module_path, first=request.get("serials", [])):
            with Pkcs11Context(home, softhsm_conf=conf) as ctx:
                library = ctx.library(module_path)
                listed = {t.label: t for t in tokens.list_tokens(library)}
                slots.update({label: t.slot_id for label, t in listed.items()})
                serials.update({label: t.serial for label, t in listed.items()})
                for label in wanted:  # in the run's order: a wrong PIN names its first token
                    if label in listed:  # an absent token is reported per device, as before
                        tokens.session(library, label, request["pin"])
    except UserError as exc:
        return {"error": str(exc)}
    return {"slots": slots, "serials": serials}


def _listing_views(home: Path, module_path: str, *, first: list[str] = ()) -> Iterator[Path | None]:
    """SoftHSM configurations that together show every token once: views of about
    LISTING_OBJECTS token objects each, the tokens of serials `first` first and in that
    order, or None (the state directory's own) when the module is not SoftHSM or its files
    allow no view."""
    try:
        views = token_views.open_views(module_path, home)
    except token_views.ViewsUnavailable:
        views = None
    if views is None:
        yield None
        return
    directory = views.tokens
    try:
        found = (directory.by_serial.get(serial.strip().lower()) for serial in first)
        ahead = list(dict.fromkeys(path for path in found if path is not None))
        rest = sorted(set(directory.by_serial.values()).difference(ahead))
        for group in token_views.batches([*ahead, *rest], key=lambda path: path,
                                         weight=token_views.objects_in, limit=LISTING_OBJECTS):
            conf = views.make(group)
            yield conf
            views.remove(conf)
    finally:
        views.close()


class DeviceStream:
    """A TLS identity per record of a selection, made as the runner asks for the next one;
    the chain above the leaf is built once per issuing CA. `token_counts` tells the
    runner's TokenLogins how many devices each token has (runner.token_key -> n).

    With `views` (SoftHSM), the devices come in token batches of about `batch` identities
    (counted over every identity on the batch's tokens: SoftHSM loads them all), each
    batch after a `TokenSwitch` to a view of its tokens; `batches` counts them."""

    def __init__(self, records: Selection | list[registry.DeviceRecord], *, home: Path, module_path: str,
                 pin: str, slots: dict[str, int], chain_to: str = chain_builder.ROOT, chain_files=(),
                 views: token_views.Views | None = None, serials: dict[str, str] | None = None,
                 batch: int = 0):
        self.records, self.home, self.module_path, self.pin = records, Path(home), module_path, pin
        self.slots, self.chain_to, self.chain_files = slots, chain_to, chain_files
        self.views, self.serials, self.batch = views, serials or {}, batch
        self.batches = 0
        self._ca_parts: dict[str, bytes] = {}
        self.token_counts = Counter({(module_path, slots[label], label): count
                                     for label, (count, _) in _tokens(records).items()})

    def __iter__(self) -> Iterator[FleetDevice | TokenSwitch]:
        if self.views is None:
            for record in self.records:
                yield self.device(record)
            return
        identities_on = registry.count_by_token(self.home)  # SoftHSM loads all of a token's objects
        previous: list[Path] = []
        for group in token_views.batches(self.records, key=lambda record: record.token_label,
                                         weight=lambda label: identities_on.get(label, 1), limit=self.batch):
            made: list[Path] = []
            counts = Counter((self.module_path, self.slots[r.token_label], r.token_label) for r in group)
            yield TokenSwitch(self.module_path, functools.partial(self._view, group, made), counts)
            if made:  # the runner asks for the next item once it has switched to this view
                for conf in previous:
                    self.views.remove(conf)
                previous = made
            for record in group:
                yield self.device(record)

    def _view(self, group: list[registry.DeviceRecord], made: list[Path]) -> dict[str, str]:
        labels = dict.fromkeys(r.token_label for r in group)
        conf = self.views.make(self.views.tokens.directories({label: self.serials[label] for label in labels}))
        made.append(conf)
        self.batches += 1
        return {module.ENV_SOFTHSM_CONF: str(conf)}

    def __len__(self) -> int:
        return len(self.records)

    def close(self) -> None:
        """Remove the views (after the run: the last one is in use until then)."""
        if self.views is not None:
            self.views.close()

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
                   slots: dict[str, int], chain_to: str = chain_builder.ROOT, chain_files=(),
                   batch: int = 0, on_note: Callable[[str], None] | None = None) -> DeviceStream:
    """The run's devices, streamed. Logs in once to each token first (see `ask_tokens`):
    a wrong PIN, or a token that is not present, stops here, before any device starts.

    `batch` > 0 with SoftHSM: token batches of about that many identities (see
    DeviceStream); when SoftHSM's files do not allow views, all tokens load at once and
    `on_note` hears why."""
    tokens = _tokens(records)
    answer = ask_tokens(module_path, home, pin=pin, labels=tuple(tokens))
    slots = {**slots, **answer["slots"]}
    for label, (_, first) in tokens.items():
        if label not in slots:
            raise UserError(_absent(label, first))
    views = None
    if batch > 0:
        try:
            views = token_views.open_views(module_path, home)
            if views is not None:
                views.tokens.directories({label: answer["serials"].get(label, "") for label in tokens})
        except token_views.ViewsUnavailable as exc:
            views = None
            if on_note:
                on_note(f"every token loads at once ({exc})")
    return DeviceStream(records, home=home, module_path=module_path, pin=pin, slots=slots,
                        chain_to=chain_to, chain_files=chain_files, views=views,
                        serials=answer["serials"], batch=batch)


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


if __name__ == "__main__":  # the child of `ask_tokens`
    print(json.dumps(_answer_token_slots(json.loads(sys.stdin.read()))))
