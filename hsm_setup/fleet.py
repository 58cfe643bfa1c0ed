"""`hsm-setup fleet create`: many device identities, spread over shard tokens.

SoftHSM lookups slow down as a token fills up, so devices go to shard tokens of
at most `per_token` identities each (`<token-prefix>-001`, -002, ... initialised on
demand, and filled up first when they exist from an earlier run). Every per-device
step except the token's key generation and object writes is kept negligible: the
CA key handle, sessions and the CA chain on each shard are looked up once, and
each registry row is committed as soon as its identity is complete (cheap in WAL mode,
and parallel workers never wait on each other's transaction).

A run can be repeated: identities of the same fleet (same CA and key type, on this token
prefix's shards) that exist already are kept, what an interrupted run left on a token
without a registry row is removed, and exactly the missing identities are made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import multiprocessing
import re
import signal
import sys
import time
from multiprocessing import connection
from pathlib import Path
from typing import Callable

import pkcs11
from tqdm import tqdm

from device_sim.common.errors import UserError
from device_sim.common.registration_id import validate_registration_id
from hsm_setup import devices, tokens
from hsm_setup.ca import Issuer, open_issuer
from hsm_setup.context import Pkcs11Context, Pkcs11Library
from hsm_setup.failures import as_user_error
from hsm_setup.identities import IdentityFactory, register
from hsm_setup.interrupts import Interrupted, StopRequest
from hsm_setup.key_types import KeySpec, key_spec

# Small shards keep the one key-label search awscrt makes per device TLS context cheap during
# `device-sim fleet run` (per context, SoftHSM, token kept logged in: ~0.7 ms at 5 devices a
# token, ~5.5 ms at 50, growing linearly); a shard costs one token initialisation (~40 ms).
DEFAULT_PER_TOKEN = 10
DEFAULT_TOKEN_PREFIX = "fleet"


@dataclasses.dataclass
class FleetResult:
    created: list[dict]     # registration_id, token, uri
    tokens: list[str]       # shard tokens used
    seconds: float
    kept: int = 0           # identities of this fleet that an earlier run made

    @property
    def rate(self) -> float:
        return len(self.created) / self.seconds if self.seconds else 0.0


def fleet_ids(prefix: str, count: int, start: int = 1) -> list[str]:
    """prefix + zero-padded numbers (at least 4 digits, so lists sort naturally)."""
    if count < 1:
        raise UserError("--count must be at least 1")
    if start < 0:
        raise UserError("--start must not be negative")
    width = max(4, len(str(start + count - 1)))
    ids = [f"{prefix}{n:0{width}d}" for n in range(start, start + count)]
    validate_registration_id(ids[0])
    validate_registration_id(ids[-1])
    return ids


def plan_shards(ids: list[str], *, per_token: int, token_prefix: str,
                filled: dict[str, int]) -> list[tuple[str, list[str]]]:
    """Assign IDs to shard tokens (pure): fill existing shards, then new ones, in order."""
    if per_token < 1:
        raise UserError("--per-token must be at least 1")
    plan, taken, n = [], 0, 1
    while taken < len(ids):  # an index, not a shrinking copy: O(1) per identity at any count
        label = shard_label(token_prefix, n)
        room = per_token - filled.get(label, 0)
        if room > 0:
            plan.append((label, ids[taken:taken + room]))
            taken += room
        n += 1
    return plan


def shard_label(token_prefix: str, n: int) -> str:
    label = f"{token_prefix}-{n:03d}"
    if len(label.encode("utf-8")) > tokens.LABEL_MAX:
        raise UserError(f"--token-prefix {token_prefix!r} is too long (token labels are at most "
                        f"{tokens.LABEL_MAX} bytes)")
    return label


@dataclasses.dataclass(frozen=True)
class FleetJob:
    """What one process creates: picklable, so a worker process can receive it."""

    home: str
    module_path: str
    ca_module_path: str
    ca_name: str
    key_type: str
    days: int
    shards: tuple[tuple[str, tuple[str, ...]], ...]


def create_fleet(library: Pkcs11Library, home: Path, *, ids: list[str], issuer: Issuer,
                 spec: KeySpec, pin: str, ca_pin: str, so_pin: Callable[[], str], days: int,
                 per_token: int = DEFAULT_PER_TOKEN, token_prefix: str = DEFAULT_TOKEN_PREFIX,
                 jobs: int = 1, progress: bool = True) -> FleetResult:
    """Check everything, initialise and prepare the shard tokens, then create the identities.

    `library` holds the shard tokens; the issuer's CA token may be in another module.
    With jobs > 1 the shards are split over that many worker processes (one process
    per token at a time: SoftHSM is not used from two threads of one process here).
    Every shard token is initialised, and every token write other than the identities'
    own is done, here before the first worker starts: workers only add objects to their
    own shards.
    """
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    todo, kept = _missing_ids(home, ids, issuer=issuer, spec=spec, token_prefix=token_prefix)
    plan = plan_shards(todo, per_token=per_token, token_prefix=token_prefix,
                       filled=devices.count_by_token(home))
    missing = [label for label, _ in plan if tokens.find_token(library, label, required=False) is None]
    for label in missing:  # every check and every token before the first key
        tokens.init_token(library, label, so_pin=so_pin(), user_pin=pin, reload=False)
    if missing:  # lasting slot IDs for the new tokens (see init_token), then log in again
        library.reload()
        if issuer.library is library:
            issuer = open_issuer(library, home, issuer.record.name, ca_pin)
    factory = IdentityFactory(library, home, issuer, spec, days=days, pin=pin)
    for label, shard_ids in plan:
        factory.prepare_token(label)
        factory.remove_leftovers(label, set(shard_ids))
    jobs = max(1, min(jobs, len(plan)))
    job_list = [
        FleetJob(str(home), library.path, issuer.library.path, issuer.record.name, spec.name, days,
                 tuple((label, tuple(shard_ids)) for label, shard_ids in plan[n::jobs]))
        for n in range(jobs)
    ]
    created: list[dict] = []
    bar = tqdm(total=len(todo), unit="dev", file=sys.stderr, disable=not progress,
               desc="fleet create", smoothing=0.1)

    def report(item: dict) -> None:
        created.append(item)
        bar.update(1)

    started = time.perf_counter()
    try:
        with StopRequest() as stop:
            if not plan:
                pass
            elif jobs == 1:
                _run_job_here(job_list[0], library, factory, report=report, stop=stop)
            else:
                _run_workers(job_list, pin=pin, ca_pin=ca_pin, report=report, stop=stop)
    except Interrupted:
        raise UserError(f"interrupted: {len(created)} of {len(todo)} identities were created "
                        "(each complete and registered); run the same command again to "
                        "create the rest", exit_code=130) from None
    finally:
        bar.close()
    return FleetResult(created=sorted(created, key=lambda c: c["registration_id"]),
                       tokens=[label for label, _ in plan], seconds=time.perf_counter() - started,
                       kept=kept)


def _missing_ids(home: Path, ids: list[str], *, issuer: Issuer, spec: KeySpec,
                 token_prefix: str) -> tuple[list[str], int]:
    """(IDs still to make, how many this fleet has already); UserError when an ID is taken
    by another identity (another token, CA or key type)."""
    existing = devices.existing(home, ids)
    shard = re.compile(re.escape(token_prefix) + r"-\d{3,}\Z")
    foreign = [rid for rid, (token, ca_name, key_type) in existing.items()
               if not (shard.match(token) and ca_name == issuer.record.name and key_type == spec.name)]
    if foreign:
        raise UserError(f"{len(foreign)} of these registration IDs exist already outside this fleet "
                        f"(e.g. {sorted(foreign)[0]!r}): choose another --prefix or --start")
    done = {rid.lower() for rid in existing}
    return [rid for rid in ids if rid.lower() not in done], len(existing)


def _run_job_here(job: FleetJob, library: Pkcs11Library, factory: IdentityFactory, *,
                  report: Callable[[dict], None], stop: StopRequest) -> None:
    """One job in this process, with the sessions the preparation opened."""
    conn = devices.connect(Path(job.home), create=True)
    try:
        for label, shard_ids in job.shards:
            for registration_id in shard_ids:
                if stop.requested:
                    raise Interrupted()
                try:
                    row = factory.create(registration_id, label)
                except pkcs11.PKCS11Error as exc:
                    raise as_user_error(exc, doing=f"creating {registration_id}", token=label) from None
                with conn:  # commits, or rolls back the row and its token objects
                    register(conn, factory, row)
                report({"registration_id": registration_id, "token": label, "uri": row["uri"]})
    finally:
        conn.close()


def run_job(job: FleetJob, *, pin: str, ca_pin: str, report: Callable[[dict], None],
            stop: StopRequest, ready: Callable[[], None] = lambda: None) -> None:
    """Create the identities of one job in a worker process, committing each row at once.

    Everything is read first (the module's initialisation, the CA, a session per shard),
    then `ready()` waits until every worker got that far: SoftHSM's C_Initialize reads every
    token's files, and reading them while another process writes objects failed about one
    run in ten ("unknown token 'ca'", CKR_GENERAL_ERROR; docs/hsm-setup.md).
    """
    home = Path(job.home)
    with Pkcs11Context(home) as ctx:
        with _one_at_a_time(home):  # concurrent SoftHSM start-ups and logins failed as well
            library = ctx.library(job.module_path)
            issuer = open_issuer(ctx.library(job.ca_module_path), home, job.ca_name, ca_pin)
            factory = IdentityFactory(library, home, issuer, key_spec(job.key_type), days=job.days,
                                      pin=pin)
            for label, _ in job.shards:
                factory.prepare_token(label)  # the chain is there already: a search, no write
        ready()
        _run_job_here(job, library, factory, report=report, stop=stop)


@contextlib.contextmanager
def _one_at_a_time(home: Path):
    """An exclusive lock on <home>/pki/.fleet-start.lock while a worker starts up."""
    path = devices.db_path(home).with_name(".fleet-start.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_workers(job_list: list[FleetJob], *, pin: str, ca_pin: str,
                 report: Callable[[dict], None], stop: StopRequest) -> None:
    # "spawn": a forked child would inherit the parent's initialised PKCS#11 library,
    # which PKCS#11 forbids using; a spawned one loads and initialises its own.
    # One pipe per worker, not one shared Queue: a Queue's writers share a lock, and a
    # worker that ends while its feeder thread holds it leaves the others hanging.
    devices.connect(Path(job_list[0].home), create=True).close()  # schema and WAL mode, once
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()  # set once every worker has read the tokens (see run_job)
    workers, readers = [], {}
    for index, job in enumerate(job_list):
        reader, writer = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_worker_main, args=(job, pin, ca_pin, writer, index, go), daemon=True)
        worker.start()
        writer.close()  # the worker holds the only write end: EOF when it is gone
        workers.append(worker)
        readers[reader] = index
    finished: set[int] = set()
    ready: set[int] = set()
    errors: list[str] = []
    interrupted = forwarded = False
    try:
        while readers:
            if (stop.requested or (errors and not go.is_set())) and not forwarded:
                for worker in workers:  # ask them to stop between identities too
                    if worker.is_alive():
                        worker.terminate()
                forwarded = True
            if not go.is_set() and not errors and len(ready | finished) == len(workers):
                go.set()
            for reader in connection.wait(list(readers), timeout=0.5):
                index = readers[reader]
                try:
                    _, kind, value = reader.recv()
                except EOFError:  # the worker is gone
                    del readers[reader]
                    if index not in finished:
                        finished.add(index)
                        workers[index].join(timeout=5)
                        code = workers[index].exitcode
                        if forwarded and code == -signal.SIGTERM:
                            # Our SIGTERM reached it before it set its handler, i.e. before
                            # its first identity: nothing of it is half-written.
                            interrupted = True
                        else:
                            errors.append(f"fleet worker {index} exited unexpectedly (code {code})")
                    continue
                if kind == "device":
                    report(value)
                elif kind == "ready":
                    ready.add(index)
                else:
                    finished.add(index)
                    if kind == "interrupted":
                        interrupted = True
                    elif kind == "error":
                        errors.append(value)
    finally:
        for worker in workers:
            worker.join(timeout=60)
    if errors:
        raise UserError(errors[0])
    if interrupted or stop.requested:
        raise Interrupted()


def _worker_main(job: FleetJob, pin: str, ca_pin: str, conn, index: int, go) -> None:
    def send(kind: str, value=None) -> None:
        conn.send((index, kind, value))

    with StopRequest() as stop:
        def ready() -> None:
            send("ready")
            while not go.wait(0.2):
                if stop.requested:
                    raise Interrupted()

        try:
            run_job(job, pin=pin, ca_pin=ca_pin, stop=stop, ready=ready,
                    report=lambda item: send("device", item))
        except Interrupted:
            send("interrupted")
        except UserError as exc:
            send("error", str(exc))
        except BaseException as exc:  # report, do not leave the parent waiting
            send("error", f"fleet worker failed: {type(exc).__name__}: {exc}")
        else:
            send("exit")
        finally:
            conn.close()
