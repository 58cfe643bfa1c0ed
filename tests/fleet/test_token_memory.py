"""A fleet run's memory does not follow the state directory (docs/fleet.md, "Memory"):
SoftHSM keeps every object of every token it was initialised over, so a run loads only
the tokens of its batch. Measured on the real CLI: the same 10-device run, in a state
directory that also holds 800 identities on a token the run does not use, with token
views (the default) and with every token loaded at once (--token-batch 0)."""

from __future__ import annotations

import pytest

from device_sim.testing import StateDir, fleet_emulator, fleet_world
from stub_server.emulator_proc import REPO

BALLAST = 800  # identities on a token no run here uses: ~15 MiB of SoftHSM objects (~19 KB each)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("memory-home"), cwd=REPO, timeout=600)
    fleet_world(state, 10, "run-", per_token=5)
    state.fleet_create(BALLAST, "ballast-", "root", "--token-prefix", "ballast", "--jobs", 1, per_token=BALLAST)
    emulator = fleet_emulator(state, "--retry-after", "0", "--assignment-delay", "0", "--no-amqp")
    yield state
    emulator.stop()


def peak_rss_mib(state, *args) -> float:
    """Peak RSS of one `fleet run` process alone (its VmHWM: docs/testing.md)."""
    _, peak = state.python_peak_rss("-m", "device_sim.cli", "fleet", "run", "--emulator", "--no-progress",
                                    "--prefix", "run-", *args)
    return peak


def test_tokens_outside_the_run_cost_the_run_no_memory(world):
    viewed = peak_rss_mib(world)
    everything = peak_rss_mib(world, "--token-batch", 0)
    # measured 11.4 MiB for 600 ballast identities: half of what 800 cost when loaded
    assert everything - viewed >= 7.5, (viewed, everything)
