"""`hsm-setup fleet create`: many device identities, spread over shard tokens.

SoftHSM lookups slow down as a token fills up, so devices go to shard tokens of
at most `per_token` identities each (`<token-prefix>-001`, -002, ... initialised on
demand, and filled up first when they exist from an earlier run). Every per-device
step except the token's key generation and object writes is kept negligible: the
CA key handle, sessions and the CA chain on each shard are looked up once, and
registry rows are committed in batches.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from hsm_setup import devices, tokens
from hsm_setup.ca import Issuer
from hsm_setup.errors import UserError
from hsm_setup.identities import IdentityFactory, register
from hsm_setup.key_types import KeySpec
from hsm_setup.registration_id import validate_registration_id

DEFAULT_PER_TOKEN = 500
DEFAULT_TOKEN_PREFIX = "fleet"
COMMIT_EVERY = 200


@dataclasses.dataclass
class FleetResult:
    created: list[dict]     # registration_id, token, uri
    tokens: list[str]       # shard tokens used
    seconds: float

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
    plan, rest, n = [], list(ids), 1
    while rest:
        label = shard_label(token_prefix, n)
        room = per_token - filled.get(label, 0)
        if room > 0:
            plan.append((label, rest[:room]))
            rest = rest[room:]
        n += 1
    return plan


def shard_label(token_prefix: str, n: int) -> str:
    label = f"{token_prefix}-{n:03d}"
    if len(label.encode("utf-8")) > tokens.LABEL_MAX:
        raise UserError(f"--token-prefix {token_prefix!r} is too long (token labels are at most "
                        f"{tokens.LABEL_MAX} bytes)")
    return label


def create_fleet(lib, home: Path, module_path: str, *, ids: list[str], issuer: Issuer,
                 spec: KeySpec, pin: str, so_pin: Callable[[], str], days: int,
                 per_token: int = DEFAULT_PER_TOKEN, token_prefix: str = DEFAULT_TOKEN_PREFIX,
                 progress: bool = True) -> FleetResult:
    taken = devices.existing_ids(home, ids)
    if taken:
        raise UserError(f"{len(taken)} of these registration IDs exist already (e.g. {taken[0]!r}): "
                        "choose another --prefix or --start")
    plan = plan_shards(ids, per_token=per_token, token_prefix=token_prefix,
                       filled=devices.count_by_token(home))
    factory = IdentityFactory(lib, home, issuer, spec, days=days, pin=pin)
    for label, _ in plan:  # every check and every token before the first key
        if tokens.find_token(lib, label, required=False) is None:
            tokens.init_token(lib, module_path, label, so_pin=so_pin(), user_pin=pin)
        factory.prepare_token(label)
    created: list[dict] = []
    conn = devices.connect(home, create=True)
    bar = tqdm(total=len(ids), unit="dev", file=sys.stderr, disable=not progress,
               desc="fleet create", smoothing=0.1)
    started = time.perf_counter()
    try:
        for label, shard_ids in plan:
            for registration_id in shard_ids:
                row = factory.create(registration_id, label)
                register(conn, factory, row)
                created.append({"registration_id": registration_id, "token": label, "uri": row["uri"]})
                if len(created) % COMMIT_EVERY == 0:
                    conn.commit()
                bar.update(1)
    finally:
        # Identities completed so far are whole (key, public key, certificate): keep them.
        conn.commit()
        conn.close()
        bar.close()
    return FleetResult(created=created, tokens=[label for label, _ in plan],
                       seconds=time.perf_counter() - started)
