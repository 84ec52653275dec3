"""The Table 4 driver on the tiny variants: every cell, the paired duel, the figure and the reading."""
import json

import pytest

from ava_jax.pipelines import table4


@pytest.mark.slow
def test_table4_smoke(tmp_path):
    """Four tiny synthetic runs (about 1.5 min on an idle 2-core machine)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "t4.md"
    payload = table4.run_table(("synthetic",), (0, 1), tiny=True, command="test")
    paths = table4.write_outputs(payload, str(out))
    d = payload["datasets"]["synthetic"]
    assert set(d["runs"]) == {"DPO", "AVA-p"} and all(len(v) == 2 for v in d["runs"].values())
    for runs in d["runs"].values():
        for r in runs:
            assert r["trajectory"][0]["step"] == 0 and r["trajectory"][0]["kl_to_initial"] == pytest.approx(0, abs=1e-4)
            assert r["trajectory"][-1]["step"] == 6 and len(r["trajectory"]) >= 3
    duel = d["duel"][0]
    assert duel["win"] + duel["tie"] + duel["lose"] == pytest.approx(1.0)
    md = out.read_text()
    assert "| AVA-p |" in md and "| DPO |" in md and "## Reading" in md
    assert any(w in md for w in ("confirmed", "contradicted"))
    with open(paths["synthetic"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "t4.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_table5_smoke(tmp_path):
    """One tiny synthetic seed of the four Table 5 rows (SFT, then AfD pairs from it; about 1.5 min)."""
    pytest.importorskip("matplotlib")
    from ava_jax.pipelines import table5
    payload = table5.run_table(("synthetic",), (0,), tiny=True, command="test")
    paths = table5.write_outputs(payload, str(tmp_path / "t5.md"))
    runs = payload["datasets"]["synthetic"]["runs"]
    assert list(runs) == ["SFT", "DPO w/ AfD", "AVA-p w/ AfD", "AVA-d"] and all(len(v) == 1 for v in runs.values())
    md = (tmp_path / "t5.md").read_text()
    assert "AVA-d against SFT" in md and "| AVA-p w/ AfD |" in md and paths["synthetic"].endswith(".png")


@pytest.mark.slow
def test_table2_smoke(tmp_path):
    """Two tiny synthetic seeds: three reward models each, one shared pool (about 2 min)."""
    pytest.importorskip("matplotlib")
    from ava_jax.pipelines import table2
    payload = table2.run_table(("synthetic",), (0, 1), tiny=True, command="test")
    paths = table2.write_outputs(payload, str(tmp_path / "t2.md"))
    runs = payload["datasets"]["synthetic"]["runs"]
    assert len(runs) == 2
    for r in runs:
        assert list(r["curves"]) == ["AVA-p", "BT", "PT"] and set(r["head_to_head"]) == {
            "AVA-p vs BT", "AVA-p vs PT", "BT vs PT"}
        # N = 1 picks a uniformly random sample whatever the model: one number for all three.
        assert len({c["gold"][0] for c in r["curves"].values()}) == 1
        h = r["head_to_head"]["AVA-p vs BT"]
        assert h["win"][0] == pytest.approx(0) and h["lose"][0] == pytest.approx(0)
        assert 0.0 <= r["accuracy"]["AVA-p"] <= 1.0
    # The seeds draw different pools.
    assert runs[0]["curves"]["AVA-p"]["gold"][0] != runs[1]["curves"]["AVA-p"]["gold"][0]
    md = (tmp_path / "t2.md").read_text()
    assert "| AVA-p |" in md and "AVA-p against PT" in md and "## Reading" in md
    assert paths["synthetic"].endswith(".png") and json.loads((tmp_path / "t2.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_table3_smoke(tmp_path):
    """One tiny synthetic seed: three reward models, SFT, five PPO runs (about 2.5 min)."""
    pytest.importorskip("matplotlib")
    from ava_jax.pipelines import table3
    payload = table3.run_table(("synthetic",), (0,), tiny=True, command="test")
    paths = table3.write_outputs(payload, str(tmp_path / "t3.md"))
    d = payload["datasets"]["synthetic"]
    assert list(d["runs"]) == ["SFT", "PPO + AVA-p dense", "PPO + AVA-p sparse", "PPO + BT", "PPO + PT",
                               "PPO + AVA-p dense, pessimism 1"]
    sft, dense = d["runs"]["SFT"][0], d["runs"]["PPO + AVA-p dense"][0]
    # Every PPO run starts from the SFT policy and is judged on the same prompts with the same keys.
    for m in ("PPO + AVA-p sparse", "PPO + BT", "PPO + PT", "PPO + AVA-p dense, pessimism 1"):
        assert d["runs"][m][0]["gold_initial"] == dense["gold_initial"] == sft["gold"]
        assert d["runs"][m][0]["trajectory"][0]["kl_to_initial"] == pytest.approx(0, abs=1e-4)
    assert set(d["duels"]) == set(d["runs"]) - {"PPO + AVA-p dense"}
    assert "overoptimisation_gap_sd" in dense["final"]
    md = (tmp_path / "t3.md").read_text()
    assert "| PPO + BT |" in md and "## Reading" in md and paths["synthetic"].endswith(".png")


def test_cache_stores_each_seed_and_reruns_only_missing_ones(tmp_path, monkeypatch):
    """`--cache DIR`: a seed that finished is read back with the same values and types (NumPy floats
    come back as floats), a new seed runs, and without a cache every call runs."""
    import json
    import numpy as np
    from ava_jax.pipelines import tables
    calls = []

    def fake(dataset, seed, *, tiny):
        calls.append((dataset, seed, tiny))
        return {"DPO": {"gold": [float(seed), 0.5], "final": {"kl": np.float32(seed + 0.25)}}}

    monkeypatch.setitem(tables.CACHE, "dir", str(tmp_path))
    first = tables.cached("tableX", fake)("stories", 1, tiny=True)
    again = tables.cached("tableX", fake)("stories", 1, tiny=True)
    other = tables.cached("tableX", fake)("stories", 2, tiny=True)
    assert calls == [("stories", 1, True), ("stories", 2, True)]
    assert first == again == {"DPO": {"gold": [1.0, 0.5], "final": {"kl": 1.25}}} and type(again["DPO"]["final"]["kl"]) is float
    assert other["DPO"]["gold"][0] == 2.0
    stored = json.load(open(tmp_path / "tableX_stories_seed1_tiny.json"))
    assert set(stored) == {"date", "commit", "records"} and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setitem(tables.CACHE, "dir", None)
    tables.cached("tableX", fake)("stories", 1, tiny=True)
    assert len(calls) == 3


@pytest.mark.parametrize("launcher", ["table2", "table4", "table5"])
@pytest.mark.parametrize("args, says", [
    (("--datasets", "paper"), "needs --model-path and --judge"),
    (("--datasets", "paper", "--model-path", "bundled:tinystories-260k"), "needs --judge"),
    (("--datasets", "synthetic,nosuch"), "unknown dataset 'nosuch'"),
])
def test_table_cli_user_errors_are_one_line(tmp_path, launcher, args, says):
    """A missing flag of the `paper` dataset or an unknown dataset: one line, exit status 2, nothing run."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, f"launch/{launcher}.py", *args, "--out", str(tmp_path / "t.md")],
                          capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "t.md").exists()


def test_paper_setup_points_every_pipeline_at_the_checkpoint_data_and_judge():
    """Paper.apply on each pipeline's `paper` variant: the model path, data path and judge land on the
    keys that pipeline reads, and --tiny shrinks the run without touching them."""
    from ava_jax.pipelines import best_of_n, direct, reward_model, table2
    from ava_jax.pipelines.tables import Paper
    paper = Paper("/ckpt/smollm2", "/runs/judge", "/data/hh_train.jsonl")
    d = table4.run_config("DPO", "paper", 3, paper=paper)
    assert (d.model.path, d.data.path, d.eval.judge, d.seed) == ("/ckpt/smollm2", "/data/hh_train.jsonl", "/runs/judge", 3)
    assert d.data.format == "hh" and d.model.dtype == "bfloat16"
    assert d.train.steps == direct.default_config("dpo", "paper").train.steps
    r = table2.rm_config("ava_p", "paper", 0, tiny=True, paper=paper)
    assert r.model.path == "/ckpt/smollm2" and r.train.steps == 2 and r.data.max_train_pairs == 16
    assert reward_model.default_config("ava_p", "paper").train.steps > 100
    b = table2.bon_config("paper", 1, ["/a", "/b"], tiny=False, paper=paper)
    assert (b.best_of_n.judge, b.best_of_n.reward_models, b.data.format) == ("/runs/judge", "/a,/b", "hh")
    assert b.best_of_n.samples_per_prompt == best_of_n.default_config("paper").best_of_n.samples_per_prompt
    with pytest.raises(ValueError, match="needs --judge"):
        Paper("/ckpt/smollm2", "")


@pytest.mark.slow
def test_paper_rows_run_end_to_end_on_the_bundled_model(tmp_path):
    """The `paper` dataset of Tables 4, 5 and 2 with --tiny on the bundled TinyStories-260K and the
    bundled HH-RLHF file, judged by a tiny BT reward-model run: every row is made and rendered
    (about 4 min on 2 cores; the real thing needs an accelerator)."""
    pytest.importorskip("matplotlib")
    from ava_jax.pipelines import reward_model, table2, table5
    from ava_jax.pipelines.tables import Paper
    judge = reward_model.default_config("bt", "hh_tiny")
    judge.workdir, judge.train.progress = str(tmp_path / "judge"), False
    reward_model.run(judge)
    paper = Paper("bundled:tinystories-260k", judge.workdir)
    t4 = table4.run_table(("paper",), (0,), tiny=True, command="test", paper=paper)
    d = t4["datasets"]["paper"]
    assert set(d["runs"]) == {"DPO", "AVA-p"} and d["setup"]["judge"] == judge.workdir
    assert len(d["runs"]["DPO"][0]["gold"]) == 4 * 2  # num_prompts x samples_per_prompt of the tiny paper run
    md = table4.format_markdown(t4)
    assert "judge reward model" in md and "| AVA-p |" in md
    t5 = table5.run_table(("paper",), (0,), tiny=True, command="test", paper=paper)
    assert list(t5["datasets"]["paper"]["runs"]) == ["SFT", "DPO w/ AfD", "AVA-p w/ AfD", "AVA-d"]
    t2 = table2.run_table(("paper",), (0,), tiny=True, command="test", paper=paper)
    run = t2["datasets"]["paper"]["runs"][0]
    assert list(run["curves"]) == ["AVA-p", "BT", "PT"] and run["samples_per_prompt"] == 4
    assert "judge reward model" in table2.format_markdown(t2)


def test_the_runs_of_a_table_share_dpos_reference_log_probs():
    """Every seed's run points at one reference cache of the process (its entries' key, the data,
    weights and settings, keeps policies apart: tests/test_reference_cache.py), not at none."""
    import os

    dirs = {table4.run_config(m, "stories", seed).reference.cache_dir for m in ("DPO", "AVA-p") for seed in (0, 1)}
    assert len(dirs) == 1
    path = dirs.pop()
    assert path and os.path.isdir(path)
