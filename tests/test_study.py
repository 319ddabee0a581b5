"""experiments.study: the grid, the paired statistics, a tiny study run twice (the second run trains nothing)."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from experiments import paired_tests, results, study, study_grid, study_report

TINY = dict(dataset="digits", methods=["cpsgd", "adpsgd"], partitions=["iid"], lr_schedules=["cosine"], workers=[4],
            seeds=2, total_batch=32, args=["--epochs", "1", "--avg-period", "4"])


def test_paired_interval_is_the_t_interval():
    d = [-0.3, -0.1, -0.2, -0.4]
    mean, low, high = paired_tests.paired(d)
    half = 3.182446305284263 * np.std(d, ddof=1) / 2  # t_{0.975, 3} * sd / sqrt(4)
    assert mean == pytest.approx(-0.25)
    assert (low, high) == pytest.approx((-0.25 - half, -0.25 + half))
    assert paired_tests.verdict(low, high) == "lower"
    assert paired_tests.verdict(*paired_tests.paired([0.2, 0.3, 0.25])[1:]) == "higher"
    assert paired_tests.verdict(*paired_tests.paired([-0.2, 0.3, 0.05])[1:]) == "inconclusive"
    one = paired_tests.paired([-1.0])
    assert one[0] == -1.0 and math.isnan(one[1]) and paired_tests.verdict(*one[1:]) == "inconclusive"


def test_preset_expands_to_every_setting():
    grid = study_grid.parse_grid(study_grid.PRESETS["offline"])
    assert len(grid.settings) == 3 * 2 * 2 and grid.seeds == (0, 1, 2, 3, 4)
    assert {s.batch_size * s.workers for s in grid.settings} == {128}  # the same examples per step everywhere
    assert grid.baseline == "cpsgd" and "cpsgd" in grid.methods
    assert len({s.name for s in grid.settings}) == len(grid.settings)


def test_fragment_keys_make_settings_with_their_flags(tmp_path):
    grid = study_grid.parse_grid({**TINY, "fragments": [1, 2], "fragment_delays": [0, 1], "fragment_alphas": [0, 0.5]})
    assert [s.name for s in grid.settings][:4] == ["iid-cosine-n4", "iid-cosine-n4-alpha0.5", "iid-cosine-n4-delay1",
                                                    "iid-cosine-n4-delay1-alpha0.5"]
    planned = study.plan(grid, str(tmp_path))
    by_name = {setting.name: configs for setting, configs, _ in planned}
    config = by_name["iid-cosine-n4-frag2-delay1-alpha0.5"][0]
    assert (config.fragments, config.fragment_delay, config.fragment_alpha) == (2, 1, 0.5)
    assert config.label == "cpsgd-frag2-delay1-alpha0.5"
    assert {(c.fragments, c.fragment_delay) for c in by_name["iid-cosine-n4"]} == {(1, 0)}
    with pytest.raises(study_grid.StudyError, match="setting iid-cosine-n4-frag3: --fragments 3 must divide"):
        study.plan(study_grid.parse_grid({**TINY, "fragments": [3]}), str(tmp_path))


def test_a_study_of_fragments_compares_each_streamed_setting_with_its_plain_one(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('dataset = "digits"\nmethods = ["cpsgd", "adpsgd"]\nworkers = [4]\ntotal_batch = 32\n'
                    'seeds = 2\nlr_schedules = ["cosine"]\nfragments = [1, 2]\n'
                    'args = ["--epochs", "1", "--avg-period", "4"]\n')
    out = tmp_path / "study"
    assert study.main(["--grid", str(grid), "--out", str(out), "--quiet"]) == 0
    table = json.load(open(out / "study_fragments.json"))
    assert table["family_size"] == 2 and table["correction"] == "holm"
    for row in table["rows"]:
        assert (row["setting"], row["reference"], row["fragments"]) == ("iid-cosine-n4-frag2", "iid-cosine-n4", 2)
        mine = {r.seed: r.summary for r in results.finished_runs(str(out / row["setting"]))
                if r.summary["config"]["method"] == row["method"]}
        plain = {r.seed: r.summary for r in results.finished_runs(str(out / row["reference"]))
                 if r.summary["config"]["method"] == row["method"]}
        assert row["seeds"] == [0, 1] and mine[0]["syncs"] == 2 * plain[0]["syncs"]
        diffs = [mine[k]["final_train_loss"] - plain[k]["final_train_loss"] for k in (0, 1)]
        assert row["loss_diff"] == pytest.approx(np.mean(diffs)) and row["loss_p_holm"] >= row["loss_p"]
    assert [r["method"] for r in table["rows"]] == ["cpsgd", "adpsgd"]
    assert "| iid-cosine-n4-frag2 | cpsgd | 2 | 0 | 0 |" in (out / "study_fragments.md").read_text()


@pytest.mark.parametrize("change, words", [
    (dict(colour="red"), "unknown grid key(s) colour"),
    (dict(methods=["cpsgd", "sgd"]), "unknown method 'sgd'"),
    (dict(baseline="allreduce"), "'baseline' must be one of the grid's methods"),
    (dict(methods=[]), "'methods' must be a non-empty list"),
    (dict(workers=[4, 4]), "names a value twice"),
    (dict(lr_schedules=["linear"]), "unknown schedule 'linear'"),
    (dict(total_batch=30, workers=[4, 8]), "multiple of every worker count"),
    (dict(seeds=0), "'seeds' must be a count >= 1"),
    (dict(batch_size=8), "not both"),
    (dict(args=["--workers", "4"]), "must not set --workers"),
    (dict(args=["--out=elsewhere"]), "must not set --out"),
    (dict(args=["--fragments", "2"]), "must not set --fragments"),
    (dict(fragment_alphas=["a"]), "'fragment_alphas' must be a non-empty list of numbers"),
])
def test_bad_grid_is_refused_naming_the_key(change, words):
    with pytest.raises(study_grid.StudyError, match=None) as err:
        study_grid.parse_grid({**TINY, **change})
    assert words in str(err.value)


def test_bad_flag_in_a_setting_stops_before_anything_is_written(tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text('methods = ["cpsgd"]\nworkers = [4]\ntotal_batch = 32\nargs = ["--epochs", "0"]\n')
    out = tmp_path / "out"
    assert study.main(["--grid", str(grid), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: setting iid-step-n4: --epochs") and "\n" not in err
    assert not out.exists()


def test_unreadable_grid_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "grid.toml"
    bad.write_text("methods = [cpsgd\n")
    assert study.main(["--grid", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert study.main(["--grid", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """(out, {run name: summary}) of TINY, run once: cpsgd and adpsgd, 2 seeds, 1 epoch."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "grid.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items()) + "\n")
    out = str(folder / "study")
    assert study.main(["--grid", str(folder / "grid.toml"), "--out", out, "--quiet"]) == 0
    runs = os.path.join(out, "iid-cosine-n4")
    return out, {name: results.read_json(os.path.join(runs, name, results.SUMMARY)) for name in os.listdir(runs)}


def test_tiny_study_writes_the_table_and_skips_finished_runs(tiny_study, capsys):
    out, _ = tiny_study
    grid = os.path.join(os.path.dirname(out), "grid.toml")
    capsys.readouterr()
    assert study.main(["--grid", str(grid), "--out", out, "--quiet", "--report-only"]) == 0
    table = capsys.readouterr().out
    rows = json.load(open(os.path.join(out, study_report.STUDY_JSON)))["rows"]
    assert [(r["setting"], r["method"]) for r in rows] == [("iid-cosine-n4", "cpsgd"), ("iid-cosine-n4", "adpsgd")]
    adpsgd = rows[1]
    assert adpsgd["seeds"] == [0, 1] and adpsgd["verdict"] in paired_tests.VERDICTS
    folder = os.path.join(out, "iid-cosine-n4")
    summaries = {name: json.load(open(os.path.join(folder, name, "summary.json"))) for name in os.listdir(folder)}
    loss = [summaries[f"adpsgd-seed{k}"]["final_train_loss"] - summaries[f"cpsgd-seed{k}"]["final_train_loss"]
            for k in (0, 1)]
    assert adpsgd["loss_diff"] == pytest.approx(np.mean(loss))
    assert adpsgd["seeds_won"] == sum(d < 0 for d in loss)
    assert "| iid-cosine-n4 | adpsgd |" in table and os.path.getsize(os.path.join(out, study_report.STUDY_PLOT)) > 0
    stamps = {name: os.path.getmtime(os.path.join(folder, name, "metrics.jsonl")) for name in summaries}
    assert study.main(["--grid", str(grid), "--out", out, "--quiet"]) == 0  # everything finished: nothing retrains
    assert stamps == {name: os.path.getmtime(os.path.join(folder, name, "metrics.jsonl")) for name in summaries}
    lines, again = capsys.readouterr().out.split("Against **", 1)
    assert "Against **" + again == table  # the same table, after one line per run
    assert lines.splitlines() == [f"iid-cosine-n4 {m} seed {k}: final loss {summaries[f'{m}-seed{k}']['final_train_loss']:.4f}, finished before"
                                  for k in (0, 1) for m in ("cpsgd", "adpsgd")]
    assert study.main(["--grid", str(grid), "--out", out, "--report-only", "--baseline", "cpsgd,adpsgd"]) == 0
    assert json.load(open(os.path.join(out, study_report.STUDY_JSON)))["rows"] == rows  # the grid's table kept
    md, js = study_report.outputs("adpsgd", "cpsgd")  # the page against another baseline than the grid's
    page = open(os.path.join(out, md)).read()
    assert page.startswith("Against **adpsgd**. Scope: dataset digits; model mlp") and "Holm" in page
    against = json.load(open(os.path.join(out, js)))
    assert against["baseline"] == "adpsgd" and against["correction"] == "holm" and against["family_size"] == 1
    back = against["rows"][1]
    assert [r["method"] for r in against["rows"]] == ["adpsgd", "cpsgd"]
    assert back["loss_diff"] == pytest.approx(-np.mean(loss)) and back["acc_diff"] == pytest.approx(-adpsgd["acc_diff"])
    assert (back["acc_b"], back["acc_c"]) == (adpsgd["acc_c"], adpsgd["acc_b"])
    assert back["acc_p"] == pytest.approx(adpsgd["acc_p"])
    assert study.main(["--grid", str(grid), "--out", out, "--report-only", "--baseline", "sgd"]) == 2


def test_tiny_study_has_adjusted_verdicts_and_per_example_accuracy(tiny_study):
    out, summaries = tiny_study
    rows = json.load(open(os.path.join(out, study_report.STUDY_JSON)))["rows"]
    adpsgd = rows[1]
    # One row in the family: Holm changes nothing; the verdicts follow the p-values.
    assert adpsgd["loss_p_holm"] == pytest.approx(adpsgd["loss_p"]) and adpsgd["acc_p_holm"] == pytest.approx(
        adpsgd["acc_p"])
    assert adpsgd["verdict"] == paired_tests.decide(adpsgd["loss_diff"], adpsgd["loss_p_holm"]) == adpsgd["raw_verdict"]
    pairs = []
    for k in (0, 1):
        mine, base = (results.unpack_correct(summaries[f"{m}-seed{k}"]["test_correct"]) for m in ("adpsgd", "cpsgd"))
        assert mine.mean() == summaries[f"adpsgd-seed{k}"]["test_accuracy"] and len(mine) == 360
        pairs.append((mine, base))
    b = sum(int(np.sum(m & ~o)) for m, o in pairs)
    c = sum(int(np.sum(~m & o)) for m, o in pairs)
    assert (adpsgd["acc_b"], adpsgd["acc_c"], adpsgd["acc_n"]) == (b, c, 360)
    assert adpsgd["acc_diff"] == pytest.approx((b - c) / 720)
    assert adpsgd["acc_p"] == pytest.approx(stats.binomtest(b, b + c).pvalue if b + c else 1.0)


def test_summary_without_per_example_correctness_reports_na(tiny_study, tmp_path):
    out, _ = tiny_study
    copy = str(tmp_path / "old")
    shutil.copytree(out, copy)
    name = os.path.join(copy, "iid-cosine-n4", "cpsgd-seed1", results.SUMMARY)
    summary = results.read_json(name)
    del summary["test_correct"]  # a run written before the summary kept it
    results.write_json_atomic(name, summary)
    grid = study_grid.parse_grid(TINY)
    text = study_report.write(grid, copy, plots=False)
    row = json.load(open(os.path.join(copy, study_report.STUDY_JSON)))["rows"][1]
    assert row["acc_diff"] is None and row["acc_p"] is None and row["acc_verdict"] is None
    assert row["acc_note"] == study_report.NO_CORRECT and row["verdict"] in paired_tests.VERDICTS
    assert "| n/a | n/a | n/a | n/a | n/a |" in text and "Accuracy n/a in 1 rows" in text
