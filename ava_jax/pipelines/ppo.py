"""The `ppo` pipeline (paper Table 3): fine-tune a policy with PPO against a learned reward model,
with AVA's dense per-token rewards (`reward.mode=dense`) or one sparse sequence score.

    python -m ava_jax.main --config=configs/ppo.py                         # stories task, AVA-p dense
    python -m ava_jax.main --config=configs/ppo.py --config.reward.path=runs/ava_p
    python -m ava_jax.main --config=configs/ppo.py --config.reward.mode=sparse --config.reward.path=runs/bt

Prerequisites are built when not given, inside the run directory, and reused when already there:
  - `reward.path` empty: the task's default `reward.objective` (AVA-p) reward model is trained first
    (`reward_model` pipeline) into `<workdir>/reward_model_<objective>`;
  - `sft.enabled`: the initial policy is `model.path` fine-tuned by SFT on the task's demonstrations
    (`direct` pipeline, with the same `lora` settings, adapters merged) into `<workdir>/sft`, and PPO
    starts from (and is anchored by KL to) that.
Then the rollouts (`rl.rollout`: the jitted KV-cache sampler on the current policy, the reference's
and the reward model's passes) and the PPO updates (`rl.ppo`) run in the shared train loop, with
checkpoints at whole iterations (exact resume, the rollout PRNG included). The initial and the final
policy answer the same held-out prompts with the same keys and are judged by the task's gold reward
(direct pipeline's `PolicyEvaluation`: gold reward, KL to the initial policy, win / tie / lose).
Writes `<workdir>/summary.json`, `metrics.jsonl`, TensorBoard events, `rollouts.jsonl` (one line per
rollout) and the final policy as a Hugging Face directory at `<workdir>/policy`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from ava_jax import config as cfglib
from ava_jax import sharding as shd
from ava_jax.data.load import load_pair_splits
from ava_jax.errors import ConfigError
from ava_jax.losses.ppo import PpoConfig
from ava_jax.models import param_count
from ava_jax.models.actor_critic import ActorCritic
from ava_jax.models.build import build_tqr
from ava_jax.pipelines import direct, reward_model
from ava_jax.rl.ppo import make_ppo_loss
from ava_jax.rl.rewards import RewardConfig, check_reward_model
from ava_jax.rl.rollout import RolloutSource
from ava_jax.train.lora import LoraRun
from ava_jax.train.reference import tokenizer_fingerprint
from ava_jax.train.setup import start_run

log = logging.getLogger(__name__)

VARIANTS = ("", "tiny", "synthetic", "synthetic_tiny", "paper")
# The prerequisite runs' variants, per PPO variant.
_RM_VARIANT = {"": "", "tiny": "tiny", "synthetic": "synthetic", "synthetic_tiny": "synthetic_tiny", "paper": "paper"}
_SFT_VARIANT = {"": "", "tiny": "tiny", "synthetic": "synthetic", "synthetic_tiny": "synthetic_tiny"}
_PPO_FIELDS = [f.name for f in dataclasses.fields(PpoConfig)]


def default_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Variants: "" (the stories task on the bundled TinyStories-260K, SFT'd on the stories
    demonstrations, against an AVA-p reward model: CPU minutes), "tiny" (the tests), "synthetic"
    (the synthetic MDP, a scratch policy SFT'd on the expert), "synthetic_tiny", "paper" (an
    accelerator: a SmolLM2-135M or GPT-2 policy from --config.model.path, already SFT'd, against a
    reward-model run given by --config.reward.path (e.g. the reward_model pipeline's "paper" variant,
    GPT-2: another tokenizer is re-encoded), on HH-RLHF prompts; judged by --config.eval.judge, a
    reward-model run trained on more data, when given)."""
    variant = variant or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for ppo; known: {VARIANTS}")
    c = cfglib.base_config()
    c.pipeline = "ppo"
    c.variant = variant  # the prerequisites (reward model, SFT) use the same task variant
    c.model.scratch = cfglib.scratch_section()
    c.data = cfglib.data_section()
    c.data.format = "stories"
    c.data.pad_to_multiple = 16
    c.data.stories.update(num_pairs=2048, num_eval_pairs=256)  # train prompts; test prompts judge
    # reward: path = a finished reward-model run directory ("" trains reward.objective's default
    # first); mode "dense" (AVA's mu_t on every token) or "sparse" (one score at the last token);
    # pessimism k: mu - k sigma; score: the sparse score ("" = the run's own eval.score);
    # scale "initial_std": scores divided by the sd of the first rollout's summed scores (fixed
    # afterwards), so one kl_coef suits reward models of any scale; "none" keeps raw scores.
    c.reward = ml_collections.ConfigDict(dict(path="", objective="ava_p", mode="dense", pessimism=0.0, score="",
                                              scale="initial_std"))
    # sft: start PPO from model.path fine-tuned on the task's demonstrations (direct pipeline, its
    # default config for the task with `steps`), trained into <workdir>/sft and reused.
    c.sft = ml_collections.ConfigDict(dict(enabled=True, steps=200))
    # PPO (losses.ppo.PpoConfig, defaults as the reference stacks: policy.md), plus the rollout
    # shape: rollout_batch prompts per iteration, `epochs` passes in `minibatches` minibatches.
    c.ppo = ml_collections.ConfigDict(dict(
        **{f.name: f.default for f in dataclasses.fields(PpoConfig)},
        iterations=40, rollout_batch=64, minibatches=4, epochs=2, separate_critic=False))
    c.train = ml_collections.ConfigDict(dict(
        learning_rate=3e-4, warmup_steps=10, final_lr_fraction=1.0, weight_decay=0.0, grad_clip=1.0,
        log_every=1, eval_every=0, checkpoint_every=10, max_consecutive_bad_steps=5, progress=True))
    # eval: held-out judging as the direct pipeline (every eval_every iterations when trajectory);
    # judge: a reward-model run directory judging instead of the task's gold reward (user data).
    c.eval = ml_collections.ConfigDict(dict(num_prompts=128, samples_per_prompt=4, tie_threshold=0.0,
                                            batch_size=64, seed=1234, split="test", trajectory=False,
                                            judge=""))
    c.sampling.temperature = 1.0
    c.export = True
    # LoRA on the policy (models.lora; rank 0 = full fine-tuning): the reference and the initial
    # policy are the base weights without the adapters; the value head (and a separate critic) train fully.
    c.lora = cfglib.lora_section()
    c.workdir = "runs/ppo" if variant in ("", "synthetic") else ""
    if variant == "tiny":
        c.data.stories.update(num_pairs=32, num_eval_pairs=16, num_demos=32, num_eval_demos=16)
        c.sft.steps = 4
        c.ppo.update(iterations=3, rollout_batch=8, minibatches=2, epochs=1)
        c.train.update(warmup_steps=1, checkpoint_every=0, progress=False)
        c.eval.update(num_prompts=4, samples_per_prompt=2, batch_size=8)
    elif variant in ("synthetic", "synthetic_tiny"):
        c.model.path = "scratch"
        c.data.format = "synthetic"
        c.data.synthetic.update(vocab_size=8, num_examples=4096, num_eval_examples=1024)
        c.ppo.update(iterations=40, rollout_batch=128, minibatches=4, epochs=2)
        c.train.learning_rate = 1e-3
        c.eval.update(num_prompts=256, samples_per_prompt=4, batch_size=256)
        if variant == "synthetic_tiny":
            c.data.synthetic.update(num_examples=256, num_eval_examples=64)
            c.sft.steps = 6
            c.ppo.update(iterations=3, rollout_batch=16, minibatches=2, epochs=1)
            c.train.update(warmup_steps=1, checkpoint_every=0, progress=False)
            c.eval.update(num_prompts=8, samples_per_prompt=2, batch_size=16)
    elif variant == "paper":
        c.model.path = ""  # required: the SFT'd policy (HF dir or GGUF)
        c.model.dtype = "bfloat16"
        c.reward.path = ""  # required: a finished reward-model run directory
        c.sft.enabled = False
        c.data.format = "hh"
        c.data.update(max_len=512)
        c.sampling.update(max_new_tokens=128, temperature=1.0)
        c.ppo.update(iterations=200, rollout_batch=64, minibatches=4, epochs=2, missing_eos_penalty=1.0)
        c.train.update(learning_rate=1e-6, warmup_steps=20, checkpoint_every=20)
        c.eval.update(num_prompts=256, samples_per_prompt=2)
    return c


def ppo_config(c: ml_collections.ConfigDict) -> PpoConfig:
    try:
        return PpoConfig(**{k: (float(c.ppo[k]) if isinstance(PpoConfig.__dataclass_fields__[k].default, float)
                                else c.ppo[k]) for k in _PPO_FIELDS})
    except ValueError as e:
        raise ConfigError(f"config.ppo: {e}") from e


def train_section(c: ml_collections.ConfigDict, steps_per_iteration: int, rows: int) -> ml_collections.ConfigDict:
    """`config.train` in steps (one step = one minibatch update; its intervals are in iterations)."""
    p, t = c.ppo, c.train
    for key in ("iterations", "rollout_batch", "minibatches", "epochs"):
        if p[key] < 1:
            raise ConfigError(f"ppo.{key}={p[key]} must be >= 1")
    return ml_collections.ConfigDict(dict(
        steps=p.iterations * steps_per_iteration, batch_size=rows, accum_steps=1,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, final_lr_fraction=t.final_lr_fraction,
        weight_decay=t.weight_decay, grad_clip=t.grad_clip, log_every=t.log_every * steps_per_iteration,
        eval_every=t.eval_every * steps_per_iteration, checkpoint_every=t.checkpoint_every * steps_per_iteration,
        max_consecutive_bad_steps=t.max_consecutive_bad_steps, progress=t.progress))


def _finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def prepare_reward_model(c: ml_collections.ConfigDict, base_dir: str) -> str:
    """`reward.path`, or the task's default reward model trained into base_dir (reused when done)."""
    if c.reward.path:
        return c.reward.path
    if c.variant == "paper":
        raise ConfigError("the paper variant needs --config.reward.path=DIR, a finished reward-model run (train one "
                          "with configs/ava_p.py:paper first)")
    run_dir = os.path.join(base_dir, f"reward_model_{c.reward.objective}")
    if not _finished(run_dir):
        rc = reward_model.default_config(c.reward.objective, _RM_VARIANT[c.variant])
        rc.seed, rc.workdir, rc.train.progress = c.seed, run_dir, c.train.progress
        log.info("ppo: training the %s reward model first into %s (give reward.path to reuse one)",
                 c.reward.objective, run_dir)
        reward_model.run(rc)
    return run_dir


def prepare_policy(c: ml_collections.ConfigDict, base_dir: str) -> tuple[str, dict | None]:
    """(the policy path PPO starts from, the SFT run's held-out metrics or None)."""
    if not c.sft.enabled:
        return c.model.path, None
    run_dir = os.path.join(base_dir, "sft")
    if not _finished(run_dir):
        sc = direct.default_config("sft", _SFT_VARIANT[c.variant])
        sc.seed, sc.workdir, sc.train.progress = c.seed, run_dir, c.train.progress
        sc.model.path, sc.train.steps = c.model.path, c.sft.steps
        sc.train.eval_every = sc.train.checkpoint_every = 0
        # The SFT stage fine-tunes as PPO does (LoRA when lora.rank > 0, so a model too big for full
        # fine-tuning fits both stages); its adapters are merged into the exported policy PPO starts from.
        sc.lora.update(c.lora.to_dict())
        sc.lora.export = "merged"
        log.info("ppo: SFT of %s on the task's demonstrations first into %s", c.model.path, run_dir)
        direct.run(sc)
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return os.path.join(run_dir, "policy"), {"initial": summary["initial"], "final": summary["final"]}


@dataclasses.dataclass
class PpoResult:
    reward_model: str
    mode: str
    initial: dict
    final: dict
    rollouts: list  # every rollout's metrics
    trajectory: list  # held-out judging along training (initial, every eval, final)
    checkpoint_dir: str | None
    policy_dir: str
    wall_s: float
    extra: dict
    examples: list = dataclasses.field(default_factory=list)
    per_sample: dict = dataclasses.field(default=None, repr=False)


def run(config: ml_collections.ConfigDict) -> PpoResult:
    t0 = time.perf_counter()
    pcfg = ppo_config(config)
    rcfg = RewardConfig(mode=config.reward.mode, pessimism=float(config.reward.pessimism), score=config.reward.score)
    data_cfg = cfglib.data_config(config.data)
    with tempfile.TemporaryDirectory(prefix="ava_ppo_") as tmp:
        base = config.workdir or tmp
        rm_dir = prepare_reward_model(config, base)
        policy_path, sft = prepare_policy(config, base)
        result = _run_ppo(config, pcfg, rcfg, data_cfg, rm_dir, policy_path, sft, t0)
    return result


def _run_ppo(config, pcfg, rcfg, data_cfg, rm_dir, policy_path, sft, t0) -> PpoResult:
    spec_cfg = ml_collections.ConfigDict(config.to_dict())
    spec_cfg.model.path = policy_path
    tqr, tokenizer = build_tqr(cfglib.backbone_spec(spec_cfg), cfglib.head_config(config.model), config.seed)
    policy = tqr.backbone
    splits, pad_id, _ = load_pair_splits(data_cfg, tokenizer)
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    lora_cfg = cfglib.lora_config(config)
    model = ActorCritic(policy, separate_critic=bool(config.ppo.separate_critic))
    if lora_cfg.enabled:  # the reference and the baseline: the same base weights without the adapters
        lora_run = LoraRun.adapt(model, lora_cfg, mesh, config.seed)
        initial, reference = lora_run.initial_backbone(), lora_run.reference()
    else:  # the reference and the baseline, never trained: a copy
        lora_run, initial = None, nnx.clone(policy)
        reference = initial
    shd.place_module(initial, mesh)  # as the trained model's parameters: its evaluations share their programs
    scfg = direct.task_sampling(data_cfg, config.sampling, tokenizer)
    e, p = config.eval, config.ppo
    with jax.set_mesh(mesh):
        rm = reward_model.load_trained(rm_dir, mesh)
        retokenizer = None
        if tokenizer_fingerprint(rm.tokenizer) != tokenizer_fingerprint(tokenizer):
            if rm.tokenizer is None or tokenizer is None:
                raise ConfigError(f"reward.path={rm_dir!r} and the policy ({policy_path!r}) disagree on their "
                                  "vocabulary and one of them has no tokenizer to re-encode text with")
            from ava_jax.rl.retokenize import Retokenizer
            retokenizer = Retokenizer(tokenizer, rm.tokenizer)
            log.info("ppo: the reward model has another tokenizer than the policy; its rewards are computed on "
                     "re-encoded text and mapped back to the policy's tokens (rl.retokenize)")
        check_reward_model(rm, rcfg)
        judge = direct.make_judge(data_cfg, tokenizer, e.judge, pad_id=pad_id, mesh=mesh)
        graphdef = nnx.graphdef(model)
        train_prompts = direct.heldout_prompts(splits["train"], len(splits["train"]))
        source = RolloutSource(graphdef, train_prompts, scfg, pcfg, rcfg, rm, reference, rows=p.rollout_batch,
                               minibatches=p.minibatches, epochs=p.epochs, seed=config.seed,
                               reward_scale=config.reward.scale, judge=judge, pad_id=pad_id,
                               retokenizer=retokenizer, mesh=mesh)
        t = train_section(config, source.steps_per_iteration, source.minibatch_rows)
        loss_fn = make_ppo_loss(pcfg, temperature=float(scfg.temperature) or 1.0, banned_ids=tuple(scfg.banned_ids))
        log.info("mesh: %s; policy %s, %d parameters (critic: %s); reward model %s (%s, %s rewards); %d train "
                 "prompts; %d iterations of %d rollouts", shd.describe(mesh), model.cfg.arch, param_count(model),
                 "separate" if p.separate_critic else "value head on the policy trunk", rm_dir, rm.objective.title,
                 rcfg.mode, len(train_prompts), p.iterations, p.rollout_batch)
        run_ = start_run(model, loss_fn, source, source.example(), mesh=mesh, optimizer=cfglib.optimizer_config(t),
                         loop=cfglib.loop_options(t), step_options=cfglib.step_options(t), workdir=config.workdir,
                         trainable=lora_run.trainable if lora_run else None)
        source.writer, source.graphdef, source.fixed = run_.writer, run_.graphdef, run_.fixed
        if e.split not in ("validation", "test"):
            raise ConfigError(f"eval.split={e.split!r} is not one of ('validation', 'test')")
        judging = direct.PolicyEvaluation(direct.heldout_prompts(splits[e.split], e.num_prompts), scfg, judge, pad_id,
                                          jax.random.key(e.seed), e.samples_per_prompt, e.batch_size, splits[e.split],
                                          data_cfg.pad_to_multiple)
        before, per0 = judging.evaluate(initial, initial)
        trajectory = [{"iteration": 0, **before}]

        def evaluate(s):
            judged, _ = judging.evaluate(run_.model(s), initial)
            it = int(jax.device_get(s.step)) // source.steps_per_iteration
            trajectory.append({"iteration": it, **judged})
            return {f"judge/{k}": v for k, v in judged.items()}

        state = run_.train(jax.random.key(config.seed + 1), evaluate if e.trajectory else None)
        trained = run_.model(state)
        after, per1 = judging.evaluate(trained, initial)
        after.update(judging.vs_initial(per1, per0, e.tie_threshold))
        run_.writer.write(int(state.step), {f"initial/{k}": v for k, v in before.items()})
        run_.writer.write(int(state.step), {f"final/{k}": v for k, v in after.items()})
        ckpt_dir = run_.checkpoint_dir
        run_.close()
    if trajectory[-1]["iteration"] != p.iterations:
        trajectory.append({"iteration": p.iterations, **after})
    extra = {"judge": judge.name if judge is not None else None, "reward_objective": rm.objective.name,
             "policy_start": policy_path, "sft": sft, "resumed_from_step": run_.resumed_from,
             "reward_model_accuracy": _rm_accuracy(rm_dir)}
    if lora_run:
        extra["lora"] = lora_run.summary(model)
    result = PpoResult(rm_dir, rcfg.mode, before, after, source.history, trajectory, ckpt_dir, "", 0.0, extra,
                       examples=direct._examples(per0, per1, tokenizer), per_sample={"initial": per0, "final": per1})
    if config.workdir and shd.is_primary():
        with open(os.path.join(config.workdir, "rollouts.jsonl"), "a", encoding="utf-8") as f:
            for m in source.history:
                f.write(json.dumps(m) + "\n")
        if config.export:
            out = os.path.join(config.workdir, "policy")
            result.policy_dir = (lora_run.export(trained, tokenizer, out, direct.export_policy, base=policy_path)
                                 if lora_run else direct.export_policy(trained, tokenizer, out))
    result.wall_s = time.perf_counter() - t0
    if config.workdir and shd.is_primary():
        write_summary(result, config)
    print(format_result(result, config.workdir))
    return result


def _rm_accuracy(run_dir: str):
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)["metrics"]["test"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return None


def timing(rollouts: list) -> dict:
    """Mean seconds per iteration of generation, policy forward, reference, reward model and update."""
    keys = ("time/generate", "time/policy_forward", "time/reference", "time/reward", "time/update_previous")
    out = {}
    for k in keys:
        # The first rollout compiles its passes; the update measured at the second one includes the
        # train step's compilation (it times the first iteration's updates).
        skip = 2 if k == "time/update_previous" else 1
        vals = [r[k] for r in rollouts[skip:] if k in r] or [r[k] for r in rollouts if k in r]
        if vals:
            out["update" if k == "time/update_previous" else k.split("/")[1]] = float(np.mean(vals))
    return out


def write_summary(r: PpoResult, config: ml_collections.ConfigDict) -> str:
    path = os.path.join(config.workdir, "summary.json")
    payload = {"pipeline": "ppo", "reward_model": r.reward_model, "mode": r.mode, "wall_s": r.wall_s,
               "initial": r.initial, "final": r.final, "timing": timing(r.rollouts), "trajectory": r.trajectory,
               "last_rollout": r.rollouts[-1] if r.rollouts else None, "checkpoint": r.checkpoint_dir,
               "policy": r.policy_dir, "extra": r.extra, "examples": r.examples, "config": config.to_dict()}
    os.makedirs(config.workdir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float, allow_nan=True)
    return path


def format_result(r: PpoResult, workdir: str = "") -> str:
    lines = [f"\nPPO ({r.mode} rewards from {r.extra['reward_objective']} at {r.reward_model}): finished in "
             f"{r.wall_s:.0f} s", "| | initial | final | change |", "|---|---|---|---|"]
    for name, key in (("gold reward of samples", "gold_reward"), ("KL to the initial policy (nats)", "kl_to_initial"),
                      ("initial LM log-lik per sample token", "initial_loglik_per_token")):
        if key in r.final:
            lines.append(f"| {name} | {r.initial[key]:.3f} | {r.final[key]:.3f} | {r.final[key] - r.initial[key]:+.3f} |")
    if "vs_initial_win" in r.final:
        f = r.final
        lines.append(f"win / tie / lose against the initial policy: {f['vs_initial_win']:.3f} / "
                     f"{f['vs_initial_tie']:.3f} / {f['vs_initial_lose']:.3f}")
    if r.rollouts:
        a, b = r.rollouts[0], r.rollouts[-1]
        lines.append(f"rollouts: proxy score {a['objective/scores']:.3f} -> {b['objective/scores']:.3f}, KL "
                     f"{a['objective/kl']:.3f} -> {b['objective/kl']:.3f}"
                     + (f", gold {a['objective/gold']:.3f} -> {b['objective/gold']:.3f}" if "objective/gold" in a else ""))
        tm = timing(r.rollouts)
        lines.append("per iteration: " + ", ".join(f"{k} {v:.2f} s" for k, v in tm.items()))
    lines.append(f"checkpoint: {r.checkpoint_dir or '(none: set --config.workdir=DIR)'}")
    if r.policy_dir:
        lines.append(f"policy (Hugging Face format): {r.policy_dir}")
    if workdir:
        lines.append(f"summary: {os.path.join(workdir, 'summary.json')}")
    return "\n".join(lines)
