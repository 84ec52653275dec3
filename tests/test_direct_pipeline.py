"""The direct pipeline: short runs that can fail, resume with the reference cache, export, bad input."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ava_jax import errors
from ava_jax.checkpoints.load import save_pretrained
from ava_jax.eval.policy import win_rate
from ava_jax.models import TQR
from ava_jax.pipelines import direct

from conftest import tiny_config


def _tiny(objective, workdir="", variant="tiny"):
    c = direct.default_config(objective, variant)
    c.workdir = workdir
    c.train.progress = False
    return c


def test_tiny_dpo_writes_summary_resumes_from_the_cache_and_exports(tmp_path):
    workdir = str(tmp_path / "run")
    r = direct.run(_tiny("dpo", workdir))
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["pipeline"] == "direct" and summary["objective"] == "dpo"
    for key in ("gold_reward", "kl_to_initial", "heldout_loglik_chosen", "initial_loglik_per_token"):
        assert np.isfinite(summary["final"][key]) and np.isfinite(summary["initial"][key])
    assert summary["initial"]["kl_to_initial"] == pytest.approx(0.0, abs=1e-4)  # the same policy
    assert 0 <= summary["final"]["vs_initial_win"] <= 1 and summary["examples"]
    assert r.extra["reference_cache"]["computed"] and r.extra["reference_cache"]["forward_batches"] > 0
    # The same run directory again: it resumes at its last step and reads the reference from disk.
    again = direct.run(_tiny("dpo", workdir))
    assert not again.extra["reference_cache"]["computed"] and again.extra["reference_cache"]["forward_batches"] == 0
    np.testing.assert_allclose(again.final["heldout_loglik_chosen"], r.final["heldout_loglik_chosen"], rtol=1e-6)
    # The exported policy: transformers loads it and gives the trained policy's logits.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.policy_dir).eval()
    tokens = np.asarray([[1, 45, 300, 22, 7, 99, 410, 3]], np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(nnx.merge(r.graphdef, r.params)(jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Its tokenizer opens in transformers too (the llama2.c tok512 exported as tokenizer.json), same ids.
    from ava_jax.tokenizers import load_tokenizer
    ours = load_tokenizer(os.path.join(os.path.dirname(direct.__file__), "..", "assets", "tinystories-260k"))
    theirs = transformers.AutoTokenizer.from_pretrained(r.policy_dir)
    text = "Once upon a time, Lily saw a happy dog. She smiled!"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


def test_runs_of_other_seeds_from_one_checkpoint_share_the_reference_log_probs(tmp_path):
    """The reference's cache key covers the LM only: the TQR heads, drawn from each run's seed, do
    not enter it, so a table's seeds read the entry the first one wrote."""
    runs = []
    for seed in (0, 1):
        c = _tiny("dpo")
        c.seed, c.reference.cache_dir = seed, str(tmp_path / "reference")
        runs.append(direct.run(c))
    assert runs[0].extra["reference_cache"]["computed"]
    assert not runs[1].extra["reference_cache"]["computed"] and runs[1].extra["reference_cache"]["forward_batches"] == 0


def test_reference_with_another_vocabulary_is_a_user_error(tmp_path):
    other = str(tmp_path / "other")
    save_pretrained(TQR(tiny_config("llama", vocab_size=97), rngs=nnx.Rngs(0)), None, other)
    c = _tiny("dpo")
    c.reference.path = other
    with pytest.raises(errors.ConfigError, match=r"reference.path=.*vocabulary of 97 tokens.*512") as e:
        direct.run(c)
    assert errors.is_user_error(e.value)


def test_policy_objective_in_the_reward_pipeline_and_back_is_an_error():
    from ava_jax.pipelines import reward_model
    with pytest.raises(errors.ConfigError, match="not a policy objective; known: ava_d, ava_p, dpo, sft"):
        direct.default_config("bt")
    with pytest.raises(errors.ConfigError, match="not a reward_model objective"):
        reward_model.default_config("dpo")


def test_win_rate_counts_ties_and_bootstraps_over_prompts():
    a, b = np.array([1.0, 2.0, 3.0, 0.0]), np.array([0.0, 2.0, 3.5, 0.0])
    w = win_rate(a, b, tau=0.25, groups_N=[0, 0, 1, 1])
    assert (w.win, w.tie, w.lose) == (0.25, 0.5, 0.25) and w.n == 4
    assert 0.0 <= w.win_ci[0] <= w.win <= w.win_ci[1] <= 0.5  # a prompt holds at most one of the two wins
    with pytest.raises(ValueError, match="tau"):
        win_rate(a, b, tau=-1.0)


@pytest.mark.slow
def test_dpo_on_the_synthetic_task_raises_the_true_reward():
    """300 DPO steps from a scratch (near-uniform) policy on 4,096 synthetic pairs (about 80 s): the
    true return of the policy's 1,024 held-out samples rises above the initial policy's (same prompts,
    same keys) by more than 10 paired standard errors and by at least 3 (measured: -1.0 -> 11.2), and
    the policy wins at least half of the paired comparisons more often than it loses (measured 0.955
    against 0.029)."""
    c = direct.default_config("dpo", "synthetic")
    c.workdir, c.train.progress = "", False
    r = direct.run(c)
    d = r.per_sample["final"]["gold"] - r.per_sample["initial"]["gold"]
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert d.size == 1024 and d.mean() > max(10 * se, 3.0), (d.mean(), se)
    assert r.final["vs_initial_win"] == pytest.approx(np.mean(d > 0)) and r.final["vs_initial_lose"] == \
        pytest.approx(np.mean(d < 0))
    assert r.final["vs_initial_win"] > r.final["vs_initial_lose"] + 0.5, r.final


@pytest.mark.slow
def test_sft_on_expert_demonstrations_raises_the_experts_likelihood():
    """100 SFT steps on the synthetic task's expert demonstrations (about 30 s): the held-out expert
    responses' log-likelihood per token rises from near uniform (-log 8 = -2.08) by more than 0.4
    nats, toward the expert's own (-1.19), and the policy's samples earn more true reward."""
    c = direct.default_config("sft", "synthetic")
    c.workdir, c.train.progress, c.train.steps = "", False, 100
    r = direct.run(c)
    assert r.extra["test_expert_loglik"] == pytest.approx(-1.19, abs=0.05)
    assert r.initial["heldout_loglik_chosen"] < -1.9
    assert r.final["heldout_loglik_chosen"] > r.initial["heldout_loglik_chosen"] + 0.4, (r.initial, r.final)
    assert r.final["heldout_loglik_chosen"] < r.extra["test_expert_loglik"] + 0.05  # not above the expert
    assert r.final["gold_reward"] > r.initial["gold_reward"] + 1.0


def test_ava_policy_keeps_q_causal_and_names_its_sampling_reading():
    c = direct.default_config("ava_p", "tiny")
    assert c.model.weight_heads == "reward" and c.model.q_param == "lm_logprobs"
    assert (c.loss.normalize, c.loss.td_terminal) == ("sequence", "zero")
    heads = direct.cfglib.head_config(c.model)
    objective, lcfg = direct.cfglib.objective_config(c, "policy")
    scfg = direct.task_sampling(direct.cfglib.data_config(c.data), c.sampling, None)
    assert direct._sampling_reading(c, heads, lcfg, scfg) == scfg  # "lm"
    c.eval.sample_from = "boltzmann"
    c.model.alpha, c.loss.beta = 0.5, 4.0
    heads = direct.cfglib.head_config(c.model)
    _, lcfg = direct.cfglib.objective_config(c, "policy")
    assert direct._sampling_reading(c, heads, lcfg, scfg).temperature == pytest.approx(scfg.temperature / 2.0)
    c.model.weight_heads = "both"
    with pytest.raises(errors.ConfigError, match="weight_heads='both'.*depends on later tokens"):
        direct._sampling_reading(c, direct.cfglib.head_config(c.model), lcfg, scfg)
    d = direct.default_config("dpo", "tiny")
    d.eval.sample_from = "boltzmann"
    _, dcfg = direct.cfglib.objective_config(d, "policy")
    with pytest.raises(errors.ConfigError, match="needs an AVA objective"):
        direct._sampling_reading(d, direct.cfglib.head_config(d.model), dcfg, scfg)


@pytest.mark.slow
def test_afd_pairs_from_an_sft_policy_and_source_errors(tmp_path):
    """DPO w/ AfD: the pairs are an SFT policy's sample (chosen) against the initial policy's (rejected)
    for each demonstration prompt; the wrong source for an objective is a user error."""
    sft = _tiny("sft", str(tmp_path / "sft"))
    assert direct._data_source(sft, direct.objectives.get("sft")) == "demonstrations"
    direct.run(sft)
    c = _tiny("dpo")
    c.data.source, c.data.afd_policy = "afd", str(tmp_path / "sft" / "policy")
    r = direct.run(c)
    assert r.extra["afd"]["pairs"] == {"train": 32, "validation": 16}
    c.data.afd_policy = ""
    with pytest.raises(errors.ConfigError, match="needs data.afd_policy"):
        direct.run(c)
    c.data.source = "demonstrations"
    with pytest.raises(errors.ConfigError, match="learns from pairs"):
        direct.run(c)


@pytest.mark.slow
def test_ava_p_direct_on_the_synthetic_task_raises_the_true_reward():
    """300 AVA-p steps as a policy objective from a scratch policy on 4,096 synthetic pairs (about
    50 s): the true return of 1,024 held-out samples rises by more than 10 paired standard errors and
    by at least 2 (measured on validation prompts: -1.0 -> 3.0 at a KL of 1.9 nats), the policy wins
    more than it loses, and the held-out chosen responses become more likely, not less."""
    c = direct.default_config("ava_p", "synthetic")
    c.workdir, c.train.progress = "", False
    r = direct.run(c)
    d = r.per_sample["final"]["gold"] - r.per_sample["initial"]["gold"]
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert d.mean() > max(10 * se, 2.0), (d.mean(), se)
    assert r.final["vs_initial_win"] > r.final["vs_initial_lose"] + 0.3, r.final
    assert r.final["heldout_loglik_chosen"] > r.initial["heldout_loglik_chosen"], (r.initial, r.final)


def test_every_config_file_loads_with_its_variants():
    """Each configs/*.py builds its config for its documented variants (a broken one fails here, not
    at a user's first run); the AfD config without its SFT policy is a user error at run time."""
    import importlib.util
    import pathlib
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    variants = {"generate": ("", "tiny"), "best_of_n": ("", "tiny", "synthetic", "paper"),
                "afd": ("dpo", "ava_p,synthetic"), "ppo": ("", "tiny", "synthetic", "paper"),
                "dpo": ("", "tiny", "paper"), "sft": ("", "tiny", "paper")}
    seen = set()
    for path in sorted(configs.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for v in variants.get(path.stem, ("", "tiny")):
            c = module.get_config(v)
            assert c.pipeline in ("generate", "reward_model", "direct", "best_of_n", "ppo"), path
            seen.add(c.pipeline)
    assert seen == {"generate", "reward_model", "direct", "best_of_n", "ppo"}
    c = _tiny("dpo")
    c.data.source = "afd"
    with pytest.raises(errors.ConfigError, match="needs data.afd_policy"):
        direct.run(c)


@pytest.mark.slow
def test_a_reward_model_run_can_be_the_judge(tmp_path):
    """For data without a gold reward, eval.judge names a reward-model run that scores the samples."""
    from ava_jax.eval.judges import RewardModelJudge, score_sequences
    from ava_jax.pipelines import reward_model
    rm = reward_model.default_config("bt", "tiny")
    rm.workdir, rm.train.progress = str(tmp_path / "rm"), False
    reward_model.run(rm)
    c = _tiny("sft")
    c.eval.judge = rm.workdir
    r = direct.run(c)
    assert r.extra["judge"] == f"reward model {rm.workdir}"
    trained = reward_model.load_trained(rm.workdir)
    s = r.per_sample["final"]["samples"]
    # Scored in the judge's batch size, the rescoring is the same XLA computation on the same padded
    # batches, so it must agree to float32 rounding (another batch size changes the CPU kernels' sums).
    np.testing.assert_allclose(r.per_sample["final"]["gold"],
                               score_sequences(trained, s.prompts, s.responses, pad_id=2,
                                               batch_size=RewardModelJudge.BATCH_SIZE), rtol=1e-6)
