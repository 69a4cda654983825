"""Protocol fuzzing (Hypothesis): raw HTTP/1.1 byte streams against the real gateway in front
of a strict recording upstream. For every example: the upstream sees exactly the requests the
gateway answered for, unchanged modulo the README's header rules, never one hidden inside
another; every status is a documented one; the exchange ends within the timeouts.

CI runs a bounded, derandomized profile (about a minute). `./dev fuzz --minutes N` runs the same
properties for longer: FUZZ_EXAMPLES raises max_examples, FUZZ_SEED picks a fresh seed, and
failures are kept in .hypothesis/ to be replayed first next time."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from proxy.embedded_redis import RedisProcess
from tests.fuzz_reference import EITHER, FORWARD, REFUSE, interpret
from tests.fuzz_strategies import ALL, FRAMING, HEAD, PIPELINE, SIZE, TARGET, Stream, streams
from tests.fuzzing import Harness, Outcome, parse_responses, raise_worst, violations
from tests.strict_upstream import Malformed, Recorded, parse_request

LONG = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=LONG or 50,
    deadline=None,                              # the harness bounds each exchange itself (HANG)
    derandomize=not LONG,
    database=DirectoryBasedExampleDatabase(".hypothesis/fuzz") if LONG else None,
    report_multiple_bugs=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


EXAMPLES: Counter[str] = Counter()         # per test, for `./dev fuzz`'s summary (FUZZ_REPORT)


@pytest.fixture(scope="module")
def harness(redis_server: RedisProcess) -> Iterator[Harness]:
    running = Harness(redis_server.url)
    running.start()
    yield running
    running.stop()
    if os.environ.get("FUZZ_REPORT"):
        with open(os.environ["FUZZ_REPORT"], "a", encoding="utf-8") as report:
            for test, count in EXAMPLES.items():
                report.write(json.dumps({"test": test, "examples": count}) + "\n")


def check(harness: Harness, data: bytes) -> None:
    EXAMPLES[os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]] += 1
    expected, outcome, found = harness.run(data)
    note(f"sent {Stream(outcome.sent[:3000])!r}")
    for exp in expected:
        note(f"  reference {exp.describe()}")
        event(f"verdict {exp.verdict}")
    note(f"received {Stream(outcome.received[:3000])!r} (closed={outcome.closed}, {outcome.seconds:.2f} s)")
    raise_worst(found)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(frozenset()))
def test_valid_requests_reach_the_upstream_unchanged(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(HEAD))
def test_malformed_heads_are_refused_and_never_forwarded(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(TARGET))
def test_methods_and_targets_are_forwarded_only_as_documented(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(FRAMING))
def test_ambiguous_framing_never_lets_a_request_through(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(SIZE, max_requests=2))
def test_oversized_heads_are_refused(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(PIPELINE, max_requests=4))
def test_pipelined_requests_are_answered_for_what_ran(harness: Harness, data: bytes) -> None:
    check(harness, data)


@pytest.mark.fuzz
@FUZZ
@given(data=streams(ALL, max_requests=4))
def test_any_mix_of_mutations_keeps_every_invariant(harness: Harness, data: bytes) -> None:
    check(harness, data)


# -- the harness checks itself: each invariant fires on a broken exchange --------------------

GET = b"GET /a HTTP/1.1\r\nHost: h\r\nX-Request-ID: fz-0\r\n\r\n"
UPSTREAM_HOST = b"127.0.0.1:1"


def _recorded(raw: bytes, echo: int = 1) -> Recorded:
    parsed = parse_request(raw)
    assert parsed is not None
    return Recorded(echo, 1, parsed[0])


def _forwarded_get(rid: bytes = b"fz-0", target: bytes = b"/base/a") -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\nHost: " + UPSTREAM_HOST + b"\r\nx-forwarded-for: 127.0.0.2"
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: h\r\nx-request-id: " + rid + b"\r\n\r\n")


def _answer(rid: bytes = b"fz-0", echo: int = 1) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nX-Echo: %d\r\nx-request-id: %b\r\nContent-Length: %d\r\n\r\necho %d"
            % (echo, rid, len(b"echo %d" % echo), echo))


def test_strict_upstream_refuses_what_a_lenient_parser_accepts() -> None:
    for raw in (b"GET / HTTP/1.1\nHost: h\n\n", b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
                b"GET / HTTP/1.1\r\nA: \x01\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: 1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n",
                b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\na", b"GET  / HTTP/1.1\r\n\r\n"):
        with pytest.raises(Malformed):
            parse_request(raw)
    raw = (b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"003;a=b\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: v\r\n\r\nrest")
    parsed = parse_request(raw)
    assert parsed is not None
    request, end = parsed
    assert (request.body, request.trailers, raw[end:]) == (b"abc0123456789", [(b"T", b"v")], b"rest")


def test_reference_stops_reading_where_framing_turns_ambiguous() -> None:
    smuggler = (b"POST /a HTTP/1.1\r\nHost: h\r\nX-Request-ID: fz-0\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + GET.replace(b"fz-0", b"fz-1"))
    assert [(e.request_id, e.verdict, e.stop) for e in interpret(smuggler)] == [(b"fz-0", REFUSE, True)]
    pipelined = GET + b"get /b HTTP/1.1\r\nHost: h\r\nX-Request-ID: fz-1\r\n\r\n" + \
        b"GET /../x HTTP/1.1\r\nHost: h\r\nX-Request-ID: fz-2\r\nConnection: close\r\n\r\nhello"
    read = interpret(pipelined)
    assert [(e.request_id, e.verdict, e.stop) for e in read] == [
        (b"fz-0", FORWARD, False), (b"fz-1", REFUSE, False), (b"fz-2", EITHER, True)]
    assert read[2].targets == frozenset({b"/base/x"})          # climbing: only resolved below base


def test_invariants_flag_a_smuggled_request() -> None:
    outcome = Outcome(GET, _answer(), closed=True, seconds=0.1)
    hidden = _recorded(_forwarded_get(rid=b"sm-0"), echo=2)
    found = violations(interpret(GET), outcome, [_recorded(_forwarded_get()), hidden], [],
                       UPSTREAM_HOST, settled=True)
    assert len(found) == 1 and found[0].startswith("[smuggled]"), found


def test_invariants_flag_a_request_that_ran_while_the_client_was_told_400() -> None:
    refusal = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    found = violations(interpret(GET), Outcome(GET, refusal, closed=True, seconds=0.1),
                       [_recorded(_forwarded_get())], [], UPSTREAM_HOST, settled=True)
    assert any("ran upstream" in f for f in found) and any("problem+json" in f for f in found), found


def test_invariants_flag_a_changed_request_an_undocumented_status_and_a_hang() -> None:
    answers = _answer() + b"HTTP/1.1 500 Oops\r\ncontent-type: application/problem+json\r\n" \
        b"content-length: 2\r\n\r\n{}"
    found = violations(interpret(GET), Outcome(GET, answers, closed=False, seconds=15.0),
                       [_recorded(_forwarded_get(target=b"/base/../a"))], [], UPSTREAM_HOST,
                       settled=True)
    assert any("target forwarded as" in f for f in found), found
    assert any("undocumented status 500" in f for f in found), found
    assert any(f.startswith("[hang]") for f in found), found


def test_invariants_hold_for_a_plain_exchange() -> None:
    found = violations(interpret(GET), Outcome(GET, _answer(), closed=True, seconds=0.1),
                       [_recorded(_forwarded_get())], [], UPSTREAM_HOST, settled=True)
    assert found == []


def test_stream_repr_folds_long_runs() -> None:
    assert repr(Stream(b"X: " + b"v" * 50 + b"\r\n")) == "b'X: ' + b'v' * 50 + b'\\r\\n'"


def test_response_parser_frames_head_answers_without_a_body() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nx-request-id: fz-0\r\n"
            b"Content-Length: 6\r\n\r\n" + _answer(b"fz-1", 2))
    responses, error = parse_responses(data, frozenset({b"fz-0"}))
    assert error is None
    assert [(r.status, r.interim, r.body) for r in responses] == [(200, [100], b""), (200, [], b"echo 2")]


def test_strict_upstream_and_client_talk_through_the_gateway(harness: Harness) -> None:
    expected, outcome, found = harness.run(GET)
    assert found == [] and outcome.closed
    assert [e.request_id for e in expected] == [b"fz-0", b"fz-end"]
