"""The gateway's server edge: Hypercorn's HTTP/1.1 and HTTP/2 protocols with the strict checks
of proxy/strict.py, problem+json for every malformed request, and h2c only when enabled.

Hypercorn builds its protocol per connection from `hypercorn.asyncio.tcp_server.ProtocolWrapper`
and offers no hook; install() swaps in a factory that picks the strict protocol for a
GatewayConfig and leaves every other server (the tests' upstream) as it is."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import h2.events
from hypercorn.asyncio import tcp_server
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.typing import AppWrapper, ConnectionState, TaskGroup, WorkerContext

from .errors import BadRequest, GatewayError, HeadersTooLarge, NotImplementedByGateway
from .strict import (CLOSE, HEAD_LIMIT, check_fields, check_head, check_partial, check_request,
                     head_end, too_large)

log = logging.getLogger("proxy.server")
Send = Callable[[Event], Awaitable[None]]


class GatewayConfig(Config):
    """Hypercorn's Config for the gateway's own server: marks it for the strict protocol."""

    h2c = False                        # GATEWAY_H2C: cleartext HTTP/2 (prior knowledge, Upgrade)


class StrictConnection(h11.Connection):
    """h11's server connection that checks each raw request head before h11 parses it, and
    drops whatever follows a request that ends the connection (it will never be answered)."""

    def __init__(self, h2c: bool) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.h2c = h2c
        self.refusal: GatewayError | None = None
        self._scanned = 0                  # how far an incomplete head has been checked

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            if self.refusal is None:
                self.refusal = _from_h11(exc)
            raise

    def _extract_next_receive_event(self) -> Any:
        state = self.their_state
        buffer = self._receive_buffer
        if state is h11.IDLE and buffer:
            data = buffer._data                                       # noqa: SLF001
            while data.startswith(b"\r\n"):
                buffer.maybe_extract_at_most(2)   # RFC 9112 2.2: ignore empty lines before a request
            end = head_end(data, self._scanned)
            try:
                if end < 0:
                    self._scanned = check_partial(data, self._scanned)
                else:
                    self._scanned = 0
                    check_head(data, end, self.h2c)
            except GatewayError as err:
                self.refusal = err
                raise h11.RemoteProtocolError(err.detail, error_status_hint=err.status) from None
        elif state is h11.MUST_CLOSE and buffer:
            # bytes after a request that closes the connection (a stray CRLF after a body, a
            # second HTTP/1.0 request): h11 would fail the connection over them while the first
            # request is already running; never read, never answered
            buffer.maybe_extract_at_most(len(buffer))
        return super()._extract_next_receive_event()


class StrictH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol over StrictConnection; its own error answers are the
    gateway's problem+json, with one log line per refused request."""

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext,
                 task_group: TaskGroup, connection_state: ConnectionState, ssl: bool,
                 client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Send) -> None:
        super().__init__(app, config, context, task_group, connection_state, ssl, client,
                         server, send)
        self.h2c = bool(getattr(config, "h2c", False))
        self.connection = StrictConnection(self.h2c)

    async def _check_protocol(self, event: h11.Request) -> None:
        if self.h2c:
            await super()._check_protocol(event)
        # otherwise Upgrade: h2c is not honoured: the request is served as HTTP/1.1

    async def _send_error_response(self, status_code: int) -> None:
        connection = self.connection
        err = connection.refusal if isinstance(connection, StrictConnection) else None
        err = err or _by_status(status_code)
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        log.info("refused a request from %s: %d %s: %s", peer, err.status, err.code, err.detail)
        status, headers, body = err.render()
        if CLOSE not in headers:
            headers.append(CLOSE)
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class StrictH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol with HTTP/1.1's rules: the same request checks before a
    stream reaches the app, and a closed connection releases its streams at once."""

    refused: set[int]

    async def initiate(self, headers: list[tuple[bytes, bytes]] | None = None,
                       settings: bytes | None = None) -> None:
        self.refused = set()
        await super().initiate(headers, settings)

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        method = target = b""
        hosts: list[bytes] = []
        for name, value in request.headers:
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name in (b":authority", b"host"):
                hosts.append(value)
        try:
            if hosts[1:] and all(h == hosts[0] for h in hosts):
                hosts = hosts[:1]                  # :authority and the same Host (RFC 9113 8.3.1)
            check_request(method, target, hosts)
            fields = check_fields(list(request.headers))
        except GatewayError as err:
            await self._refuse(request.stream_id, err, request.stream_ended is None)
            return
        if request.stream_ended is None and not any(n == b"content-length" for n, _ in fields):
            # a body framed by DATA frames alone: to the gateway (and the HTTP/1.1 upstream)
            # that is a chunked body; without this it would be forwarded as no body at all
            fields.append((b"transfer-encoding", b"chunked"))
        request.headers = fields
        await super()._create_stream(request)

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if stream_id not in self.refused:
                await super()._handle_events([event])
            elif isinstance(event, h2.events.DataReceived):    # no stream takes it: free the window
                self.connection.acknowledge_received_data(event.flow_controlled_length, stream_id)

    async def handle(self, event: Event) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            # nobody sends these any more: a relay blocked on a full buffer (or waiting for it
            # to drain) would hold its forwarding slot until UPSTREAM_TIMEOUT
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    async def _refuse(self, stream_id: int, err: GatewayError, more: bool) -> None:
        self.refused.add(stream_id)
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        log.info("refused an h2 request from %s: %d %s: %s", peer, err.status, err.code,
                 err.detail)
        status, headers, body = err.render()
        headers = [h for h in headers if h != CLOSE]          # connection-specific in h2
        self.connection.send_headers(stream_id, [(b":status", b"%d" % status), *headers])
        self.connection.send_data(stream_id, body, end_stream=True)
        if more:
            self.connection.reset_stream(stream_id)           # NO_ERROR: the rest is not read
        await self._flush()


class GatewayProtocol:
    """Hypercorn's ProtocolWrapper for the gateway: the strict protocols, and a switch to
    HTTP/2 (prior knowledge or Upgrade: h2c) only when the config enables h2c."""

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext,
                 task_group: TaskGroup, state: ConnectionState, ssl: bool,
                 client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Send, alpn_protocol: str | None = None) -> None:
        self.args = (app, config, context, task_group, state, ssl, client, server, send)
        self.protocol: StrictH11Protocol | StrictH2Protocol
        if alpn_protocol == "h2":
            self.protocol = StrictH2Protocol(*self.args)
        else:
            self.protocol = StrictH11Protocol(*self.args)

    async def initiate(self) -> None:
        await self.protocol.initiate()

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:
            self.protocol = StrictH2Protocol(*self.args)
            await self.protocol.initiate()
            if error.data:
                await self.protocol.handle(RawData(data=error.data))
        except H2CProtocolRequiredError as error:
            self.protocol = StrictH2Protocol(*self.args)
            await self.protocol.initiate(error.headers, error.settings)
            if error.data:
                await self.protocol.handle(RawData(data=error.data))


def protocol_for(app: AppWrapper, config: Config, context: WorkerContext, task_group: TaskGroup,
                 state: ConnectionState, ssl: bool, client: tuple[str, int] | None,
                 server: tuple[str, int] | None, send: Send,
                 alpn_protocol: str | None = None) -> GatewayProtocol | ProtocolWrapper:
    """The protocol Hypercorn's TCPServer runs a new connection with."""
    kind = GatewayProtocol if isinstance(config, GatewayConfig) else ProtocolWrapper
    return kind(app, config, context, task_group, state, ssl, client, server, send,
                alpn_protocol)


def install() -> None:
    """Make Hypercorn's asyncio (and uvloop) server build connections with protocol_for."""
    setattr(tcp_server, "ProtocolWrapper", protocol_for)    # noqa: B010 - a module global, no hook


def _from_h11(exc: h11.RemoteProtocolError) -> GatewayError:
    """h11's own refusals (no Host, a bad header line, an unknown Transfer-Encoding)."""
    status = exc.error_status_hint
    if status == 431:
        return too_large()
    if status == 501:
        return NotImplementedByGateway("Only chunked Transfer-Encoding is supported.",
                                       headers=[CLOSE])
    return BadRequest(f"Malformed request: {str(exc)[:120]}", headers=[CLOSE])


def _by_status(status: int) -> GatewayError:
    if status == 431:
        return HeadersTooLarge(too_large().detail, headers=[CLOSE])
    return BadRequest("Malformed request.", headers=[CLOSE])
