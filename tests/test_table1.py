"""Table 1 driver: the verdict rule, the table's shape, and (slow) a smoke run on the tiny variants."""
import numpy as np
import pytest

from ava_jax.pipelines import table1


def test_verdict_decides_only_beyond_the_seed_spread():
    assert table1.verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], "a", "b")[0] == "confirmed"
    assert table1.verdict([0.70, 0.71, 0.72], [0.80, 0.81, 0.82], "a", "b")[0] == "contradicted"
    # A 1-point gap with a 3-point spread decides nothing.
    assert table1.verdict([0.70, 0.76, 0.73], [0.72, 0.69, 0.75], "a", "b")[0].startswith("not confirmed")
    assert table1.verdict([0.9], [0.1], "a", "b")[0].startswith("not decided")
    assert table1.verdict([0.9, 0.8], [], "a", "b") == ("not decided (no seed finished)", "a: 2 seeds, b: 0 seeds finished")


def _cell(acc, **extra):
    return table1.Cell(test=acc, validation=acc, extra=extra, test_metrics={"ece": 0.1, "lm_loglik_chosen": -2.0},
                       low_data_test=acc - 0.05)


def test_format_table_has_every_row_reference_and_claim():
    cells = {"synthetic": {name: [_cell(a + 0.01 * s, test_prefix_accuracy=0.6, test_reward_spearman=0.3)
                                  for s in range(3)]
                           for name, a in (("BT", 0.7), ("PT", 0.72), ("AVA-p", 0.75), ("AVA-p w/o cer", 0.6))}}
    refs = {"synthetic": {"Bayes ceiling": 0.8, "bigram logistic regression": 0.79}}
    text = table1.format_table(cells, refs, (0, 1, 2), "python launch/table1.py", 60.0, 256,
                               {"accuracy": "/x/t1_accuracy.png"})
    for needle in ("| *Bayes ceiling* | 80.00 |", "| AVA-p | 76.00 ± 1.00 |", "test acc, 256 pairs",
                   "acc, lowest-sigma quarter", "MAE to true P", "[accuracy](t1_accuracy.png)",
                   "| AVA-p more accurate than BT | synthetic | confirmed |",
                   "| removing cer hurts | synthetic | confirmed |", "prefix pairs",
                   "| AVA-p more accurate than PT with few training pairs (low-data column) | synthetic | confirmed "
                   "| AVA-p 71.00 vs PT 68.00"):
        assert needle in text, needle
    for c in cells["synthetic"]["PT"]:
        c.low_data_test = float("nan")  # no low-data runs for PT: no low-data claim against it
    text = table1.format_table(cells, refs, (0, 1, 2), "python launch/table1.py", 60.0, 256)
    assert "than PT with few training pairs" not in text and "than BT with few training pairs" in text


def test_reliability_is_pooled_over_seeds_by_count_and_plotted(tmp_path):
    """Pooled bins: counts summed, mean prediction and frequency weighted by count (an empty bin of
    one seed adds nothing); write_plots draws the accuracy panel and the reliability panel."""
    a = _cell(0.7, test_prefix_accuracy=0.6)
    b = _cell(0.72, test_prefix_accuracy=0.6)
    a.reliability = {"mean_pred": [0.1, float("nan")], "freq": [0.2, float("nan")], "count": [2, 0]}
    b.reliability = {"mean_pred": [0.2, 0.9], "freq": [0.0, 1.0], "count": [6, 4]}
    pooled = table1.pooled_reliability([a, b, _cell(0.7)])
    np.testing.assert_allclose(pooled.count_B, [8, 4])
    np.testing.assert_allclose(pooled.mean_pred_B, [(2 * 0.1 + 6 * 0.2) / 8, 0.9])
    np.testing.assert_allclose(pooled.freq_B, [(2 * 0.2) / 8, 1.0])
    assert table1.pooled_reliability([_cell(0.7)]) is None
    cells = {"synthetic": {"BT": [_cell(0.7), _cell(0.71)], "AVA-p": [a, b]}}
    paths = table1.write_plots(cells, {"synthetic": {"Bayes ceiling": 0.8}}, str(tmp_path / "t1"))
    assert set(paths) == {"accuracy", "reliability"}
    for path in paths.values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_row_is_an_error(capsys):
    with pytest.raises(SystemExit):
        table1.main(["--rows", "AVA-q", "--datasets", "synthetic"])
    assert "unknown rows ['AVA-q']" in capsys.readouterr().err


def test_row_names_with_commas_can_be_chosen(tmp_path):
    out = tmp_path / "t1.md"
    table1.main(["--rows", "BT,AVA-p (as printed, eval.score=sum),AVA-p (default, sigma_init=4)",
                 "--datasets", "synthetic", "--seeds", "0", "--low-data", "0",
                 "--cache", str(tmp_path / "cells"), "--kept-only", "--out", str(out)])
    text = out.read_text()
    missing = text.split("## Not run yet (3 cells")[1]
    for name in ("synthetic / BT:", "synthetic / AVA-p (as printed, eval.score=sum):",
                 "synthetic / AVA-p (default, sigma_init=4):"):
        assert name in missing
    assert "synthetic / PT:" not in missing


@pytest.mark.parametrize("flag, value", [("--seeds", "a"), ("--seeds", "0,,1")])
def test_malformed_integer_list_is_a_one_line_error(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        table1.main([flag, value, "--datasets", "synthetic"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"argument {flag}: {value!r} is not a comma-separated list of integers" in err


@pytest.mark.slow
def test_tiny_table_runs_end_to_end(tmp_path):
    out = tmp_path / "tables" / "t1.md"  # a directory that does not exist yet
    table1.main(["--datasets", "synthetic,hh", "--rows", "BT,AVA-p", "--seeds", "0,1", "--tiny",
                 "--low-data", "64", "--out", str(out)])
    text = out.read_text()
    assert "| *Bayes ceiling* |" in text and "| *heuristic: shorter wins* |" in text
    assert text.count("| AVA-p |") == 2 and "both-EOS pairs acc" in text
    assert np.isfinite(float(text.split("| BT | ")[1].split(" ± ")[0]))
    # AVA-p has a sigma: its runs' reliability bins reach the plot.
    assert (out.parent / "t1_accuracy.png").exists() and (out.parent / "t1_reliability.png").exists()
    assert "[reliability](t1_reliability.png)" in text


def test_cell_cache_reruns_only_missing_or_changed_cells(tmp_path, monkeypatch):
    """`--cache DIR`: a kept cell comes back equal (NaN fields included) without a run; another seed,
    or another override for the dataset, runs afresh; no cache runs every time."""
    import math
    calls = []

    def fake_run_cell(row, dataset, seed, overrides, *, tiny, train_pairs=0):
        calls.append((row.name, dataset, seed, tuple(sorted(overrides.get(dataset, {}).items())), train_pairs))
        return table1.Cell(test=0.5 + seed / 100, validation=0.4, extra={"test_prefix_accuracy": 0.7, "pairs": 12,
                                                                         "names": ["not", "kept"]},
                           test_metrics={"ece": np.float32(0.25)})
    monkeypatch.setattr(table1, "run_cell", fake_run_cell)
    bt = table1.ROWS[0]
    first = table1.cached_cell(bt, "synthetic", 1, {}, tiny=True, cache_dir=str(tmp_path))
    again = table1.cached_cell(bt, "synthetic", 1, {}, tiny=True, cache_dir=str(tmp_path))
    assert len(calls) == 1 and again.test == first.test == 0.51 and math.isnan(again.both_eos)
    assert again.extra == {"test_prefix_accuracy": 0.7, "pairs": 12.0} and again.test_metrics == {"ece": 0.25}
    table1.cached_cell(bt, "synthetic", 2, {}, tiny=True, cache_dir=str(tmp_path))
    table1.cached_cell(bt, "synthetic", 1, {"synthetic": {"train.steps": 5}}, tiny=True,
                       cache_dir=str(tmp_path))
    assert [c[2:] for c in calls[1:]] == [(2, (), 0), (1, (("train.steps", 5),), 0)]
    assert len(list(tmp_path.glob("table1_synthetic_BT_seed*.json"))) == 3
    table1.cached_cell(bt, "synthetic", 1, {}, tiny=True)
    assert len(calls) == 4
    # The low-data run is a cell of its own: the full-data cell is not rerun for it, and it is kept too.
    low = table1.cached_cell(bt, "synthetic", 1, {}, tiny=True, train_pairs=64, cache_dir=str(tmp_path))
    table1.cached_cell(bt, "synthetic", 1, {}, tiny=True, train_pairs=64, cache_dir=str(tmp_path))
    assert calls[4:] == [("BT", "synthetic", 1, (), 64)] and low.test == 0.51
    assert len(list(tmp_path.glob("table1_synthetic_BT_seed1_pairs64_*.json"))) == 1


def test_a_diverged_run_is_kept_as_a_result_not_a_crash(tmp_path, monkeypatch):
    """A reading whose loss goes non-finite ends its run with NonFiniteError: the cell is kept (so it
    is not rerun), the table counts the diverged seeds on the row's label, shows the mean of the
    others, and the claims use only the seeds that finished."""
    from ava_jax.train.loop import NonFiniteError
    seen = []

    def fake_run(config):
        seen.append(config.seed)
        if config.seed == 1:
            raise NonFiniteError("5 consecutive steps had a non-finite loss or gradient (steps [61, 62, 63, 64, 65])")
        raise AssertionError("only seed 1 runs for real here")
    monkeypatch.setattr(table1.reward_model, "run", fake_run)
    row = next(r for r in table1.ROWS if r.name == "AVA-p w/o cer")
    first = table1.cached_cell(row, "synthetic", 1, {}, tiny=True, cache_dir=str(tmp_path))
    again = table1.cached_cell(row, "synthetic", 1, {}, tiny=True, cache_dir=str(tmp_path))
    assert seen == [1] and np.isnan(first.test) and np.isnan(again.test) and first.diverged == again.diverged and "steps [61, 62, 63, 64, 65]" in again.diverged
    cells = {"synthetic": {"AVA-p": [_cell(0.75 + 0.01 * s) for s in range(3)],
                           "AVA-p w/o cer": [_cell(0.60), again, _cell(0.62)]}}
    text = table1.format_table(cells, {"synthetic": {"Bayes ceiling": 0.8}}, (0, 1, 2), "cmd", 1.0, 256,
                               {"accuracy": str(tmp_path / "t_accuracy.png")})
    assert "| AVA-p w/o cer (diverged: 1 of 3 seeds; the rest shown) | 61.00 ± 1.41 |" in text
    assert "| removing cer hurts | synthetic | confirmed | AVA-p 76.00 vs AVA-p w/o cer 61.00" in text
    cells["synthetic"]["AVA-p w/o cer"] = [again]
    assert "| AVA-p w/o cer (1 of 3 seeds) (diverged: 1 of 1 seeds; the rest shown) | - |" in table1.format_table(
        cells, {"synthetic": {"Bayes ceiling": 0.8}}, (0, 1, 2), "cmd", 1.0, 256)
    assert "| removing cer hurts | synthetic | not decided (no seed finished) |" in table1.format_table(
        cells, {"synthetic": {"Bayes ceiling": 0.8}}, (0, 1, 2), "cmd", 1.0, 256)
    assert table1.write_plots(cells, {"synthetic": {"Bayes ceiling": 0.8}}, str(tmp_path / "t"))


def test_kept_only_tabulates_the_kept_cells_and_lists_the_missing(tmp_path, monkeypatch):
    """`--kept-only`: nothing runs; a row shows the seeds it has, a row with none is left out, and
    every missing cell (the low-data ones too) is listed under the table."""
    monkeypatch.setattr(table1, "reference_rows", lambda ds, overrides, tiny: {"Bayes ceiling": 0.8})
    ran = []

    def fake_run_cell(row, dataset, seed, overrides, *, tiny, train_pairs=0):
        ran.append((row.name, seed, train_pairs))
        return table1.Cell(test=0.6 + seed / 100, validation=0.6, extra={}, test_metrics={})
    monkeypatch.setattr(table1, "run_cell", fake_run_cell)
    bt, pt = table1.ROWS[0], table1.ROWS[1]
    for seed in (0, 1):
        table1.cached_cell(bt, "synthetic", seed, {}, tiny=True, cache_dir=str(tmp_path))
    table1.cached_cell(bt, "synthetic", 0, {}, tiny=True, train_pairs=64, cache_dir=str(tmp_path))
    ran.clear()
    cells, refs, missing = table1.run_table(("synthetic",), (0, 1, 2), (bt, pt), tiny=True, low_data=64,
                                            cache_dir=str(tmp_path), kept_only=True)
    assert ran == [] and list(cells["synthetic"]) == ["BT"] and len(cells["synthetic"]["BT"]) == 2
    assert cells["synthetic"]["BT"][0].low_data_test == 0.6 and np.isnan(cells["synthetic"]["BT"][1].low_data_test)
    assert missing == [("synthetic", "BT", 1, 64), ("synthetic", "BT", 2, 0), ("synthetic", "PT", 0, 0),
                       ("synthetic", "PT", 1, 0), ("synthetic", "PT", 2, 0)]
    text = table1.format_table(cells, refs, (0, 1, 2), "cmd", 1.0, 64, missing=missing)
    assert "| BT (2 of 3 seeds) | 60.50 ± 0.71 |" in text and "## Not run yet (4 cells, 1 more low-data runs)" in text
    assert "- synthetic / BT: seeds 2, [1]" in text and "- synthetic / PT: seeds 0,1,2" in text
    with pytest.raises(SystemExit):
        table1.main(["--kept-only", "--datasets", "synthetic"])


def test_low_data_runs_only_for_the_compared_rows_by_default(tmp_path, monkeypatch):
    """The low-data column is run for the rows its claims compare (BT, PT, AVA-p); an ablation gets
    none unless asked (`low_data_rows=None`, `--low-data-rows all`), and is not listed as missing."""
    monkeypatch.setattr(table1, "reference_rows", lambda ds, overrides, tiny: {"Bayes ceiling": 0.8})
    ran = []

    def fake_run_cell(row, dataset, seed, overrides, *, tiny, train_pairs=0):
        ran.append((row.name, train_pairs))
        return table1.Cell(test=0.6, validation=0.6, extra={}, test_metrics={})
    monkeypatch.setattr(table1, "run_cell", fake_run_cell)
    rows = tuple(r for r in table1.ROWS if r.name in ("BT", "AVA-p", "AVA-p w/o cer"))
    cells, _, missing = table1.run_table(("synthetic",), (0,), rows, tiny=True, low_data=64,
                                         cache_dir=str(tmp_path))
    assert ran == [("BT", 0), ("BT", 64), ("AVA-p", 0), ("AVA-p", 64), ("AVA-p w/o cer", 0)] and missing == []
    assert np.isnan(cells["synthetic"]["AVA-p w/o cer"][0].low_data_test)
    # Asking for every row's low-data cell from the same cache: only the ablation's is missing.
    _, _, missing = table1.run_table(("synthetic",), (0,), rows, tiny=True, low_data=64, low_data_rows=None,
                                     cache_dir=str(tmp_path), kept_only=True)
    assert missing == [("synthetic", "AVA-p w/o cer", 0, 64)]


def test_an_out_path_that_cannot_be_written_fails_before_any_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(table1, "run_table", lambda *a, **k: pytest.fail("ran cells before checking --out"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        table1.main(["--datasets", "synthetic", "--rows", "BT", "--out", str(tmp_path / "a_file" / "t1.md")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_unknown_low_data_row_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        table1.main(["--low-data-rows", "BT,AVA-q", "--datasets", "synthetic"])
    assert e.value.code == 2 and "--low-data-rows: unknown rows ['AVA-q']" in capsys.readouterr().err


def test_regenerating_keeps_the_reading_below_the_marker(tmp_path):
    out = tmp_path / "t1.md"
    table1.write_keeping_reading(str(out), "# table v1")
    assert out.read_text() == "# table v1\n"
    out.write_text(out.read_text() + f"\n{table1.READING}\n\nAVA-p is below PT.\n")
    table1.write_keeping_reading(str(out), "# table v2")
    text = out.read_text()
    assert text.startswith("# table v2\n") and "v1" not in text and text.endswith("AVA-p is below PT.\n")
    assert text.count(table1.READING) == 1
