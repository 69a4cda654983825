"""Metrics, access logs and request IDs, observed from outside as an operator would."""
from __future__ import annotations

import asyncio
import json
import io
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.__main__ import describe
from proxy.embedded_redis import RedisProcess, free_port
from proxy.logs import JsonFormatter, TextFormatter, escape
from tests.servers import closed_port
from tests.test_main import gateway_process, wait_exit
from tests.test_proxy import eventually, raw_exchange

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by name and label set."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def total(scrape: dict, name: str, **labels: str) -> float:
    """Sum of a metric over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and wanted <= ls)


async def scrape(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_forwarded_and_rate_limited_requests_are_counted(start_gateway):
    async with start_gateway(RATE_LIMIT=5) as gw, gw.client() as client:
        for _ in range(7):
            await client.get("/echo")
        await client.post("/echo", content=b"x")
        m = await scrape(client)
    assert value(m, "gateway_requests_total", outcome="forwarded", method="GET", status_class="2xx") == 5
    assert value(m, "gateway_requests_total", outcome="rate_limited", method="GET", status_class="4xx") == 2
    assert value(m, "gateway_requests_total", outcome="rate_limited", method="POST", status_class="4xx") == 1
    assert value(m, "gateway_ratelimit_decisions_total", policy="default", decision="within_limit") == 3
    assert value(m, "gateway_ratelimit_decisions_total", policy="default", decision="near_limit") == 2
    assert value(m, "gateway_ratelimit_decisions_total", policy="default", decision="over_limit") == 3
    assert value(m, "gateway_request_duration_seconds_count", outcome="forwarded") == 5
    assert value(m, "gateway_request_duration_seconds_count", outcome="rate_limited") == 3
    # six trips to Redis: five admitted, one refused; the two later refusals are local
    assert value(m, "gateway_limiter_duration_seconds_count") == 6
    assert value(m, "gateway_upstream_duration_seconds_count") == 5
    assert value(m, "gateway_queue_wait_seconds_count") == 5


async def test_unknown_methods_share_one_label(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        await client.request("PROPFIND", "/echo")
        await client.request("BREW", "/echo")
        m = await scrape(client)
    assert value(m, "gateway_requests_total", outcome="forwarded", method="OTHER", status_class="2xx") == 2


async def test_upstream_errors_are_counted_as_such(start_gateway, make_settings):
    settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{closed_port()}")
    async with start_gateway(settings) as gw, gw.client() as client:
        await client.get("/x")
        m = await scrape(client)
    assert value(m, "gateway_requests_total", outcome="upstream_error", method="GET", status_class="5xx") == 1
    async with start_gateway(UPSTREAM_TIMEOUT=0.1) as gw, gw.client() as client:
        await client.get("/slow?delay=3")
        m = await scrape(client)
    assert value(m, "gateway_requests_total", outcome="upstream_error", method="GET", status_class="5xx") == 1


async def test_shed_requests_and_slot_gauges(start_gateway):
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=30) as gw, gw.client() as client:
        held = [asyncio.create_task(client.get("/hold")) for _ in range(3)]
        await eventually(lambda: gw.gateway.slots.waiting == 2, "two waiting")
        m = await scrape(client)
        assert value(m, "gateway_upstream_in_flight") == 1
        assert value(m, "gateway_queue_waiting") == 2
        gw.upstream.release.set()
        await asyncio.gather(*held)
        m = await scrape(client)
    assert value(m, "gateway_upstream_in_flight") == 0
    assert value(m, "gateway_queue_waiting") == 0
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=0.1) as gw, gw.client() as client:
        gw.upstream.release.clear()
        holder = asyncio.create_task(client.get("/hold"))
        await eventually(lambda: gw.upstream.in_flight == 1, "slot taken")
        assert (await client.get("/echo")).status_code == 503
        gw.upstream.release.set()
        await holder
        m = await scrape(client)
    assert value(m, "gateway_requests_total", outcome="shed", method="GET", status_class="5xx") == 1


async def test_redis_errors_by_kind_and_limiter_errors(start_gateway, make_settings):
    own = RedisProcess(port=free_port())
    own.start()
    try:
        settings = make_settings(REDIS_URL=own.url, RATE_LIMIT_FAIL_MODE="closed", REDIS_TIMEOUT=0.2)
        async with start_gateway(settings) as gw, gw.client() as client:
            await client.get("/echo")
            own.stop()
            assert (await client.get("/echo")).status_code == 503
            m = await scrape(client)
    finally:
        own.stop()
    assert value(m, "gateway_requests_total", outcome="limiter_error", method="GET", status_class="5xx") == 1
    assert total(m, "gateway_redis_errors_total") == 1
    assert value(m, "gateway_redis_errors_total", kind="connection") == 1


async def test_script_reloads_are_counted(start_gateway, redis):
    async with start_gateway() as gw, gw.client() as client:
        await client.get("/echo")
        await redis.script_flush()
        await client.get("/echo")
        m = await scrape(client)
    assert value(m, "gateway_script_reloads_total") == 1


async def test_health_counters_agree_with_metrics(start_gateway):
    async with start_gateway(RATE_LIMIT=2) as gw, gw.client() as client:
        for _ in range(5):
            await client.get("/echo")
        health = (await client.get("/health")).json()
        m = await scrape(client)
    assert health["total_requests"] == total(m, "gateway_requests_total") == 5
    assert health["blocked_requests"] == total(m, "gateway_requests_total", outcome="rate_limited") == 3


async def test_no_client_address_or_path_in_labels(start_gateway):
    async with start_gateway(RATE_LIMIT=1) as gw:
        for source in ("127.0.0.2", "127.0.0.3"):
            async with gw.client(source) as client:
                await client.get("/secret/path-123")
                await client.get("/secret/path-123")
        async with gw.client() as client:
            text = (await client.get("/metrics")).text
    assert "127.0.0." not in text and "path-123" not in text


async def test_one_scrape_covers_every_worker(tmp_path, upstream, redis_server):
    async with gateway_process(tmp_path, UPSTREAM_BACKEND_URL=upstream[1], REDIS_URL=redis_server.url,
                               GATEWAY_WORKERS=2, RATE_LIMIT=10,
                               REDIS_KEY_PREFIX=f"m{free_port()}") as (proc, url, log):
        end = time.monotonic() + 20
        while sum("Running on" in line for line in log) < 2 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        fresh = httpx.Limits(max_keepalive_connections=0)       # spread over both workers
        async with httpx.AsyncClient(base_url=url, limits=fresh) as client:
            await asyncio.gather(*(client.get("/echo") for _ in range(25)))
            scrapes = [await scrape(client) for _ in range(8)]
            healths = [(await client.get("/health")).json() for _ in range(8)]
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    for m in scrapes:
        assert total(m, "gateway_requests_total") == 25
        assert total(m, "gateway_requests_total", outcome="forwarded") == 10
        assert total(m, "gateway_requests_total", outcome="rate_limited") == 15
    assert {(h["total_requests"], h["blocked_requests"]) for h in healths} == {(25, 15)}


def test_multiprocess_samples_follow_a_fork(tmp_path):
    """The pid prometheus-client files samples under is cached (os.getpid() is a syscall per
    increment); a forked child must still write its own file, and the scrape sums both."""
    script = textwrap.dedent(f"""
        import os
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from proxy.metrics import Metrics
        metrics = Metrics()
        metrics.count("forwarded", "GET", 200, 0.01)
        child = os.fork()
        if child == 0:
            metrics.count("forwarded", "GET", 200, 0.01)
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        print(os.getpid(), child)
        print(metrics.render().decode())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    head, _, text = done.stdout.partition("\n")
    parent, child = head.split()
    assert {p.name for p in tmp_path.glob("counter_*.db")} == {f"counter_{parent}.db",
                                                              f"counter_{child}.db"}
    assert total(samples(text), "gateway_requests_total", outcome="forwarded") == 2


# --- access log and request ids ------------------------------------------------------------------

async def test_access_log_line_has_every_field(start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with start_gateway(RATE_LIMIT=1) as gw, gw.client() as client:
        ok = await client.get("/echo?q=1", headers={"X-Request-ID": "req-42"})
        limited = await client.get("/echo")
    records = [r for r in caplog.records if r.name == "proxy.access"]
    assert len(records) == 2
    first, second = (r.fields for r in records)
    assert first == {**first, "request_id": "req-42", "client": "127.0.0.1", "method": "GET",
                     "path": "/echo?q=1", "status": 200, "outcome": "forwarded", "decision": "allowed",
                     "remaining": 0, "bytes": len(ok.content)}
    assert first["total_s"] >= first["upstream_s"] >= 0 and first["queue_s"] >= 0
    assert second["status"] == 429 and second["decision"] == "limited"
    assert second["request_id"] == limited.headers["x-request-id"]
    assert "req-42" in records[0].getMessage() and '"GET /echo?q=1"' in records[0].getMessage()


def test_json_log_lines_carry_the_fields():
    record = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, "msg %s", ("x",), None)
    record.fields = {"request_id": "r1", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r1" and line["status"] == 200 and line["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    plain = logging.LogRecord("proxy", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    assert json.loads(JsonFormatter().format(plain))["message"] == "hello you"


TEXT_ACCESS_LINE = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[\d+\] proxy\.access: '
                              r'[0-9a-f]{32} 127\.0\.0\.1 "GET (?:[ !#-\[\]-~]|\\.)*" 200 forwarded '
                              r'decision=allowed remaining=\d+ queue=[\d.]+ upstream=[\d.]+ '
                              r'total=[\d.]+ bytes=\d+')
FORGING_TARGETS = [
    b"/x%0d%0a2026-12-01%2000:00:00,000%20INFO%20[1]%20proxy.access:%20forged%20line",
    b"/x%0a%0d%1b[2J%1b]0;title%07%08",
    b"/x%22%20200%20forwarded%20decision=allowed%20%22",
    b'/x"%20200%20forwarded"',
    b"/x\\%22\\",
    b"/x?q=%0d%0afake&r=\"%1b",
]


async def test_text_access_log_cannot_be_forged_by_the_request_target(start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logging.getLogger("proxy.access").addHandler(handler)
    try:
        async with start_gateway() as gw:
            for target in FORGING_TARGETS:
                answer = await raw_exchange(gw.url, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
                assert answer.startswith(b"HTTP/1.1 200 ")
            await eventually(lambda: out.getvalue().count("\n") >= len(FORGING_TARGETS), "access lines")
    finally:
        logging.getLogger("proxy.access").removeHandler(handler)
    lines = out.getvalue().split("\n")
    assert lines.pop() == "" and len(lines) == len(FORGING_TARGETS)
    for line, target in zip(lines, FORGING_TARGETS):
        assert TEXT_ACCESS_LINE.fullmatch(line), line
        assert f'"GET {escape(target.decode("latin-1"))}"' in line
    fields = [r.fields for r in caplog.records if r.name == "proxy.access"]
    assert [f["path"] for f in fields] == [t.decode("latin-1") for t in FORGING_TARGETS]


def test_text_format_escapes_every_text_field_and_json_keeps_the_real_values():
    fields = {"request_id": "r1", "client": "fe80::1\x1b[31m", "method": 'G"ET\\',
              "path": "/a\r\n2026-12-01 00:00:00,000 INFO x\x07\x9b\u20ac", "status": 200}
    message = '%(request_id)s %(client)s "%(method)s %(path)s" %(status)s'
    record = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, message, (fields,), None)
    record.fields = fields
    line = TextFormatter().format(record)
    assert line.endswith(' proxy.access: r1 fe80::1\\x1b[31m "G\\"ET\\\\ '
                         '/a\\r\\n2026-12-01 00:00:00,000 INFO x\\x07\\x9b\\u20ac" 200')
    assert line.isascii() and line.isprintable()
    assert record.getMessage() == message % fields
    assert {k: json.loads(JsonFormatter().format(record))[k] for k in fields} == fields


def test_configured_text_log_escapes_access_fields():
    script = textwrap.dedent("""
        from proxy.logs import access_log, configure_logging
        configure_logging("INFO", "text")
        fields = {"client": "\\x1b[31m", "path": "/x\\r\\n2026-12-01 00:00:00,000 INFO fake"}
        access_log.info('%(client)s "%(path)s"', fields, extra={"fields": fields})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(' proxy.access: \\x1b[31m "/x\\r\\n2026-12-01 00:00:00,000 INFO fake"\n')
    assert done.stderr.count("\n") == 1


async def test_sane_request_id_round_trips(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        response = await client.get("/echo", headers={"X-Request-ID": "abc-123.X_y:z",
                                                      "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    upstream = dict((n, v) for n, v in response.json()["headers"])
    assert response.headers["x-request-id"] == "abc-123.X_y:z"
    assert upstream["x-request-id"] == "abc-123.X_y:z"
    assert upstream["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert [n for n, _ in response.json()["headers"]].count("x-request-id") == 1


@pytest.mark.parametrize("sent", [None, "bad id with spaces", "x" * 300, "<script>"])
async def test_missing_or_insane_request_id_is_replaced(start_gateway, sent):
    async with start_gateway() as gw, gw.client() as client:
        response = await client.get("/echo", headers={"X-Request-ID": sent} if sent else {})
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert dict((n, v) for n, v in response.json()["headers"])["x-request-id"] == rid


async def test_generated_request_ids_are_distinct(start_gateway):
    async with start_gateway(RATE_LIMIT=5) as gw, gw.client() as client:
        ids = [(await client.get("/echo")).headers["x-request-id"] for _ in range(20)]
    assert len(set(ids)) == 20 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


async def test_gateway_errors_carry_the_request_id(start_gateway):
    async with start_gateway(RATE_LIMIT=1) as gw, gw.client() as client:
        await client.get("/echo")
        refused = await client.get("/echo", headers={"X-Request-ID": "mine"})
    assert refused.status_code == 429 and refused.headers["x-request-id"] == "mine"


async def test_startup_logs_configuration_redis_version_and_script(tmp_path, upstream, redis_server):
    async with gateway_process(tmp_path, UPSTREAM_BACKEND_URL=upstream[1],
                               REDIS_URL=redis_server.url) as (proc, url, log):
        end = time.monotonic() + 20
        while not any("loaded fixed_window.v1" in line for line in log) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    text = "\n".join(log)
    assert "configuration: GATEWAY_HOST=127.0.0.1" in text and "RATE_LIMIT=5" in text
    assert re.search(r"redis \d+\.\d+\.\d+ answering; loaded fixed_window\.v1 as [0-9a-f]{40}", text)


def test_configuration_line_masks_redis_password(make_settings):
    line = describe(make_settings(), "redis://user:hunter2@db:6379/0")
    assert "hunter2" not in line and "REDIS_URL=redis://user:***@db:6379/0" in line
