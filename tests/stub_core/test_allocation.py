"""Hub choice and re-registration outcomes, as pure functions."""

from collections import Counter

from device_sim.stub.core.allocation import (BACK_TO_INITIAL, INITIAL, MIGRATED, RESET, allocate,
                                        choose_hub)
from device_sim.stub.core.config import Hub, StubConfig

CONFIG = StubConfig(hubs=[Hub("a.example", weight=1), Hub("b.example", weight=3),
                          Hub("quiet.example", apply_allocation_policy=False)])


def test_hashed_is_deterministic_and_follows_weights():
    picks = [choose_hub(f"dev-{i}", {}, CONFIG)[0] for i in range(4000)]
    assert picks == [choose_hub(f"DEV-{i}", {}, CONFIG)[0] for i in range(4000)]
    counts = Counter(picks)
    assert set(counts) == {"a.example", "b.example"}   # quiet hub excluded from policy
    assert 2.6 < counts["b.example"] / counts["a.example"] < 3.4


def test_entry_hub_list_and_static():
    assert choose_hub("x", {"iotHubs": ["quiet.example"]}, CONFIG) == ("quiet.example", None)
    assert choose_hub("x", {"allocationPolicy": "static", "iotHubHostName": "a.example"},
                      CONFIG) == ("a.example", None)
    hub, error = choose_hub("x", {"allocationPolicy": "static"}, CONFIG)
    assert hub is None and "exactly one" in error
    hub, error = choose_hub("x", {"iotHubs": ["unlinked.example"]}, CONFIG)
    assert hub is None and "no linked IoT hub" in error
    geo = [choose_hub(f"d{i}", {"allocationPolicy": "geoLatency"}, CONFIG)[0] for i in range(50)]
    assert geo == [choose_hub(f"d{i}", {}, CONFIG)[0] for i in range(50)]


def prev(hub, initial=None, substatus=INITIAL, device="old-id"):
    return {"assignedHub": hub, "initialHub": initial or hub, "substatus": substatus,
            "deviceId": device}


def on(hub, **policy):
    entry = {"iotHubs": [hub]}
    if policy:
        entry["reprovisionPolicy"] = policy
    return entry


def test_first_assignment():
    result = allocate("d", "new-id", on("a.example"), CONFIG, None, "2021-06-01")
    assert (result.hub, result.substatus, result.device_id, result.initial_hub) == \
        ("a.example", INITIAL, "new-id", "a.example")


def test_reprovision_table():
    cases = [
        # entry, previous, expected (hub, substatus, deviceId)
        (on("b.example", updateHubAssignment=False, migrateDeviceData=True), prev("a.example"),
         ("a.example", INITIAL, "old-id")),
        (on("a.example", updateHubAssignment=True, migrateDeviceData=True),
         prev("a.example", substatus=MIGRATED), ("a.example", MIGRATED, "old-id")),
        (on("a.example", updateHubAssignment=True, migrateDeviceData=False), prev("a.example"),
         ("a.example", RESET, "new-id")),
        (on("b.example"), prev("a.example"), ("b.example", MIGRATED, "old-id")),
        (on("b.example", updateHubAssignment=True, migrateDeviceData=False), prev("a.example"),
         ("b.example", RESET, "new-id")),
        (on("a.example"), prev("b.example", initial="a.example", substatus=MIGRATED),
         ("a.example", BACK_TO_INITIAL, "old-id")),
    ]
    for entry, before, expected in cases:
        result = allocate("d", "new-id", entry, CONFIG, before, "2021-06-01")
        assert (result.hub, result.substatus, result.device_id) == expected, (entry, before)


def test_legacy_api_version_without_policy_is_sticky():
    sticky = allocate("d", "n", on("b.example"), CONFIG, prev("a.example"), "2018-04-01")
    assert sticky.hub == "a.example"
    moved = allocate("d", "n", on("b.example"), CONFIG, prev("a.example"), "2019-03-31")
    assert moved.hub == "b.example"
    with_policy = allocate("d", "n", on("b.example", updateHubAssignment=True), CONFIG,
                           prev("a.example"), "2018-04-01")
    assert with_policy.hub == "b.example"


def test_no_hub_on_reregistration_fails_but_remembers_initial_hub():
    result = allocate("d", "n", {"iotHubs": ["gone.example"]}, CONFIG, prev("a.example"), "2021-06-01")
    assert result.hub is None and result.initial_hub == "a.example"
