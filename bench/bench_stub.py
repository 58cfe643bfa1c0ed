"""Benchmark of the local DPS emulator's HTTPS device front end.

Prints, from one run against one `device-sim stub serve` process:
  1. raw mTLS handshakes/s the server sustains with C concurrent clients (the limit);
  2. full X.509 registrations/s (mTLS handshake + PUT register + GET poll until assigned,
     through an enrollment group on a verified root) with the same C clients;
  3. their ratio (how much of the handshake budget the HTTP layer and the core leave);
  4. what TCP_QUICKACK buys: sequential awscrt TLS 1.2 mTLS handshakes with it on and off;
  5. commits/s of the store alone (`Store.save_registration`, what one registration
     writes), from 1, 2 and 4 processes at once: the ceiling no number of
     `stub serve --workers` raises (SQLite has one writer; docs/scaling.md).

With `--workers 1,2` phases 1-3 run once per worker count, each against its own
`stub serve --workers N`, so the comparison and its raw limits come from the same run.

Clients are Python threads with `ssl` + `http.client` and file keys (TLS 1.2, as DPS).
Both ends share this machine's cores, so the figures are a floor, not a server ceiling.

    .venv/bin/python bench/bench_stub.py [--clients 64] [--seconds 8] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

from device_sim.stub.core.store import OperationRow, RegistrationRow, Store
from device_sim.testing import Emulator, TestCA
from device_sim.stub.net.listener import TlsListener
from device_sim.stub.net.server_pki import ensure_server_identity
from device_sim.stub.net.tls_context import device_context

API_VERSION = "2021-06-01"


def client_context(ca_cert: str, chain: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_cert)
    context.load_cert_chain(str(chain), str(key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # DPS speaks TLS 1.2
    return context


def run_clients(count: int, seconds: float, work) -> tuple[int, int, float]:
    """Run `work(index)` in `count` threads until `seconds` passed; (ok, failed, elapsed)."""
    stop = time.monotonic() + seconds
    ok = [0] * count
    failed = [0] * count
    errors: list[str] = []

    def loop(index: int) -> None:
        while time.monotonic() < stop:
            try:
                work(index)
                ok[index] += 1
            except Exception as exc:
                failed[index] += 1
                if len(errors) < 3:
                    errors.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for error in errors:
        print(f"  sample error: {error}", file=sys.stderr)
    return sum(ok), sum(failed), elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def handshake_once(port: int, context: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.do_handshake()


def register_once(port: int, context: ssl.SSLContext, id_scope: str, registration_id: str) -> None:
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        headers = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}
        body = json.dumps({"registrationId": registration_id})
        connection.request("PUT", f"/{id_scope}/registrations/{registration_id}/register?api-version={API_VERSION}",
                           body=body, headers=headers)
        response = connection.getresponse()
        reply = json.loads(response.read())
        if response.status not in (200, 202):
            raise RuntimeError(f"register: HTTP {response.status} {reply}")
        for _ in range(100):
            if reply.get("status") != "assigning":
                break
            connection.request("GET", f"/{id_scope}/registrations/{registration_id}/operations/"
                                      f"{reply['operationId']}?api-version={API_VERSION}", headers=headers)
            response = connection.getresponse()
            reply = json.loads(response.read())
        if reply.get("status") != "assigned":
            raise RuntimeError(f"registration ended {reply.get('status')}: {reply}")
    finally:
        connection.close()


def quickack_effect(ca_dir: Path, chain: Path, key: Path, rounds: int = 30) -> dict[bool, float]:
    """Sequential awscrt TLS 1.2 mTLS handshakes against a bare TlsListener, QUICKACK on/off."""
    from awscrt import http as crt_http
    from awscrt import io as crt_io
    from OpenSSL import SSL

    identity = ensure_server_identity(ca_dir)
    options = crt_io.TlsContextOptions.create_client_with_mtls_from_path(str(chain), str(key))
    options.override_default_trust_store_from_path(None, str(identity.ca_cert))
    client = crt_io.ClientTlsContext(options)
    rates = {}
    for quickack in (True, False):
        context = device_context(identity)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)  # awscrt with PKCS#11 keys is TLS 1.2 only
        listener = TlsListener("bench", "https", "127.0.0.1", 0, context,
                                   lambda stream: stream.recv(1, 5), quickack=quickack)
        listener.start()
        try:
            started = time.monotonic()
            for _ in range(rounds):
                connection_options = client.new_connection_options()
                connection_options.set_server_name("localhost")
                connection = crt_http.HttpClientConnection.new(
                    "127.0.0.1", listener.port, tls_connection_options=connection_options).result(10)
                connection.close().result(10)
            rates[quickack] = rounds / (time.monotonic() - started)
        finally:
            listener.close()
    return rates


def emulator_cpu(emulator: Emulator) -> float:
    """CPU seconds of the emulator: the `stub serve` process and its workers."""
    pids = [emulator.process.pid, *emulator.ready.get("worker_pids", [])]
    return sum(cpu_seconds(pid) for pid in pids)


def bench_workers(workers: int, args, tmp_path: Path, root: TestCA, identities) -> tuple[float, float]:
    """Phases 1-3 against `stub serve --workers N`: (handshakes/s, registrations/s)."""
    emulator = Emulator.spawn(tmp_path / f"home-{workers}", "--retry-after", "0", "--assignment-delay", "0",
                              "--no-mqtt", "--no-dashboard", "--workers", str(workers))
    ready = emulator.ready
    try:
        port = emulator.device_port
        emulator.admin.upload_ca("bench-root", root.cert_pem, verified=True)
        emulator.admin.create_group("bench-group", ca_ref="bench-root")
        contexts = [client_context(ready["ca_cert"], chain, key) for chain, key in identities]
        register_once(port, contexts[0], ready["id_scope"], "bench-dev-0")  # warm-up + sanity check
        print(f"stub serve --workers {workers}:", flush=True)
        cpu, mine = emulator_cpu(emulator), cpu_seconds(os.getpid())
        ok, failed, elapsed = run_clients(args.clients, args.seconds, lambda i: handshake_once(port, contexts[i]))
        handshakes = ok / elapsed
        used, cpu = emulator_cpu(emulator) - cpu, emulator_cpu(emulator)
        client, mine = cpu_seconds(os.getpid()) - mine, cpu_seconds(os.getpid())
        print(f"  raw mTLS handshakes:   {handshakes:8.1f} /s  ({ok} ok, {failed} failed; server CPU "
              f"{1000 * used / max(ok, 1):.2f} ms each, bench clients {1000 * client / max(ok, 1):.2f} ms)",
              flush=True)
        ok, failed, elapsed = run_clients(
            args.clients, args.seconds,
            lambda i: register_once(port, contexts[i], ready["id_scope"], f"bench-dev-{i}"))
        registrations = ok / elapsed
        used, client = emulator_cpu(emulator) - cpu, cpu_seconds(os.getpid()) - mine
        print(f"  X.509 registrations:   {registrations:8.1f} /s  ({ok} ok, {failed} failed; server CPU "
              f"{1000 * used / max(ok, 1):.2f} ms each, bench clients {1000 * client / max(ok, 1):.2f} ms)",
              flush=True)
        print(f"  ratio registrations/handshakes: {registrations / handshakes:.2f}", flush=True)
    finally:
        emulator.stop()
    return handshakes, registrations


def store_commits(path: Path, count: int, name: str = "s") -> tuple[float, float]:
    """Save `count` registrations through one Store (one commit each); (start, end) wall time."""
    store = Store(path)
    try:
        started = time.time()
        for i in range(count):
            rid = f"{name}-{i % 1000}"
            store.save_registration(
                RegistrationRow(rid, None, {"registrationId": rid, "status": "assigned",
                                            "assignedHub": "stub-hub-1.azure-devices.net"}, {"leaf": "ab" * 32}),
                OperationRow(f"op-{name}-{i}", rid, "ab" * 32, 0.0, {"status": "assigned"}))
        return started, time.time()
    finally:
        store.close()


def store_ceiling(tmp_path: Path, processes: int, count: int = 3000) -> float:
    """Commits/s of one store file written by `processes` processes at once (from the
    first commit to the last, interpreter start-up left out)."""
    path = tmp_path / f"store-{processes}.db"
    Store(path).close()
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
            "from bench_stub import store_commits;"
            "print(*store_commits(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4]))")
    here = str(Path(__file__).parent)
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), str(count), here, f"w{index}"],
                                stdout=subprocess.PIPE, text=True) for index in range(processes)]
    spans = [tuple(map(float, writer.communicate(timeout=300)[0].split())) for writer in writers]
    # Writers start at different moments: count only the span in which all of them ran.
    overlap = min(end for _, end in spans) - max(start for start, _ in spans)
    if overlap <= 0:
        return processes * count / (max(end for _, end in spans) - min(start for start, _ in spans))
    inside = sum(count * overlap / (end - start) for start, end in spans)
    return inside / overlap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", default="1", metavar="N[,N...]",
                        help="stub serve --workers counts to measure, e.g. 1,2 (default 1)")
    args = parser.parse_args()
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers {args.workers}: give whole numbers separated by commas, e.g. 1,2")
    if any(n < 1 for n in counts):
        parser.error("--workers: every count must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-stub-") as tmp:
        tmp_path = Path(tmp)
        root = TestCA("bench-root")
        line = root.issue_intermediate("bench-inter1").issue_intermediate("bench-inter2")
        identities = [line.issue_leaf(f"bench-dev-{i}").write(tmp_path / "devices", f"bench-dev-{i}")
                      for i in range(args.clients)]
        print(f"stub bench: {args.clients} concurrent mTLS clients, {args.seconds:.0f} s per phase, "
              f"TLS 1.2, EC P-256 file keys, client and server on this machine ({os.cpu_count()} cores)",
              flush=True)
        results = {workers: bench_workers(workers, args, tmp_path, root, identities) for workers in counts}
        if len(results) > 1:
            base_handshakes, base_registrations = results[counts[0]]
            for workers, (handshakes, registrations) in results.items():
                print(f"  --workers {workers}: handshakes x{handshakes / base_handshakes:.2f}, "
                      f"registrations x{registrations / base_registrations:.2f} "
                      f"(against --workers {counts[0]})", flush=True)
        chain, key = identities[0]
        rates = quickack_effect(tmp_path / "qa-tls", chain, key)
        print(f"  awscrt sequential TLS 1.2 mTLS handshakes: {rates[True]:.1f} /s with TCP_QUICKACK, "
              f"{rates[False]:.1f} /s without (x{rates[True] / rates[False]:.1f})", flush=True)
        ceilings = {processes: store_ceiling(tmp_path, processes) for processes in (1, 2, 4)}
        print("  store alone (SQLite WAL, synchronous=NORMAL; one registration = one commit): "
              + ", ".join(f"{rate:.0f} commits/s from {processes} process{'es' if processes > 1 else ''}"
                          for processes, rate in ceilings.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
