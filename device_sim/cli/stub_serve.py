"""`device-sim stub serve`: run the local DPS emulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from device_sim.cli.options import add_home_argument
from device_sim.common.errors import UserError
from device_sim.common.home import ensure_home
from device_sim.stub.net import amqp, mqtt


# --------------------------------------------------------------------------- serve

MAX_WORKERS = 256


def add_serve(verbs) -> None:
    parser = verbs.add_parser(
        "serve", help="run the emulator until SIGTERM/SIGINT",
        description="Run the local DPS emulator. Prints one JSON line on stdout when ready "
                    "(device_url, service_url, id_scope, ca_cert, service_key_file, pid, ...); "
                    "state (SQLite, CA, service key) lives in <home>/stub/.",
    )
    add_home_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="device API (HTTPS) port; 0 picks a free one (default)")
    parser.add_argument("--service-port", type=int, default=0, help="service API (HTTPS) port; 0 picks a free one")
    parser.add_argument("--service-on-device-port", action="store_true",
                        help="serve the service API on the device port too (for service SDKs that "
                             "only dial 443); service_connection_string then names that port")
    parser.add_argument("--service-connection-string", action=argparse.BooleanOptionalAction, default=True,
                        help="service_connection_string (HostName=...;SharedAccessKey=..., what the service "
                             "SDKs take) in the ready line (default: yes; it carries the emulator's own "
                             "service key: --no-service-connection-string keeps it out of logs you share)")
    parser.add_argument("--id-scope", help="ID scope (default: the one chosen on first start)")
    parser.add_argument("--hub", action="append", metavar="NAME[=WEIGHT]",
                        help="linked IoT hub host name, repeatable (default: the ones chosen before, "
                             "else stub-hub-1.azure-devices.net)")
    parser.add_argument("--assignment-delay", type=float, default=0.0, metavar="S",
                        help="seconds an operation stays 'assigning' (default 0)")
    parser.add_argument("--retry-after", type=int, default=1, metavar="S", help="Retry-After seconds on 202 (default 1)")
    parser.add_argument("--throttle", type=int, default=0, metavar="N",
                        help="answer the first N device requests of each registration ID with 429 (default 0)")
    parser.add_argument("--faults", type=Path, metavar="FILE",
                        help="fault plan (JSON: seed and rules) to start with; change it live with "
                             "`device-sim stub faults set|clear` (docs/emulator.md, 'Fault plans')")
    parser.add_argument("--quota-units", type=int, default=0, metavar="N",
                        help="enforce DPS quotas for N units: 1,000 registrations and 1,000 service "
                             "operations per minute per unit, 5 polls per 10 s per device; 429 past them "
                             "(default 0: no quotas)")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP for the server certificate (localhost and 127.0.0.1 are always in it)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="the server certificate to present (PEM, leaf first) instead of the generated "
                             "one; needs --tls-key; nothing in <home>/stub/tls/ is touched")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the key of --tls-cert (PEM, unencrypted)")
    parser.add_argument("--tls-chain", type=Path, metavar="FILE",
                        help="CA certificates for --tls-cert (intermediates are sent, the file is the "
                             "ready line's ca_cert)")
    parser.add_argument("--issuing-ca-cert", type=Path, metavar="FILE",
                        help="certificate issuance: the issuing CA (PEM, its root may follow); "
                             "default: one made in <home>/stub/issuing/")
    parser.add_argument("--issuing-ca-key", metavar="FILE|URI",
                        help="the key of --issuing-ca-cert: an unencrypted PEM file or a pkcs11: URI "
                             "(signatures made in the token; PIN from ?pin-source= or $PKCS11_PIN)")
    parser.add_argument("--max-connections", type=int, default=512, metavar="N",
                        help="connections served at once per port; more wait in the backlog (default 512)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="emulator processes sharing the ports and the store, to use N cores "
                             "(default 1: one process; docs/scaling.md)")
    parser.add_argument("--webhook-trust", type=Path, metavar="FILE",
                        help="CA certificates (PEM) to trust for https custom allocation webhooks "
                             "(default: the system's)")
    parser.add_argument("--webhook-timeout", type=float, default=10.0, metavar="S",
                        help="seconds a custom allocation webhook has to answer (default 10)")
    _add_front_end_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="on failure also print a JSON error object on stdout")
    _add_dashboard_arguments(parser)
    parser.set_defaults(func=run_serve)


def _parse_hubs(values):
    from device_sim.stub.core.config import Hub

    if not values:
        return None
    hubs = []
    for value in values:
        name, sep, weight = value.partition("=")
        if sep and not weight.isdigit():
            raise UserError(f"--hub {value!r}: weight must be a whole number 1..1000 (NAME=WEIGHT)")
        hubs.append(Hub(name.strip(), int(weight) if sep else 1))
    return hubs


def run_serve(args) -> int:
    from device_sim.stub import server
    from device_sim.stub.net.listener import Limits

    home = ensure_home(args.home)
    for name, port in (("--port", args.port), ("--service-port", args.service_port)):
        if not 0 <= port <= 65535:
            raise UserError(f"{name} {port} is not a TCP port (0..65535)")
    if args.max_connections < 1:
        raise UserError("--max-connections must be at least 1")
    _check_tls_options(args)
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UserError(f"--workers {args.workers}: give 1..{MAX_WORKERS} emulator processes "
                        "(1, the default, is one process)")
    if not 0 <= args.quota_units <= 10_000:
        raise UserError("--quota-units must be 0..10000 (0: no quotas)")
    _check_webhook_options(args)
    options = server.ServeOptions(
        home=home, host=args.host, port=args.port, service_port=args.service_port,
        server_names=args.server_name, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_chain=args.tls_chain,
        service_on_device_port=args.service_on_device_port,
        service_connection_string=args.service_connection_string,
        id_scope=args.id_scope, hubs=_parse_hubs(args.hub),
        assignment_delay=args.assignment_delay, retry_after=args.retry_after, throttle=args.throttle,
        limits=Limits(max_connections=args.max_connections),
        faults=_read_fault_plan(args.faults), quota_units=args.quota_units,
        issuing_ca_cert=args.issuing_ca_cert and args.issuing_ca_cert.absolute(),
        issuing_ca_key=_absolute_unless_uri(args.issuing_ca_key),
        webhook_trust=args.webhook_trust and args.webhook_trust.resolve(),
        webhook_timeout=args.webhook_timeout,
    )
    if args.workers > 1:
        return _serve_workers(args, options)
    stub = server.StubServer(options, _factories(args))
    stop = _stop_on_signals()
    _start(stub, args)
    print(json.dumps(stub.ready), flush=True)
    stub.serve_until(stop)
    return 0


def _factories(args, ports: dict | None = None, dashboard: bool = True) -> list:
    factories = _front_end_factories(args, ports or {})
    dashboard_factory = _dashboard_factory(args) if dashboard else None
    if dashboard_factory is not None:
        factories.append(dashboard_factory)
    return factories


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _start(stub, args) -> dict:
    """Start one emulator process; the failures a user can fix as one line."""
    from device_sim.stub.net.listener import ListenError

    try:
        return stub.start()
    except ListenError as exc:
        raise UserError(_listen_error_text(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}: {exc.strerror or exc}") from None
    except ValueError as exc:  # the core refuses the configuration
        stub.close()
        raise UserError(f"bad emulator settings: {exc}") from None


def _serve_workers(args, options) -> int:
    """`--workers N`: the supervisor of stub/workers.py; worker 0 alone serves the dashboard."""
    import dataclasses

    from device_sim.stub import server
    from device_sim.stub.net.log import log_stderr
    from device_sim.stub.workers import Supervisor

    def start_worker(index: int, ports: dict | None):
        ports = ports or {}
        worker_options = dataclasses.replace(
            options, worker=index, workers=args.workers,
            port=ports.get("device", options.port), service_port=ports.get("service", options.service_port),
            limits=dataclasses.replace(options.limits, share_port="first" if index == 0 else "join"))
        stub = server.StubServer(worker_options, _factories(args, ports, dashboard=index == 0),
                                 log=lambda message: log_stderr(f"worker {index}: {message}"))
        _start(stub, args)
        return stub

    _factories(args)  # a bad port option fails here, before any worker starts
    supervisor = Supervisor(args.workers, start_worker, log_stderr)
    stop = _stop_on_signals()
    ready = supervisor.start()
    print(json.dumps(ready), flush=True)
    return supervisor.serve_until(stop)


def _read_fault_plan(path: Path | None):
    from device_sim.stub.core.faults import FaultPlanError, parse_plan

    if path is None:
        return None
    try:
        return parse_plan(path.read_bytes())
    except OSError as exc:
        raise UserError(f"--faults {path}: cannot read it ({exc.strerror or exc})") from None
    except FaultPlanError as exc:
        raise UserError(f"--faults {path}: {exc}") from None


def _absolute_unless_uri(value: str | None) -> str | None:
    if value is None or value.lower().startswith("pkcs11:"):
        return value
    return str(Path(value).absolute())


def _check_tls_options(args) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give the certificate and its key")
    if args.tls_chain is not None and args.tls_cert is None:
        raise UserError("--tls-chain belongs to --tls-cert; give the certificate and key too")
    if args.tls_cert is not None and args.server_name:
        raise UserError("--server-name names the generated certificate; with --tls-cert the names "
                        "are the ones in that certificate")


def _check_webhook_options(args) -> None:
    from device_sim.common.x509util import CertificateError, load_certificate_file

    if not 0 < args.webhook_timeout <= 300:
        raise UserError(f"--webhook-timeout {args.webhook_timeout:g} must be more than 0 and at most 300 seconds")
    if args.webhook_trust is not None:
        try:
            load_certificate_file(args.webhook_trust)
        except (OSError, CertificateError, ValueError) as exc:
            raise UserError(f"--webhook-trust: {exc}; give a PEM file of CA certificates") from None


# The option that moves each listener, and how the error names it.
LISTENER_OPTIONS = {
    "device": ("device API", "--port"),
    "service": ("service API", "--service-port"),
    "mqtt": ("MQTT", "--mqtt-port"),
    "amqp": ("AMQP", "--amqp-port"),
    "dashboard": ("dashboard", "--dashboard-port"),
}


def _listen_error_text(exc) -> str:
    """One line naming the port, why it cannot be used, and the option to change."""
    what, option = LISTENER_OPTIONS.get(exc.name, (exc.name, "--port"))
    text = f"{what} port {exc.port} {exc.reason}: cannot listen on {exc.host}:{exc.port}; {option} 0 picks a free port"
    if exc.name in ("mqtt", "amqp"):
        text += f", --no-{exc.name} turns {what} off"
    return text


# --------------------------------------------------------------------------- front ends

# Front ends with a TLS port of their own: listener name (option stem), what the help
# calls it, and the module giving DEFAULT_PORT and listener_factory(port).
PORT_FRONT_ENDS = (("mqtt", "MQTT", mqtt), ("amqp", "AMQP 1.0", amqp))


def _add_front_end_arguments(parser) -> None:
    for name, label, module in PORT_FRONT_ENDS:
        parser.add_argument(f"--{name}-port", type=int, default=module.DEFAULT_PORT, metavar="PORT",
                            help=f"DPS {label} (TLS) port; 0 picks a free one (default {module.DEFAULT_PORT}, "
                                 "the port the Azure SDKs use)")
        parser.add_argument(f"--no-{name}", action="store_true", help=f"do not serve {label}")


def _front_end_factories(args, ports: dict | None = None) -> list:
    """The `server.ListenerFactory` of each front end not turned off with --no-NAME;
    `ports` (listener name -> port) overrides the options (the workers after the first)."""
    factories = []
    for name, _label, module in PORT_FRONT_ENDS:
        if getattr(args, f"no_{name}"):
            continue
        port = (ports or {}).get(name, getattr(args, f"{name}_port"))
        if not 0 <= port <= 65535:
            raise UserError(f"--{name}-port {port} is not a TCP port (0..65535)")
        factories.append(module.listener_factory(port))
    return factories


def _add_dashboard_arguments(parser) -> None:
    parser.add_argument("--dashboard-port", type=int, default=0, metavar="PORT",
                        help="port of the dashboard page (plain HTTP; the ready line's dashboard_url "
                             "carries its access token); 0 picks a free one (default)")
    parser.add_argument("--dashboard-host", default="127.0.0.1", metavar="ADDR",
                        help="address the dashboard listens on (default 127.0.0.1: this machine only)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard")


def _dashboard_factory(args):
    """The dashboard `server.ListenerFactory` for `stub serve`, or None with --no-dashboard."""
    from device_sim.stub.net import dashboard

    if args.no_dashboard:
        return None
    if not 0 <= args.dashboard_port <= 65535:
        raise UserError(f"--dashboard-port {args.dashboard_port} is not a TCP port (0..65535)")
    return dashboard.listener_factory(args.dashboard_port, args.dashboard_host)
