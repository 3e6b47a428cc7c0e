"""``fedmeta bench idle``'s arithmetic: CPU percent per process and role, the rounds'
percentile, and the times read back from a run's log and a site's logs (the benchmark itself
starts a deployment and is run by hand; see BENCHMARKS.md)."""

import json

import pytest

from fedmeta.bench.idle import (
    Watched,
    by_role,
    cpu_percent,
    first_message,
    percentile,
    run_log_times,
)


def test_cpu_percent_of_one_core_per_process_and_role():
    assert cpu_percent(10.0, 16.0, 600.0) == pytest.approx(1.0)  # 6 CPU seconds in 10 minutes
    watched = [Watched("coordinator", "SuperLink", 1, cpu_s=3.0, rss_max=100 * 2**20),
               Watched("coordinator", "ServerApp executor", 2, cpu_s=1.2, rss_max=50 * 2**20),
               Watched("site a", "site worker", 3, cpu_s=0.6, rss_max=400 * 2**20),
               Watched("site a", "SuperNode", 4, cpu_s=2.4, rss_max=130 * 2**20)]
    roles = by_role(watched, 600.0)
    assert roles["coordinator"] == pytest.approx({"cpu_pct": 0.7, "rss_mb": 150.0})
    assert roles["site a"] == pytest.approx({"cpu_pct": 0.5, "rss_mb": 530.0})


def test_percentile_interpolates_between_order_statistics():
    rounds = [0.5, 0.4, 0.45, 0.6, 0.42, 0.47, 0.44, 0.9, 0.43, 0.46]
    # sorted: 0.40 0.42 0.43 0.44 0.45 0.46 0.47 0.50 0.60 0.90; p95 at 8.55: 0.60 + 0.55 x 0.30
    assert percentile(rounds, 95) == pytest.approx(0.765)
    assert percentile(rounds, 50) == pytest.approx(0.455)
    assert percentile([1.0], 95) == 1.0


def test_the_waits_read_back_from_the_run_s_and_the_site_s_logs(tmp_path):
    import datetime as dt

    def wall(stamp: str) -> float:
        return dt.datetime.fromisoformat(stamp).astimezone().timestamp()

    run_log = tmp_path / "run.log"
    run_log.write_text("2026-12-08 01:00:04,500 INFO fedmeta.progress: reptile, 10 rounds; run folder x\n"
                       "2026-12-08 01:00:05,000 INFO fedmeta.server.handshake: greeting 3 site(s)\n"
                       "2026-12-08 01:00:07,250 INFO fedmeta.progress: 3 site(s) joined: a, b, c\n")
    marks = run_log_times(run_log, wall("2026-12-08 01:00:00.000"))
    assert marks == pytest.approx({"app": 4.5, "greeting": 5.0, "joined": 7.25})
    assert run_log_times(tmp_path / "none.log", 0.0) == {"app": None, "greeting": None, "joined": None}
    state = tmp_path / "state"
    (state / "run" / "logs").mkdir(parents=True)
    (state / "run" / "logs" / "supernode.log").write_text(
        "INFO 2026-12-08 01:00:03,000:      Starting\n"
        "INFO 2026-12-08 01:00:06,125:      Receiving: query message (ID: 1)\n"
        "INFO 2026-12-08 01:00:09,000:      Receiving: train message (ID: 2)\n")
    (state / "audit.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
        {"event": "site_started"}, {"event": "request_served", "seconds": 0.8},
        {"event": "request_served", "seconds": 0.1})))
    received, served = first_message(state)
    assert received == pytest.approx(wall("2026-12-08 01:00:06.125")) and served == 0.8


@pytest.mark.deployment
def test_the_benchmark_measures_an_idle_consortium_then_runs_on_it(tmp_path, monkeypatch):
    """CI-sized: a 5 s window after a 2 s settle, then a 2-round run; every process and role is
    measured and the figures are saved (their values are results, not expectations)."""
    from fedmeta.bench import idle

    monkeypatch.setattr(idle, "SETTLE_S", 2.0)
    rows = idle.run(quick=True, out_dir=tmp_path, seconds=5.0)
    cpu = {r["method"]: r["value"] for r in rows if r["metric"] == "cpu_pct"}
    assert {"coordinator: SuperLink", "coordinator: ServerApp executor"} <= set(cpu)
    for site in ("cleveland", "hungary", "va-long-beach"):
        assert {f"site {site}: SuperNode", f"site {site}: site worker (`site start`)"} <= set(cpu)
    assert all(v is not None and v >= 0 for v in cpu.values())
    assert not any(r.get("gone") for r in rows)
    rounds = [r["value"] for r in rows if r["metric"] == "round_s"]
    assert len(rounds) == 2 and all(v > 0 for v in rounds)
    assert {r["metric"] for r in rows} >= {"round_s_median", "round_s_p95", "greeting_s",
                                           "first_message_reached_node_s", "load_avg_1m_before"}
    assert (tmp_path / "idle.json").is_file() and "idle site" in (tmp_path / "idle.md").read_text()
