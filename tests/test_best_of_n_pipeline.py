"""The best_of_n pipeline on tiny reward models: curves from one pool, head-to-head, bad input.

Slow: the fixture trains three reward models (about 2 min on 2 cores).
"""
import json
import os

import numpy as np
import pytest

from ava_jax import errors
from ava_jax.pipelines import best_of_n, reward_model


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory):
    """Two tiny stories reward models (BT, AVA-p) and a synthetic one, each in its own run directory."""
    dirs = {}
    for objective, variant in (("bt", "tiny"), ("ava_p", "tiny"), ("bt", "synthetic_tiny")):
        c = reward_model.default_config(objective, variant)
        c.workdir = str(tmp_path_factory.mktemp(f"{objective}_{variant}"))
        c.train.progress = False
        reward_model.run(c)
        dirs[objective, variant] = c.workdir
    return dirs


@pytest.mark.slow
def test_best_of_n_curves_and_head_to_head(reward_runs, tmp_path):
    c = best_of_n.default_config("tiny")
    c.workdir = str(tmp_path / "bon")
    c.best_of_n.reward_models = f"{reward_runs['bt', 'tiny']},{reward_runs['ava_p', 'tiny']}"
    payload = best_of_n.run(c)
    assert set(payload["curves"]) == {f"BT ({os.path.basename(reward_runs['bt', 'tiny'])})",
                                      f"AVA-p ({os.path.basename(reward_runs['ava_p', 'tiny'])})"}
    curves = list(payload["curves"].values())
    # N = 1 is the policy itself, whatever the reward model: both curves start at the same gold reward.
    assert curves[0]["gold"][0] == pytest.approx(curves[1]["gold"][0])
    assert curves[0]["n"] == [1, 2, 3, 4] and curves[0]["kl_bound"][0] == 0.0
    (duel,) = payload["head_to_head"].values()
    assert duel["win"][0] == duel["lose"][0] == 0.0 and duel["tie"][0] == pytest.approx(1.0)  # same pick at N = 1
    assert all(abs(w + t + l - 1) < 1e-9 for w, t, l in zip(duel["win"], duel["tie"], duel["lose"]))
    for name in ("best_of_n.json", "best_of_n.png", "summary.json"):
        assert os.path.getsize(os.path.join(c.workdir, name)) > 0
    with open(os.path.join(c.workdir, "summary.json")) as f:
        assert json.load(f)["pipeline"] == "best_of_n"
    assert np.isfinite(curves[1]["proxy"]).all()


@pytest.mark.slow
def test_best_of_n_bad_input_is_a_user_error(reward_runs, tmp_path):
    c = best_of_n.default_config("tiny")
    c.best_of_n.reward_models = reward_runs["bt", "tiny"]
    c.best_of_n.ns = "1,8"
    with pytest.raises(errors.ConfigError, match=r"N=8 needs at least N samples.*samples_per_prompt=4"):
        best_of_n.run(c)
    c.best_of_n.ns = ""
    c.best_of_n.reward_models = reward_runs["bt", "synthetic_tiny"]  # no tokenizer: other token ids
    with pytest.raises(errors.ConfigError, match="another tokenizer than the policy"):
        best_of_n.run(c)
    c.best_of_n.reward_models = str(tmp_path)
    with pytest.raises(errors.ConfigError, match="no summary.json"):
        best_of_n.run(c)
    c.best_of_n.reward_models = ""
    with pytest.raises(errors.ConfigError, match="reward_models is empty"):
        best_of_n.run(c)
