"""Static checks of the observability profile: deploy/prometheus.yml, the Grafana provisioning
and the "API gateway" dashboard, and their services in compose.yaml.

No Docker needed. The series the dashboard may query are computed from the real code: a fresh
`proxy.metrics.Metrics()` is rendered in-process and parsed back with prometheus_client's parser,
and its label names come from the metric objects themselves, so the dashboard follows the code.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from integration.test_deploy_files import environment, gateway_services, services
from proxy import metrics as metrics_module
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DATASOURCE_YAML = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDER_YAML = GRAFANA_DIR / "provisioning" / "dashboards" / "gateway.yaml"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "gateway.json"

PROFILE = "observability"
OBSERVABILITY_SERVICES = ("prometheus", "grafana")
PROMETHEUS_OWN_LABELS = frozenset({"instance", "job"})
METRIC_NAME = re.compile(r"\bgateway_[a-z_]+\b")
AGGREGATORS = ("sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
               "bottomk", "quantile", "count_values")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
MATCHERS = re.compile(r"\b(gateway_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
RANGE = re.compile(r"\[(\d+)(ms|s|m|h)\]")
PANEL_TYPES = frozenset({"timeseries", "stat", "gauge", "bargauge", "table", "text",
                         "heatmap", "piechart"})


# ----------------------------------------------------------------------------------------------
# what the gateway really exports
# ----------------------------------------------------------------------------------------------

@cache
def exported_families() -> dict[str, str]:
    """Family name -> type, from one in-process render of a fresh Metrics()."""
    saved = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # in-memory registry, not files
    try:
        text = Metrics().render().decode("utf-8")
    finally:
        if saved is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families, "Metrics().render() exported no metric families"
    return families


def series_for(family: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{family}_total"}
    if kind in ("histogram", "gaugehistogram"):
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    if kind == "summary":
        return {family, f"{family}_sum", f"{family}_count"}
    return {family}


@cache
def exported_series() -> dict[str, str]:
    """Series name a query may use -> its family name."""
    return {series: family for family, kind in exported_families().items()
            for series in series_for(family, kind)}


@cache
def metric_objects() -> dict[str, MetricWrapperBase]:
    """Family name -> the prometheus_client metric object on a Metrics() instance."""
    found: dict[str, MetricWrapperBase] = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            found[value._name] = value
    assert found, "Metrics() has no prometheus_client metrics as attributes"
    return found


def series_labels(series: str) -> set[str]:
    assert series in exported_series(), f"{series} is not exported by proxy.metrics.Metrics"
    family = exported_series()[series]
    labels = set(metric_objects()[family]._labelnames) | PROMETHEUS_OWN_LABELS
    if exported_families()[family] in ("histogram", "gaugehistogram") and series.endswith("_bucket"):
        labels.add("le")
    return labels


@cache
def known_label_values() -> dict[str, set[str]]:
    """Values the code can put on a label, where the code can tell: outcome from OUTCOMES,
    decision and policy by driving Metrics.decision() through its three cases."""
    saved = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        m = Metrics()
        m.decision(False, 0, 10)
        m.decision(True, 0, 10)
        m.decision(True, 10, 10)
        text = m.render().decode("utf-8")
    finally:
        if saved is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved
    values: dict[str, set[str]] = {"outcome": set(metrics_module.OUTCOMES)}
    for family in text_string_to_metric_families(text):
        if family.name == m.decisions._name:
            for sample in family.samples:
                for label in ("decision", "policy"):
                    values.setdefault(label, set()).add(sample.labels[label])
    assert values.get("decision"), "Metrics.decision() produced no samples"
    return values


# ----------------------------------------------------------------------------------------------
# the files
# ----------------------------------------------------------------------------------------------

@cache
def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def dashboard() -> dict[str, Any]:
    assert DASHBOARD_JSON.is_file(), f"{DASHBOARD_JSON.relative_to(ROOT)} is missing"
    data = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels():
        for target in panel.get("targets", []):
            yield panel, target


def exprs() -> Iterator[tuple[str, str]]:
    for panel, target in targets():
        yield panel["title"], target["expr"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container target, read_only) for the short and the long volume syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((str(volume["source"]), str(volume["target"]),
                           bool(volume.get("read_only"))))
        else:
            parts = str(volume).split(":")
            mode = parts[2] if len(parts) > 2 else ""
            mounts.append((parts[0], parts[1], "ro" in mode.split(",")))
    return mounts


def mount_target(service: dict[str, Any], source: Path) -> str:
    """Container path where `source` (a repo path) is mounted, read-only."""
    for src, target, read_only in bind_mounts(service):
        if (ROOT / src).resolve() == source.resolve():
            assert read_only, f"{src} should be mounted read-only"
            return target
    raise AssertionError(f"{source.relative_to(ROOT)} is not mounted: {bind_mounts(service)}")


def published(service: dict[str, Any]) -> dict[int, int]:
    """host port -> container port"""
    ports = {}
    for port in service.get("ports", []):
        parts = str(port).split(":")
        ports[int(parts[-2])] = int(parts[-1].split("/")[0])
    return ports


def datasource() -> dict[str, Any]:
    (source,) = load_yaml(DATASOURCE_YAML)["datasources"]
    return source


def dashboard_provider() -> dict[str, Any]:
    (provider,) = load_yaml(DASHBOARD_PROVIDER_YAML)["providers"]
    return provider


def gateway_scrape_config() -> dict[str, Any]:
    configs = [c for c in load_yaml(PROMETHEUS_YML)["scrape_configs"] if c["job_name"] == "gateway"]
    assert len(configs) == 1, "expected exactly one scrape config with job_name: gateway"
    return configs[0]


def duration_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", str(text))
    assert match, f"bad duration {text!r}"
    return int(match.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def balanced_group(expr: str, start: int) -> tuple[int, int]:
    """(start, end) of the parenthesised group opening at expr[start] == '('."""
    assert expr[start] == "(", (expr, start)
    depth = 0
    for i in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return start, i + 1
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def balanced_group_ending(expr: str, end: int) -> tuple[int, int]:
    """(start, end) of the parenthesised group closing at expr[end - 1] == ')'."""
    assert expr[end - 1] == ")", (expr, end)
    depth = 0
    for i in range(end - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            return i, end
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def grouping_scopes(expr: str) -> Iterator[tuple[str, list[str], str]]:
    """(keyword, labels, the sub-expression they apply to) for every by/without/on/... clause.
    `sum by (l) (X)` and `sum(X) by (l)` both give X; a binary operator's on/ignoring/group_*
    applies to the whole expression."""
    for match in GROUPING.finditer(expr):
        keyword = match.group(1)
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        if keyword in ("by", "without"):
            before = expr[: match.start()].rstrip()
            if re.search(rf"\b({'|'.join(AGGREGATORS)})$", before):
                rest = match.end() + len(expr[match.end():]) - len(expr[match.end():].lstrip())
                start, end = balanced_group(expr, rest)
            else:
                start, end = balanced_group_ending(expr, len(before))
            yield keyword, labels, expr[start:end]
        else:
            yield keyword, labels, expr


# ----------------------------------------------------------------------------------------------
# the metrics the checks rely on
# ----------------------------------------------------------------------------------------------

def test_every_metric_object_is_exported_even_without_samples() -> None:
    """Labelled metrics with no children still render HELP/TYPE, so they parse as families."""
    labelled = {f for f, m in metric_objects().items() if m._labelnames}
    assert labelled, "expected some labelled metrics (outcome, decision, kind, ...)"
    assert labelled <= set(exported_families()), labelled - set(exported_families())
    assert set(metric_objects()) == set(exported_families())
    for family, kind in exported_families().items():
        assert kind == metric_objects()[family]._type, family


# ----------------------------------------------------------------------------------------------
# dashboard
# ----------------------------------------------------------------------------------------------

def test_dashboard_is_valid_json_with_identity() -> None:
    data = dashboard()
    assert data.get("uid") == "api-gateway"
    assert isinstance(data["uid"], str) and len(data["uid"]) <= 40
    assert data.get("title") == "API gateway"
    assert isinstance(data.get("schemaVersion"), int) and data["schemaVersion"] >= 36
    assert data.get("refresh") == "5s"
    assert data.get("time") == {"from": "now-15m", "to": "now"}
    assert data.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert isinstance(data.get("panels"), list) and data["panels"]


def test_panels_have_unique_ids_types_titles_and_a_layout() -> None:
    ids = [panel.get("id") for panel in panels()]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels():
        assert panel.get("type") in PANEL_TYPES, panel
        assert isinstance(panel.get("title"), str) and panel["title"], panel["id"]
        grid = panel.get("gridPos")
        assert isinstance(grid, dict) and set(grid) >= {"x", "y", "w", "h"}, panel["id"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "xywh"), grid
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, grid
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"


def test_query_panels_have_targets_on_the_provisioned_datasource() -> None:
    uid = datasource()["uid"]
    for panel in panels():
        if panel["type"] == "text":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel.get("datasource", {}).get("uid") == uid, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no queries"
        refs = [target.get("refId") for target in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), (panel["title"], refs)
    for panel, target in targets():
        assert target.get("datasource", {}).get("uid") == uid, (panel["title"], target)
        assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]
        assert isinstance(target.get("legendFormat"), str), panel["title"]


def test_queries_use_only_series_the_gateway_exports() -> None:
    used = set()
    for title, expr in exprs():
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{title}: {expr!r} queries no gateway metric"
        unknown = names - set(exported_series())
        assert not unknown, (f"{title}: {sorted(unknown)} not exported by proxy.metrics.Metrics "
                             f"(it exports {sorted(exported_series())})")
        used |= {exported_series()[name] for name in names}
    # a new metric in proxy/metrics.py should get a panel
    assert used == set(exported_families()), f"not on the dashboard: {set(exported_families()) - used}"


def test_queries_use_only_labels_the_metrics_have() -> None:
    values = known_label_values()
    for title, expr in exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for name, body in MATCHERS.findall(expr):
            for matcher in filter(None, body.split(",")):
                match = MATCHER.fullmatch(matcher)
                assert match, f"{title}: cannot parse matcher {matcher!r}"
                label, op, value = match.groups()
                assert label in series_labels(name), f"{title}: {name} has no label {label!r}"
                if op == "=" and label in values:
                    assert value in values[label], f"{title}: {label}={value!r} never exported"
        for keyword, labels, scope in grouping_scopes(expr):
            names = set(METRIC_NAME.findall(scope))
            assert names, f"{title}: {keyword} ({', '.join(labels)}) groups no gateway metric"
            for label in labels:
                for name in names:
                    assert label in series_labels(name), (
                        f"{title}: {keyword} ({label}) but {name} has only {sorted(series_labels(name))}")


def test_histogram_quantiles_aggregate_buckets_by_le() -> None:
    seen = 0
    for title, expr in exprs():
        for match in re.finditer(r"histogram_quantile\s*\(\s*([0-9.]+)\s*,", expr):
            seen += 1
            assert 0 < float(match.group(1)) < 1, title
            rest = expr[match.end():]
            first = METRIC_NAME.search(rest)
            assert first and first.group(0).endswith("_bucket"), title
            grouping = re.search(r"\bby\s*\(([^)]*)\)", rest)
            assert grouping and "le" in [l.strip() for l in grouping.group(1).split(",")], title
    assert seen


def test_rate_windows_cover_several_scrapes() -> None:
    interval = duration_seconds(gateway_scrape_config().get(
        "scrape_interval", load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]))
    for title, expr in exprs():
        for amount, unit in RANGE.findall(expr):
            window = duration_seconds(amount + unit)
            assert window >= 4 * interval, f"{title}: [{amount}{unit}] < 4 scrapes of {interval}s"


def test_dashboard_covers_the_requested_views() -> None:
    normalized = " ".join(" ".join(expr for _, expr in exprs()).split())
    required = [
        "sum by (outcome) (rate(gateway_requests_total[1m]))",
        'sum(rate(gateway_requests_total{outcome="rate_limited"}[1m]))',
        'sum(rate(gateway_requests_total{outcome="upstream_error"}[1m]))',
        'sum(rate(gateway_requests_total{outcome="upstream_aborted"}[1m]))',
        "sum by (decision) (rate(gateway_ratelimit_decisions_total[1m]))",
        *(f"histogram_quantile({q}, sum by (le) (rate(gateway_request_duration_seconds_bucket[1m])))"
          for q in ("0.5", "0.95", "0.99")),
        *(f"histogram_quantile({q}, sum by (le) (rate(gateway_{m}_bucket[1m])))"
          for q in ("0.5", "0.99") for m in ("upstream_duration_seconds", "limiter_duration_seconds")),
        "histogram_quantile(0.99, sum by (le) (rate(gateway_queue_wait_seconds_bucket[1m])))",
        "sum(gateway_upstream_in_flight)",
        "sum(gateway_queue_waiting)",
        "sum by (kind) (rate(gateway_redis_errors_total[1m]))",
        "increase(gateway_script_reloads_total[",
    ]
    missing = [query for query in required if query not in normalized]
    assert not missing, f"no panel queries {missing}"
    # who is limited: no client label exists, so the dashboard points at the access log
    texts = [p for p in panels() if p["type"] == "text"]
    content = " ".join(p.get("options", {}).get("content", "") for p in texts)
    for needle in ("proxy.access", "decision=limited", "LOG_FORMAT=json"):
        assert needle in content, needle


def test_no_metric_has_a_client_label() -> None:
    """The text panel's premise: per-client detail is not in the metrics."""
    for family, metric in metric_objects().items():
        assert not {"client", "ip", "path", "remote_addr"} & set(metric._labelnames), family


# ----------------------------------------------------------------------------------------------
# Prometheus and Grafana provisioning
# ----------------------------------------------------------------------------------------------

def test_prometheus_scrapes_exactly_the_gateway_replicas() -> None:
    config = gateway_scrape_config()
    assert config.get("metrics_path", "/metrics") == "/metrics"
    assert config.get("scheme", "http") == "http"
    interval = config.get("scrape_interval", load_yaml(PROMETHEUS_YML).get("global", {}).get("scrape_interval"))
    assert duration_seconds(interval) == 5
    timeout = config.get("scrape_timeout", load_yaml(PROMETHEUS_YML).get("global", {}).get("scrape_timeout"))
    assert timeout is None or duration_seconds(timeout) <= duration_seconds(interval)
    targets_ = [t for static in config["static_configs"] for t in static["targets"]]
    expected = [f"{name}:{environment(svc)['GATEWAY_PORT']}" for name, svc in gateway_services().items()]
    assert sorted(targets_) == sorted(expected), f"scrapes {targets_}, replicas are {expected}"
    assert len(expected) >= 2
    assert {"gateway1:8000", "gateway2:8000"} <= set(targets_)


def test_grafana_datasource_points_at_the_prometheus_service() -> None:
    source = datasource()
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source.get("isDefault") is True
    url = re.fullmatch(r"http://([a-z0-9_-]+):(\d+)/?", source["url"])
    assert url, source["url"]
    assert url.group(1) == "prometheus" and url.group(1) in services(), source["url"]
    assert int(url.group(2)) in published(services()["prometheus"]).values()


def test_dashboard_provider_path_is_the_mounted_dashboards_dir() -> None:
    provider = dashboard_provider()
    assert provider.get("type", "file") == "file"
    path = provider["options"]["path"]
    grafana = services()["grafana"]
    mounted = mount_target(grafana, DASHBOARD_JSON.parent)
    assert PurePosixPath(path) == PurePosixPath(mounted), (
        f"the provider loads {path}, but compose mounts the dashboards at {mounted}")
    provisioning = PurePosixPath(mount_target(grafana, DATASOURCE_YAML.parent.parent))
    assert provisioning == PurePosixPath("/etc/grafana/provisioning")
    # the provisioning files sit where Grafana looks for them inside that mount
    assert DATASOURCE_YAML.parent.name == "datasources"
    assert DASHBOARD_PROVIDER_YAML.parent.name == "dashboards"
    assert DASHBOARD_PROVIDER_YAML.parent.parent == DATASOURCE_YAML.parent.parent
    assert DASHBOARD_JSON.suffix == ".json"


# ----------------------------------------------------------------------------------------------
# compose.yaml
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OBSERVABILITY_SERVICES)
def test_observability_services_are_opt_in(name: str) -> None:
    svc = services()[name]
    assert svc.get("profiles") == [PROFILE], f"{name} must only start with --profile {PROFILE}"
    assert "build" not in svc, f"{name} must not be mistaken for a gateway replica"
    for source, _, _ in bind_mounts(svc):
        assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
    assert bind_mounts(svc), name


def test_core_services_are_not_in_a_profile() -> None:
    for name, svc in services().items():
        if name not in OBSERVABILITY_SERVICES:
            assert not svc.get("profiles"), f"{name} would no longer start with `docker compose up`"


def test_observability_services_mount_and_publish() -> None:
    prometheus, grafana = services()["prometheus"], services()["grafana"]
    assert prometheus["image"] == "prom/prometheus:v2.55.1"
    assert mount_target(prometheus, PROMETHEUS_YML) == "/etc/prometheus/prometheus.yml"
    assert published(prometheus) == {9090: 9090}
    assert set(prometheus.get("depends_on", {})) >= set(gateway_services()), (
        f"prometheus should depend on every replica: {sorted(gateway_services())}")
    assert grafana["image"] == "grafana/grafana:11.3.0"
    assert published(grafana) == {3000: 3000}
    assert "prometheus" in grafana.get("depends_on", {})
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-admin}"


def test_observability_services_share_the_network_without_taking_lbs_address() -> None:
    lb_networks = services()["lb"]["networks"]
    lb_addresses = {cfg["ipv4_address"] for cfg in lb_networks.values()
                    if isinstance(cfg, dict) and "ipv4_address" in cfg}
    for name in OBSERVABILITY_SERVICES:
        networks = services()[name].get("networks")
        if not networks:
            continue  # the project's default network, like the gateways
        assert set(networks) & set(lb_networks), f"{name} is not on lb's/the gateways' network"
        if isinstance(networks, dict):
            for cfg in networks.values():
                if isinstance(cfg, dict):
                    assert cfg.get("ipv4_address") not in lb_addresses, name
