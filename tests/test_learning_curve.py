"""The learning-curve driver: a two-size, one-seed BT curve on the tiny synthetic task."""
import dataclasses
import json

import pytest

from ava_jax import config as cfglib
from ava_jax.data import synthetic as syn
from ava_jax.pipelines import learning_curve as lc


def test_overrides_parse_and_reject_unknown_keys():
    c = lc.run_config("ava_p", 256, 3, variant="synthetic_tiny", steps=7,
                      overrides=[lc.parse_override("train.learning_rate=2"),
                                 lc.parse_override("train.batch_size=8"), lc.parse_override("loss.use_neg=false")])
    assert (c.seed, c.data.synthetic.num_examples, c.train.steps, c.train.batch_size) == (3, 256, 7, 8)
    assert c.train.learning_rate == 2.0 and isinstance(c.train.learning_rate, float) and c.loss.use_neg is False
    assert lc.run_config("bt", 256, 0, variant="synthetic_tiny", epochs=2.0,
                         overrides=[("train.batch_size", 64)]).train.steps == 8
    with pytest.raises(KeyError, match="train.bacth_size"):
        lc.run_config("bt", 256, 0, variant="synthetic_tiny", overrides=[("train.bacth_size", 8)])
    # BT has no AVA switches: its config.loss is empty, so an AVA key is an error, not silently ignored.
    with pytest.raises(KeyError, match="loss.use_neg"):
        lc.run_config("bt", 256, 0, variant="synthetic_tiny", overrides=[("loss.use_neg", False)])


def test_learning_curve_writes_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lc"
    # One layer: the run time is mostly XLA compiling the step, which scales with depth.
    lc.run_learning_curve((256, 512), (0,), ("bt",), variant="synthetic_tiny", steps=20,
                          overrides=[("model.scratch.n_layers", 1)], out_dir=str(out))
    for ext in ("png", "md", "json"):
        assert (out / f"learning_curve.{ext}").stat().st_size > 0
    with open(out / "learning_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "learning_curve.json").read_text())
    assert set(payload["accuracy"]["bt"]) == {"256", "512"}
    assert payload["overrides"] == {"model.scratch.n_layers": 1} and payload["steps"] == {"256": 20, "512": 20}
    numbers = [v for by_size in payload["accuracy"].values() for vs in by_size.values() for v in vs]
    numbers += [v for by_size in payload["references"].values() for v in by_size.values()]
    assert len(numbers) == 2 + 3 * 2 and all(0.0 <= v <= 1.0 for v in numbers), numbers
    # The ceiling row is the Bayes-optimal accuracy of the pipeline's own test pairs.
    c = lc.run_config("bt", 256, 0, variant="synthetic_tiny")
    scfg = dataclasses.replace(cfglib.synthetic_config(c.data.synthetic, c.data.synthetic.data_seed + 2),
                               num_examples=c.data.synthetic.num_eval_examples)
    bayes = syn.make_preference_dataset(scfg).bayes_optimal_accuracy
    assert payload["references"]["bayes_ceiling"] == {"256": bayes, "512": bayes}
    md = (out / "learning_curve.md").read_text()
    assert "| BT |" in md and "Bayes ceiling" in md


def test_learning_curve_resumes_finished_points(tmp_path, monkeypatch):
    """A killed curve keeps its finished points: a rerun with the same settings trains only the rest,
    and other settings start afresh."""
    out = str(tmp_path / "lc")
    settings = {"variant": "synthetic_tiny", "steps": 3, "epochs": 0.0, "overrides": []}
    lc._save_partial(f"{out}/learning_curve.partial.json", settings, {"bt/256/0": [0.625, 1.5]})
    trained = []

    def fake_run(c):
        trained.append((c.objective, c.data.synthetic.num_examples, c.seed))
        return lc.reward_model.RewardModelResult(c.objective, {"test": {"accuracy": 0.5}}, None, 2.0, {})

    monkeypatch.setattr(lc.reward_model, "run", fake_run)
    monkeypatch.setattr(lc, "write_outputs", lambda payload, out_dir: {})
    payload = lc.run_learning_curve((256,), (0, 1), ("bt",), variant="synthetic_tiny", steps=3, out_dir=out)
    assert trained == [("bt", 256, 1)]
    assert payload["accuracy"]["bt"]["256"] == [0.625, 0.5] and payload["wall_s"]["bt"]["256"] == [1.5, 2.0]
    trained.clear()
    lc._save_partial(f"{out}/learning_curve.partial.json", settings, {"bt/256/0": [0.625, 1.5]})
    lc.run_learning_curve((256,), (0,), ("bt",), variant="synthetic_tiny", steps=4, out_dir=out)
    assert trained == [("bt", 256, 0)]  # steps differ: the saved point is not reused
