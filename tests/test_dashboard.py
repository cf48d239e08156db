"""The dashboard in a real browser: headless Chromium (Playwright) against `create_app`
served by uvicorn over a SQLite database filled through the real queue and consumer.

The page loads without console errors, its tiles hold what `/v1/overview` returns, the
hourly chart has one point per hour with traffic, the paths table sorts and opens a path's
view, the pipeline tab shows the DLQ, workers, jobs and data quality; a token-protected
server asks for a token, refuses a wrong one and takes a right one, then refreshes by
itself; `edgepipe report` renders the same views offline from one file. Each view is
screenshotted to artifacts/ (see tests/browser_support.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline import clock, migrate
from pipeline.cli.report import pipeline_document
from pipeline.config import Config
from pipeline.env import Env, open_env
from pipeline.heartbeat import Heartbeat
from pipeline.http.app import create_app
from pipeline.http.auth import create_token
from pipeline.http.dashboard import STATIC
from scheduler.runner import run_by_hand
from tests.browser_support import TIMEOUT_MS, chromium, chromium_path, new_page, screenshot, uvicorn_server
from tests.conftest import run_cli
from tests.http_support import consume_all
from tests.traffic_truth import Truth, make_events

HOUR_S = 3600
GAP_HOURS = (10, 11, 12)  # hours of the range left without traffic: the chart skips them


@dataclass
class Site:
    env: Env
    base: str
    start: int  # the range the tests show: [start, end)
    end: int
    truths: list[Truth]

    @property
    def query(self) -> str:
        return f"range=custom&from={clock.iso(self.start)}&to={clock.iso(self.end)}"

    @property
    def range(self) -> dict[str, str]:
        return {"from": clock.iso(self.start), "to": clock.iso(self.end)}

    def api(self, endpoint: str, **params: Any) -> Any:
        r = httpx.get(self.base + endpoint, params=params, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


def _env(tmp: Path) -> Env:
    cfg = Config().replace(
        bindings={"db": f"sqlite:///{tmp / 'edgepipe.db'}", "archive": f"file://{tmp / 'archive'}"},
        consumer={"max_batch_timeout": 0},
        cleaner={"stats_file": str(tmp / "stats.json")},
    )
    env = open_env(cfg, check_schema=False)
    migrate.upgrade(env.DB)
    return env


def _fill(env: Env, seed: int, n: int, start: int) -> list[Truth]:
    """`n` events between `start` and a minute ago, none in the GAP_HOURS of the range,
    through the queue and the consumer; plus two invalid events (the DLQ)."""
    now_ms = clock.now_ms() - 60_000
    made = [
        (body, t)
        for body, t in make_events(seed, n, now_ms, now_ms - start * 1000)
        if (t.hour - start) // HOUR_S not in GAP_HOURS
    ]
    for i in range(0, len(made), 500):
        env.QUEUE.send_batch([body for body, _ in made[i : i + 500]])
    env.QUEUE.send_batch([{"id": "bad-1", "ts": now_ms, "method": "GET"}, {"id": "bad-2", "path": "x"}])
    consume_all(env)
    return [t for _, t in made]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chromium_path()
    env = _env(tmp_path_factory.mktemp("dashboard"))
    end = int(clock.now_s()) // HOUR_S * HOUR_S + HOUR_S
    start = end - 48 * HOUR_S
    truths = _fill(env, 7, 4000, start)
    beat = Heartbeat(env.DB, "edge-1:4242:ab12cd")
    beat.batch_done()
    beat.beat(force=True)
    assert run_by_hand(env, "monitor", None).status == "succeeded"
    with uvicorn_server(create_app(env, pipeline_report=pipeline_document)) as base:
        yield Site(env, base, start, end, truths)
    env.close()


def test_the_page_and_its_assets_are_served_from_the_package(make_env: Any, sqlite_url: str) -> None:
    with uvicorn_server(create_app(make_env(sqlite_url))) as base, httpx.Client(base_url=base, timeout=30) as client:
        _check_page_and_assets(client)


def _check_page_and_assets(client: httpx.Client) -> None:
    root = client.get("/?range=7d")
    assert (root.status_code, root.headers["location"]) == (302, "/dashboard?range=7d")
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    linked = set(re.findall(r'(?:src|href)="/dashboard/assets/([^"]+)"', page.text))
    assert linked == {"vendor/uPlot.min.css", "app.css", "vendor/uPlot.iife.min.js", "app.js"}
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for name in [*linked, "vendor/uPlot.LICENSE"]:
        r = client.get(f"/dashboard/assets/{name}")
        assert r.status_code == 200 and r.content == (STATIC / name).read_bytes(), name
        assert r.headers["content-type"] == types.get(Path(name).suffix, "text/plain; charset=utf-8"), name
    assert "MIT" in client.get("/dashboard/assets/vendor/uPlot.LICENSE").text
    for bad in ("nope.js", "../dashboard.py", "..%2Fdashboard.py", "index.html"):
        r = client.get(f"/dashboard/assets/{bad}")
        assert r.status_code == 404 and r.json()["error"] == "not_found", bad


def _open(page: Any, url: str, view: str) -> None:
    page.goto(url)
    page.wait_for_selector(f'body[data-loaded="{view}"]', timeout=TIMEOUT_MS)


def _tiles(page: Any, scope: str) -> dict[str, str]:
    return {t.get_attribute("data-key"): t.get_attribute("data-value") for t in page.locator(f"{scope} .tile").all()}


def _assert_tiles_match(tiles: dict[str, str], totals: dict[str, Any]) -> None:
    assert tiles, "no tiles"
    for key, shown in tiles.items():
        want = totals[key]
        assert (float(shown) if shown else None) == want, key


def test_overview_tiles_chart_and_table_show_what_the_api_returns(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    context, page, console = new_page(browser)
    try:
        _open(page, f"{site.base}/?{site.query}", "traffic")  # `/` redirects to /dashboard
        assert page.url.startswith(f"{site.base}/dashboard?")
        doc = site.api("/v1/overview", **site.range)
        tiles = _tiles(page, "#view-traffic")
        assert set(tiles) == {"requests", "rate_4xx", "rate_5xx", "bytes", "p50_ms", "p95_ms", "p99_ms",
                              "distinct_paths"}  # fmt: skip
        _assert_tiles_match(tiles, doc["totals"])
        assert doc["totals"]["requests"] == len(site.truths)
        assert doc["totals"]["distinct_paths"] == len({t.path for t in site.truths})
        # the same figures through the other read endpoints: /v1/paths/hourly and /v1/stats
        hourly = site.api("/v1/paths/hourly", **site.range)["rows"]
        assert float(tiles["requests"]) == sum(r["requests"] for r in hourly) == site.api("/v1/stats")["hot"]["events"]
        assert float(tiles["bytes"]) == sum(r["bytes_sum"] for r in hourly)
        requests = sum(r["requests"] for r in hourly)
        for status in ("4xx", "5xx"):
            errors = sum(r[f"status_{status}"] for r in hourly)
            assert float(tiles[f"rate_{status}"]) == pytest.approx(errors / requests, abs=1e-6)
        assert float(tiles["distinct_paths"]) == len({r["path"] for r in hourly})
        expect(page.locator('#view-traffic .tile[data-key="requests"] .value')).to_have_text(f"{len(site.truths):,}")

        hours = Counter(t.hour for t in site.truths)
        assert len(hours) == 48 - len(GAP_HOURS)
        assert page.get_attribute("#chart-requests", "data-points") == str(len(hours)) == str(len(doc["series"]))
        assert page.get_attribute("#chart-latency", "data-points") == str(len(hours))
        assert page.locator("#chart-requests canvas").count() == 1
        legend = page.locator("#chart-requests .u-legend").inner_text()
        assert all(label in legend for label in ("2xx", "4xx", "5xx"))

        rows = page.locator("#paths-table tbody tr")
        expect(rows).to_have_count(len(doc["paths"]))
        assert rows.first.get_attribute("data-path") == doc["paths"][0]["path"]
        assert page.locator("#paths-table tbody tr .spark").count() == len(doc["paths"])
        options = page.locator("#host-select option").all_inner_texts()
        assert options == ["All hosts", *(h or "(no host)" for h in doc["hosts"])]
        screenshot(page, "dashboard-overview.png")
        assert console.errors == []
    finally:
        context.close()


def test_sorting_the_paths_and_opening_one(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    context, page, console = new_page(browser)
    try:
        _open(page, f"{site.base}/dashboard?{site.query}", "traffic")
        page.click('#paths-table th[data-sort="requests"]')  # busiest first → fewest first
        expect(page.locator('#paths-table th[data-sort="requests"]')).to_have_attribute("aria-sort", "ascending")
        cells = page.locator("#paths-table tbody tr td:nth-child(2)").all_inner_texts()
        shown = [int(c.replace(",", "")) for c in cells]
        assert shown == sorted(shown) and len(shown) > 1
        page.click('#paths-table th[data-sort="path"]')
        names = page.locator("#paths-table tbody tr td:first-child").all_inner_texts()
        assert names == sorted(names)

        by_path = Counter(t.path for t in site.truths)
        path = max(by_path, key=lambda p: (by_path[p], p))
        page.locator(f'#paths-table tbody tr[data-path="{path}"] td:nth-child(2)').click()
        page.wait_for_selector(f'body[data-loaded="path:{path}"]')
        expect(page.locator("#path-name")).to_have_text(path)
        doc = site.api("/v1/overview", path=path, **site.range)
        assert doc["totals"]["requests"] == by_path[path]
        _assert_tiles_match(_tiles(page, "#view-path"), doc["totals"])
        hours = {t.hour for t in site.truths if t.path == path}
        assert page.get_attribute("#chart-path-requests", "data-points") == str(len(hours))
        screenshot(page, "dashboard-path.png")
        page.click("#view-path a.back")
        page.wait_for_selector('body[data-loaded="traffic"]')
        assert console.errors == []
    finally:
        context.close()


def test_pipeline_health_tab(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    context, page, console = new_page(browser)
    try:
        _open(page, f"{site.base}/dashboard?{site.query}", "traffic")
        page.click("#tab-pipeline")
        page.wait_for_selector('body[data-loaded="pipeline"]')
        doc = site.api("/v1/pipeline")
        assert doc["dlq_by_reason"] == {"invalid": 2}
        grid = page.locator("#pipeline-grid")
        dlq = grid.locator('[data-card="Dead letters"] tbody tr')
        expect(dlq).to_have_count(1)
        assert dlq.first.inner_text().split() == ["invalid", "2", "2"]
        expect(grid.locator('[data-card="Workers"]')).to_contain_text("edge-1:4242:ab12cd")
        jobs = grid.locator('[data-card="Scheduled jobs"] tbody tr')
        expect(jobs).to_have_count(len(doc["jobs"]))
        monitor_row = grid.locator('[data-card="Scheduled jobs"] tbody tr', has_text="monitor")
        expect(monitor_row).to_contain_text("succeeded")
        expect(page.locator("#alerts h2")).to_have_text(
            "No alerts raised" if not doc["monitor"]["raised"] else re.compile(r"\d+ alerts? raised")
        )
        quality = grid.locator('[data-card^="Data quality"]')
        expect(quality).to_contain_text("Received")
        q = site.api("/v1/quality", hours=24)
        assert q["totals"]["received"] == len(site.truths) + 2 and q["totals"]["invalid"] == 2
        expect(quality).to_contain_text(f"{len(site.truths) + 2:,}")
        screenshot(page, "dashboard-pipeline.png")
        assert console.errors == []
    finally:
        context.close()


def test_report_file_renders_offline(browser: Any, site: Site, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    out = tmp_path / "report.html"
    res = run_cli(site.env, "report", "--from", clock.iso(site.start), "--to", clock.iso(site.end),
                  "--out", str(out), "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    written = json.loads(res.stdout)
    assert written["out"] == str(out) and written["bytes"] == out.stat().st_size

    context, page, console = new_page(browser, offline=True)
    try:
        _open(page, out.as_uri(), "traffic")
        doc = site.api("/v1/overview", **site.range)
        _assert_tiles_match(_tiles(page, "#view-traffic"), doc["totals"])
        assert page.get_attribute("#chart-requests", "data-points") == str(len(doc["series"]))
        expect(page.locator("#banner")).to_contain_text("edgepipe report")
        assert page.locator(".ranges").is_hidden()
        screenshot(page, "report-overview.png")
        top = doc["paths"][0]["path"]
        page.locator(f'#paths-table tbody tr[data-path="{top}"] td:nth-child(2)').click()
        page.wait_for_selector(f'body[data-loaded="path:{top}"]')
        tiles = _tiles(page, "#view-path")
        assert tiles["requests"] == str(doc["paths"][0]["requests"])
        page.click("#tab-pipeline")
        page.wait_for_selector('body[data-loaded="pipeline"]')
        expect(page.locator('#pipeline-grid [data-card="Dead letters"]')).to_contain_text("invalid")
        screenshot(page, "report-pipeline.png")
        assert console.errors == []
    finally:
        context.close()


def test_a_protected_server_asks_for_a_token_refuses_a_wrong_one_and_refreshes(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    env = _env(tmp_path)
    start = int(clock.now_s()) // HOUR_S * HOUR_S - 23 * HOUR_S
    truths = _fill(env, 3, 200, start)
    read = create_token(env.DB, "viewer", "read")[1]
    ingest = create_token(env.DB, "producer", "ingest")[1]
    context, page, _ = new_page(browser)
    try:
        with uvicorn_server(create_app(env, pipeline_report=pipeline_document)) as base:
            page.goto(f"{base}/dashboard")
            dialog, message = page.locator("#token-dialog"), page.locator("#token-message")
            expect(dialog).to_be_visible()
            expect(message).to_contain_text("requires an API token")
            page.fill("#token-input", "ep_wrong")
            page.click("#token-submit")
            expect(message).to_contain_text("not accepted (HTTP 401: missing or invalid bearer token)")
            expect(dialog).to_be_visible()
            page.fill("#token-input", ingest)
            page.click("#token-submit")
            expect(message).to_contain_text("HTTP 403")
            page.fill("#token-input", read)
            page.click("#token-submit")
            page.wait_for_selector('body[data-loaded="traffic"]')
            expect(dialog).to_be_hidden()
            tile = page.locator('#view-traffic .tile[data-key="requests"]')
            expect(tile).to_have_attribute("data-value", str(len(truths)))
            screenshot(page, "dashboard-token.png")

            page.reload()  # the token is kept for the tab: no second prompt
            page.wait_for_selector('body[data-loaded="traffic"]')
            expect(dialog).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('edgepipe.token')") == read

            more = _fill(env, 4, 50, start)  # new traffic: the page shows it within a refresh (10 s)
            expect(tile).to_have_attribute("data-value", str(len(truths) + len(more)), timeout=TIMEOUT_MS)
    finally:
        context.close()
        env.close()
