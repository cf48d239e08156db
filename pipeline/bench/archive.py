"""Benchmarks of the archive side: `edgepipe bench archive|clean|replay`.

Each phase and its reference run in a fresh child process (`python -m
pipeline.bench.archive PHASE DIR`), so the peak RSS reported is that phase's own and not
the generator's; for the same reason each phase imports what it runs inside itself, and
this module's top imports stay light. References, measured in the same run on the same rows:
* archive — serialise the rows to NDJSON and gzip them in memory (no DB, no I/O);
* clean   — bare `DELETE … WHERE seq BETWEEN` in 1000-row transactions on a copy; the
  rows are archived in objects of `CLEAN_OBJECT_ROWS` (small objects: the clean job's
  transactions of `batch_size` 1000 rows each take several whole objects);
* replay  — plain gunzip + JSON parse of the same objects (no checks, no aggregation);
  verify runs after the clean job, as it does in service.
Each phase runs three times alternating with its reference (archive and clean from a copy
of the same database each time): the round with the median ratio is reported, with every
round's ratio in `round_ratios`.
`ratio` compares wall-clock throughput; `cpu_ratio` compares the process CPU time of the
same runs (all threads), steadier on a busy machine.
"""

from __future__ import annotations

import gzip
import io
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline import clock, sample
from pipeline.bench.common import Progress, quiet

SCHEDULED = "2026-11-30T02:00:00Z"  # every generated row is older than its cutoff
ROUNDS = 3
END_MS = int(clock.parse_time("2026-11-25T00:00:00Z") * 1000)
GENERATE_CHUNK = 50_000
CLEAN_OBJECT_ROWS = 250  # `[archive] max_rows_per_object` of the clean benchmark: 4 objects a transaction
INSERT = (
    "INSERT INTO traffic_events (ts, id, method, path, overflow, status, response_time_ms, host, colo, bytes)"
    " VALUES (?,?,?,?,0,?,?,?,?,?)"
)


def _config(work: Path, **archive: Any) -> Any:
    from pipeline.config import Config

    return Config().replace(
        bindings={"db": f"sqlite:///{work / 'bench.db'}", "archive": f"file://{work / 'archive'}"},
        archive={"max_objects_per_run": 1_000_000, **archive},
        cleaner={"batch_size": 1000, "stats_file": str(work / "stats.json")},
    )


def generate(work: Path, n: int) -> None:
    """Detail rows (stdlib executemany) and their hourly aggregates (the consumer's fold)."""
    from pipeline import migrate
    from pipeline.env import open_env

    env = open_env(_config(work), check_schema=False)
    migrate.upgrade(env.DB)
    con = sqlite3.connect(work / "bench.db", isolation_level=None)
    batch: list[dict[str, Any]] = []
    for e in sample.events(n, days=5, n_paths=2000, end_ms=END_MS, seed=7):
        batch.append(e)
        if len(batch) == GENERATE_CHUNK:
            _store(con, env, batch)
            batch = []
    _store(con, env, batch)
    con.close()
    env.close()


def _store(con: sqlite3.Connection, env: Any, batch: list[dict[str, Any]]) -> None:
    """Insert `batch` as detail rows and add its fold to the hourly aggregates."""
    from pipeline.aggregate import AGG_COLUMNS, AGG_KEYS, Acc, fold
    from pipeline.schema import path_stats_hourly

    if not batch:
        return
    con.execute("BEGIN")
    con.executemany(INSERT, [
        (e["ts"], e["id"], e["method"], e["path"], e["status"], e["response_time_ms"], e["host"], e["colo"], e["bytes"])
        for e in batch
    ])  # fmt: skip
    con.execute("COMMIT")
    acc: Acc = {}
    fold(acc, (
        (e["ts"], e["host"], e["path"], e["method"], e["status"], e["bytes"], float(e["response_time_ms"]))
        for e in batch
    ))  # fmt: skip
    with env.DB.transaction() as conn:
        env.DB.upsert_add_rows(
            conn, path_stats_hourly, AGG_KEYS + AGG_COLUMNS, [(*key, *a) for key, a in acc.items()], AGG_KEYS,
            minimum=["rt_min_ms"], maximum=["rt_max_ms"],
        )  # fmt: skip


def _peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; ru_maxrss would start
    from the parent's RSS at the fork (here, the generator's), hence only a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timed(fn: Callable[[], dict[str, Any]], env: Any = None) -> dict[str, Any]:
    """Run a phase: its wall and CPU seconds (helper processes' included) and peak RSS
    (the largest process's). With `env`, the WAL checkpoints the phase's commits asked of
    the DB binding's background thread are waited for inside the time: the references
    checkpoint inside their commits."""
    started, cpu = clock.monotonic(), _cpu_s()
    out = fn()
    if env is not None:
        env.DB.wait_checkpoints()
    out["seconds"], out["cpu_seconds"] = clock.monotonic() - started, _cpu_s() - cpu
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out["peak_rss_mb"] = max(_peak_rss_mb(), round(children_mb, 1))
    return out


def _cpu_s() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _env(work: Path, **archive: Any) -> Any:
    from pipeline.env import open_env

    return open_env(_config(work, **archive))


def phase_archive(work: Path, **archive: Any) -> dict[str, Any]:
    from pipeline.cli.compose import register_jobs

    run = register_jobs()["archive"]
    env = _env(work, **archive)
    when = datetime.fromtimestamp(clock.parse_time(SCHEDULED), UTC)
    return _timed(lambda: run(env, when, False), env)


def phase_archive_small(work: Path) -> dict[str, Any]:
    """The archive job cutting the rows into objects of `CLEAN_OBJECT_ROWS` (for clean)."""
    return phase_archive(work, max_rows_per_object=CLEAN_OBJECT_ROWS)


def phase_archive_ref(work: Path) -> dict[str, Any]:
    from pipeline.cli.compose import archive_format

    row_fields, level, _ = archive_format()

    con = sqlite3.connect(work / "bench.db")
    rows = con.execute(f"SELECT {', '.join(row_fields)} FROM traffic_events ORDER BY seq").fetchall()
    con.close()

    def serialise() -> dict[str, Any]:
        out = io.BytesIO()
        raw = 0
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:
            for i in range(0, len(rows), 2000):
                data = b"\n".join(orjson.dumps(dict(zip(row_fields, r, strict=True))) for r in rows[i : i + 2000])
                gz.write(data + b"\n")
                raw += len(data) + 1
        return {"rows": len(rows), "raw_bytes": raw, "bytes": out.tell()}

    return _timed(serialise)


def phase_clean(work: Path) -> dict[str, Any]:
    from pipeline.cli.compose import register_jobs

    run = register_jobs()["clean"]
    env = _env(work)
    return _timed(lambda: run(env, clock.now(), False), env)


def phase_clean_ref(work: Path) -> dict[str, Any]:
    con = sqlite3.connect(work / "ref.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA secure_delete=FAST")  # as the DB binding deletes: the same pages written
    lo, hi = con.execute("SELECT min(seq), max(seq) FROM traffic_events").fetchone()

    def delete() -> dict[str, Any]:
        deleted = 0
        for start in range(lo, hi + 1, 1000):
            con.execute("BEGIN")
            deleted += con.execute(
                "DELETE FROM traffic_events WHERE seq BETWEEN ? AND ?", (start, start + 999)
            ).rowcount
            con.execute("COMMIT")
        return {"rows": deleted}

    return _timed(delete)


def phase_replay(work: Path) -> dict[str, Any]:
    from pipeline.cli.compose import replay_verify

    env = _env(work)

    def verify() -> dict[str, Any]:
        r = replay_verify(env, 946_684_800, clock.parse_time(SCHEDULED))
        return {"rows": r["archived_rows"], "ok": r["ok"], "mismatches": len(r["mismatches"]), "bad": len(r["bad"]),
                "processes": r["processes"]}  # fmt: skip

    return _timed(verify)


def phase_replay_ref(work: Path) -> dict[str, Any]:
    from pipeline.cli.compose import archive_format

    key_re = archive_format()[2]
    env = _env(work)
    keys = [i.key for i in env.ARCHIVE.list("events/") if key_re.search(i.key)]

    def parse() -> dict[str, Any]:
        n = 0
        for key in keys:
            for line in gzip.decompress(env.ARCHIVE.get_bytes(key)).splitlines():
                orjson.loads(line)
                n += 1
        return {"rows": n}

    return _timed(parse)


PHASES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "archive": phase_archive,
    "archive_ref": phase_archive_ref,
    "archive_small": phase_archive_small,
    "clean": phase_clean,
    "clean_ref": phase_clean_ref,
    "replay": phase_replay,
    "replay_ref": phase_replay_ref,
}


def _child(phase: str, work: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.archive", phase, str(work)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench phase {phase} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def run(kind: str, n: int, progress: Progress = quiet) -> dict[str, Any]:
    """Run `kind` (archive, clean or replay) on `n` generated rows; see the module doc."""
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        progress(f"generating {n:,} rows")
        generate(work, n)
        if kind == "archive":
            _keep_db(work, "generated.db")

            def reset(phase: str) -> None:  # each archive run starts from the generated rows
                if phase == "archive":
                    _restore_db(work, "generated.db", "bench.db")
                    shutil.rmtree(work / "archive", ignore_errors=True)

            arch, ref, rounds = _rounds(work, "archive", progress, reset)
            mine_rps, ref_rps = arch["rows"] / arch["seconds"], ref["rows"] / ref["seconds"]
            return {
                "bench": "archive", "rows": arch["rows"], "objects": arch["objects"],
                "rows_per_s": round(mine_rps), "mb_per_s": round(arch["raw_bytes"] / arch["seconds"] / 1e6, 1),
                "compression_ratio": round(arch["raw_bytes"] / arch["bytes"], 2), "peak_rss_mb": arch["peak_rss_mb"],
                "reference_rows_per_s": round(ref_rps), "ratio": _ratio(mine_rps, ref_rps),
                "cpu_ratio": _ratio(arch["rows"] / arch["cpu_seconds"], ref["rows"] / ref["cpu_seconds"]),
                "reference_peak_rss_mb": ref["peak_rss_mb"], "round_ratios": rounds,
            }  # fmt: skip
        progress("archive" + (f" in objects of {CLEAN_OBJECT_ROWS} rows" if kind == "clean" else ""))
        arch = _child("archive_small" if kind == "clean" else "archive", work)
        if kind == "clean":
            _keep_db(work, "archived.db")

            def reset(phase: str) -> None:  # each delete starts from the archived rows
                _restore_db(work, "archived.db", "bench.db" if phase == "clean" else "ref.db")

            mine, ref, rounds = _rounds(work, "clean", progress, reset)
        else:
            progress("clean: replay meets the state the nightly jobs leave")
            _child("clean", work)
            mine, ref, rounds = _rounds(work, "replay", progress)
        mine_rps, ref_rps = mine["rows"] / mine["seconds"], ref["rows"] / ref["seconds"]
        return {
            "bench": kind, "rows": mine["rows"], "rows_per_s": round(mine_rps),
            "mb_per_s": round(arch["raw_bytes"] / mine["seconds"] / 1e6, 1),
            "compression_ratio": round(arch["raw_bytes"] / arch["bytes"], 2), "peak_rss_mb": mine["peak_rss_mb"],
            "reference_rows_per_s": round(ref_rps), "ratio": _ratio(mine_rps, ref_rps),
            "cpu_ratio": _ratio(mine["rows"] / mine["cpu_seconds"], ref["rows"] / ref["cpu_seconds"]),
            "reference_rows": ref["rows"],
            "archive_peak_rss_mb": arch["peak_rss_mb"],
            **({"replay_ok": mine["ok"]} if kind == "replay" else {}),
            **({"objects": mine["objects"], "object_rows": CLEAN_OBJECT_ROWS, "transactions": mine["batches"],
                "complete": mine["complete"]} if kind == "clean" else {}),
            "round_ratios": rounds,
        }  # fmt: skip


def _keep_db(work: Path, name: str) -> None:
    """Copy bench.db (checkpointed) to `name`."""
    con = sqlite3.connect(work / "bench.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.copy(work / "bench.db", work / name)


def _restore_db(work: Path, name: str, to: str) -> None:
    for suffix in ("-wal", "-shm"):
        (work / f"{to}{suffix}").unlink(missing_ok=True)
    shutil.copy(work / name, work / to)


def _rounds(
    work: Path, phase: str, progress: Progress, reset: Callable[[str], None] = lambda _p: None
) -> tuple[dict[str, Any], dict[str, Any], list[float]]:
    """`phase` and its reference, `ROUNDS` times in alternating order, `reset(phase)` before
    each run: (phase, reference) of the round with the median ratio, and every round's
    ratio (single runs a minute apart vary widely: see docs/benchmarks.md)."""
    pairs = []
    for i in range(ROUNDS):
        progress(f"{phase} and reference, round {i + 1} of {ROUNDS}")
        order = (phase, f"{phase}_ref") if i % 2 == 0 else (f"{phase}_ref", phase)
        got = {}
        for name in order:
            reset(name)
            got[name] = _child(name, work)
        pairs.append((got[phase], got[f"{phase}_ref"]))
    ratios = [_ratio(m["rows"] / m["seconds"], r["rows"] / r["seconds"]) for m, r in pairs]
    mine, ref = pairs[sorted(range(len(pairs)), key=ratios.__getitem__)[len(pairs) // 2]]
    return mine, ref, ratios


if __name__ == "__main__":
    from pipeline import log

    log.setup("WARNING")
    result = PHASES[sys.argv[1]](Path(sys.argv[2]))
    print(json.dumps(result, default=str))
