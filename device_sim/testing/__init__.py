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
- `register` (`device_sim.testing.device`): one registration of a token identity.

The pytest plugin (`device_sim.testing.plugin`, docs/pytest.md) is built on these.
"""

from device_sim.testing.ca import LeafCert, TestCA, key_pem, pem
from device_sim.testing.device import Registration, register
from device_sim.testing.emulator import Emulator, EmulatorFailed
from device_sim.testing.token import TEST_PIN, TEST_SO_PIN, TokenCa, TokenDevice, TokenPki
from device_sim.testing.transport import DeviceApiTransport

__all__ = ["DeviceApiTransport", "Emulator", "EmulatorFailed", "LeafCert", "Registration", "TEST_PIN", "TEST_SO_PIN",
           "TestCA", "TokenCa", "TokenDevice", "TokenPki", "key_pem", "pem", "register"]

