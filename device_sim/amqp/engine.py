"""python-qpid-proton's protocol engine fed bytes, the same on both AMQP sides.

The device (`device/transport_amqp.py`, client mode) and the emulator
(`stub/net/amqp_session.py`, server mode) each bind a `proton.Transport` to a `Connection`
and a `Collector` and never give the engine a socket: their own I/O loops move the bytes.
Feeding bytes in, taking the output, ticking heartbeats and handing each collected event
to a handler is identical on both sides, so `EngineEndpoint` holds it once; a side
subclasses it, sets `transport` and `collector`, and writes its own `_dispatch(event)`.
"""

from __future__ import annotations

from proton import Collector, Event, Transport


class EngineEndpoint:
    """Bytes in (`receive`, `end_of_input`), bytes out (`output`), heartbeats (`tick`)."""

    transport: Transport
    collector: Collector

    def receive(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._halted():
            capacity = self.transport.capacity()
            if capacity < 0:
                return  # the engine stopped reading (error or close): the rest is ignored
            if capacity == 0:
                self._process()
                if self.transport.capacity() == 0:
                    return
                continue
            chunk = bytes(view[:capacity])
            view = view[capacity:]
            try:
                self.transport.push(chunk)
            except Exception as exc:  # the engine's own framing errors land in its condition
                self._input_refused(exc)
            self._process()

    def end_of_input(self) -> None:
        if self.transport.capacity() >= 0:
            self.transport.close_tail()
        self._process()

    def tick(self, now: float) -> float:
        """Heartbeats the peer asked for (its idle-timeout); the next deadline, or 0."""
        deadline = self.transport.tick(now)
        self._process()
        return deadline

    def output(self) -> bytes:
        """Every byte the engine has ready to send (b"" when none, or once its output closed)."""
        chunks = []
        while (size := self.transport.pending()) > 0:
            chunks.append(self.transport.peek(size))
            self.transport.pop(size)
        return b"".join(chunks)

    def _process(self) -> None:
        while not self._halted() and (event := self.collector.peek()) is not None:
            try:
                self._dispatch(event)
            finally:
                self.collector.pop()

    def _dispatch(self, event: Event) -> None:
        raise NotImplementedError

    def _halted(self) -> bool:
        """True once a side decided to read and dispatch nothing more (the emulator's fault
        plan dropping the connection: docs/emulator.md, 'Fault plans')."""
        return False

    def _input_refused(self, exc: Exception) -> None:
        """The engine refused input bytes (its condition says why); a side may note it."""
