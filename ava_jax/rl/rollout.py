"""PPO rollouts as a `BatchSource`: the train loop asks `next_batch(state, step)`, and every
`epochs x minibatches` steps the source samples a fresh rollout from the current policy in `state`.

One iteration:
  1. prompts: `rows` train prompts drawn by (seed, iteration), left-padded to one fixed width P;
  2. generation: the jitted KV-cache sampler (`ava_jax.sampling`, compiled once for the shape) on
     the current policy, keyed by fold_in(rollout key, iteration);
  3. the policy's log-probs and values, the reference's log-probs (both at the sampling temperature,
     banned ids removed) and the reward model's [B, N] reward tensor (`rl.rewards`);
  4. rewards r_t = scale x score_t - missing-EOS penalty - kl_coef x kl_t, GAE by reverse scan,
     returns before the advantages are whitened (`losses.ppo`);
  5. `epochs` passes over the rollout in `minibatches` shuffled minibatches (a permutation drawn by
     (seed, iteration, epoch)).

Everything a resume needs is a function of (parameters, iteration) except two host numbers, the
adaptive KL coefficient and the reward scale, which `RolloutState` carries into the checkpoint (the
loop saves it as it saves a grain iterator's position). Resumes land on iteration boundaries
(checkpoints are taken every whole iteration), so a killed and resumed run draws the same rollouts
and gives the same losses as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ava_jax import sharding as shd

from ava_jax import xla
from ava_jax.losses.ppo import PpoConfig, gae, kl_estimate, masked_whiten
from ava_jax.rl.ppo import lm_response_logprobs, policy_outputs
from ava_jax.rl.rewards import RewardConfig, dense_stats, last_index, reward_tensor
from ava_jax.sampling import SamplingConfig, generate

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens_BxT", "mask_BxT", "response_mask_BxN", "old_logp_BxN", "old_values_BxN", "advantages_BxN",
              "returns_BxN")


class RolloutState:
    """The host state a resume needs (adaptive KL coefficient, reward scale), saved with the
    checkpoint through grain's iterator protocol (get_state / set_state as bytes)."""

    def __init__(self, kl_coef: float):
        self.values = {"kl_coef": float(kl_coef), "reward_scale": None}

    def get_state(self) -> bytes:
        return json.dumps(self.values).encode()

    def set_state(self, state: bytes) -> None:
        self.values = json.loads(state.decode() if isinstance(state, bytes) else state)

    def start_prefetch(self) -> None:  # grain's restore calls it
        pass


def left_pad(prompts, pad_id: int, width: int):
    """(tokens [B, width], mask [B, width]) of left-padded prompts."""
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= width:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the rollout prompt width is {width}")
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
    return tokens, mask


@functools.cache
def _policy_fn(graphdef, n: int, temperature: float, banned: tuple[int, ...]):
    @xla.jit
    def one(params, tokens, mask):
        logp, _, values = policy_outputs(nnx.merge(graphdef, params), tokens, mask, n, temperature, banned)
        return logp, values
    return one


@functools.cache
def _reference_fn(graphdef, n: int, temperature: float, banned: tuple[int, ...]):
    @xla.jit
    def one(params, tokens, mask):
        return lm_response_logprobs(nnx.merge(graphdef, params), tokens, mask, n, temperature, banned)
    return one


@functools.cache
def _advantage_fn(cfg: PpoConfig):
    @xla.jit
    def one(scores_BxN, penalty_B, logp, ref_logp, values, mask, kl_coef, scale):
        m = mask.astype(bool)
        kl = jnp.where(m, kl_estimate(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp), 0.0)
        last = jnp.arange(m.shape[1])[None, :] == last_index(m)[:, None]
        score = scale * scores_BxN - jnp.where(last, penalty_B[:, None], 0.0)
        rewards = jnp.where(m, score - kl_coef * kl, 0.0).astype(jnp.float32)
        values = jnp.where(m, values, 0.0)
        adv, returns = gae(rewards, values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, m)
        return rewards, adv, returns, kl, score
    return one


@dataclasses.dataclass
class Rollout:
    batch: dict  # BATCH_KEYS -> [rows, ...] host arrays (numpy)
    metrics: dict
    prompts: list
    responses: list


class RolloutSource:
    """A BatchSource of PPO minibatches (see the module docstring).

    Args:
      graphdef: the trained `ActorCritic`'s graph (its parameters come from the loop's state).
      prompts: the train prompts (token lists, BOS included).
      sampling: how the policy samples (its temperature and banned ids also shape the log-probs).
      ppo, reward: PpoConfig, RewardConfig.
      reward_model: a `reward_model.TrainedRewardModel` on the policy's tokenizer.
      reference: the frozen reference policy (a Transformer, placed on `mesh`), or `train.step.freeze`'s
        FrozenModels holding it as "reference".
      rows, minibatches, epochs: prompts per rollout, minibatches per epoch, epochs per rollout.
      seed: draws prompts, sampling keys and minibatch orders.
      reward_scale: "initial_std" divides every score by the sd of the summed scores of the first
        rollout (then fixed, checkpointed: the reward stays one function of the text, and one
        kl_coef suits reward models of any scale), or "none".
      judge: optional gold judge of the rollouts (logged as objective/gold, never trained on).
      writer: MetricWriter for the per-rollout metrics (set after `start_run`).
      retokenizer: an `rl.retokenize.Retokenizer` when the reward model has another tokenizer than
        the policy (its rewards are then computed on re-encoded text and mapped back).
    """

    def __init__(self, graphdef, prompts, sampling: SamplingConfig, ppo: PpoConfig, reward: RewardConfig,
                 reward_model, reference, *, rows: int, minibatches: int, epochs: int, seed: int,
                 reward_scale: str = "initial_std", judge=None, writer=None, pad_id: int = 0, retokenizer=None,
                 mesh=None):
        if rows % minibatches:
            raise ValueError(f"ppo.rollout_batch={rows} is not a multiple of ppo.minibatches={minibatches}")
        if reward_scale not in ("initial_std", "none"):
            raise ValueError(f"reward.scale={reward_scale!r} is not one of ('initial_std', 'none')")
        self.graphdef, self.prompts, self.sampling = graphdef, [list(p) for p in prompts], sampling
        self.ppo, self.reward, self.rm = ppo, reward, reward_model
        # The reference as a frozen, sharded parameter tree (train.step.freeze places it by
        # sharding.PARAM_RULES on the current mesh), read by its own jitted pass.
        from ava_jax.train.step import FrozenModels
        if not isinstance(reference, FrozenModels):
            from ava_jax.train.step import freeze
            from ava_jax import sharding as shd
            reference = freeze({"reference": reference}, shd.make_mesh() if mesh is None else mesh)
        self.ref_graphdef, self.ref_params = reference.graphdefs["reference"], reference.params["reference"]
        self.rows, self.minibatches, self.epochs, self.seed = rows, minibatches, epochs, seed
        self.reward_scale, self.judge, self.writer, self.pad_id = reward_scale, judge, writer, pad_id
        self.retokenizer = retokenizer
        self.fixed = None  # the parameters the train state does not hold (LoRA's base weights), set by the pipeline
        self.width = -(-max(map(len, self.prompts)) // sampling.prompt_bucket) * sampling.prompt_bucket
        self.n = sampling.max_new_tokens
        self.checkpoint_iterator = RolloutState(ppo.kl_coef)
        self.key = jax.random.key(seed)
        self._current: tuple[int, Rollout] | None = None
        self._last_collect_end = None
        self.history: list[dict] = []  # every rollout's metrics, in order

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * self.minibatches

    def resumable_at(self, step: int) -> bool:
        """A resume must start a fresh rollout: only iteration boundaries (the loop asks on preemption)."""
        return step % self.steps_per_iteration == 0

    @property
    def minibatch_rows(self) -> int:
        return self.rows // self.minibatches

    def example(self) -> dict:
        """This process's share of a minibatch, of the right shapes and dtypes (for the step's shardings)."""
        b, t, n = self.minibatch_rows // jax.process_count(), self.width + self.n, self.n
        shapes = {"tokens_BxT": ((b, t), np.int32), "mask_BxT": ((b, t), bool), "response_mask_BxN": ((b, n), bool)}
        out = {k: np.zeros(*shapes.get(k, ((b, n), np.float32))) for k in BATCH_KEYS}
        return out

    def next_batch(self, state, step: int):
        iteration, k = divmod(step, self.steps_per_iteration)
        if self._current is None or self._current[0] != iteration:
            params = state.params if self.fixed is None else nnx.merge_state(state.params, self.fixed)
            self._current = (iteration, self.collect(params, iteration, step))
        epoch, mb = divmod(k, self.minibatches)
        order = np.random.default_rng((self.seed, iteration, epoch)).permutation(self.rows)
        idx = np.sort(order[mb * self.minibatch_rows:(mb + 1) * self.minibatch_rows])
        # Several processes: every one collects the same rollout (same keys, replicated results) and
        # hands the step its contiguous share of the minibatch, the rows its devices hold in the
        # global batch (train.step assembles it).
        i, n = shd.process_shard()
        if len(idx) % n:
            raise ValueError(f"a PPO minibatch of {len(idx)} rows does not split over {n} processes")
        idx = idx[i * len(idx) // n:(i + 1) * len(idx) // n]
        return {key: v[idx] for key, v in self._current[1].batch.items()}

    def collect(self, params, iteration: int, step: int | None = None) -> Rollout:
        """One rollout from the policy with `params` (see the module docstring)."""
        t_start = time.perf_counter()
        update_s = None if self._last_collect_end is None else t_start - self._last_collect_end
        rng = np.random.default_rng((self.seed, iteration))
        pick = rng.choice(len(self.prompts), self.rows, replace=self.rows > len(self.prompts))
        prompts = [self.prompts[i] for i in pick]
        ptok, pmask = left_pad(prompts, self.sampling.pad_id, self.width)
        policy = nnx.merge(self.graphdef, params).backbone
        gen = generate(policy, (ptok, pmask), jax.random.fold_in(self.key, iteration), self.sampling)
        resp_mask = np.asarray(gen.mask, bool)
        tokens = jnp.concatenate([jnp.asarray(ptok), gen.tokens], axis=1)
        mask = jnp.concatenate([jnp.asarray(pmask), gen.mask], axis=1)
        jax.block_until_ready(tokens)
        t_gen = time.perf_counter()
        temp, banned = float(self.sampling.temperature) or 1.0, tuple(self.sampling.banned_ids)
        logp, values = _policy_fn(self.graphdef, self.n, temp, banned)(params, tokens, mask)
        jax.block_until_ready(logp)
        t_pol = time.perf_counter()
        ref_logp = _reference_fn(self.ref_graphdef, self.n, temp, banned)(self.ref_params, tokens, mask)
        jax.block_until_ready(ref_logp)
        t_ref = time.perf_counter()
        tok_np = np.asarray(gen.tokens)
        responses = [tok_np[i][resp_mask[i]].tolist() for i in range(self.rows)]
        if self.retokenizer is None:
            plen = jnp.asarray(pmask.sum(1), jnp.int32)
            scores, mu, sigma = reward_tensor(self.rm, self.reward, tokens, mask, plen, gen.mask)
        else:
            from ava_jax.rl.retokenize import retokenized_rewards
            scores, mu, sigma = (jnp.asarray(x) for x in retokenized_rewards(
                self.rm, self.reward, self.retokenizer, prompts, responses, self.n,
                pad_id=self.rm.tokenizer.pad_id or 0))
        jax.block_until_ready(scores)
        t_rew = time.perf_counter()
        state = self.checkpoint_iterator.values
        seq_score = np.asarray(scores, np.float64).sum(1)
        if state["reward_scale"] is None:
            sd = float(seq_score.std()) if self.reward_scale == "initial_std" else 1.0
            state["reward_scale"] = 1.0 / sd if sd > 1e-8 else 1.0
        eos = self.sampling.eos_id
        has_eos = (np.any((tok_np == eos) & resp_mask, axis=1) if eos is not None else np.ones(self.rows, bool))
        penalty = np.where(has_eos, 0.0, self.ppo.missing_eos_penalty).astype(np.float32)
        kl_coef = state["kl_coef"]
        rewards, adv, returns, kl, score = _advantage_fn(self.ppo)(
            scores, jnp.asarray(penalty), logp, ref_logp, values, gen.mask, jnp.float32(kl_coef),
            jnp.float32(state["reward_scale"]))
        batch = {"tokens_BxT": tokens, "mask_BxT": mask, "response_mask_BxN": gen.mask, "old_logp_BxN": logp,
                 "old_values_BxN": jnp.where(gen.mask, values, 0.0), "advantages_BxN": adv, "returns_BxN": returns}
        # Held on the host: next_batch slices a minibatch out of it every step, and a slice of a numpy
        # array is free, while indexing a device array is an op of its own, queued behind the step
        # in flight (50 ms a minibatch in the default run). The step puts the rows in its shardings.
        batch = jax.device_get(batch)
        kl_sum = np.asarray(kl, np.float64).sum(1)
        score_sum = np.asarray(score, np.float64).sum(1)
        lengths = resp_mask.sum(1)
        metrics = {"iteration": iteration, "objective/kl": float(kl_sum.mean()),
                   "objective/scores": float(score_sum.mean()), "objective/raw_scores": float(seq_score.mean()),
                   "objective/non_score_reward": float(-kl_coef * kl_sum.mean()),
                   "objective/rlhf_reward": float((score_sum - kl_coef * kl_sum).mean()),
                   "objective/kl_coef": kl_coef, "objective/reward_scale": state["reward_scale"],
                   "completion_length": float(lengths.mean()), "eos_rate": float(has_eos.mean()),
                   "value/mean": float(np.asarray(values)[resp_mask].mean()),
                   "time/generate": t_gen - t_start, "time/policy_forward": t_pol - t_gen,
                   "time/reference": t_ref - t_pol, "time/reward": t_rew - t_ref}
        if update_s is not None:
            metrics["time/update_previous"] = update_s
        if self.reward.mode == "dense":
            metrics.update({f"dense/{k}": float(v) for k, v in dense_stats(mu, gen.mask).items()})
        if self.reward.pessimism:
            metrics["objective/sigma_mean"] = float(np.asarray(sigma)[resp_mask].mean())
        if self.judge is not None:
            metrics["objective/gold"] = float(np.mean(self.judge(prompts, responses)))
        if self.ppo.adaptive_kl_target > 0:  # Ziegler et al. (2019), applied to the next rollout
            err = np.clip(kl_sum.mean() / self.ppo.adaptive_kl_target - 1.0, -0.2, 0.2)
            state["kl_coef"] = float(kl_coef * (1.0 + err * self.rows / self.ppo.adaptive_kl_horizon))
        self.history.append(metrics)
        if self.writer is not None:
            self.writer.write(step if step is not None else iteration, metrics, prefix="rollout/")
        self._last_collect_end = time.perf_counter()
        return Rollout(batch, metrics, prompts, responses)
