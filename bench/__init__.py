"""`python -m bench`: a rerunnable, loopback-only, time-bounded benchmark of the gateway.

Modules:
  __main__   command line
  runner     setup (Redis, upstream, floor app, gateways), pinning, interleaved rounds
  scenarios  pass, blocked, large, upload, workers, floor
  procs      process groups, readiness polling, /proc readers (CPU time, RSS), pinning plan
  loadgen    Python keep-alive HTTP/1.1 load generator (fallback when wrk is not installed)
  wrk        wrk command lines, Lua scripts and output parsing
  redisstats INFO commandstats over a raw socket, and its delta
  upstream   raw asyncio/uvloop HTTP/1.1 upstream answering constant responses
  nginx      minimal nginx config for the upstream, used when nginx is on PATH
  floor      bare Hypercorn ASGI app returning a constant body: the ceiling for the gateway
  report     medians, the table, results-<timestamp>.md and .json
"""
