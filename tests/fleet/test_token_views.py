"""SoftHSM token views (device_sim/fleet/token_views.py) and token batches
(token_views.batches): a real SoftHSM, looked at from child processes, since SoftHSM
reads its configuration once per initialisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.fleet import token_views
from device_sim.testing import TokenPki
from hsm_setup import devices as registry
from hsm_setup import module

LIST_TOKENS = """
import json, sys
import pkcs11
from pkcs11.constants import TokenFlag
lib = pkcs11.lib(sys.argv[1])
out = {}
for slot in lib.get_slots(token_present=True):
    token = slot.get_token()
    if token.flags & TokenFlag.TOKEN_INITIALIZED:
        with token.open(user_pin="1234") as session:
            objects = len(list(session.get_objects()))
        out[token.label] = [slot.slot_id, token.serial.decode(), objects]
print(json.dumps(out))
"""


def tokens_seen(module_path: str, conf: Path) -> dict[str, list]:
    """label -> [slot id, serial, objects] as a fresh process initialised with `conf` sees them."""
    env = {**os.environ, module.ENV_SOFTHSM_CONF: str(conf)}
    result = subprocess.run([sys.executable, "-c", LIST_TOKENS, module_path], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Three device tokens with 1, 2 and 3 identities, and the CA token."""
    pki = TokenPki(tmp_path_factory.mktemp("views"))
    pki.ca("root")
    for n, label in enumerate(("shard-a", "shard-b", "shard-c"), start=1):
        pki.init_token(label)
        for i in range(n):
            pki.device(f"{label}-dev-{i}", ca="root", token=label)
    return pki


def test_a_view_shows_only_its_tokens_with_their_slots_and_objects(pki):
    conf = module.softhsm_conf(pki.home)
    everything = tokens_seen(pki.module_path, conf)
    directory = token_views.TokenDirectory.of(conf)
    views = token_views.Views(directory)
    try:
        wanted = {label: everything[label][1] for label in ("shard-a", "shard-c")}
        view_conf = views.make(directory.directories(wanted))
        seen = tokens_seen(pki.module_path, view_conf)
        assert seen == {label: everything[label] for label in wanted}  # same slot IDs, every object
    finally:
        views.close()
    assert not views.root.exists()
    assert tokens_seen(pki.module_path, conf) == everything  # removing a view leaves the tokens whole


def test_a_view_shares_the_token_files_not_copies(pki):
    conf = module.softhsm_conf(pki.home)
    directory = token_views.TokenDirectory.of(conf)
    serial = tokens_seen(pki.module_path, conf)["shard-b"][1]
    views = token_views.Views(directory)
    try:
        view_conf = views.make(directory.directories({"shard-b": serial}))
        source = directory.by_serial[serial]
        linked = Path(view_conf).parent / "tokens" / source.name
        for path in source.iterdir():
            assert os.path.samefile(path, linked / path.name)
    finally:
        views.close()


def test_a_token_without_a_directory_is_named(pki):
    directory = token_views.TokenDirectory.of(module.softhsm_conf(pki.home))
    with pytest.raises(token_views.ViewsUnavailable, match="token 'ghost' .*has no directory"):
        directory.directories({"ghost": "0123456789abcdef"})


def test_a_configuration_without_a_token_directory_is_refused(tmp_path):
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("log.level = ERROR\n")
    with pytest.raises(token_views.ViewsUnavailable, match="names no directories.tokendir"):
        token_views.TokenDirectory.of(conf)


def test_views_of_a_process_that_is_gone_are_removed(pki, tmp_path):
    directory = token_views.TokenDirectory.of(module.softhsm_conf(pki.home))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = directory.path.parent / token_views.VIEWS_DIR / gone.stdout.strip() / "1"
    stale.mkdir(parents=True)
    views = token_views.Views(directory)
    try:
        assert not stale.exists()
    finally:
        views.close()


def token_batches(records, weight, limit):
    """Devices in batches by token, as a fleet run makes them (identities.DeviceStream)."""
    return token_views.batches(records, key=lambda r: r.token_label, weight=weight, limit=limit)


def _record(registration_id: str, token: str) -> registry.DeviceRecord:
    fields = {name: None for name in registry.DeviceRecord.__dataclass_fields__}
    return registry.DeviceRecord(**{**fields, "registration_id": registration_id, "token_label": token})


def test_batches_keep_a_token_whole_and_weigh_every_identity_on_it():
    records = [_record(f"d{n}", f"t{n // 3}") for n in range(9)]  # t0, t1, t2: 3 each
    weights = {"t0": 3, "t1": 3, "t2": 5}  # t2 holds two identities outside the run as well
    groups = list(token_batches(records, weights.__getitem__, 6))
    assert [[r.registration_id for r in g] for g in groups] == [
        ["d0", "d1", "d2", "d3", "d4", "d5"], ["d6", "d7", "d8"]]


def test_a_token_heavier_than_the_batch_is_a_batch_of_its_own():
    records = [_record("a", "big"), _record("b", "big"), _record("c", "small")]
    groups = list(token_batches(records, {"big": 50, "small": 1}.__getitem__, 10))
    assert [[r.registration_id for r in g] for g in groups] == [["a", "b"], ["c"]]
