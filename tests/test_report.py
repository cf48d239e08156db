"""`edgepipe report`: one self-contained HTML file (every script and stylesheet inlined,
nothing fetched), its data embedded as JSON and equal to what the API's functions return,
safe whatever the paths hold; bad options exit 3 like other commands. The report in a
browser is tested with the dashboard (tests/test_dashboard.py)."""

from __future__ import annotations

import html.parser
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from pipeline import clock, overview
from pipeline.http.dashboard import DATA_ID, STATIC
from tests.conftest import run_cli
from tests.http_support import consume_all, edgepipe_cmd
from tests.traffic_truth import make_events

NOW = "2026-11-20T15:30:00Z"
EVIL = "/x</script><script>alert(1)</script>"


class Page(html.parser.HTMLParser):
    """What a browser would load from the page, and its embedded data."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.scripts: list[dict[str, str | None]] = []
        self.styles = 0
        self.data: str | None = None
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, name, value))
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_data = dict(attrs).get("id") == DATA_ID
        self.styles += tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data = (self.data or "") + data

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture
def loaded(make_env: Any, sqlite_url: str) -> Any:
    env = make_env(sqlite_url)
    with freeze_time(NOW):
        made = make_events(9, 600, clock.now_ms(), 2 * 86_400_000)
        env.QUEUE.send_batch([body for body, _ in made])
        env.QUEUE.send({"id": "evil", "ts": clock.now_ms() - 1000, "method": "GET", "path": EVIL, "status": 500,
                        "response_time_ms": 5, "host": "api.example.com"})  # fmt: skip
        consume_all(env)
    return env


def test_the_report_is_one_file_with_its_data_embedded(loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "report.html"
    start, end = "2026-11-19T00:00:00Z", "2026-11-20T16:00:00Z"
    with freeze_time(NOW):
        res = run_cli(loaded, "report", "--from", start, "--to", end, "--out", str(out))
        want = overview.overview(loaded.DB, clock.parse_time(start), clock.parse_time(end))
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{out}\n"
    page = _parse(out)
    # nothing to fetch: no script or stylesheet by URL, links only within the page
    assert [r for r in page.refs if not (r[2].startswith("#") or r[2].startswith("data:"))] == []
    assert all("src" not in s for s in page.scripts) and len(page.scripts) == 3  # data, uPlot, app
    assert page.styles == 2  # uPlot's and the dashboard's
    text = out.read_text(encoding="utf-8")
    assert (STATIC / "vendor" / "uPlot.iife.min.js").read_text(encoding="utf-8").strip() in text
    assert "/dashboard/assets/" not in text

    assert page.data is not None
    data = json.loads(page.data)
    assert set(data) == {"report", "overview", "paths", "quality", "pipeline"}
    assert data["overview"] == want
    assert data["report"] == {"generated_at": NOW, "from": start, "to": end, "host": None}
    assert set(data["paths"]) == {p["path"] for p in want["paths"]}
    for path, view in data["paths"].items():
        assert view["totals"]["requests"] == next(p["requests"] for p in want["paths"] if p["path"] == path)
    assert data["quality"]["totals"]["received"] == 601
    assert {"monitor", "status", "jobs", "dlq_by_reason", "rejected"} <= set(data["pipeline"])


def test_a_path_cannot_end_the_data_script(loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    with freeze_time(NOW):
        res = run_cli(loaded, "report", "--out", str(out), "--limit", "1000", "--json")
    assert res.exit_code == 0, res.output
    text = out.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in text
    data = json.loads(_parse(out).data or "")
    assert EVIL in data["paths"] and EVIL in {p["path"] for p in data["overview"]["paths"]}
    written = json.loads(res.stdout)
    assert written == {"out": str(out), "bytes": len(text.encode()), "from": "2026-11-19T16:00:00Z",
                       "to": "2026-11-20T16:00:00Z"}  # fmt: skip


def test_one_host(loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    with freeze_time(NOW):
        res = run_cli(loaded, "report", "--host", "shop.example.com", "--out", str(out))
        want = overview.overview(loaded.DB, host="shop.example.com")
    assert res.exit_code == 0, res.output
    data = json.loads(_parse(out).data or "")
    assert data["overview"] == want and data["report"]["host"] == "shop.example.com"
    every = overview.overview(loaded.DB, now_s=clock.parse_time(NOW))
    assert 0 < want["totals"]["requests"] < every["totals"]["requests"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "last tuesday"], "edgepipe: --from: not a time: 'last tuesday'"),
        (["--from", "2026-11-20", "--to", "2026-11-19"], "edgepipe: to: must be after from"),
        (["--host", "nowhere.example"], "edgepipe: host: no traffic was ever seen for host 'nowhere.example'"),
    ],
)
def test_bad_options_exit_3_and_write_nothing(loaded: Any, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "r.html"
    with freeze_time(NOW):
        res = run_cli(loaded, "report", *args, "--out", str(out))
    assert res.exit_code == 3 and res.stderr.startswith(message), res.output
    assert not out.exists()


def test_the_command_in_a_fresh_process(tmp_path: Path) -> None:
    """As an operator runs it: nothing registered beforehand (the jobs' cron table included)."""
    cfg = tmp_path / "edgepipe.toml"
    cfg.write_text(f'[bindings]\ndb = "sqlite:///{tmp_path}/e.db"\narchive = "file://{tmp_path}/archive"\n')
    run = [*edgepipe_cmd(cfg, "init")], [*edgepipe_cmd(cfg, "report", "--out", str(tmp_path / "r.html"), "--json")]
    assert subprocess.run(run[0], capture_output=True, timeout=120).returncode == 0
    res = subprocess.run(run[1], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(_parse(tmp_path / "r.html").data or "")
    assert data["overview"]["totals"]["requests"] == 0 and data["overview"]["series"] == []
    assert {j["job"] for j in data["pipeline"]["jobs"]} >= {"archive", "clean", "monitor", "rollup"}
    assert json.loads(res.stdout)["out"] == str(tmp_path / "r.html")


def test_out_is_required(loaded: Any) -> None:
    res = run_cli(loaded, "report")
    assert res.exit_code == 2 and "--out" in res.output
