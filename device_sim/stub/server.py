"""Assembly of one emulator process: state directory, core, listeners, ready line, shutdown.

The files it keeps below `<home>/stub/` are named in `stub/layout.py`.

Extra front ends (MQTT) plug in through `ListenerFactory`: a callable that receives the
running `StubApp` (core objects, TLS identity, limits) and returns a `Listener` (or None
when not enabled). Its `url` appears in the ready line as `<name>_url`.
`device_sim/cli/stub_serve.py` passes the factories of the front ends asked for.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from OpenSSL import SSL

from device_sim.common.errors import UserError
from device_sim.common.files import write_atomic
from device_sim.stub.core.config import Hub, StubConfig
from device_sim.stub.layout import StateLayout, ensure_service_key, read_service_key
from device_sim.stub.net import amqp
from device_sim.stub.net import http as http_server
from device_sim.stub.net import websocket
from device_sim.stub.net.listener import Limits, TlsListener
from device_sim.stub.net.log import log_stderr
from device_sim.stub.net.mqtt import serve_mqtt
from device_sim.stub.net.server_pki import ServerIdentity, ensure_server_identity, supplied_identity
from device_sim.stub.net.tls_context import device_context, service_context

if TYPE_CHECKING:
    from device_sim.stub.core.device_api import DeviceApi
    from device_sim.stub.core.service import ServiceApi
    from device_sim.stub.core.store import Store

DEFAULT_HUB = "stub-hub-1.azure-devices.net"
# The policy name DPS gives its built-in full-access key; service SDKs expect it.
SERVICE_KEY_NAME = "provisioningserviceowner"


class Listener(Protocol):
    name: str  # ready-line key prefix: "device" -> "device_url"
    url: str

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class ServeOptions:
    home: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    service_port: int = 0
    server_names: Sequence[str] = ()
    # A bench's own server identity; None = the generated one in <home>/stub/tls/.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_chain: Path | None = None
    service_on_device_port: bool = False  # the device port answers service API paths too
    # The ready line carries the service key only when asked: by default no secret is printed.
    service_connection_string: bool = True  # the ready line carries it (docs/emulator.md)
    id_scope: str | None = None  # None = the one from settings.json, else a new one
    hubs: Sequence[Hub] | None = None  # None = from settings.json, else one default hub
    assignment_delay: float = 0.0
    retry_after: int = 1
    throttle: int = 0
    faults: object = None  # core.faults.FaultPlan from --faults, or None
    quota_units: int = 0
    limits: Limits = field(default_factory=Limits)
    # Certificate issuance: None/None = the issuing CA generated in <home>/stub/issuing/.
    issuing_ca_cert: Path | None = None
    issuing_ca_key: str | None = None  # a PEM file or a pkcs11: URI
    webhook_trust: Path | None = None  # CA file for https custom allocation webhooks
    webhook_timeout: float = 10.0
    # `stub serve --workers N` (stub/workers.py): this process's index and N; None = the
    # only process. Workers share the fault plan and split the quotas through the store,
    # and leave the endpoint file to the supervisor.
    worker: int | None = None
    workers: int = 1


@dataclass
class StubApp:
    """What every front end of one emulator process shares."""

    state_dir: Path
    config: StubConfig
    store: Store
    device_api: DeviceApi
    service_api: ServiceApi
    identity: ServerIdentity
    host: str
    url_host: str
    limits: Limits
    log: Callable[[str], None]
    # What `GET /$iothub/websocket` on the device port may switch to; a front end adds its
    # own with register_subprotocol(name, handler) (net/websocket.py).
    websocket_subprotocols: websocket.Subprotocols = field(default_factory=websocket.Subprotocols)

    def device_context(self) -> SSL.Context:
        """pyOpenSSL context for device ports (asks for any client chain, accepts any)."""
        return device_context(self.identity)


ListenerFactory = Callable[[StubApp], "Listener | None"]


def new_id_scope() -> str:
    # Same shape as real scopes ("0ne" + 8 hex digits), so clients that check it are happy.
    return "0ne" + secrets.token_hex(4).upper()


def load_settings(directory: Path) -> dict:
    path = StateLayout.at(directory).settings
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; fix or delete the file") from exc


def resolve_config(directory: Path, options: ServeOptions) -> StubConfig:
    """Combine the options with what earlier starts chose, and remember the result."""
    settings = load_settings(directory)
    id_scope = options.id_scope or settings.get("id_scope") or new_id_scope()
    if options.hubs:
        hubs = list(options.hubs)
    elif settings.get("hubs"):
        try:
            hubs = [Hub(**hub) for hub in settings["hubs"]]
        except TypeError:
            raise UserError(f"{StateLayout.at(directory).settings} has malformed hubs; fix it, delete it, "
                            "or pass --hub") from None
    else:
        hubs = [Hub(DEFAULT_HUB)]
    config = StubConfig(
        id_scope=id_scope,
        hubs=hubs,
        assignment_delay=options.assignment_delay,
        retry_after=options.retry_after,
        throttle=options.throttle,
        quota_units=options.quota_units,
    )  # validates: a bad value raises ValueError before anything is remembered
    settings = {"id_scope": id_scope, "hubs": [asdict(hub) for hub in hubs]}
    write_atomic(StateLayout.at(directory).settings, json.dumps(settings, indent=2) + "\n")
    return config


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def server_identity(layout: StateLayout, options: ServeOptions) -> ServerIdentity:
    """The supplied identity when given, else the generated one, naming the listen address."""
    if options.tls_cert is not None:
        return supplied_identity(options.tls_cert, options.tls_key, options.tls_chain)
    names = list(options.server_names)
    if options.host not in WILDCARD_HOSTS:
        names.append(options.host)  # so clients dialling that address can verify it
    return ensure_server_identity(layout.tls_dir, names)


class StubServer:
    """One emulator: build with options, `start()` returns the ready info, `close()` stops."""

    def __init__(self, options: ServeOptions, extra_listeners: Sequence[ListenerFactory] = (),
                 log: Callable[[str], None] = log_stderr):
        self.options = options
        self.extra_listeners = list(extra_listeners)
        self.log = log
        self.app: StubApp | None = None
        self.listeners: list[Listener] = []
        self.ready: dict = {}
        self.started = time.time()
        self.webhooks = None

    def start(self) -> dict:
        # The core is imported here so that the admin commands (which only need the file
        # layout above) do not load the decision engine and the store.
        from device_sim.stub.core.device_api import DeviceApi
        from device_sim.stub.core.service import ServiceApi
        from device_sim.stub.core.store import Store
        from device_sim.stub.issuing_ca import load_issuer

        options = self.options
        layout = StateLayout.of(options.home)
        directory = layout.root
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = resolve_config(directory, options)
        key_path = ensure_service_key(layout.service_key)
        identity = server_identity(layout, options)
        store = Store(layout.database)
        from device_sim.stub.net.webhook_client import WebhookClient

        self.webhooks = WebhookClient(options.webhook_trust, options.webhook_timeout, log=self.log)
        device_api = DeviceApi(store, config, issuer=load_issuer(
            directory, options.issuing_ca_cert, options.issuing_ca_key), webhooks=self.webhooks)
        device_api.faults.set(options.faults)
        if options.worker is not None:
            self._share_with_workers(store, config, device_api)
        url_host = "localhost" if options.host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::") else options.host
        self.app = app = StubApp(
            state_dir=directory,
            config=config,
            store=store,
            device_api=device_api,
            service_api=ServiceApi(store, config, read_service_key(key_path), server_status=self.status,
                                   faults=device_api.faults),
            identity=identity,
            host=options.host,
            url_host=url_host,
            limits=options.limits,
            log=self.log,
        )
        try:
            self._start_listeners(app)
        except OSError:
            self.close()
            raise  # a ListenError names the port; the CLI adds which option to change
        # A service SDK signs its SAS for the HostName it dialled, port included.
        config.service_ports = tuple(listener.port for listener in self.listeners
                                     if listener.name == "service"
                                     or (listener.name == "device" and options.service_on_device_port))
        self.started = time.time()
        self.ready = {
            **{f"{listener.name}_url": listener.url for listener in self.listeners},
            "id_scope": config.id_scope,
            "ca_cert": None if identity.ca_cert is None else str(identity.ca_cert),
            "service_key_file": str(key_path),
            "service_host": config.service_host,
            "home": str(options.home),
            "pid": os.getpid(),
        }
        if options.faults is not None:
            self.ready["faults"] = app.device_api.faults.summary()
        if options.quota_units:
            self.ready["quota_units"] = options.quota_units
        if options.service_connection_string:
            self.ready["service_connection_string"] = self._service_connection_string(app)
        if options.worker is not None:
            app.service_api.quotas = type(device_api.quotas)(config.quota_units, workers=options.workers,
                                                             shared=store)
            self.ready["worker"] = options.worker
            return self.ready  # the supervisor writes the endpoint file, with every worker's pid
        # Private: the connection string carries the service key.
        write_atomic(layout.endpoint, json.dumps(self.ready, indent=2) + "\n", private=True)
        return self.ready

    def _share_with_workers(self, store, config, device_api) -> None:
        from device_sim.stub.core.quotas import Quotas
        from device_sim.stub.core.shared_faults import SharedFaults

        if self.options.worker == 0:
            store.begin_run()
        device_api.faults = SharedFaults(store, self.options.worker, self.options.faults)
        device_api.quotas = Quotas(config.quota_units, workers=self.options.workers)

    def status(self) -> dict:
        """The server's part of `stub status`: listeners and uptime (the counts are the core's)."""
        status = {
            "listeners": {listener.name: listener.url for listener in self.listeners},
            "startedUtc": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
                          .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "uptimeSeconds": round(time.time() - self.started),
        }
        if self.options.worker is not None and self.app is not None:
            from device_sim.stub.workers import worker_table

            status["workers"] = worker_table(self)
        return status

    def _service_connection_string(self, app: StubApp) -> str:
        """What the service SDKs take: host and port of a listener serving the service API."""
        name = "device" if self.options.service_on_device_port else "service"
        port = next(listener.port for listener in self.listeners if listener.name == name)
        key = base64.b64encode(app.service_api.service_key).decode()
        return f"HostName={app.url_host}:{port};SharedAccessKeyName={SERVICE_KEY_NAME};SharedAccessKey={key}"

    def _start_listeners(self, app: StubApp) -> None:
        options = self.options
        # AMQP over WebSockets belongs to the device port, whether or not 5671 is served.
        amqp.register_websocket(app)
        on_service = http_server.service_handler(app.service_api, app.device_api.faults)
        on_device = http_server.device_handler(app.device_api)
        if options.service_on_device_port:
            on_device = http_server.device_or_service_handler(on_device, on_service)
        # MQTT over WebSockets belongs to the device port (as on DPS), whether or not 8883 is served.
        app.websocket_subprotocols.register_subprotocol(
            websocket.MQTT, lambda stream: serve_mqtt(stream, app.device_api, app.limits, log=self.log))
        upgrade = websocket.upgrade_handler(app.websocket_subprotocols, log=self.log, faults=app.device_api.faults)
        device = TlsListener(
            "device", "https", options.host, options.port, app.device_context(),
            lambda stream: http_server.serve_http(stream, on_device, app.limits, app.config.max_body, self.log,
                                                  upgrade),
            limits=app.limits, on_not_tls=http_server.plain_http_hint, url_host=app.url_host, log=self.log,
            one_at_a_time=True,  # the device handlers only wait in TlsStream reads and writes
            faults=app.device_api.faults, transport="https",
        )
        self.listeners.append(device)
        service = TlsListener(
            "service", "https", options.host, options.service_port, service_context(app.identity),
            lambda stream: http_server.serve_http(stream, on_service, app.limits, app.config.max_body, self.log),
            limits=app.limits, on_not_tls=http_server.plain_http_hint, url_host=app.url_host, log=self.log,
        )
        self.listeners.append(service)
        for factory in self.extra_listeners:
            listener = factory(app)
            if listener is not None:
                self.listeners.append(listener)
        for listener in self.listeners:
            listener.start()

    def close(self) -> None:
        for listener in self.listeners:
            try:
                listener.close()
            except Exception as exc:
                self.log(f"closing {listener.name} listener failed: {exc}")
        self.listeners.clear()
        if self.webhooks is not None:
            self.webhooks.close()
        if self.app is not None:
            self.app.store.close()
            self._remove_endpoint_file()
            self.app = None

    def _remove_endpoint_file(self) -> None:
        path = StateLayout.of(self.options.home).endpoint
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    def serve_until(self, stop: threading.Event) -> None:
        """Block until `stop` is set (signal handlers set it), then shut down."""
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.close()
