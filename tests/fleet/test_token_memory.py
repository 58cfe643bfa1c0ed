"""A fleet run's memory does not follow the state directory (docs/fleet.md, "Memory"):
SoftHSM keeps every object of every token it was initialised over, so a run loads only
the tokens of its batch. Measured on the real CLI: the same 10-device run, in a state
directory that also holds 800 identities on a token the run does not use, with token
views (the default) and with every token loaded at once (--token-batch 0)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from device_sim.testing import Emulator
from stub_server.emulator_proc import REPO, stub_admin

PIN, SO_PIN = "1234", "87654321"
BALLAST = 800  # identities on a token no run here uses: ~15 MiB of SoftHSM objects (~19 KB each)


def hsm(env, *args):
    subprocess.run([sys.executable, "-m", "device_sim.cli.hsm_setup", *map(str, args)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("memory-home")
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env.update(DEVICE_SIM_HOME=str(home), PKCS11_PIN=PIN, PKCS11_SO_PIN=SO_PIN)
    hsm(env, "token", "init", "ca")
    hsm(env, "ca", "create", "root")
    hsm(env, "fleet", "create", "--count", 10, "--prefix", "run-", "--ca", "root", "--per-token", 5, "--no-progress")
    hsm(env, "fleet", "create", "--count", BALLAST, "--prefix", "ballast-", "--ca", "root",
        "--per-token", BALLAST, "--token-prefix", "ballast", "--jobs", 1, "--no-progress")
    emulator = Emulator.spawn(home, "--retry-after", "0", "--assignment-delay", "0", "--no-amqp")
    stub_admin(emulator, "ca", "upload", "root", home / "pki" / "ca" / "root" / "cert.pem", "--verified")
    stub_admin(emulator, "group", "create", "all", "--ca-ref", "root")
    yield env
    emulator.stop()


def peak_rss_mib(env, *args) -> float:
    """Peak RSS of one `fleet run` process (wait4: it and the children it waited for; its
    slot child loads a few tokens at a time as well)."""
    process = subprocess.Popen([sys.executable, "-m", "device_sim.cli", "fleet", "run", "--emulator",
                                "--no-progress", "--prefix", "run-", *map(str, args)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    err = process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == 0, err
    return usage.ru_maxrss / 1024


def test_tokens_outside_the_run_cost_the_run_no_memory(world):
    viewed = peak_rss_mib(world)
    everything = peak_rss_mib(world, "--token-batch", 0)
    # measured 11.4 MiB for 600 ballast identities: half of what 800 cost when loaded
    assert everything - viewed >= 7.5, (viewed, everything)
