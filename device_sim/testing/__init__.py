"""Test helpers for device-sim users and for device-sim's own tests (docs/testing.md).

One small explicit API, each piece documented by examples in its module:

- `TestCA` (`device_sim.testing.ca`): file-key CAs, intermediates and leaves, including
  the broken certificates negative tests need;
- `TokenPki` (`device_sim.testing.token`): CAs and devices with their keys in a SoftHSM
  (or any PKCS#11) token inside a temporary state directory;
- `Emulator` (`device_sim.testing.emulator`): the DPS emulator as a subprocess
  (`Emulator.spawn`) or in this process (`Emulator.in_process`), with an `.admin` client;
- `DeviceApiTransport` (`device_sim.testing.transport`): the device's registration flow
  against the emulator's core without sockets;
- `register` (`device_sim.testing.device`): one registration of a token identity;
- `StateDir`, `fleet_world`, `fleet_emulator` (`device_sim.testing.cli`): a state directory
  driven through the real CLIs in subprocesses, a fleet made in it, an emulator trusting it.

The pytest plugin (`device_sim.testing.plugin`, docs/pytest.md) is built on these.
"""

import importlib

# Where each name lives. They are imported on first use, so that loading the pytest
# plugin (device_sim.testing.plugin) imports nothing else of the project before the
# suite's own conftest files.
_HOMES = {
    "DeviceApiTransport": "transport", "Emulator": "emulator", "EmulatorFailed": "emulator",
    "LeafCert": "ca", "Registration": "device", "StateDir": "cli", "TEST_PIN": "token",
    "TEST_SO_PIN": "token", "TestCA": "ca", "TokenCa": "token", "TokenDevice": "token", "TokenPki": "token",
    "fleet_emulator": "cli", "fleet_world": "cli", "key_pem": "ca", "pem": "ca", "register": "device",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__():
    return __all__
