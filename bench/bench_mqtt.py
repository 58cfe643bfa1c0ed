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
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from awscrt import http as crt_http  # noqa: E402
from awscrt import io as crt_io  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from device_sim.device import registration as reg  # noqa: E402
from device_sim.device.driver import run_registration  # noqa: E402
from device_sim.device.transport_https import HttpsTransport, TlsIdentity, client_tls_context, default_runtime  # noqa: E402
from device_sim.device.transport_mqtt import MqttTransport  # noqa: E402
from hsm_setup import ca, identities, module, tokens  # noqa: E402
from hsm_setup.key_types import key_spec  # noqa: E402

REGISTRATION_ID = "bench-mqtt-dev"
HOST = "localhost"  # the name in the emulator's server certificate
PIN, SO_PIN = "1234", "87654321"  # throw-away tokens in a temporary directory


def make_devices(home: Path, count: int):
    """Token "ca" (root, intermediate) and token "devices" (`count` EC P-256 devices), via hsm_setup.

    Returns (module path, root CaRecord, [(registration ID, key label, chain PEM), ...]).
    """
    module_path = module.resolve_module(None, home)
    lib = module.load_library(module_path)
    for label in ("ca", "devices"):
        tokens.init_token(lib, module_path, label, so_pin=SO_PIN, user_pin=PIN)
    spec = key_spec("ec-p256")
    root = ca.create_ca(lib, home, "root", parent=None, spec=spec, days=30, token_label="ca", pin=PIN)
    ca.create_ca(lib, home, "intermediate", parent="root", spec=spec, days=30, token_label="ca", pin=PIN)
    issuer = ca.open_issuer(lib, home, "intermediate", PIN)
    devices = []
    for index in range(count):
        device = identities.create_device(lib, home, f"{REGISTRATION_ID}-{index}", issuer=issuer, spec=spec,
                                          token_label="devices", pin=PIN)
        chain_pem = b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
                             for der in (device.certificate, *device.chain))
        devices.append((device.registration_id, device.label, chain_pem))
    return module_path, root, devices


def cli(*argv) -> None:
    subprocess.run([sys.executable, "-m", "device_sim.cli", *map(str, argv)], check=True, cwd=ROOT,
                   capture_output=True)


def start_emulator(home: Path) -> tuple[subprocess.Popen, dict]:
    command = [sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home), "--port", "0",
               "--mqtt-port", "0", "--no-amqp", "--retry-after", "0", "--assignment-delay", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"emulator did not start (exit {process.wait()})")
    return process, json.loads(line)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def handshake_once(context, port: int) -> None:
    """A bare mTLS handshake: awscrt's HTTP connection completes right after TLS."""
    options = crt_io.SocketOptions()
    options.domain = crt_io.SocketDomain.IPv4
    tls_options = context.new_connection_options()
    tls_options.set_server_name(HOST)
    future = crt_http.HttpClientConnection.new(host_name=HOST, port=port, bootstrap=default_runtime().bootstrap,
                                               socket_options=options, tls_connection_options=tls_options)
    connection = future.result(10)
    connection.close().result(10)


def register_once(transport, registration_id: str) -> None:
    outcome, _ = run_registration(reg.RegistrationFlow(registration_id), transport, 20)
    if outcome.status != reg.ASSIGNED:
        raise RuntimeError(f"registration failed: {outcome.status}: {outcome.error_message}")


def rate(clients: int, seconds: float, work) -> tuple[float, int]:
    """Run `work(index)` in `clients` threads for `seconds`: (successes per second, failures)."""
    done, failed = [0] * clients, [0] * clients
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        while time.monotonic() < stop:
            try:
                work(index)
                done[index] += 1
            except Exception:
                failed[index] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started), sum(failed)


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
        module_path, root, devices = make_devices(tmp_path / "pki", args.clients)
        process, ready = start_emulator(tmp_path / "home")
        try:
            home = tmp_path / "home"
            cli("stub", "ca", "upload", "--home", home, "--verified", "bench-root", root.pem_path)
            cli("stub", "group", "create", "--home", home, "--ca-ref", "bench-root", "bench-group")
            trust = Path(ready["ca_cert"]).read_bytes()
            contexts = [client_tls_context(TlsIdentity(module_path, label, chain_pem, PIN, token_label="devices"), trust)
                        for _, label, chain_pem in devices]
            ids = [registration_id for registration_id, _, _ in devices]
            mqtt_port, https_port, scope = port_of(ready["mqtt_url"]), port_of(ready["device_url"]), ready["id_scope"]

            def mqtt_once(i: int) -> None:
                register_once(MqttTransport(HOST, mqtt_port, scope, ids[i], contexts[i]), ids[i])

            def https_once(i: int) -> None:
                register_once(HttpsTransport(HOST, https_port, scope, ids[i], contexts[i]), ids[i])

            handshake = timed(args.rounds, lambda: handshake_once(contexts[0], mqtt_port))
            mqtt = timed(args.rounds, lambda: mqtt_once(0))
            https = timed(args.rounds, lambda: https_once(0))
            handshakes_per_s, handshake_failures = rate(args.clients, args.seconds,
                                                        lambda i: handshake_once(contexts[i], mqtt_port))
            mqtt_per_s, mqtt_failures = rate(args.clients, args.seconds, mqtt_once)
            https_per_s, https_failures = rate(args.clients, args.seconds, https_once)
        finally:
            process.terminate()
            process.wait(timeout=10)

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
