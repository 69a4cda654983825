"""Protocol fuzzing harness: the raw client, the invariants every exchange must keep, and the
real gateway (Hypercorn, Redis) in front of the strict recording upstream, run on an event loop
in a thread of their own so that the blocking client and Hypothesis run beside them."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from proxy.app import create_app
from proxy.gateway import Gateway
from proxy.settings import load_settings
from tests.fuzz_reference import (BASE, FORWARD, MAX_BODY, PEER, REFUSE, Expected, interpret,
                                  request_id)
from tests.servers import gateway_config, serving
from tests.strict_upstream import (DIGITS, TOKEN, Malformed, Recorded, Rejected, StrictUpstream,
                                   parse_chunked)

Header = tuple[bytes, bytes]
UPSTREAM_TIMEOUT = 2.0
HANG = 15.0                           # a generous bound on one exchange: the timeouts plus slack
SETTLE = 5.0                          # a client connection's tasks end within ~UPSTREAM_TIMEOUT
SENTINEL = (b"GET /fuzz-end HTTP/1.1\r\nHost: fuzz.example\r\nX-Request-ID: fz-end\r\n"
            b"Connection: close\r\n\r\n")
# README's error table, the gateway's own routes (200/503 for /health, Quart's 405 and 413),
# 501 for a transfer coding nobody implements (RFC 9112 6.1), and the upstream's 200
ALLOWED_STATUSES = frozenset({200, 400, 405, 408, 413, 429, 431, 501, 502, 503, 504, 505})


# -- the client side --------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: list[Header]
    body: bytes
    interim: list[int]

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


@dataclass
class Outcome:
    """What one raw exchange produced."""

    sent: bytes
    received: bytes
    closed: bool                      # the gateway closed the connection within HANG
    seconds: float
    send_error: str | None = None


def exchange(port: int, data: bytes, hang: float = HANG) -> Outcome:
    """Send `data` over one connection from PEER and read until the gateway closes it."""
    start = time.monotonic()
    received = bytearray()
    send_error = None
    with socket.create_connection(("127.0.0.1", port), timeout=hang,
                                  source_address=(PEER, 0)) as sock:
        try:
            sock.sendall(data)
        except OSError as exc:                       # the gateway may close before reading it all
            send_error = f"{type(exc).__name__}: {exc}"
        closed = False
        while (left := hang - (time.monotonic() - start)) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError:                           # reset: the answer so far is all there is
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return Outcome(data, bytes(received), closed, time.monotonic() - start, send_error)


def parse_responses(data: bytes, head_ids: frozenset[bytes],
                    head_at: frozenset[int] = frozenset()) -> tuple[list[Response], str | None]:
    """The responses in `data`, strictly framed; the error that stopped parsing, if any. A
    response whose X-Request-ID is in `head_ids` answers a HEAD request: it has no body; so does
    one without an id (the gateway's own routes set none) at a position in `head_at`."""
    responses: list[Response] = []
    interim: list[int] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return responses, f"response head cut short: {data[pos:pos + 120]!r}"
        lines = data[pos:end].split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.[01] ([0-9]{3})(?: .*)?", lines[0])
        if match is None:
            return responses, f"malformed status line {lines[0][:80]!r}"
        status = int(match.group(1))
        headers: list[Header] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name):
                return responses, f"malformed response header line {line[:80]!r}"
            headers.append((name, value.strip(b" \t")))
        pos = end + 4
        if 100 <= status < 200:
            interim.append(status)
            if status == 101:
                return responses, "101 Switching Protocols: the gateway upgraded the connection"
            continue
        response = Response(status, headers, b"", interim)
        interim = []
        responses.append(response)
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        chunked = any(n.lower() == b"transfer-encoding" for n, _ in headers)
        answered = response.header(b"x-request-id")
        # the gateway's refusal of a head it could not take (problem+json, closing) carries its
        # body even when the head said HEAD; nothing follows it, so no answer is misread
        refusal = (response.header(b"connection") or b"").lower() == b"close" \
            and response.header(b"content-type") == b"application/problem+json"
        # (h11 itself leaves the body out when it had parsed the HEAD: then nothing follows)
        if (answered in head_ids or (answered is None and len(responses) - 1 in head_at)) \
                and not (refusal and pos < len(data)) or status in (204, 304):
            continue
        if chunked:
            try:
                parsed = parse_chunked(data, pos)
            except Malformed as exc:
                return responses, f"malformed chunked response body: {exc}"
            if parsed is None:
                return responses, "chunked response body cut short"
            response.body, _, pos = parsed
        elif lengths:
            if len(lengths) != 1 or not DIGITS.fullmatch(lengths[0]):
                return responses, f"bad response Content-Length {lengths!r}"
            length = int(lengths[0])
            if len(data) < pos + length:
                return responses, (f"response body cut short: {len(data) - pos} of {length} "
                                   f"bytes (status {status})")
            response.body = data[pos:pos + length]
            pos += length
        else:
            response.body = data[pos:]
            pos = len(data)
    return responses, None


# -- the invariants ---------------------------------------------------------------------------

def violations(expected: list[Expected], outcome: Outcome, records: list[Recorded],
               rejected: list[Rejected], upstream_host: bytes, settled: bool) -> list[str]:
    """Every way the exchange broke the fuzzer's invariants (empty: it held)."""
    found: list[str] = []
    by_id: dict[bytes | None, Expected] = {e.request_id: e for e in expected if e.request_id}
    head_ids = frozenset(e.request_id for e in expected if e.method == b"HEAD" and e.request_id)
    head_at = frozenset(i for i, e in enumerate(expected) if e.method == b"HEAD")
    responses, error = parse_responses(outcome.received, head_ids, head_at)
    if not outcome.closed:
        found.append(f"[hang] the connection was still open after {HANG:g} s")
    if not settled:
        found.append(f"[hang] the gateway or the upstream was still busy {SETTLE:g} s after the exchange")
    if error:
        found.append(f"[response stream] unparseable: {error}")
    found += _check_statuses(responses, by_id, any(e.own for e in expected))
    for cut in rejected:
        rid = request_id(cut.head) if cut.head is not None else None
        exp = by_id.get(rid) if rid is not None else None
        if not (cut.reason.startswith("connection closed") and exp is not None and exp.may_cut_off):
            found.append(f"[unframeable] the upstream got bytes it cannot frame ({cut.reason}): {cut.data[:200]!r}")
    seen: set[bytes] = set()
    answered = {r.header(b"x-request-id"): r for r in responses}
    own = any(e.own for e in expected)
    for record in records:
        if own and _is_health_probe(record):
            continue
        found += _check_record(record, by_id, answered, seen, upstream_host)
    mandatory = []
    for exp in expected:
        if exp.verdict != FORWARD:
            break
        mandatory.append(exp)
        if exp.may_close:
            break
    for exp in mandatory:
        if exp.request_id not in seen:
            got = answered.get(exp.request_id)
            found.append(f"[not forwarded] valid request {exp.request_id!r} never reached the upstream; the client got "
                         f"{got.status if got else 'no answer'}")
    order = [by_id[r.header(b"x-request-id")].index for r in responses
             if r.header(b"x-request-id") in by_id]
    if order != sorted(order):
        found.append(f"[response stream] answers out of order: request indexes {order}")
    return found


def _is_health_probe(record: Recorded) -> bool:
    """/health's own probe of the upstream: a bare GET of the base path."""
    head = record.request.head
    return (head.method == b"GET" and head.target == BASE and not head.values(b"x-request-id")
            and not head.values(b"x-forwarded-for"))


def _check_statuses(responses: list[Response], by_id: dict[bytes | None, Expected],
                    own: bool) -> list[str]:
    found = []
    for response in responses:
        rid = response.header(b"x-request-id")
        exp = by_id.get(rid)
        if response.status not in ALLOWED_STATUSES:
            found.append(f"[status] undocumented status {response.status} for {rid!r}: {response.body[:200]!r}")
        if response.status >= 400:
            kind = response.header(b"content-type") or b""
            if not kind.startswith(b"application/problem+json"):
                found.append(f"[problem+json] error {response.status} for {rid!r} without a problem+json body "
                             f"(content-type {kind!r}, body {response.body[:100]!r})")
        # /health and /metrics answer without an X-Request-ID
        if response.status == 200 and response.header(b"x-echo") is None \
                and not (exp.own if exp is not None else rid is None and own):
            found.append(f"[status] a 200 for {rid!r} that is neither the upstream's nor a gateway route's")
    return found


def _check_record(record: Recorded, by_id: dict[bytes | None, Expected],
                  answered: dict[bytes | None, Response], seen: set[bytes],
                  upstream_host: bytes) -> list[str]:
    head = record.request.head
    rid = record.request_id
    shown = f"{head.method.decode('latin-1')} {head.target[:80]!r} id={rid!r}"
    exp = by_id.get(rid)
    if rid is not None and rid.startswith(b"sm-"):
        return [f"[smuggled] a request hidden in the client's bytes reached the upstream: {shown}"]
    if rid is None or exp is None:
        return [f"[smuggled] the upstream got a request that is not one the client sent as such "
                f"(after the point where its stream stopped making sense): {shown}"]
    found = []
    if rid in seen:
        found.append(f"[smuggled] {rid!r} reached the upstream twice")
    seen.add(rid)
    if exp.verdict == REFUSE:
        return found + [f"[refused but forwarded] refused request reached the upstream ({'; '.join(exp.reasons)}): {shown}"]
    if head.method != exp.method:
        found.append(f"[changed] {rid!r}: method {exp.method!r} forwarded as {head.method!r}")
    if head.target not in exp.targets:
        found.append(f"[changed] {rid!r}: target forwarded as {head.target!r}, expected one of "
                     f"{sorted(exp.targets)!r}")
    got = [(n.lower(), v) for n, v in head.headers
           if n.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    if got != exp.headers:
        found.append(f"[changed] {rid!r}: headers forwarded as {got!r}, expected {exp.headers!r}")
    if head.values(b"host") != [upstream_host]:
        found.append(f"[changed] {rid!r}: upstream Host {head.values(b'host')!r}, expected {upstream_host!r}")
    if record.request.body != exp.body:
        found.append(f"[changed] {rid!r}: body forwarded as {record.request.body[:200]!r}, expected "
                     f"{exp.body[:200]!r}")
    if record.request.trailers:
        found.append(f"[changed] {rid!r}: trailer fields forwarded {record.request.trailers!r}")
    response = answered.get(rid)
    if response is None or response.status != 200 or \
            response.header(b"x-echo") != str(record.echo).encode() or \
            (exp.method != b"HEAD" and response.body != b"echo %d" % record.echo):
        what = (f"{response.status} {response.body[:120]!r} x-echo={response.header(b'x-echo')!r}"
                if response else "no answer with its request id")
        found.append(f"[ran but not answered] {rid!r} ran upstream (echo {record.echo}) but the client got {what}")
    return found


def _where(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=None)
    return " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames[-4:])) or "?"


class Violation(AssertionError):
    """An exchange broke an invariant; one subclass per kind, so Hypothesis tells them apart
    (it keys distinct bugs on the exception's type) and shrinks each one on its own."""


class Smuggled(Violation):
    """The upstream got a request the client did not send as one (hidden, or after the stream broke)."""


class RefusedButForwarded(Violation):
    """A request the gateway must refuse reached the upstream."""


class Changed(Violation):
    """A forwarded request differs from what the client sent, beyond the README's rules."""


class RanButNotAnswered(Violation):
    """A request ran upstream but the client did not get the upstream's answer."""


class Unframeable(Violation):
    """The gateway sent the upstream bytes a strict HTTP/1.1 parser cannot frame."""


class Hang(Violation):
    """The exchange did not end within the timeouts."""


class NotForwarded(Violation):
    """A valid request never reached the upstream."""


class BadStatus(Violation):
    """A status the README does not document, or a 200 nobody answered."""


class BadResponseStream(Violation):
    """The client could not frame the gateway's answers, or they came out of order."""


class NoProblemJson(Violation):
    """An error answer without an application/problem+json body."""


# most severe first: an example is reported as its worst violation
KINDS: list[tuple[str, type[Violation]]] = [
    ("[smuggled]", Smuggled), ("[refused but forwarded]", RefusedButForwarded), ("[changed]", Changed),
    ("[ran but not answered]", RanButNotAnswered), ("[unframeable]", Unframeable), ("[hang]", Hang),
    ("[not forwarded]", NotForwarded), ("[status]", BadStatus), ("[response stream]", BadResponseStream),
    ("[problem+json]", NoProblemJson),
]


def raise_worst(found: list[str]) -> None:
    """Raise the Violation of the most severe kind among `found`, listing all of them."""
    for tag, kind in KINDS:
        if any(f.startswith(tag) for f in found):
            raise kind("\n".join(found))
    if found:
        raise Violation("\n".join(found))


# -- the harness ------------------------------------------------------------------------------

class Harness:
    """The real gateway under Hypercorn and the strict upstream, on a loop in their own thread,
    so that the blocking client and Hypothesis run beside them."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.upstream = StrictUpstream()
        self.port = 0
        self.upstream_host = b""
        self.gateway: Gateway | None = None
        self._baseline: set[asyncio.Task[Any]] = set()
        self.leftover: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the fuzzing gateway did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("the fuzzing gateway did not stop within 30 s")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop() in the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self.upstream.serve, "127.0.0.1", 0)
        upstream_port = server.sockets[0].getsockname()[1]
        self.upstream_host = b"127.0.0.1:%d" % upstream_port
        settings = load_settings({
            "REDIS_URL": self.redis_url,
            "UPSTREAM_BACKEND_URL": f"http://127.0.0.1:{upstream_port}{BASE.decode()}",
            "RATE_LIMIT": "100000000", "TIME_WINDOW": "60", "MAX_BODY_SIZE": str(MAX_BODY),
            "UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT), "QUEUE_TIMEOUT": "2",
            "SHUTDOWN_TIMEOUT": "2", "LOG_LEVEL": "WARNING", "ACCESS_LOG": "off",
        }, dotenv=None)
        app = create_app(settings)
        self.gateway = app.extensions["gateway"]
        config = gateway_config(settings)
        config.keep_alive_timeout = UPSTREAM_TIMEOUT       # an idle client is let go quickly
        try:
            async with serving(app, config) as url:
                self.port = int(url.rsplit(":", 1)[1])
                self._baseline = asyncio.all_tasks()
                self._ready.set()
                await self._stop.wait()
        finally:
            server.close()
            self.upstream.close_all()
            await server.wait_closed()

    def settle(self, deadline: float = SETTLE) -> bool:
        """Wait until the gateway runs no task of a client connection (Hypercorn's connection
        task outlives the requests it spawned), no slot is taken and the upstream holds no
        partial request; False when that does not happen within `deadline` seconds."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._quiet(deadline), self._loop).result()

    async def _quiet(self, deadline: float) -> bool:
        self.leftover = []
        end = time.monotonic() + deadline
        me = asyncio.current_task()
        gateway = self.gateway
        assert gateway is not None
        while True:
            busy = [t for t in asyncio.all_tasks() - self._baseline
                    if t is not me and getattr(t.get_coro(), "__qualname__", "") != "StrictUpstream.serve"]
            if not busy and gateway.slots.in_use == 0 and not self.upstream.busy:
                return True
            if time.monotonic() > end:
                self.leftover = [f"{getattr(t.get_coro(), '__qualname__', t)} at "
                                 f"{_where(t)}" for t in busy]
                self._baseline |= set(busy)    # reported once; later examples start clean
                return False
            await asyncio.sleep(0.005)

    def run(self, data: bytes) -> tuple[list[Expected], Outcome, list[str]]:
        """One example: the reference reading, what happened, and the invariants it broke.
        Unless the stream ends with a clean close, a closing request is appended: a gateway that
        reads the stream as the reference does answers it (or has closed before it), so its
        close ends the exchange without waiting for an idle timeout."""
        expected = interpret(data)
        if not expected or not expected[-1].stop or expected[-1].verdict == REFUSE:
            data += SENTINEL
            expected = interpret(data)
        mark = self.upstream.snapshot()
        outcome = exchange(self.port, data)
        settled = self.settle()
        records, rejected = self.upstream.since(mark)
        found = violations(expected, outcome, records, rejected, self.upstream_host, settled)
        if not settled:
            found.append(f"[hang] still running: {self.leftover or 'none'}; slots in use "
                         f"{self.gateway.slots.in_use if self.gateway else '?'}; upstream "
                         f"connections mid-request {sorted(self.upstream.busy)}")
        return expected, outcome, found
