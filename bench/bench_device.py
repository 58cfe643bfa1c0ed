"""Benchmark of what one device registration costs with the key in a token (device area).

Builds a throwaway state directory (a root and an intermediate CA, 400 devices on one
token = 1,200 token objects, 30 tokens holding one device each), starts one
`device-sim stub serve` (Retry-After 0), and measures with awscrt + SoftHSM, sequentially
unless noted, medians (p90) over the runs:

  identity    `load_identity`: registry lookup, login, key and certificate searches, the
              nonce signature that proves certificate and key match (what `register` does
              before connecting)
  context     one `ClientTlsContext` per device (session, login, key search by label);
              raw limit: the same on a token holding 3 objects
  handshake   awscrt mTLS handshake with the token key; raw limit: the same with an
              in-memory file key (no PKCS#11)
  register    PUT register + GET poll on the open connection
  in flight   N handshakes started at once on one event-loop thread, token key vs file key

Each figure is printed beside its raw limit from the same run and the ratio raw/figure
(1.0 = the token costs nothing). Client and emulator share this machine's cores.

    .venv/bin/python bench/bench_device.py [--devices 50] [--in-flight 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from awscrt import http as crt_http
from awscrt import io as crt_io

from device_sim.device import chain_builder
from device_sim.device import registration as reg
from device_sim.device.driver import run_registration
from device_sim.device.identity import load_identity
from device_sim.device.transport_https import CrtRuntime, HttpsTransport, TlsIdentity, client_tls_context
from device_sim.testing import Emulator, TestCA
from hsm_setup import devices, tokens
from hsm_setup.context import Pkcs11Context

BIN = Path(sys.executable).parent
PIN = "1234-bench"


def run(*argv, env):
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, env=env)


def build_state(home: Path, env: dict) -> None:
    (home / "pin").write_text(PIN + "\n")
    (home / "so-pin").write_text("so-" + PIN + "\n")
    common = ["--home", home, "--pin-file", home / "pin"]
    hs = BIN / "hsm-setup"
    run(hs, "token", "init", "ca", *common, "--so-pin-file", home / "so-pin", env=env)
    run(hs, "ca", "create", "root", *common, env=env)
    run(hs, "ca", "create", "int", "--parent", "root", *common, env=env)
    for prefix, count, per_token in (("big-", 400, 400), ("small-", 30, 1)):
        run(hs, "fleet", "create", "--count", count, "--prefix", prefix, "--ca", "int", "--per-token", per_token,
            "--token-prefix", prefix.rstrip("-"), "--no-progress", "--jobs", "1", *common,
            "--so-pin-file", home / "so-pin", env=env)


def start_emulator(home: Path, env: dict) -> Emulator:
    emulator = Emulator.spawn(home, "--no-mqtt", "--retry-after", "0", env=env)
    emulator.admin.upload_ca("root", (home / "pki/ca/root/cert.pem").read_bytes(), verified=True)
    emulator.admin.create_group("all", ca_ref="root")
    return emulator


def summary(values):
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def line(label, values, raw=None):
    med, p90 = summary(values)
    text = f"{label:62} {med:7.2f} ms (p90 {p90:6.2f})"
    if raw is not None:
        raw_med, _ = summary(raw)
        text += f"   raw limit {raw_med:6.2f} ms   ratio {raw_med / med:4.2f}"
    print(text)


def timed(fn, items):
    out = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - started) * 1000)
    return out


def file_key_context(trust: bytes):
    leaf = TestCA.self_signed_leaf("file-key")
    options = crt_io.TlsContextOptions.create_client_with_mtls(leaf.cert_pem, leaf.key_pem)
    options.override_default_trust_store(trust)
    options.min_tls_ver = crt_io.TlsVersion.TLSv1_2
    return crt_io.ClientTlsContext(options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50, help="devices per measurement (default 50, max 400)")
    parser.add_argument("--in-flight", type=int, default=200, help="handshakes started at once (default 200)")
    args = parser.parse_args()
    n = max(1, min(args.devices, 400))
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        home = Path(tmp)
        env = dict(os.environ, DEVICE_SIM_HOME=str(home))
        os.environ["DEVICE_SIM_HOME"] = str(home)
        print("building the state directory (CAs, 400 + 30 devices) ...", flush=True)
        build_state(home, env)
        emulator = start_emulator(home, env)
        try:
            measure(home, emulator.ready, n, args.in_flight)
        finally:
            emulator.stop()
    return 0


def measure(home: Path, ready: dict, n: int, in_flight: int) -> None:
    trust = Path(ready["ca_cert"]).read_bytes()
    port = int(ready["device_url"].rsplit(":", 1)[1])
    scope = ready["id_scope"]
    pin_file = str(home / "pin")

    ids = [f"big-{i:04d}" for i in range(1, n + 1)]
    identity_ms = timed(lambda rid: load_identity(rid, home=home, pin_file=pin_file), ids)
    first = load_identity(ids[0], home=home, pin_file=pin_file)
    live = {t.label: t.slot_id for t in tokens.list_tokens(Pkcs11Context(home).library(first.module_path))}
    big = [dataclasses.replace(devices.lookup_device(home, rid), slot_id=None) for rid in ids]
    small = [devices.lookup_device(home, f"small-{i:04d}") for i in range(1, 31)]

    def tls_identity(record, by_slot=True):
        chain = chain_builder.to_pem([record.certificate_x509(), *record.chain_x509()])
        slot = live[record.token_label] if by_slot else None
        return TlsIdentity(first.module_path, record.label, chain, PIN, slot_id=slot, token_label=record.token_label)

    runtime = CrtRuntime()
    runtime.pkcs11_lib(first.module_path)
    print(f"\n{n} devices on one token holding 1,200 objects; 41 tokens in all")
    line("identity load + checks (before connecting)", identity_ms)
    small_ctx = timed(lambda r: client_tls_context(tls_identity(r), trust, runtime), small)
    line("TLS context by slot id (raw: 3-object token)", timed(lambda r: client_tls_context(tls_identity(r), trust, runtime), big), small_ctx)
    line("TLS context by token label (raw: by slot id, 3-object token)",
         timed(lambda r: client_tls_context(tls_identity(r, by_slot=False), trust, runtime), big), small_ctx)

    contexts = [client_tls_context(tls_identity(r), trust, runtime) for r in big]
    file_ctx = file_key_context(trust)

    def handshake(ctx):
        transport = HttpsTransport("localhost", port, scope, "x", ctx, runtime=runtime)
        transport.connect(10)
        transport.close()

    raw_handshakes = timed(handshake, [file_ctx] * n)
    line("mTLS handshake, token key (raw: file key)", timed(handshake, contexts), raw_handshakes)

    connect_ms, register_ms, total_ms, statuses = [], [], [], {}
    for record, ctx in zip(big, contexts):
        transport = HttpsTransport("localhost", port, scope, record.registration_id, ctx, runtime=runtime)
        outcome, timings = run_registration(reg.RegistrationFlow(record.registration_id), transport, 20)
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        connect_ms.append(timings.connect_ms or 0)
        register_ms.append(timings.register_ms or 0)
        total_ms.append(timings.total_ms)
    line("register + poll requests on the open connection", register_ms)
    line("registration, connect to result (raw: file-key handshake)", total_ms, raw_handshakes)
    print(f"{'':62} outcomes {statuses}; {1000 / statistics.median(total_ms):.0f} registrations/s sequential")

    def all_at_once(ctx_list):
        started = time.perf_counter()
        futures = []
        for i in range(in_flight):
            options = ctx_list[i % len(ctx_list)].new_connection_options()
            options.set_server_name("localhost")
            futures.append(crt_http.HttpClientConnection.new(
                host_name="localhost", port=port, bootstrap=runtime.bootstrap,
                tls_connection_options=options))
        connections = [f.result(60) for f in futures]
        rate = in_flight / (time.perf_counter() - started)
        for c in connections:
            c.close()
        return rate

    token_rate, file_rate = all_at_once(contexts), all_at_once([file_ctx])
    print(f"{in_flight} handshakes in flight, 1 event-loop thread: token key {token_rate:.0f}/s   "
          f"raw limit (file key) {file_rate:.0f}/s   ratio {token_rate / file_rate:4.2f}")


if __name__ == "__main__":
    sys.exit(main())
