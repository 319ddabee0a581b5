"""experiments.net.model: per-step times from the step clocks, the model+gloo fit and its predictions.

Synthetic run folders, as a 2-process launch of ``python -m experiments.net`` leaves them."""

import json
import os

import pytest

from adpsgd_jax import timemodel
from experiments.net import model, ns, worker


def step_clock(durations, steps_per_epoch, eval_s):
    """The step clock of a run whose step s lasts durations[s] (s = 1..T) and whose evaluation after
    each epoch's last step lasts ``eval_s``: entry t is taken at the end of step t + 1, or of step t
    at an epoch's end, in seconds from entry 1 (the end of step 2)."""
    steps = len(durations) - 1
    ends, t = {2: 0.0}, 0.0
    for s in range(3, steps + 1):
        t += durations[s] + (eval_s if (s - 1) % steps_per_epoch == 0 else 0.0)
        ends[s] = t
    return [ends[s] if s % steps_per_epoch == 0 or s == steps else ends[s + 1] for s in range(1, steps + 1)]


def write_run(folder, steps_per_epoch, synced, durations, nbytes=100, eval_s=0.7):
    os.makedirs(folder)
    steps = len(synced)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"steps": steps, "syncs": sum(synced), "bytes": nbytes * sum(synced),
                   "steps_per_epoch": steps_per_epoch}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for s, flag in enumerate(synced, 1):
            f.write(json.dumps({"step": s, "synced": int(flag), "syncs": sum(synced[:s])}) + "\n")
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        for e in range(steps // steps_per_epoch):
            f.write(json.dumps({"step": (e + 1) * steps_per_epoch, "test_accuracy": 0.5 + 0.1 * e}) + "\n")
    for i in range(2):
        with open(os.path.join(folder, model.STEP_TIMES.format(i)), "w") as f:
            for s, t in enumerate(step_clock(durations, steps_per_epoch, eval_s), 1):
                f.write(json.dumps({"step": s, "time_s": t}) + "\n")
    return model.Run(str(folder), 2)


def test_step_durations_follow_the_clock_of_the_cpu_client(tmp_path):
    """2 epochs of 6 steps, local steps of 1 s, syncs (steps 4, 7 and 10) of 5 s, evaluations of 0.7 s."""
    sync_steps = (4, 7, 10)
    durations = [None] + [5.0 if s in sync_steps else 1.0 for s in range(1, 13)]
    run = write_run(tmp_path / "r", 6, [s in sync_steps for s in range(1, 13)], durations)
    assert run.durations(0, synced=True) == [5.0, 5.0]  # steps 4 and 10; 7 follows an evaluation
    assert run.durations(0, synced=False) == [1.0] * 6  # steps 3, 5, 6, 9, 11, 12: both ends on the clock
    # The evaluation after step 6 is taken out: steps 7 and 8 count as a sync and a local step.
    assert run.measured_s == pytest.approx(sum(durations[3:]))
    assert run.step_s == pytest.approx(sum(durations[3:]) / 10)
    assert run.time_to(6) == pytest.approx(sum(durations[3:7]))  # from the end of step 2
    assert run.time_to(12) == pytest.approx(sum(durations[3:]))
    assert run.first_reaching(0.55) == 12


def test_a_missing_step_is_refused(tmp_path):
    write_run(tmp_path / "r", 6, [False] * 12, [None] + [1.0] * 12)
    path = tmp_path / "r" / model.STEP_TIMES.format(1)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(RuntimeError, match="timed steps, 12 expected"):
        model.Run(str(tmp_path / "r"), 2)


def launch(folder, rate_bps, t_compute, lam_full, lam_avg, arrays, nbytes, steps=48, period=8):
    """allreduce and a constant-period averaging run whose rounds cost exactly model+gloo's formula."""
    def round_s(lam, k):
        return k * 2 * lam + timemodel.allreduce_time(nbytes, 2, timemodel.Link(rate_bps))

    full = [None] + [t_compute + round_s(lam_full, arrays[0])] * steps
    synced = [s % period == 0 for s in range(1, steps + 1)]
    local = [None] + [t_compute + (round_s(lam_avg, arrays[1]) if flag else 0.0) for flag in synced]
    return {"allreduce": write_run(folder / "allreduce", 12, [True] * steps, full, nbytes),
            "cpsgd": write_run(folder / "cpsgd", 12, synced, local, nbytes)}


def test_model_gloo_fits_on_the_unshaped_link_and_predicts_a_shaped_one(tmp_path):
    t_c, lam_full, lam_avg, arrays, nbytes = 1.3e-3, 0.3e-3, 0.4e-3, (4, 5), 40_000
    unshaped_rate = 800e6
    shaped_rate = ns.payload_rate(100, 1500)
    records = [
        {"workload": "w", "rate_mbit": None, "mtu": 9000, "probe": {"rtt_s": 20e-6, "goodput_Bps": unshaped_rate},
         "arrays": arrays, "to_target": True, "repeats": [
             {"order": ["allreduce", "cpsgd"],
              "runs": launch(tmp_path / "u", unshaped_rate, t_c, lam_full, lam_avg, arrays, nbytes)}]},
        {"workload": "w", "rate_mbit": 100.0, "mtu": 1500, "probe": {"rtt_s": 20e-6, "goodput_Bps": 12e6},
         "arrays": arrays, "to_target": True, "repeats": [
             {"order": ["allreduce", "cpsgd"],
              "runs": launch(tmp_path / "s", shaped_rate, t_c, lam_full, lam_avg, arrays, nbytes)}]},
    ]
    links, rows = model.summarise(records, 2)
    assert links[0]["gloo_per_array_s"] == pytest.approx((lam_full, lam_avg))
    assert links[1]["compute_s_per_step"] == pytest.approx(t_c)
    shaped = rows[1]
    assert shaped["bandwidth"] == "100 Mbit/s" and shaped["strategy"] == "cpsgd"
    # The shaped link was not fitted, yet model+gloo predicts it exactly ...
    assert shaped["disagreement_gloo_pct"] == pytest.approx(0.0, abs=1e-6)
    full_step = t_c + 4 * 2 * lam_full + nbytes / shaped_rate
    assert shaped["comm_compute_ratio"] == pytest.approx((full_step - t_c) / t_c)
    # ... while the model as written, one wire latency per round at the nominal rate, misses by far more.
    assert abs(shaped["disagreement_pct"]) > 15
    assert shaped["comm_compute_ratio_model"] == pytest.approx((2 * 10e-6 + nbytes / 12.5e6) / t_c)


def test_rows_give_the_median_and_range_over_the_repeats_and_whether_the_model_agrees(tmp_path):
    """Three repeats on one shaped link whose compute per step differs (1.0, 1.3, 2.0 ms): every
    figure of the row is the median of the three repeats' figures, beside their min and max."""
    arrays, nbytes, rate = (4, 5), 40_000, ns.payload_rate(100, 1500)
    repeats = [{"order": worker.rotated(["allreduce", "cpsgd"], r),
                "runs": launch(tmp_path / f"r{r}", rate, t_c, 0.3e-3, 0.4e-3, arrays, nbytes)}
               for r, t_c in enumerate((1.0e-3, 2.0e-3, 1.3e-3))]
    record = {"workload": "w", "rate_mbit": 100.0, "mtu": 1500, "arrays": arrays, "to_target": True,
              "probe": {"rtt_s": 20e-6, "goodput_Bps": 12e6, "nbytes": 1 << 20}, "load_1min": [1.0, 1.0],
              "repeats": repeats}
    links, rows = model.summarise([record], 2)
    (row,) = rows
    models = model.models_for(record, None)
    each = [model.analyse(x["runs"], 2, models, arrays) for x in repeats]
    measured = [a["methods"]["allreduce"]["measured_s"] / a["methods"]["cpsgd"]["measured_s"] for a in each]
    assert row["repeats"] == 3 and len(set(measured)) == 3
    assert row["measured_speedup"] == pytest.approx(sorted(measured)[1])
    assert row["measured_speedup_range"] == pytest.approx([min(measured), max(measured)])
    assert row["predicted_speedup_gloo"] is None and row["agrees_gloo"] is None  # nothing calibrated it
    predicted = row["predicted_speedup_range"]
    overlap = predicted[0] <= max(measured) and min(measured) <= predicted[1]
    assert row["agrees"] is overlap
    link = links[0]
    assert [x["order"] for x in link["repeats"]] == [["allreduce", "cpsgd"], ["cpsgd", "allreduce"],
                                                     ["allreduce", "cpsgd"]]
    assert link["compute_s_per_step"] == pytest.approx(1.3e-3) and link["compute_s_per_step_range"] == \
        pytest.approx([1.0e-3, 2.0e-3])
    # The wire checks: the probe's round trip of 1 MiB (at 12 MB/s: 87 ms) against 1 MiB at 100 Mbit/s
    # (84 ms), and the fastest allreduce step against half of 40 KB at 100 Mbit/s; as numbers, not timings.
    probe = link["checks"]["probe_transfer_at_least_wire_time"]
    assert probe["measured_s"] == pytest.approx((1 << 20) / 12e6 + 20e-6)
    assert probe["bound_s"] == pytest.approx((1 << 20) / 12.5e6) and probe["verdict"] == "met"
    step = link["checks"]["allreduce_step_at_least_half_wire_time"]
    assert step["bound_s"] == pytest.approx(0.5 * nbytes / 12.5e6) and step["verdict"] == "met"
    table = model.table(links, rows)
    assert "median over 3 repeats" in table and "the time model as written (timemodel.simulated_wall_clock" in table
    assert f"{row['measured_speedup']:.2f}x ({min(measured):.2f}-{max(measured):.2f})" in table


def test_spread_agreement_and_rotation():
    assert model.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "range": [1.0, 3.0]}
    assert model.spread([1.0, None, 2.0]) == {"median": None, "range": None}
    assert model.agrees({"range": [1.0, 2.0]}, {"range": [2.0, 3.0]}) is True  # touching ranges overlap
    assert model.agrees({"range": [1.0, 1.9]}, {"range": [2.0, 3.0]}) is False
    assert model.agrees({"range": [3.1, 4.0]}, {"range": [2.0, 3.0]}) is False
    assert model.agrees({"range": None}, {"range": [2.0, 3.0]}) is None
    methods = ["allreduce", "cpsgd", "adpsgd"]
    orders = [worker.rotated(methods, r) for r in range(4)]
    assert orders == [methods, ["cpsgd", "adpsgd", "allreduce"], ["adpsgd", "allreduce", "cpsgd"], methods]
    # Over 3 repeats each method runs first, second and third once.
    assert all(sorted(o.index(m) for o in orders[:3]) == [0, 1, 2] for m in methods)


def test_a_shaped_link_slower_than_the_wire_fails_its_checks():
    """The checks' verdicts as numbers: a probe or an allreduce step faster than the wire is 'missed'."""
    record = {"rate_mbit": 100.0, "probe": {"rtt_s": 1e-4, "goodput_Bps": 50e6, "nbytes": 1 << 20}}
    analyses = [{"allreduce_step_s": s, "methods": {"allreduce": {"bytes_per_round": 1e6}}} for s in (0.05, 0.03)]
    checks = model.wire_checks(record, analyses)
    assert checks["probe_transfer_at_least_wire_time"]["verdict"] == "missed"  # 21 ms < 84 ms
    step = checks["allreduce_step_at_least_half_wire_time"]
    assert step["measured_s"] == 0.03 and step["bound_s"] == pytest.approx(0.04) and step["verdict"] == "missed"
    assert model.wire_checks({**record, "rate_mbit": None}, analyses) == {}
