"""The Prometheus side, checked against a live deployment: `edgepipe serve` and an `edgepipe
worker` (metrics port on) over one temporary SQLite database, events posted through the API
and consumed. `promtool check metrics` finds nothing to say about either scrape; every
metric named in the Grafana board (infra/grafana/edgepipe.json) and in the alert rules
(infra/prometheus/alerts.yml) is one those processes export; `promtool check rules` and
`promtool test rules` (infra/prometheus/alerts_test.yml) pass.

promtool is Debian's `prometheus` package (`make test` installs it: infra/ensure-tools.sh).
Without it the promtool tests skip, and fail when CI=true."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pipeline.worker_metrics import MONITOR_ALERTS
from tests.conftest import IN_CI, MakeEnv
from tests.http_support import edgepipe_cmd, event, free_port, serving
from tests.test_worker_metrics import CONFIG, DEADLINE_S, Scrape, WorkerProc, monitor_figures_render, scrape, settled

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "infra" / "grafana" / "edgepipe.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "infra" / "prometheus" / "alerts_test.yml"
# Series Prometheus makes itself, not a scrape: the alert rules may name these.
PROMETHEUS_SERIES = {"up"}
POSTED = 240


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (Debian's prometheus package; `make test` installs it: infra/ensure-tools.sh)"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the promtool checks must run)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scrape]]:
    """Scrapes of `edgepipe serve` and of an `edgepipe worker` that consumed what was posted
    through serve (and ran the monitor job), keyed "serve" and "worker"."""
    tmp = tmp_path_factory.mktemp("live")
    db_url = f"sqlite:///{tmp / 'e.db'}"
    cfg = tmp / "serve.toml"
    cfg.write_text(
        f'[bindings]\ndb = "{db_url}"\narchive = "file://{tmp / "archive"}"\n'
        f'[cleaner]\nstats_file = "{tmp / "stats.json"}"\n'
    )
    subprocess.run(edgepipe_cmd(cfg, "init"), check=True, capture_output=True, timeout=DEADLINE_S)
    worker = WorkerProc(tmp, db_url, CONFIG, free_port()).start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        with serving(cfg, base, "--host", "127.0.0.1", "--port", str(port)), httpx.Client(base_url=base) as client:
            for i in range(0, POSTED, 60):
                r = client.post("/v1/events", json=[event(n) for n in range(i, i + 60)])
                assert r.status_code == 202, r.text
            r = client.post("/v1/events", content=b"x", headers={"content-type": "text/plain"})
            assert r.status_code == 415, r.text  # counted in edgepipe_requests_refused_total
            worker_scrape = worker.scrape_until(
                settled(POSTED), "the posted events consumed, a monitor run, a snapshot and the monitor's figures"
            )
            serve_scrape = scrape(f"{base}/metrics")
        assert serve_scrape.value("edgepipe_events_accepted_total") == POSTED
        assert worker_scrape.value("edgepipe_consumer_events_total", outcome="inserted") == POSTED
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.kill()
    yield {"serve": serve_scrape, "worker": worker_scrape}


# -- metric names in PromQL ----------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSETS = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in braces or groupings) or durations."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPINGS.sub("", text)
    text = _OFFSETS.sub("", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_name_extraction_is_not_vacuous() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(edgepipe_batch_latency_seconds_bucket{job="x"}[$__rate_interval])))'
    ) == {"edgepipe_batch_latency_seconds_bucket"}
    assert metric_names(
        "max without (instance, job) (a_total) - max without (instance, job) (a_total offset 1d) > 1e3"
    ) == {"a_total"}
    assert metric_names('sum without (instance) (up{job="edgepipe-worker"}) == 0 or absent(b)') == {"up", "b"}
    assert metric_names("x / y and on (name) z >= 0.8") == {"x", "y", "z"}
    assert metric_names("30 * 86400 > bool c") == {"c"}


def _dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row holds its panels
    return out


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_is_well_formed() -> None:
    board = _dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = _panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("ingest", "outcome", "batch duration", "queue depth", "oldest", "dead letters", "job runs",
                  "job failures", "snapshot age", "lag", "auth failures", "rate limited"):  # fmt: skip
        assert topic in titles, topic


def test_every_monitor_alert_has_a_rule() -> None:
    rules = _rules()
    assert {r["labels"].get("monitor_alert") for r in rules} - {None} == set(MONITOR_ALERTS)
    assert all(r.get("annotations", {}).get("summary") for r in rules)


@pytest.mark.slow
def test_every_dashboard_metric_is_exported(live: dict[str, Scrape]) -> None:
    exported = live["serve"].names | live["worker"].names
    used = {name for p in _panels(_dashboard()) for t in p.get("targets", []) for name in metric_names(t["expr"])}
    assert used, "no metric found in the dashboard"
    assert not used - exported, f"the dashboard names metrics no process exports: {sorted(used - exported)}"


@pytest.mark.slow
def test_every_alert_rule_metric_is_exported(live: dict[str, Scrape]) -> None:
    exported = live["serve"].names | live["worker"].names | PROMETHEUS_SERIES
    used = {name for rule in _rules() for name in metric_names(rule["expr"])}
    assert len(used) >= 10
    assert not used - exported, f"the alert rules name metrics no process exports: {sorted(used - exported)}"


# -- promtool ------------------------------------------------------------------------------


def _promtool(promtool: str, *args: str, text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], input=text, capture_output=True, text=True, timeout=DEADLINE_S, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("process", ["serve", "worker"])
def test_promtool_check_metrics_finds_nothing(promtool: str, live: dict[str, Scrape], process: str) -> None:
    """`promtool check metrics` lints the exposition (names, units, `_total` counters, help
    text, histogram buckets): any line it prints is a problem; none is allowed."""
    text = live[process].text
    assert "edgepipe_" in text
    done = _promtool(promtool, "check", "metrics", text=text)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_promtool_check_metrics_finds_nothing_in_every_figure(
    promtool: str, sqlite_url: str, make_env: MakeEnv
) -> None:
    """The figures a live scrape lacks (each job's latest slot, an alert raised)."""
    text = monitor_figures_render(make_env(sqlite_url, schedule={"misfire_grace": 0}))
    assert 'edgepipe_job_slot_status{name="archive",status="missed"} 1.0' in text
    done = _promtool(promtool, "check", "metrics", text=text)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_promtool_check_metrics_is_not_vacuous(promtool: str) -> None:
    bad = "# HELP requests_count Requests.\n# TYPE requests_count counter\nrequests_count 1\n"
    done = _promtool(promtool, "check", "metrics", text=bad)
    assert done.returncode != 0 and (done.stdout + done.stderr).strip()


def test_promtool_check_rules(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_promtool_test_rules(promtool: str) -> None:
    done = _promtool(promtool, "test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text(encoding="utf-8")))
    assert tested == {r["alert"] for r in _rules()}, "every alert rule is tested"
