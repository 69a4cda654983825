"""Rate-limiting API gateway: a thin Quart/Hypercorn proxy over Redis-held limits."""
