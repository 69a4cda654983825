#!/usr/bin/env bash
# bench/instructions.sh [pass|blocked] [N]: CPU instructions the gateway process spends per
# request, counted by valgrind's callgrind over N sequential keep-alive requests after a warm-up.
# Unlike req/s on a shared 2-core machine, the count repeats to a fraction of a percent, so two
# trees can be compared within 5% (run it in each). Needs valgrind; about 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-blocked}
n=${2:-1000}
case "$scenario" in
  pass) limit=1000000000 ;;
  blocked) limit=1 ;;
  *) echo "usage: $0 [pass|blocked] [N]" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
py=.venv/bin/python
port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
redis_port=$(port); upstream_port=$(port); gateway_port=$(port)
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no >/dev/null & pids+=($!)
"$py" -m bench.upstream --port "$upstream_port" >/dev/null 2>&1 & pids+=($!)
REDIS_URL=redis://127.0.0.1:$redis_port/0 UPSTREAM_BACKEND_URL=http://127.0.0.1:$upstream_port \
  GATEWAY_PORT=$gateway_port RATE_LIMIT=$limit TIME_WINDOW=3600 LOG_LEVEL=WARNING \
  REDIS_TIMEOUT=5 PYTHONHASHSEED=0 \
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/out.%p" \
  "$py" -m proxy >"$work/gateway.log" 2>&1 & gateway=$!
pids+=("$gateway")
requests() {   # N sequential keep-alive GETs on one connection, each answer read whole
  "$py" - "$gateway_port" "$1" <<'PY'
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
conn = socket.create_connection(("127.0.0.1", port), timeout=60)
buffer = b""
for done in range(count):
    conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            length = int(buffer[:end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buffer) >= end + 4 + length:
                buffer = buffer[end + 4 + length:]
                break
        chunk = conn.recv(65536)
        if not chunk:
            sys.exit(f"instructions.sh: the gateway closed the connection after {done} requests")
        buffer += chunk
PY
}
for _ in $(seq 600); do
  curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$gateway_port/health" && break
  sleep 0.5
done
requests 200
callgrind_control -i on "$gateway" >/dev/null 2>&1
requests "$n"
callgrind_control -i off "$gateway" >/dev/null 2>&1
callgrind_control -d "$gateway" >/dev/null 2>&1
total=$(cat "$work"/out.* | awk '/^totals:/ {s += $2} END {print s}')
echo "$scenario: $((total / n)) instructions per request ($total over $n requests)"
