"""device-sim: a simulated device with a PKCS#11-held identity, and a local DPS emulator."""
