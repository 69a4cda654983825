"""Demo upstream service that the API gateway proxies to."""
