"""The fault proxy itself: each fault does what it says, against a real redis-server."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis as redis_sync
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.embedded_redis import RedisProcess
from tests.faultproxy import FaultProxy


@pytest.fixture
def proxy(redis_server: RedisProcess) -> Iterator[FaultProxy]:
    assert redis_server.port is not None
    with FaultProxy("127.0.0.1", redis_server.port) as fault_proxy:
        yield fault_proxy


def client(proxy: FaultProxy, timeout: float = 2.0) -> redis_sync.Redis:
    return redis_sync.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=timeout,
                            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def test_without_faults_traffic_passes(proxy: FaultProxy) -> None:
    with client(proxy) as r:
        assert r.ping()
        assert proxy.open_connections == 1


def test_latency_delays_each_reply(proxy: FaultProxy) -> None:
    proxy.set(latency_down=0.3)
    with client(proxy) as r:
        started = time.monotonic()
        r.ping()
        assert time.monotonic() - started >= 0.3


def test_reset_after_bytes_resets_the_connection(proxy: FaultProxy) -> None:
    proxy.set(reset_after_down=2)
    with client(proxy) as r, pytest.raises(redis_sync.ConnectionError):
        r.ping()


def test_reset_pause_lets_the_peer_read_what_passed_before_the_reset(proxy: FaultProxy) -> None:
    proxy.set(reset_after_down=3, reset_pause=0.2)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(64) == b"+PO"
        with pytest.raises(ConnectionResetError):
            conn.recv(64)


def test_blackhole_answers_nothing(proxy: FaultProxy) -> None:
    proxy.set(blackhole=True)
    with client(proxy, timeout=0.3) as r, pytest.raises(redis_sync.TimeoutError):
        r.ping()


def test_refuse_stops_listening_and_heals(proxy: FaultProxy) -> None:
    proxy.set(refuse=True)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", proxy.port)) != 0
    proxy.set()
    with client(proxy) as r:
        assert r.ping()


def test_half_close_sends_eof_to_the_client(proxy: FaultProxy) -> None:
    proxy.set(half_close_after_down=0)
    with client(proxy) as r, pytest.raises(redis_sync.ConnectionError):
        r.ping()


def test_cut_resets_open_connections(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(64) == b"+PONG\r\n"
        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            conn.sendall(b"PING\r\n")
            conn.recv(64)
