"""The emulator's network edges: TLS, HTTP and MQTT front ends over `stub.core`."""
