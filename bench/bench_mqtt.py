"""Benchmark of DPS over MQTT: registration latency and throughput, MQTT beside HTTPS.

One `device-sim stub serve` process (HTTPS and MQTT on free ports), devices whose EC P-256
keys live in a SoftHSM token, awscrt as the TLS client (the key signs in the token).
Every round opens a fresh connection, so every figure includes a full mTLS handshake.

Sequential (one device, `--rounds` each):
  raw limit   awscrt mTLS handshake alone to the MQTT port (TLS 1.2, token signature)
  mqtt        connect + CONNACK + SUBSCRIBE/SUBACK + register + poll until assigned
  https       connect + PUT register + GET poll until assigned
Concurrent (`--clients` devices, each its own registration ID, `--seconds` per phase):
  raw limit   mTLS handshakes/s to the MQTT port
  mqtt, https registrations/s

Each figure is printed beside the raw limit measured in the same run, with their ratio.
Client and server share this machine's cores: the figures are a floor, not a ceiling.

    .venv/bin/python bench/bench_mqtt.py [--rounds 40] [--clients 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from awscrt import http as crt_http
from awscrt import io as crt_io

from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.transport_https import CrtRuntime, HttpsTransport, TlsIdentity, client_tls_context
from device_sim.device.transport_mqtt import MqttTransport
from device_sim.testing import Emulator, TokenPki

from bench_stub import run_clients  # bench/ is sys.path[0] when run

REGISTRATION_ID = "bench-mqtt-dev"
RUNTIME = CrtRuntime()  # one event loop for the whole bench
HOST = "localhost"  # the name in the emulator's server certificate


def make_devices(home: Path, count: int) -> TokenPki:
    """Token "ca" (root, intermediate) and token "devices" (`count` EC P-256 devices)."""
    pki = TokenPki(home)
    pki.ca("root")
    pki.ca("intermediate", parent="root")
    for index in range(count):
        pki.device(f"{REGISTRATION_ID}-{index}", ca="intermediate")
    return pki


def handshake_once(context, port: int) -> None:
    """A bare mTLS handshake: awscrt's HTTP connection completes right after TLS."""
    options = crt_io.SocketOptions()
    options.domain = crt_io.SocketDomain.IPv4
    tls_options = context.new_connection_options()
    tls_options.set_server_name(HOST)
    future = crt_http.HttpClientConnection.new(host_name=HOST, port=port, bootstrap=RUNTIME.bootstrap,
                                               socket_options=options, tls_connection_options=tls_options)
    connection = future.result(10)
    connection.close().result(10)


def register_once(transport, registration_id: str) -> None:
    outcome, _ = run_registration(reg.RegistrationFlow(registration_id), transport, 20)
    if outcome.status != reg.ASSIGNED:
        raise RuntimeError(f"registration failed: {outcome.status}: {outcome.error_message}")


def rate(clients: int, seconds: float, work) -> tuple[float, int]:
    """Run `work(index)` in `clients` threads for `seconds`: (successes per second, failures)."""
    ok, failed, elapsed = run_clients(clients, seconds, work)
    return ok / elapsed, failed


def timed(rounds: int, work) -> list[float]:
    work()  # warm-up: first use loads the token session and the server's code paths
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * len(ordered))) - 1)]
    return f"median {statistics.median(samples):6.1f} ms  p95 {p95:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        tmp_path = Path(tmp)
        pki = make_devices(tmp_path / "pki", args.clients)
        emulator = Emulator.spawn(tmp_path / "home", "--retry-after", "0", "--assignment-delay", "0")
        try:
            emulator.admin.upload_ca("bench-root", pki.cas["root"].cert_pem, verified=True)
            emulator.admin.create_group("bench-group", ca_ref="bench-root")
            trust = emulator.ca_cert.read_bytes()
            pki.lib()
            devices = list(pki.devices.values())
            contexts = [client_tls_context(TlsIdentity(pki.module_path, d.label, d.chain_pem, pki.pin,
                                                       token_label=d.token_label), trust, RUNTIME) for d in devices]
            ids = [d.registration_id for d in devices]
            mqtt_port, https_port, scope = emulator.mqtt_port, emulator.device_port, emulator.id_scope

            def mqtt_once(i: int) -> None:
                register_once(MqttTransport(HOST, mqtt_port, scope, ids[i], contexts[i], runtime=RUNTIME), ids[i])

            def https_once(i: int) -> None:
                register_once(HttpsTransport(HOST, https_port, scope, ids[i], contexts[i], runtime=RUNTIME), ids[i])

            handshake = timed(args.rounds, lambda: handshake_once(contexts[0], mqtt_port))
            mqtt = timed(args.rounds, lambda: mqtt_once(0))
            https = timed(args.rounds, lambda: https_once(0))
            handshakes_per_s, handshake_failures = rate(args.clients, args.seconds,
                                                        lambda i: handshake_once(contexts[i], mqtt_port))
            mqtt_per_s, mqtt_failures = rate(args.clients, args.seconds, mqtt_once)
            https_per_s, https_failures = rate(args.clients, args.seconds, https_once)
        finally:
            emulator.stop()

    floor = statistics.median(handshake)
    print(f"mqtt bench: SoftHSM EC P-256 device keys, awscrt TLS 1.2, client and emulator on this machine")
    print(f"  sequential, {args.rounds} rounds each, one device:")
    print(f"    raw limit, mTLS handshake: {describe(handshake)}")
    for name, samples in (("MQTT registration ", mqtt), ("HTTPS registration", https)):
        median = statistics.median(samples)
        print(f"    {name}:        {describe(samples)}  = {median / floor:4.1f}x the handshake "
              f"({median:.1f} / {floor:.1f} ms)")
    print(f"  concurrent, {args.clients} devices, {args.seconds:g} s per phase:")
    print(f"    raw limit, mTLS handshakes: {handshakes_per_s:7.1f} /s  ({handshake_failures} failed)")
    for name, per_s, failures in (("MQTT", mqtt_per_s, mqtt_failures), ("HTTPS", https_per_s, https_failures)):
        print(f"    {name + ' registrations:':27} {per_s:7.1f} /s  ({failures} failed)  = "
              f"{per_s / handshakes_per_s:.2f} of the handshake rate ({per_s:.1f} / {handshakes_per_s:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
