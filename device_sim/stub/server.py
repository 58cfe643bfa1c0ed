"""Assembly of one emulator process: state directory, core, listeners, ready line, shutdown.

Layout of `<home>/stub/`:
  stub.db            SQLite (WAL) store: CA certificates, enrollments, registrations
  settings.json      ID scope and hubs chosen on first start (reused after a restart)
  service.key        service API key, base64, mode 600 (the SAS signing key; never printed)
  tls/ca.pem         CA clients must trust; tls/server.pem + server.key: the server identity
  endpoint.json      written while serving: what the admin commands need to find the server

Extra front ends (MQTT) plug in through `ListenerFactory`: a callable that receives the
running `StubApp` (core objects, TLS identity, limits) and returns a `Listener` (or None
when not enabled). Its `url` appears in the ready line as `<name>_url`.
`device_sim/cli/stub.py` finds such factories in the modules named in LISTENER_MODULES.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from OpenSSL import SSL

from device_sim.stub.net import http as http_server
from device_sim.stub.net import tls
from device_sim.stub.core.config import Hub, StubConfig
from device_sim.common.errors import UserError

if TYPE_CHECKING:
    from device_sim.stub.core.device_api import DeviceApi
    from device_sim.stub.core.service import ServiceApi
    from device_sim.stub.core.store import Store

STATE_SUBDIR = "stub"
DB_FILE = "stub.db"
SETTINGS_FILE = "settings.json"
SERVICE_KEY_FILE = "service.key"
ENDPOINT_FILE = "endpoint.json"
TLS_SUBDIR = "tls"
DEFAULT_HUB = "stub-hub-1.azure-devices.net"


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
    id_scope: str | None = None  # None = the one from settings.json, else a new one
    hubs: Sequence[Hub] | None = None  # None = from settings.json, else one default hub
    assignment_delay: float = 0.0
    retry_after: int = 1
    throttle: int = 0
    limits: tls.Limits = field(default_factory=tls.Limits)


@dataclass
class StubApp:
    """What every front end of one emulator process shares."""

    state_dir: Path
    config: StubConfig
    store: Store
    device_api: DeviceApi
    service_api: ServiceApi
    identity: tls.ServerIdentity
    host: str
    url_host: str
    limits: tls.Limits
    log: Callable[[str], None]

    def device_context(self) -> SSL.Context:
        """pyOpenSSL context for device ports (asks for any client chain, accepts any)."""
        return tls.device_context(self.identity)


ListenerFactory = Callable[[StubApp], "Listener | None"]


def state_dir(home: Path) -> Path:
    return home / STATE_SUBDIR


def new_id_scope() -> str:
    # Same shape as real scopes ("0ne" + 8 hex digits), so clients that check it are happy.
    return "0ne" + secrets.token_hex(4).upper()


def load_settings(directory: Path) -> dict:
    path = directory / SETTINGS_FILE
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
            raise UserError(f"{directory / SETTINGS_FILE} has malformed hubs; fix it, delete it, "
                            "or pass --hub") from None
    else:
        hubs = [Hub(DEFAULT_HUB)]
    config = StubConfig(
        id_scope=id_scope,
        hubs=hubs,
        assignment_delay=options.assignment_delay,
        retry_after=options.retry_after,
        throttle=options.throttle,
    )  # validates: a bad value raises ValueError before anything is remembered
    settings = {"id_scope": id_scope, "hubs": [asdict(hub) for hub in hubs]}
    _write_atomic(directory / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    return config


def ensure_service_key(directory: Path) -> Path:
    """The service API key: 32 random bytes, base64, created once with mode 600."""
    path = directory / SERVICE_KEY_FILE
    if not path.exists():
        text = base64.b64encode(secrets.token_bytes(32)).decode() + "\n"
        fd = os.open(path.with_name(path.name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def read_service_key(path: Path) -> bytes:
    try:
        return base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the service key {path}: {type(exc).__name__}; "
                        "delete it to make a new one") from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_stderr(message: str) -> None:
    print(f"device-sim stub: {message}", file=sys.stderr, flush=True)


class StubServer:
    """One emulator: build with options, `start()` returns the ready info, `close()` stops."""

    def __init__(self, options: ServeOptions, extra_listeners: Sequence[ListenerFactory] = (),
                 log: Callable[[str], None] = _log_stderr):
        self.options = options
        self.extra_listeners = list(extra_listeners)
        self.log = log
        self.app: StubApp | None = None
        self.listeners: list[Listener] = []
        self.ready: dict = {}

    def start(self) -> dict:
        # The core is imported here so that the admin commands (which only need the file
        # layout above) do not load the decision engine and the store.
        from device_sim.stub.core.device_api import DeviceApi
        from device_sim.stub.core.service import ServiceApi
        from device_sim.stub.core.store import Store

        options = self.options
        directory = state_dir(options.home)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = resolve_config(directory, options)
        key_path = ensure_service_key(directory)
        identity = tls.ensure_server_identity(directory / TLS_SUBDIR, options.server_names)
        store = Store(directory / DB_FILE)
        url_host = "localhost" if options.host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::") else options.host
        self.app = app = StubApp(
            state_dir=directory,
            config=config,
            store=store,
            device_api=DeviceApi(store, config),
            service_api=ServiceApi(store, config, read_service_key(key_path)),
            identity=identity,
            host=options.host,
            url_host=url_host,
            limits=options.limits,
            log=self.log,
        )
        try:
            self._start_listeners(app)
        except OSError as exc:
            self.close()
            raise UserError(f"cannot listen on {options.host}: {exc.strerror or exc}; "
                            "choose another --host/--port (0 picks a free port)") from exc
        self.ready = {
            **{f"{listener.name}_url": listener.url for listener in self.listeners},
            "id_scope": config.id_scope,
            "ca_cert": str(identity.ca_cert),
            "service_key_file": str(key_path),
            "service_host": config.service_host,
            "home": str(options.home),
            "pid": os.getpid(),
        }
        _write_atomic(directory / ENDPOINT_FILE, json.dumps(self.ready, indent=2) + "\n")
        return self.ready

    def _start_listeners(self, app: StubApp) -> None:
        options = self.options
        on_device = http_server.device_handler(app.device_api)
        on_service = http_server.service_handler(app.service_api)
        device = tls.TlsListener(
            "device", "https", options.host, options.port, app.device_context(),
            lambda stream: http_server.serve_http(stream, on_device, app.limits, app.config.max_body, self.log),
            limits=app.limits, on_not_tls=http_server.plain_http_hint, url_host=app.url_host, log=self.log,
            one_at_a_time=True,  # the device handlers only wait in TlsStream reads and writes
        )
        self.listeners.append(device)
        service = tls.TlsListener(
            "service", "https", options.host, options.service_port, tls.service_context(app.identity),
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
        if self.app is not None:
            self.app.store.close()
            self._remove_endpoint_file()
            self.app = None

    def _remove_endpoint_file(self) -> None:
        path = state_dir(self.options.home) / ENDPOINT_FILE
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
