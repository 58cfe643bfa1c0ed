"""Benchmark of DPS over MQTT: one device's registration latency, MQTT beside HTTPS.

One `device-sim stub serve` process (HTTPS and MQTT on free ports), one device whose
EC P-256 key lives in a SoftHSM token, awscrt as the TLS client (key signs in the token).
Sequential rounds, each a fresh connection, so every figure includes a full mTLS handshake:

  raw limit   awscrt mTLS handshake alone to the MQTT port (TLS 1.2, token signature)
  mqtt        connect + CONNACK + SUBSCRIBE/SUBACK + register + poll until assigned
  https       connect + PUT register + GET poll until assigned

Each registration figure is printed with the raw handshake measured in the same run and
their ratio (registration / handshake): how much the protocol adds on top of the TLS floor.
Client and server share this machine's cores.

    .venv/bin/python bench/bench_mqtt.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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


def make_device(home: Path):
    """Token "ca" (root, intermediate) and token "devices" (one EC P-256 device), via hsm_setup."""
    module_path = module.resolve_module(None, home)
    lib = module.load_library(module_path)
    for label in ("ca", "devices"):
        tokens.init_token(lib, module_path, label, so_pin=SO_PIN, user_pin=PIN)
    spec = key_spec("ec-p256")
    root = ca.create_ca(lib, home, "root", parent=None, spec=spec, days=30, token_label="ca", pin=PIN)
    ca.create_ca(lib, home, "intermediate", parent="root", spec=spec, days=30, token_label="ca", pin=PIN)
    issuer = ca.open_issuer(lib, home, "intermediate", PIN)
    device = identities.create_device(lib, home, REGISTRATION_ID, issuer=issuer, spec=spec,
                                      token_label="devices", pin=PIN)
    chain_pem = b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
                         for der in (device.certificate, *device.chain))
    return module_path, root, device, chain_pem


def cli(*argv) -> None:
    subprocess.run([sys.executable, "-m", "device_sim.cli", *map(str, argv)], check=True, cwd=ROOT,
                   capture_output=True)


def start_emulator(home: Path) -> tuple[subprocess.Popen, dict]:
    command = [sys.executable, "-m", "device_sim.cli", "stub", "serve", "--home", str(home), "--port", "0",
               "--mqtt-port", "0", "--retry-after", "0", "--assignment-delay", "0"]
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


def register_once(transport) -> None:
    outcome, _ = run_registration(reg.RegistrationFlow(REGISTRATION_ID), transport, 20)
    if outcome.status != reg.ASSIGNED:
        raise SystemExit(f"registration failed: {outcome}")


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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        tmp_path = Path(tmp)
        module_path, root, device, chain_pem = make_device(tmp_path / "pki")
        process, ready = start_emulator(tmp_path / "home")
        try:
            home = tmp_path / "home"
            cli("stub", "ca", "upload", "--home", home, "--verified", "bench-root", root.pem_path)
            cli("stub", "group", "create", "--home", home, "--ca-ref", "bench-root", "bench-group")
            context = client_tls_context(
                TlsIdentity(module_path, device.label, chain_pem, PIN, token_label=device.token_label),
                trust_pem=Path(ready["ca_cert"]).read_bytes())
            mqtt_port, https_port, scope = port_of(ready["mqtt_url"]), port_of(ready["device_url"]), ready["id_scope"]

            mqtt = timed(args.rounds, lambda: register_once(
                MqttTransport(HOST, mqtt_port, scope, REGISTRATION_ID, context)))
            https = timed(args.rounds, lambda: register_once(
                HttpsTransport(HOST, https_port, scope, REGISTRATION_ID, context)))
            handshake = timed(args.rounds, lambda: handshake_once(context, mqtt_port))
        finally:
            process.terminate()
            process.wait(timeout=10)

    floor = statistics.median(handshake)
    print(f"mqtt bench: {args.rounds} sequential rounds each, one SoftHSM EC P-256 device key, awscrt TLS 1.2, "
          "client and emulator on this machine")
    print(f"  raw limit, mTLS handshake: {describe(handshake)}")
    for name, samples in (("MQTT registration ", mqtt), ("HTTPS registration", https)):
        median = statistics.median(samples)
        print(f"  {name}:        {describe(samples)}  = {median / floor:4.1f}x the handshake "
              f"({median:.1f} / {floor:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
