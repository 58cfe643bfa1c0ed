"""What the device's and the emulator's AMQP edges share (docs/emulator.md, "AMQP"; docs/device.md, "Transports")."""
