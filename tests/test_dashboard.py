"""dashboards/tasknode.json, the Grafana dashboard: every query is PromQL that Prometheus
parses (promtool), names only metrics the server defines, and every metric is shown."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from server import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "tasknode.json"
#: The sample names a metric family of each type exposes.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
}


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return found


def expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def families() -> dict[str, Metric]:
    """The service's metric families by name, as the server exposes them."""
    found = [*REGISTRY.collect(), *metrics.BuildInfo().collect()]
    return {family.name: family for family in found if family.name.startswith("tasknode_")}


def test_every_panel_is_described_and_placed_once() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


def test_queries_name_only_the_servers_metrics_and_show_every_one() -> None:
    exposed = {
        name + suffix
        for name, family in families().items()
        for suffix in SUFFIXES.get(family.type, ("",))
    }
    named = {m for expr in expressions() for m in re.findall(r"\btasknode_[a-z_]+", expr)}
    assert named <= exposed, named - exposed
    shown = {
        name
        for name, family in families().items()
        if any(name + suffix in named for suffix in SUFFIXES.get(family.type, ("",)))
    }
    assert shown == set(families()), set(families()) - shown


def test_every_query_is_promql_prometheus_accepts(tmp_path: Path) -> None:
    """Each query as a recording rule, checked by promtool (CI installs it:
    scripts/install-promtool.sh; a missing promtool fails the test). Grafana's
    $__rate_interval stands for a range, as Grafana substitutes one."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/install-promtool.sh"
    rules = [
        {
            "record": f"tasknode:dashboard_query_{index}",
            "expr": expr.replace("$__rate_interval", "5m"),
        }
        for index, expr in enumerate(expressions())
    ]
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout
