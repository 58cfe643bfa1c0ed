"""`hsm-setup fleet create --scheduler`: device keys made on every Dask worker, in that
machine's own tokens, certified by the coordinator's CA (docs/fleet.md, "Across machines").

The worker half runs in a child process on each worker (`python -m hsm_setup.fleet_distributed`,
started by device_sim/common/dask_shares.py) with the worker's state directory
($DEVICE_SIM_HOME), module ($PKCS11_MODULE, else SoftHSM) and PINs ($PKCS11_PIN,
$PKCS11_SO_PIN for new shard tokens) from the worker's environment: tokens and their
PINs belong to a machine, and no PIN crosses the network. For each batch of its share it
generates the keys on its shard tokens (the same shards as `fleet create`), signs a CSR
per key inside the token and sends the CSRs; the coordinator checks each (signature, CN =
one of this worker's IDs, key type) and issues the leaf with the CA key in its own
token; the worker checks each certificate is for its key, stores it beside the key and
registers the identity. Only CSRs, certificates, IDs and URIs cross: no key, no PIN.
The coordinator's registry and tokens get nothing.

On the worker the identity's CA is recorded as `external:<CA subject>` with its chain in
the device's chain file (as for bring-your-own PKI, docs/byo-pki.md): the CA is not in
that machine's CA registry. While the coordinator signs a batch, the worker makes the
next one. A worker stopped mid-batch removes the keys still waiting for a certificate;
a rerun with the same workers (shares follow the worker names) makes exactly the
missing identities.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import re
import sys
from pathlib import Path
from typing import Callable

from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.common import dask_shares
from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.common.x509util import common_name
from hsm_setup import certificates, csr, devices, fleet, keys
from hsm_setup.ca import Issuer
from hsm_setup.csr_signing import request_registration_id
from hsm_setup.identities import IdentityFactory, register
from hsm_setup.key_types import KeySpec, key_spec
from hsm_setup.signing import TokenSigner
from hsm_setup.uri import Pkcs11Uri

CHILD = "hsm_setup.fleet_distributed"
DEFAULT_BATCH = 100  # CSRs per round trip
IN_FLIGHT = 2        # batches out at once: the worker makes one while the coordinator signs the other


@dataclasses.dataclass
class WorkerShare:
    address: str
    assigned: int = 0
    created: int = 0
    kept: int = 0
    tokens: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DistributedFleet:
    workers: dict[str, WorkerShare]
    first: dict | None
    last: dict | None
    seconds: float

    @property
    def created(self) -> int:
        return sum(w.created for w in self.workers.values())

    @property
    def kept(self) -> int:
        return sum(w.kept for w in self.workers.values())


# --- the coordinator's half -----------------------------------------------------------------

def create_distributed(scheduler: str, *, ids: list[str], issuer: Issuer, spec: KeySpec, days: int,
                       per_token: int = fleet.DEFAULT_PER_TOKEN,
                       token_prefix: str = fleet.DEFAULT_TOKEN_PREFIX, batch: int = DEFAULT_BATCH,
                       on_created: Callable[[int], None] = lambda n: None) -> DistributedFleet:
    """Split `ids` over the scheduler's workers and certify the CSRs they send."""
    import time

    if days < 1:
        raise UserError("--days must be at least 1")
    if per_token < 1:
        raise UserError("--per-token must be at least 1")
    fleet.shard_label(token_prefix, 1)  # a too-long prefix fails here, not on every worker
    client = dask_shares.connect(scheduler)
    try:
        worker_list = dask_shares.workers(client)
        shares = dask_shares.Shares(client, worker_list)
    except BaseException:
        client.close()
        raise
    try:
        bounds = dask_shares.split(len(ids), len(worker_list))
        chain_pem = [certificates.to_pem(der).decode("ascii") for der in issuer.chain_der()]
        shares.start(CHILD, [{"ids": ids[a:b], "key_type": spec.name, "per_token": per_token,
                              "token_prefix": token_prefix, "chain_pem": chain_pem, "batch": batch}
                             for a, b in bounds])
        signer = _Certifier(issuer, spec, days, [ids[a:b] for a, b in bounds])
        started = time.perf_counter()
        result = _converse(shares, signer, on_created)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        shares.close()


def _converse(shares, signer: "_Certifier", on_created) -> DistributedFleet:
    tally = {w.name: WorkerShare(w.address) for w in shares.workers}
    errors: list[str] = []
    first = last = None
    try:
        for index, kind, message in shares.events():
            name = shares.workers[index].name
            if kind == "csrs":
                try:
                    shares.send(index, {"kind": "certs", "certs": signer.sign(index, message["csrs"])})
                except UserError as exc:
                    shares.send(index, {"kind": "stop"})
                    errors.append(f"worker {name}: {exc}")
            elif kind == "plan":
                tally[name].assigned, tally[name].kept = message["count"], message["kept"]
                tally[name].tokens = message["tokens"]
            elif kind == "created":
                tally[name].created += len(message["devices"])
                first = first or message["devices"][0]
                last = message["devices"][-1]
                on_created(len(message["devices"]))
            elif kind == "error":
                errors.append(f"worker {name}: {message['message']}")
            elif kind == dask_shares.EXITED and message["code"] != 0 and not errors:
                tail = message.get("stderr") or ["no reason given"]
                errors.append(f"worker {name}: its fleet process failed (code {message['code']}): {tail[-1]}")
            elif kind == dask_shares.LOST:
                errors.append(f"worker {name}: {message['reason']}")
    except KeyboardInterrupt:
        shares.send_all({"kind": "stop"})
        raise UserError(_partial("interrupted", tally), exit_code=130) from None
    if errors:
        raise UserError(_partial(errors[0], tally))
    return DistributedFleet(workers=tally, first=first, last=last, seconds=0.0)


def _partial(reason: str, tally: dict[str, WorkerShare]) -> str:
    made = sum(w.created for w in tally.values())
    return (f"{reason}: {made} identities were created (each complete on its worker); run the same "
            "command again with the same workers to create the rest")


class _Certifier:
    """Checks the CSRs of a share and issues their leaf certificates in the CA's token."""

    def __init__(self, issuer: Issuer, spec: KeySpec, days: int, shares: list[list[str]]):
        self.issuer, self.spec, self.days = issuer, spec, days
        # Which worker asked for which ID: a worker only gets certificates for its own share.
        self._share_of = {rid.lower(): n for n, share in enumerate(shares) for rid in share}

    def sign(self, share: int, requests: list[dict]) -> list[dict]:
        return [{"id": r["id"], "certificate": _b64(self._issue(share, r["id"], _unb64(r["csr"])).dump())}
                for r in requests]

    def _issue(self, share: int, registration_id: str, der: bytes) -> asn1_x509.Certificate:
        source = f"the CSR for {registration_id!r}"
        try:
            request = x509.load_der_x509_csr(der)
        except ValueError:
            raise UserError(f"{source} is no PKCS#10 request") from None
        if not request.is_signature_valid:
            raise UserError(f"{source}: its signature does not verify")
        if request_registration_id(request, source).lower() != registration_id.lower() \
                or self._share_of.get(registration_id.lower()) != share:
            raise UserError(f"{source}: not an ID this worker was given")
        spki = asn1_csr.CertificationRequest.load(der)["certification_request_info"]["subject_pk_info"]
        if not _is_key_type(spki, self.spec):
            raise UserError(f"{source}: its key is not {self.spec.name}")
        return certificates.issue(signer=self.issuer.signer, issuer=self.issuer.certificate,
                                  subject_cn=registration_id, public_key=spki,
                                  profile=certificates.LEAF_PROFILE, days=self.days)


def _is_key_type(spki, spec: KeySpec) -> bool:
    if spec.is_ec:
        return spki.algorithm == "ec" and spki.curve == ("named", spec.curve)
    return spki.algorithm == "rsa" and spki.bit_size == spec.bits


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --- the worker's half ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _CaCertificate:
    """One certificate of the coordinator's CA chain, named on a device token as
    `device import-cert` names an external CA's (key identifier, CN)."""

    der: bytes

    def asn1(self) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(self.der)

    @property
    def key_id(self) -> bytes:
        return self.asn1().key_identifier or certificates.key_identifier(self.asn1().public_key)

    @property
    def label(self) -> str:
        return common_name(x509.load_der_x509_certificate(self.der)) or "ca"


@dataclasses.dataclass(frozen=True)
class _RemoteCaRecord:
    name: str


@dataclasses.dataclass(frozen=True)
class _RemoteIssuer:
    """What a worker's IdentityFactory needs of the coordinator's CA: its chain (no key)."""

    chain: tuple[_CaCertificate, ...]
    record: _RemoteCaRecord

    @classmethod
    def from_pem(cls, chain_pem: list[str]) -> "_RemoteIssuer":
        chain = tuple(_CaCertificate(x509.load_pem_x509_certificate(p.encode("ascii"))
                                     .public_bytes(Encoding.DER)) for p in chain_pem)
        subject = x509.load_der_x509_certificate(chain[0].der).subject.rfc4514_string()
        return cls(chain, _RemoteCaRecord(devices.EXTERNAL_CA_PREFIX + subject))

    def chain_der(self) -> list[bytes]:
        return [c.der for c in self.chain]


@dataclasses.dataclass
class _Pending:
    """A key on a token whose CSR is out: no certificate, no registry row yet."""

    registration_id: str
    token_label: str
    key_id: bytes
    spki_der: bytes
    objects: tuple  # public, private
    csr_der: bytes


class _WorkerFactory(IdentityFactory):
    """IdentityFactory's token handling, with the CA's signature made elsewhere:
    `request` makes the key and CSR, `complete` stores the certificate that came back."""

    def request(self, registration_id: str, token_label: str) -> _Pending:
        state = self.prepare_token(token_label)
        key_id = keys.new_key_id()
        public, private = keys.generate_keypair(state.session, self.spec, key_id=key_id,
                                                label=registration_id)
        try:
            spki = keys.public_key_info(public, self.spec)
            request = csr.build_csr(TokenSigner(private, self.spec), spki, registration_id)
        except BaseException:
            keys.destroy_quietly(public, private)
            raise
        return _Pending(registration_id, token_label, key_id, spki.dump(), (public, private), request.dump())

    def complete(self, pending: _Pending, leaf_der: bytes) -> dict:
        """Check the certificate is for the pending key and ID, store it; the registry row."""
        leaf = asn1_x509.Certificate.load(leaf_der)
        if leaf.public_key.dump() != pending.spki_der or \
                (common_name(x509.load_der_x509_certificate(leaf_der)) or "").lower() != pending.registration_id.lower():
            raise UserError(f"the coordinator sent a certificate for another key or ID than "
                            f"{pending.registration_id!r}")
        state = self.open_token(pending.token_label)
        cert_path, chain_path = devices.pem_paths(self.home, pending.registration_id)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_object = certificates.store_on_token(state.session, leaf, key_id=pending.key_id,
                                                  label=pending.registration_id)
        try:
            leaf_pem = certificates.to_pem(leaf)
            write_atomic(cert_path, leaf_pem)
            write_atomic(chain_path, leaf_pem + self._chain_pem)
        except BaseException:
            keys.destroy_quietly(cert_object)
            raise
        return {
            "registration_id": pending.registration_id, "token_label": pending.token_label,
            "token_serial": state.info.serial, "slot_id": state.info.slot_id, "key_id": pending.key_id,
            "label": pending.registration_id, "key_type": self.spec.name,
            "ca_name": self.issuer.record.name,
            "uri": str(Pkcs11Uri(token=pending.token_label, object=pending.registration_id, id=pending.key_id)),
            "certificate": leaf_der, "cert_path": str(cert_path), "chain_path": str(chain_path),
            "_objects": (cert_object, *pending.objects),
        }


def _make_share(parent: dask_shares.Parent) -> int:
    from device_sim.common.home import ensure_home
    from hsm_setup import pins, tokens
    from hsm_setup.context import Pkcs11Context

    job = parent.job
    home = ensure_home(None)  # the worker's own: $DEVICE_SIM_HOME of `dask worker`
    spec = key_spec(job["key_type"])
    issuer = _RemoteIssuer.from_pem(job["chain_pem"])
    todo, kept = _missing_ids(home, job["ids"], issuer.record.name, spec, job["token_prefix"])
    plan = fleet.plan_shards(todo, per_token=job["per_token"], token_prefix=job["token_prefix"],
                             filled=devices.count_by_token(home))
    with Pkcs11Context(home) as ctx:
        library = ctx.library(None)
        pin = dask_shares.worker_secret(pins.ENV_USER_PIN, "user PIN") if plan else ""
        missing = [label for label, _ in plan if tokens.find_token(library, label, required=False) is None]
        if missing:
            so_pin = dask_shares.worker_secret(pins.ENV_SO_PIN, "SO PIN")
            for label in missing:
                tokens.init_token(library, label, so_pin=so_pin, user_pin=pin, reload=False)
            library.reload()  # lasting slot IDs for the new tokens (see tokens.init_token)
        factory = _WorkerFactory(library, home, issuer, spec, days=1, pin=pin)
        for label, shard_ids in plan:
            factory.prepare_token(label)
            factory.remove_leftovers(label, set(shard_ids))
        parent.send("plan", count=len(todo), kept=kept, tokens=[label for label, _ in plan])
        work = [(label, rid) for label, shard_ids in plan for rid in shard_ids]
        if not _certify_all(parent, factory, home, work, job["batch"]):
            return 1
    parent.send("done")
    return 0


def _certify_all(parent, factory: _WorkerFactory, home: Path, work: list[tuple[str, str]], batch: int) -> bool:
    """Batches of CSRs out, certificates back, IN_FLIGHT batches at a time; False when the
    coordinator stopped us (every key still waiting is removed)."""
    out: collections.deque[list[_Pending]] = collections.deque()
    conn = devices.connect(home, create=True)
    try:
        for start in range(0, len(work), batch):
            pending = []
            out.append(pending)
            for label, rid in work[start:start + batch]:
                pending.append(factory.request(rid, label))
            parent.send("csrs", csrs=[{"id": p.registration_id, "csr": _b64(p.csr_der)} for p in pending])
            if len(out) >= IN_FLIGHT and not _complete(parent, factory, conn, out.popleft()):
                return False
        while out:
            if not _complete(parent, factory, conn, out.popleft()):
                return False
        return True
    finally:
        for pending in out:
            for p in pending:
                keys.destroy_quietly(*p.objects)
        conn.close()


def _complete(parent, factory: _WorkerFactory, conn, pending: list[_Pending]) -> bool:
    answer = parent.receive()
    if answer is None or answer.get("kind") != "certs":
        for p in pending:
            keys.destroy_quietly(*p.objects)
        pending.clear()
        return False
    certs = {c["id"].lower(): _unb64(c["certificate"]) for c in answer["certs"]}
    created = []
    try:
        for p in list(pending):
            der = certs.get(p.registration_id.lower())
            if der is None:
                raise UserError(f"the coordinator sent no certificate for {p.registration_id!r}")
            row = factory.complete(p, der)
            with conn:  # commits, or rolls back the row and its token objects
                register(conn, factory, row)
            pending.remove(p)
            created.append({"registration_id": p.registration_id, "token": p.token_label, "uri": row["uri"]})
    except BaseException:
        for p in pending:  # no key without its certificate
            keys.destroy_quietly(*p.objects)
        raise
    parent.send("created", devices=created)
    return True


def _missing_ids(home: Path, ids: list[str], ca_name: str, spec: KeySpec,
                 token_prefix: str) -> tuple[list[str], int]:
    """(IDs this worker still has to make, how many of its share it has already)."""
    made = devices.existing(home, ids)
    shard = re.compile(re.escape(token_prefix) + r"-\d{3,}\Z")
    other = sorted(rid for rid, (token, ca, key_type) in made.items()
                   if not shard.match(token) or ca != ca_name or key_type != spec.name)
    if other:
        raise UserError(f"{len(other)} of these registration IDs exist already on this worker outside "
                        f"this fleet (e.g. {other[0]!r}): choose another --prefix or --start")
    have = {rid.lower() for rid in made}
    return [rid for rid in ids if rid.lower() not in have], len(made)


if __name__ == "__main__":
    sys.exit(dask_shares.run_child(_make_share))
