"""DPS over MQTT 3.1.1 with mutual TLS whose client signature is made inside the PKCS#11 token.

Implements the same `Transport` seam as `transport_https.HttpsTransport`, so the same
`RegistrationFlow` decides everything and the outcome, JSON and exit codes are identical.

Why awscrt's MQTT 3.1.1 client (`awscrt.mqtt.Connection`): it takes the very
`ClientTlsContext` the HTTPS transport builds (PKCS#11 key, chain from `chain_pem`), runs
on the same `CrtRuntime` event loop and loaded `Pkcs11Lib` (so the two never fight over
the module's initialisation), and supports what DPS needs: username without password,
clean session, any port. Two settings matter: `disable_metrics=True` (otherwise awscrt
appends AWS IoT metrics to the username, which is DPS's `{scope}/registrations/...` field)
and awscrt's automatic reconnect is not relied on (it would resume without our
subscription): a dropped connection fails the pending request at once, and the next
request opens a fresh connection.

One request maps to one PUBLISH (QoS 1) carrying a fresh `$rid`; the answer is the message
on `$dps/registrations/res/{status}/?$rid=...`, whose status and `retry-after` become the
`Response` the flow reads (`headers["retry-after"]`, as over HTTPS).

A CONNACK refusal is DPS's way to say 401 over MQTT (no certificate, wrong username or
client id, CN mismatch), so it is not an exception here: the next request returns a 401
`Response` and the device reports `unauthorized` exactly as over HTTPS. awscrt's MQTT 3.1.1
client does not report which CONNACK code it got: aws-c-mqtt shuts the channel down with
AWS_ERROR_MQTT_PROTOCOL_ERROR for every refusal (and also when the first packet is not a
CONNACK at all, e.g. a non-MQTT server on the port), so the message says exactly that.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading

from awscrt import io as crt_io
from awscrt import mqtt as crt_mqtt

from device_sim.common.dps import DEVICE_API_VERSION
from device_sim.device import registration as reg
from device_sim.device.registration import Response
from device_sim.device.transport import ProtocolFailure, TransportTimeout
from device_sim.device.transport_https import USER_AGENT, CrtRuntime, CrtTransport, classify, handshake_failure
from device_sim.mqtt import topics

DEFAULT_PORT = 8883
WEBSOCKET_PATH = "/$iothub/websocket"  # the one path DPS (and the emulator) upgrade
KEEP_ALIVE_SECONDS = 60
PING_TIMEOUT_MS = 10_000

REFUSAL_MESSAGE = ("the server refused the MQTT CONNECT (or answered it with something that is not "
                   "a CONNACK); awscrt does not report the CONNACK code: for DPS this means the "
                   "certificate, client id or username was not accepted")


class MqttTransport(CrtTransport):
    """One device's MQTT connection to DPS (real or emulated); implements `Transport`."""

    def __init__(self, host: str, port: int, id_scope: str, registration_id: str,
                 tls_context: crt_io.ClientTlsContext, *, runtime: CrtRuntime,
                 api_version: str = DEVICE_API_VERSION, client_version: str = USER_AGENT,
                 websocket: bool = False):
        super().__init__(host, port, id_scope, registration_id, tls_context, runtime=runtime,
                         api_version=api_version)
        self.websocket = websocket
        self.username = topics.format_username(id_scope, registration_id, api_version, client_version)
        self.connection: crt_mqtt.Connection | None = None
        self._refused = False
        self._interrupted = False
        self._rids = itertools.count(1)
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    # -- Transport ---------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        if self._interrupted:
            self.close()  # awscrt would resume without our subscription: start afresh instead
        if self.connection is not None or self._refused:
            return
        socket_options = crt_io.SocketOptions()
        socket_options.connect_timeout_ms = max(1, int(min(timeout, 30) * 1000))
        connection = crt_mqtt.Connection(
            client=crt_mqtt.Client(self.runtime.bootstrap, self.tls_context),
            host_name=self.host,
            port=self.port,
            client_id=self.registration_id,
            clean_session=True,
            username=self.username,
            keep_alive_secs=KEEP_ALIVE_SECONDS,
            ping_timeout_ms=PING_TIMEOUT_MS,
            socket_options=socket_options,
            on_connection_interrupted=self._on_interrupted,
            disable_metrics=True,
            use_websockets=self.websocket,
            websocket_handshake_transform=_dps_websocket_path if self.websocket else None,
        )
        what = f"connecting to {self.host}:{self.port}"
        try:
            connection.connect().result(timeout)
        except concurrent.futures.TimeoutError:
            connection.disconnect()
            raise TransportTimeout(f"no CONNACK from the server while {what}", reg.CONNECT_TIMEOUT) from None
        except Exception as exc:
            if getattr(exc, "name", None) == "AWS_ERROR_HTTP_WEBSOCKET_UPGRADE_FAILURE":
                # an answer, not a network failure (`classify` would read SOCKET in the name)
                raise ProtocolFailure(f"the server refused the WebSocket upgrade of {WEBSOCKET_PATH} while "
                                      f"{what} (does it serve MQTT over WebSockets?)") from None
            if not _is_refusal(exc):
                # s2n's ambiguous negotiation failure is settled as on HTTPS (docs/device.md)
                raise handshake_failure(exc, classify(exc, what, connecting=True), self.host, self.port,
                                        timeout) from None
            self._refused = True  # the channel is already shut down: nothing to disconnect
            return
        self.connection = connection
        self.connects += 1
        self._subscribe(timeout)

    def send_register(self, body: bytes, timeout: float) -> Response:
        return self._request(topics.format_register, body, timeout, "register")

    def send_poll(self, operation_id: str, timeout: float) -> Response:
        return self._request(lambda rid: topics.format_status(rid, operation_id), b"", timeout,
                             "operation status")

    def close(self) -> None:
        connection, self.connection = self.connection, None
        interrupted, self._interrupted = self._interrupted, False
        if connection is not None:
            closing = connection.disconnect()  # also stops awscrt's own reconnect attempts
            if not interrupted:  # after a drop awscrt completes this only when it gives up: don't wait
                try:
                    closing.result(5)  # DISCONNECT sent before a CLI exits
                except Exception:
                    pass  # the server closed first; nothing is left to release
        self._fail_pending(ProtocolFailure("the connection was closed", reg.DROPPED))

    # -- internals ----------------------------------------------------------------------

    def _subscribe(self, timeout: float) -> None:
        future, _ = self.connection.subscribe(topics.RESPONSE_FILTER, crt_mqtt.QoS.AT_LEAST_ONCE,
                                              callback=self._on_message)
        try:
            future.result(timeout)
        except Exception as exc:
            self.close()
            if isinstance(exc, crt_mqtt.SubscribeError):
                raise ProtocolFailure(f"the server refused the subscription to {topics.RESPONSE_FILTER}") from None
            raise classify(exc, "subscribing to the DPS response topic") from None

    def _request(self, topic_for, payload: bytes, timeout: float, what: str) -> Response:
        self.connect(timeout)
        if self._refused:
            return Response(401, {}, json.dumps({"message": REFUSAL_MESSAGE}).encode())
        rid = str(next(self._rids))
        waiter: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending[rid] = waiter
        try:
            self.connection.publish(topic_for(rid), payload, crt_mqtt.QoS.AT_LEAST_ONCE)
            return waiter.result(timeout)
        except concurrent.futures.TimeoutError:
            self.close()  # a late answer must not be taken for the next request's
            raise TransportTimeout(f"no answer from the server to the {what} request") from None
        except Exception as exc:
            self.close()
            raise classify(exc, f"waiting for the answer to the {what} request") from None
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def _on_message(self, topic, payload, **kwargs) -> None:
        # Runs on the awscrt event-loop thread: only hand the answer over, never block.
        try:
            answer = topics.parse_response(topic)
        except topics.TopicError:
            return  # not a DPS answer; a real broker could send anything on '#'
        headers = {} if answer.retry_after is None else {"retry-after": str(answer.retry_after)}
        with self._lock:
            waiter = self._pending.get(answer.rid)
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(answer.status, headers, bytes(payload)))

    def _on_interrupted(self, connection, error, **kwargs) -> None:
        self._interrupted = True
        self._fail_pending(ProtocolFailure(f"the server closed the MQTT connection ({getattr(error, 'name', error)})",
                                           reg.DROPPED))

    def _fail_pending(self, exc: Exception) -> None:
        with self._lock:
            waiters = list(self._pending.values())
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)


def _dps_websocket_path(transform_args, **kwargs) -> None:
    transform_args.http_request.path = WEBSOCKET_PATH
    transform_args.set_done()


def _is_refusal(exc: BaseException) -> bool:
    """awscrt's verdict for a CONNACK refusal (see the module docstring)."""
    if exc.args and isinstance(exc.args[0], crt_mqtt.ConnectReturnCode):
        return True  # what awscrt's Python layer would raise if the C layer passed the code on
    return getattr(exc, "name", None) == "AWS_ERROR_MQTT_PROTOCOL_ERROR"
