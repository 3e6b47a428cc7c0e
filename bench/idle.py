"""Benchmark: what an idle consortium costs, and the round once a run comes, in one command.

``fedmeta deploy local`` starts a TLS SuperLink, fedmeta's ServerApp executor and three
``fedmeta site start`` hospitals (Fed-Heart-Disease: the sites of ``fedmeta bench deploy``) on
127.0.0.1. Once every site is online, nothing is submitted for :data:`SETTLE_S` + the window
(``--seconds``; :data:`WINDOW_S` by default, :data:`QUICK_WINDOW_S` with ``--quick``):

- **CPU**: each process's user + system CPU seconds (psutil ``cpu_times``) at the start and the
  end of the window, divided by the window: percent of one core. Per process (SuperLink,
  executor; each site's ``site start`` process, which runs the site worker, and its SuperNode)
  and per role (a site: its two processes; the coordinator: SuperLink + executor);
- **memory**: each process's resident set size, sampled every :data:`SAMPLE_S` seconds (the
  largest sample is reported).

Then the run of ``fedmeta bench deploy`` (default Reptile, 10 rounds, 2 with ``--quick``) is
submitted to the same consortium: reported are the median and 95th percentile of its rounds
(``rounds.jsonl``'s ``wall_s``), its first round, and, from the run's log and the sites' logs,
the waits that pay for the idle polls' back-off: from submission to the ServerApp's first line
(the executor's poll and the ServerApp's start), and the sites' greeting (the first message
each site gets after the window): from its sending to each SuperNode's receiving it (their idle
poll), and until every site answered (the site worker's wake-up and its work, also given).

Goals (the consortium-scale issue): an idle site at most 1 % of a core, an idle coordinator at
most 2 %, the deployed round's median still at most 0.6 s. The ``fedmeta coordinator start``
process of a real coordinator is this benchmark's own process here (it starts the SuperLink and
the executor), so it is not measured; it wakes once a second to check its two processes.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.bench import deploy as D
from fedmeta.bench import rows as R

log = logging.getLogger(__name__)

BENCH = "idle"
WINDOW_S, QUICK_WINDOW_S = 600.0, 30.0
#: Seconds left alone after the sites are online and before the window opens: the site workers
#: import torch then (their warm-up), which is start-up, not idling.
SETTLE_S = 15.0
SAMPLE_S = 5.0
#: Percent of one core an idle site (SuperNode + site worker) and an idle coordinator (SuperLink +
#: executor) may use, and the deployed round's median (seconds) with idle polls backing off.
TARGET_SITE_PCT, TARGET_COORDINATOR_PCT, TARGET_ROUND_S = 1.0, 2.0, 0.6


@dataclass
class Watched:
    """One process of the idle consortium: its role, what it is, and the figures measured."""

    role: str  # "coordinator" or "site NAME"
    what: str
    pid: int
    cpu_s: float = 0.0
    rss_max: int = 0
    gone: bool = False


def cpu_percent(cpu_before: float, cpu_after: float, wall_s: float) -> float:
    """Percent of one core used between two readings of a process's CPU seconds."""
    return 100.0 * (cpu_after - cpu_before) / wall_s if wall_s > 0 else float("nan")


def by_role(watched: Sequence[Watched], wall_s: float) -> dict[str, dict[str, float]]:
    """Per role: CPU percent of one core and the sum of the processes' largest RSS (MB)."""
    roles: dict[str, dict[str, float]] = {}
    for w in watched:
        r = roles.setdefault(w.role, {"cpu_pct": 0.0, "rss_mb": 0.0})
        r["cpu_pct"] += cpu_percent(0.0, w.cpu_s, wall_s)
        r["rss_mb"] += w.rss_max / 2**20
    return roles


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?)")


def processes(up: Any) -> list[Watched]:
    """The consortium's processes: SuperLink, executor, and per site its ``site start`` process
    (the site worker) and every process under it (its SuperNode)."""
    import psutil

    out = [Watched("coordinator", "SuperLink", up.procs.procs["superlink"].pid),
           Watched("coordinator", "ServerApp executor", up.procs.procs["serverexec"].pid)]
    for site, managed in sorted(up.sites.items()):
        out.append(Watched(f"site {site}", "site worker (`site start`)", managed.pid))
        for child in psutil.Process(managed.pid).children(recursive=True):
            cmd = " ".join(child.cmdline())
            out.append(Watched(f"site {site}", "SuperNode" if "fedmeta.deploy.supernode" in cmd
                               else child.name(), child.pid))
    return out


def watch(watched: list[Watched], seconds: float, *, sample_s: float = SAMPLE_S) -> float:
    """Measure ``watched`` over ``seconds``: CPU seconds used and largest RSS; returns the wall
    seconds the CPU readings span."""
    import psutil

    procs = {w.pid: psutil.Process(w.pid) for w in watched}

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def sample() -> None:
        for w in watched:
            if w.gone:
                continue
            try:
                w.rss_max = max(w.rss_max, int(procs[w.pid].memory_info().rss))
            except psutil.NoSuchProcess:
                w.gone = True

    before = {w.pid: cpu(procs[w.pid]) for w in watched}
    t0 = time.monotonic()
    sample()
    end = t0 + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(sample_s, left))
        sample()
    wall = time.monotonic() - t0
    for w in watched:
        try:
            w.cpu_s = cpu(procs[w.pid]) - before[w.pid]
        except psutil.NoSuchProcess:
            w.gone = True
    return wall


def run_log_times(run_log: Path, submitted_wall: float) -> dict[str, float | None]:
    """From the run's log, wall clock times: ``app`` (the ServerApp's first line), ``greeting``
    (the greeting sent: its first message to the sites) and ``joined`` (every site answered it);
    ``submitted_wall`` is subtracted from each."""
    import datetime as dt

    def stamp(line: str) -> float | None:
        m = _STAMP.match(line)
        if not m:
            return None
        return dt.datetime.fromisoformat(m.group(1).replace(",", ".")).astimezone().timestamp()

    def first(marker: str | None) -> float | None:
        t = next((t for t in (stamp(x) for x in lines if marker is None or marker in x) if t is not None), None)
        return None if t is None else t - submitted_wall

    lines = run_log.read_text(errors="replace").splitlines() if run_log.is_file() else []
    return {"app": first(None), "greeting": first("greeting "), "joined": first("joined:")}


_FLOWER_STAMP = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+):\s+Receiving:")


def first_message(site_state: Path) -> tuple[float | None, float | None]:
    """From a site's state folder: (wall clock at which its SuperNode logged receiving its first
    message, seconds its worker spent serving it: the first ``request_served`` of its audit)."""
    import datetime as dt
    import json

    received = None
    node_log = site_state / "run" / "logs" / "supernode.log"
    if node_log.is_file():
        for line in node_log.read_text(errors="replace").splitlines():
            m = _FLOWER_STAMP.match(line)
            if m:
                received = dt.datetime.fromisoformat(m.group(1).replace(",", ".")).astimezone().timestamp()
                break
    served = None
    audit = site_state / "audit.jsonl"
    if audit.is_file():
        for line in audit.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "request_served":
                served = float(event["seconds"])
                break
    return received, served


def run(*, quick: bool, out_dir: Path, seconds: float | None = None) -> list[R.Row]:
    from fedmeta.deploy.local import LocalUp, deploy_local

    window = seconds if seconds is not None else (QUICK_WINDOW_S if quick else WINDOW_S)
    rounds = D.settings(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{BENCH}.md").write_text("")
    timer = R.Timer()
    measured: dict[str, Any] = {}

    def idle(up: LocalUp) -> None:
        time.sleep(SETTLE_S)
        watched = processes(up)
        measured["load_before"] = os.getloadavg()
        measured["wall"] = watch(watched, window)
        measured["load_after"] = os.getloadavg()
        measured["watched"] = watched
        measured["submitted"] = time.time()

    with tempfile.TemporaryDirectory(prefix="fedmeta-idle-") as tmp:
        result = deploy_local(sites=len(D.SITES), rounds=None, out=Path(tmp) / "run",
                              overrides=D.overrides(rounds), stream=False, say=lambda _: None, on_up=idle)
        times = D.round_times(Path(tmp) / "run")
        run_logs = sorted((Path(tmp) / "run" / "deploy" / "coordinator" / "runs").glob("*/run.log"))
        marks = run_log_times(run_logs[0] if run_logs else Path(tmp) / "none", measured["submitted"])
        firsts = {site.name: first_message(site / "state")
                  for site in sorted((Path(tmp) / "run" / "deploy" / "pki" / "sites").iterdir())}
    to_app, sent, joined = marks["app"], marks["greeting"], marks["joined"]
    greeting = joined - sent if joined is not None and sent is not None else None
    reached = [r - measured["submitted"] - sent for r, _ in firsts.values() if r is not None and sent is not None]
    served = [s for _, s in firsts.values() if s is not None]
    watched: list[Watched] = measured["watched"]
    wall: float = measured["wall"]
    roles = by_role(watched, wall)
    sites = {k: v for k, v in roles.items() if k.startswith("site ")}
    worst_site = max(v["cpu_pct"] for v in sites.values())
    coordinator = roles["coordinator"]["cpu_pct"]
    median, p95 = statistics.median(times), percentile(times, 95)
    load_b, load_a = measured["load_before"], measured["load_after"]

    rows = [R.row(BENCH, f"{w.role}: {w.what}", "cpu_pct", cpu_percent(0.0, w.cpu_s, wall), site=w.role,
                  window_s=round(wall, 1), gone=w.gone) for w in watched]
    rows += [R.row(BENCH, f"{w.role}: {w.what}", "rss_mb", w.rss_max / 2**20, site=w.role) for w in watched]
    rows += [R.row(BENCH, role, m, v, site=role) for role, r in roles.items() for m, v in r.items()]
    rows += [
        R.row(BENCH, "idle site (worst)", "cpu_pct", worst_site, site="mean", target=TARGET_SITE_PCT),
        R.row(BENCH, "idle coordinator", "cpu_pct", coordinator, site="mean", target=TARGET_COORDINATOR_PCT),
        R.row(BENCH, "deployed", "round_s_median", median, site="mean", rounds=rounds, target=TARGET_ROUND_S),
        R.row(BENCH, "deployed", "round_s_p95", p95, site="mean", rounds=rounds),
        R.row(BENCH, "deployed", "first_round_s", times[0], site="mean"),
        R.row(BENCH, "deployed", "submit_to_serverapp_s", to_app, site="mean"),
        R.row(BENCH, "deployed", "submit_to_greeting_s", sent, site="mean"),
        R.row(BENCH, "deployed", "greeting_s", greeting, site="mean"),
        R.row(BENCH, "deployed", "first_message_reached_node_s", max(reached) if reached else None, site="mean"),
        R.row(BENCH, "deployed", "first_message_served_s", max(served) if served else None, site="mean"),
        R.row(BENCH, "deployed", "run_s", result.run_s, site="mean"),
        R.row(BENCH, "all", "load_avg_1m_before", load_b[0], site="mean"),
        R.row(BENCH, "all", "load_avg_1m_after", load_a[0], site="mean"),
    ]
    rows += [R.row(BENCH, "deployed", "round_s", v, site="mean", round=i + 1) for i, v in enumerate(times)]
    lines = [f"**An idle consortium over {wall:.0f} s (3 sites, TLS, one machine), then a "
             f"{rounds}-round run**", "",
             "| process | role | CPU (% of a core) | max RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {w.what} | {w.role} | {cpu_percent(0.0, w.cpu_s, wall):.2f}{' (exited)' if w.gone else ''} | "
              f"{w.rss_max / 2**20:.0f} |" for w in watched]
    lines += ["", "| role | CPU (% of a core) | RSS (MB) |", "|---|---|---|"]
    lines += [f"| {role} | {r['cpu_pct']:.2f} | {r['rss_mb']:.0f} |" for role, r in roles.items()]
    site_met, co_met, round_met = worst_site <= TARGET_SITE_PCT, coordinator <= TARGET_COORDINATOR_PCT, \
        median <= TARGET_ROUND_S
    def fmt(v: float | None) -> str:
        return f"{v:.2f} s" if v is not None else "not found in the run's log"

    lines += ["",
              f"idle site (worst of {len(sites)}) {worst_site:.2f} % (target <= {TARGET_SITE_PCT} %): "
              f"{'met' if site_met else 'NOT met'}; idle coordinator {coordinator:.2f} % (target <= "
              f"{TARGET_COORDINATOR_PCT} %): {'met' if co_met else 'NOT met'}",
              f"rounds: median {median:.2f} s, p95 {p95:.2f} s (target median <= {TARGET_ROUND_S} s: "
              f"{'met' if round_met else 'NOT met'}); first round {times[0]:.2f} s",
              f"after the idle window: submission to the ServerApp's first line {fmt(to_app)} (the "
              f"executor's poll and the ServerApp's start); the sites' greeting, the first message "
              f"they get, sent {fmt(sent)} after submission, {fmt(greeting)} until every site had "
              f"answered: it reached the SuperNodes {', '.join(f'{r:.2f}' for r in sorted(reached))} s "
              f"after it was sent (their idle poll), and the slowest site worker took "
              f"{fmt(max(served) if served else None)} to answer it",
              f"load average (1, 5, 15 min) {load_b[0]:.2f} {load_b[1]:.2f} {load_b[2]:.2f} at the "
              f"window's start, {load_a[0]:.2f} {load_a[1]:.2f} {load_a[2]:.2f} at its end"]
    R.emit("\n".join(lines), out_dir, BENCH)
    rows.append(R.row(BENCH, "all", "runtime_s", timer(), site="mean"))
    R.save_rows(rows, out_dir / f"{BENCH}.json")
    return rows
