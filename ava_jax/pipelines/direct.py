"""The `direct` pipeline (paper Tables 4 and 5): train the policy itself on preference pairs or
demonstrations (SFT, DPO, AVA-p, AVA-d), then judge it by its samples on held-out prompts.

AVA as a policy objective: the TQR sits on the policy, its own LM head gives Q (q_param=lm_logprobs),
a fresh reward head is trained jointly, and the fine-tuned LM is the policy that generates; the
weighting multiplies the reward head only, so Q stays causal.

    python -m ava_jax.main --config=configs/dpo.py            # stories task + TinyStories-260K
    python -m ava_jax.main --config=configs/sft.py:synthetic  # the synthetic MDP, a scratch policy

What a run does: builds the initial policy (a local checkpoint, or a scratch model for the synthetic
task), loads the pairs (`data.load`), computes the reference log-probs once (`train.reference`:
cached on disk, reused on resume; `reference.online=True` runs the frozen reference in every step
instead), trains with the objective's loss (`ava_jax.objectives`), and evaluates the initial and the
final policy on the same held-out prompts with the same sampling seeds: the gold reward of their
samples (the task's judge), the KL to the initial policy estimated on the policy's samples, win /
tie / lose against the initial policy with paired bootstrap intervals, the held-out log-likelihood
of the test split's chosen responses and the initial LM's log-likelihood of the samples (are they
still text?). It writes `<workdir>/summary.json` and exports the final policy to `<workdir>/policy`
as a Hugging Face directory (tokenizer included when the model has one).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from ava_jax import config as cfglib
from ava_jax import objectives
from ava_jax import sharding as shd
from ava_jax import xla
from ava_jax.data import make_dataset, make_iterator
from ava_jax.data import synthetic as syn
from ava_jax.data.load import DataConfig, load_demonstration_splits, load_pair_splits
from ava_jax.data.tokenization import PairArrays, SeqArrays
from ava_jax.errors import ConfigError
from ava_jax.eval.judges import StoriesJudge, SyntheticJudge
from ava_jax.eval.policy import response_logprobs, sample_responses, win_rate
from ava_jax.losses import AvaConfig
from ava_jax.models import param_count
from ava_jax.models.build import build_tqr
from ava_jax.objectives.policy import backbone_of
from ava_jax.sampling import SamplingConfig
from ava_jax.train.loop import IteratorBatches
from ava_jax.train.lora import LoraRun
from ava_jax.train.reference import (ReferenceCache, pair_sequence_logprobs, sequence_logprobs_of,
                                     tokenizer_fingerprint)
from ava_jax.train.setup import start_run
from ava_jax.train.step import metric_means

log = logging.getLogger(__name__)

KIND = "policy"
VARIANTS = ("", "tiny", "synthetic", "synthetic_tiny", "paper")


def default_config(objective: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The direct pipeline's config; `configs/{sft,dpo}.py` call this.

    Variants: "" (the stories task on the pretrained TinyStories-260K: CPU minutes), "tiny" (a few
    steps, for the tests), "synthetic" (the synthetic MDP; the initial policy is a freshly
    initialised scratch model, near uniform), "synthetic_tiny", "paper" (an accelerator: SmolLM2-135M
    or GPT-2 from --config.model.path, bf16, HH-RLHF pairs; judged by --config.eval.judge, a
    reward-model run trained on more data, when given).
    """
    variant = variant or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for objective {objective!r}; known: {VARIANTS}")
    objectives.get(objective, KIND)
    c = cfglib.base_config()
    c.pipeline = "direct"
    c.objective = objective
    c.model.scratch = cfglib.scratch_section()
    c.data = cfglib.data_section()
    c.data.format = "stories"
    c.data.pad_to_multiple = 16
    # source: "pairs", "demonstrations", or "afd" (Init-SFT pairs from the demonstrations' prompts:
    # chosen = a sample of the SFT policy at data.afd_policy, rejected = one of the initial policy);
    # "auto" picks pairs or demonstrations by the objective.
    c.data.source = "auto"
    c.data.afd_policy = ""
    # The frozen reference (DPO): the initial policy, or the checkpoint at reference.path. Its log-probs of the training pairs are computed
    # once and cached under cache_dir (default <workdir>/reference, or none without a workdir);
    # online=True runs it inside every train step instead.
    c.reference = ml_collections.ConfigDict(dict(path="", online=False, cache_dir=""))
    c.train = ml_collections.ConfigDict(dict(
        steps=200, batch_size=16, accum_steps=1, learning_rate=1e-4, warmup_steps=20, final_lr_fraction=0.1,
        weight_decay=0.0, grad_clip=1.0, log_every=10, eval_every=100, checkpoint_every=100,
        max_consecutive_bad_steps=5, progress=True))
    # Held-out judging: num_prompts test prompts, samples_per_prompt samples each from the initial and
    # the final policy (same prompts, same keys); tie_threshold is fixed before the run.
    # sample_from (AVA): "lm" samples the fine-tuned LM at sampling.temperature; "boltzmann" samples
    # pi(a|s) ∝ exp(beta Q(s, a)) with Q = alpha log pi_LM, i.e. the LM at temperature / (alpha beta).
    # The two coincide when alpha beta = 1 (the default).
    # split: whose prompts judge the policies ("validation" to choose settings, "test" to report);
    # trajectory: judge at every eval_every step too (gold reward against KL along training);
    # judge: a reward-model run directory that judges instead of the task's gold reward (user data).
    c.eval = ml_collections.ConfigDict(dict(num_prompts=128, samples_per_prompt=4, tie_threshold=0.0,
                                            batch_size=64, seed=1234, sample_from="lm", split="test",
                                            trajectory=False, judge=""))
    c.sampling.temperature = 1.0
    # The policy's Q must stay causal: the bidirectional weighting w_t multiplies the reward head only.
    c.model.weight_heads = "reward"
    c.export = True  # the final policy as a Hugging Face directory at <workdir>/policy
    # LoRA (models.lora; rank 0 = full fine-tuning): adapters on the backbone's projections, the base
    # weights fixed and shared with the reference; lora.export "merged", "adapters" or "both".
    c.lora = cfglib.lora_section()
    cfglib.apply_objective_defaults(c, KIND)
    c.workdir = f"runs/direct_{objective}" if variant in ("", "synthetic") else ""
    if variant == "paper":
        c.model.path = ""  # required: a local GPT-2 117M HF dir or the SmolLM2-135M GGUF
        c.model.dtype = "bfloat16"
        c.data.format = "hh"
        c.data.update(max_len=512, pad_to_multiple=64)
        c.sampling.update(max_new_tokens=128)
        c.train.update(steps=2000, batch_size=32, learning_rate=5e-7 if objective == "dpo" else 1e-6,
                       warmup_steps=100, eval_every=250, checkpoint_every=250)
        c.eval.update(num_prompts=256, samples_per_prompt=2, batch_size=32)
        c.workdir = f"runs/direct_{objective}_paper"
    elif variant in ("", "tiny"):
        c.data.stories.update(num_pairs=2048, num_eval_pairs=256)
        c.train.update(learning_rate=5e-4 if objective in ("dpo", "ava_p") else 1e-3)
        if objective == "ava_p":
            # Chosen on the stories validation prompts (2026-12-02, seed 0, 200 steps, lr 5e-4; gold
            # reward of 512 samples, initial 0.15): lambda 1 -> 0.39 (KL 240 nats: the TD term wrecks
            # the LM), 0.1 -> 2.31, 0.01 -> 2.45 (DPO: 2.37 at KL 28); rejected-likelihood floor -3 ->
            # 0.18, no rejected term -> 0.26 at KL 7, sigma_init 4 -> 0.38, lr 1e-4 -> 0.26. Every
            # setting that gains pays in text quality (docs/table4.md).
            c.loss.lam = 0.01
        if variant == "tiny":
            c.data.stories.update(num_pairs=32, num_eval_pairs=16, num_demos=32, num_eval_demos=16)
            c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, eval_every=0, checkpoint_every=0)
            c.eval.update(num_prompts=4, samples_per_prompt=2, batch_size=8)
    else:
        c.model.path = "scratch"
        c.data.format = "synthetic"
        c.data.synthetic.update(vocab_size=8, num_examples=4096, num_eval_examples=1024)
        c.train.update(steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=20, eval_every=100)
        c.eval.update(num_prompts=256, samples_per_prompt=4, batch_size=256)
        if variant == "synthetic_tiny":
            c.data.synthetic.update(num_examples=256, num_eval_examples=64)
            c.train.update(steps=6, batch_size=16, warmup_steps=1, log_every=2, eval_every=0, checkpoint_every=0)
            c.eval.update(num_prompts=8, samples_per_prompt=2, batch_size=16)
    return c


def load_reference(config: ml_collections.ConfigDict, initial, tokenizer):
    """The frozen reference: the initial policy, or the checkpoint at `reference.path`, which must
    share the policy's vocabulary and tokenizer (a ConfigError naming reference.path otherwise)."""
    if not config.reference.path:
        return initial
    from ava_jax.checkpoints.load import load_pretrained
    path = cfglib.resolve_path(config.reference.path)
    ref, ref_tok = load_pretrained(path, heads=cfglib.head_config(config.model), dtype=config.model.dtype,
                                   param_dtype=config.model.param_dtype, attention=config.model.attention)
    if ref.cfg.vocab_size != initial.cfg.vocab_size:
        raise ConfigError(f"reference.path={config.reference.path!r} has a vocabulary of {ref.cfg.vocab_size} "
                          f"tokens, the policy (model.path={config.model.path!r}) {initial.cfg.vocab_size}: "
                          "DPO compares their log-probs of the same token ids")
    if ref_tok is not None and tokenizer is not None and \
            tokenizer_fingerprint(ref_tok) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"reference.path={config.reference.path!r} has another tokenizer than the policy "
                          f"(model.path={config.model.path!r}): the same text gives other token ids")
    return ref


def task_sampling(d: DataConfig, s: ml_collections.ConfigDict, tokenizer) -> SamplingConfig:
    """How held-out answers are sampled: as the task's own data were (the stories task: exactly
    response_len tokens, BOS and EOS banned; the synthetic task: response_len tokens and EOS), or
    by `config.sampling` for user data."""
    if d.format == "stories":
        response_len = d.stories["test"].response_len
        from ava_jax.data import stories
        return SamplingConfig(max_new_tokens=response_len, temperature=float(s.temperature), top_k=s.top_k,
                              top_p=float(s.top_p), eos_id=None, pad_id=stories.EOS_ID,
                              prompt_bucket=stories.PROMPT_BUCKET, new_bucket=response_len,
                              banned_ids=(stories.BOS_ID, stories.EOS_ID))
    if d.format == "synthetic":
        response_len = d.synthetic["test"].response_len
        return SamplingConfig(max_new_tokens=response_len + 1, temperature=float(s.temperature), top_k=s.top_k,
                              top_p=float(s.top_p), eos_id=syn.EOS_ID, pad_id=syn.EOS_ID, prompt_bucket=8,
                              new_bucket=response_len + 1)
    return cfglib.sampling_config(s, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def _sampling_reading(config, heads, lcfg, scfg: SamplingConfig) -> SamplingConfig:
    """Checks that the policy's Q is causal and applies `eval.sample_from` (see default_config)."""
    if heads.reward_weighting != "none" and heads.weight_heads == "both":
        raise ConfigError("model.weight_heads='both' multiplies Q by the bidirectional weighting w_t, so Q(s_t, .) "
                          "depends on later tokens and no policy can be sampled from it; the direct pipeline "
                          "needs model.weight_heads='reward' (or model.reward_weighting='none')")
    how = config.eval.sample_from
    if how == "lm":
        return scfg
    if how != "boltzmann":
        raise ConfigError(f"eval.sample_from={how!r} is not one of ('lm', 'boltzmann')")
    if not isinstance(lcfg, AvaConfig) or heads.q_param != "lm_logprobs":
        raise ConfigError("eval.sample_from='boltzmann' needs an AVA objective with model.q_param='lm_logprobs' "
                          "(Q = alpha log pi_LM)")
    return dataclasses.replace(scfg, temperature=scfg.temperature / (heads.alpha * lcfg.beta))


def make_judge(d: DataConfig, tokenizer, judge_dir: str = "", *, pad_id: int = 0, mesh=None):
    """The gold judge: the reward-model run at `judge_dir` (`eval.judge`) when given, else the task's
    own (synthetic true reward, stories word rule), else None (user data without a judge)."""
    if judge_dir:
        from ava_jax.eval.judges import RewardModelJudge
        from ava_jax.pipelines import reward_model
        trained = reward_model.load_trained(judge_dir, mesh)
        if tokenizer_fingerprint(trained.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"eval.judge={judge_dir!r} was trained with another tokenizer than the policy; it "
                              "would score other token ids")
        return RewardModelJudge(trained, pad_id=pad_id)
    if d.format == "synthetic":
        return SyntheticJudge(syn.make_task(d.synthetic["train"]))
    if d.format == "stories":
        return StoriesJudge(tokenizer)
    return None


def heldout_prompts(arrays, n: int) -> list[list[int]]:
    """The first n distinct prompts of a split (token lists, BOS included), in row order."""
    seen, out = set(), []
    seqs = arrays.chosen if isinstance(arrays, PairArrays) else arrays
    for tokens, plen in zip(seqs.tokens, seqs.prompt_len_N):
        p = tuple(int(t) for t in tokens[:plen])
        if p not in seen:
            seen.add(p)
            out.append(list(p))
        if len(out) == n:
            break
    return out


@dataclasses.dataclass
class PolicyEvaluation:
    """Everything the initial-vs-final comparison needs; `evaluate` fills it for one policy."""

    prompts: list
    sampling: SamplingConfig
    judge: object
    pad_id: int
    key: jax.Array
    per_prompt: int
    batch_size: int
    test_arrays: object
    pad_to_multiple: int | None

    def evaluate(self, model, initial_backbone) -> tuple[dict, dict]:
        """(metrics, per-sample arrays) of one policy against the initial one."""
        backbone = getattr(model, "backbone", model)
        samples = sample_responses(backbone, self.prompts, self.key, self.sampling, self.per_prompt, self.batch_size)
        banned = self.sampling.banned_ids
        lp = response_logprobs(backbone, samples.prompts, samples.responses, pad_id=self.pad_id, banned_ids=banned,
                               batch_size=self.batch_size)
        # The initial policy judged against itself (the evaluation before training): the same pass.
        lp0 = lp if backbone is initial_backbone else response_logprobs(
            initial_backbone, samples.prompts, samples.responses, pad_id=self.pad_id, banned_ids=banned,
            batch_size=self.batch_size)
        lengths = np.asarray([max(len(r), 1) for r in samples.responses], np.float64)
        m = {"kl_to_initial": float(np.mean(lp - lp0)),  # E_pi[log pi - log pi_0], on the policy's samples
             "initial_loglik_per_token": float(np.mean(lp0 / lengths)),
             "response_tokens": float(np.mean(lengths))}
        per = {"logp": lp, "logp_initial": lp0}
        if self.judge is not None:
            gold = self.judge(samples.prompts, samples.responses)
            m.update(gold_reward=float(gold.mean()), gold_reward_sd=float(gold.std(ddof=1)) if gold.size > 1 else 0.0)
            per["gold"] = gold
        # The LM alone: a PPO policy (an actor-critic) and its initial copy (a Transformer) share programs.
        graphdef, params = nnx.split(backbone, nnx.Param)
        if isinstance(self.test_arrays, PairArrays):  # the chosen responses
            c, _, _ = pair_sequence_logprobs(graphdef, params, self.test_arrays, batch_size=self.batch_size,
                                             pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple)
            seqs = self.test_arrays.chosen
        else:  # the demonstrations
            c = sequence_logprobs_of(graphdef, params, self.test_arrays, batch_size=self.batch_size,
                                     pad_id=self.pad_id, pad_to_multiple=self.pad_to_multiple)
            seqs = self.test_arrays
        n_tok = seqs.len_N - seqs.prompt_len_N
        m["heldout_loglik_chosen"] = float(c.sum() / max(n_tok.sum(), 1))
        per["samples"] = samples
        return m, per

    def vs_initial(self, per_final: dict, per_initial: dict, tie_threshold: float) -> dict:
        """Win / tie / lose of the final policy's samples against the initial one's (paired by prompt
        and key, bootstrapped over prompts), as `vs_initial_*` metrics; {} without a judge."""
        if "gold" not in per_final:
            return {}
        groups = np.repeat(np.arange(len(self.prompts)), self.per_prompt)
        return win_rate(per_final["gold"], per_initial["gold"], tau=float(tie_threshold),
                        groups_N=groups).as_dict("vs_initial_")


def run(config: ml_collections.ConfigDict):
    t0 = time.perf_counter()
    objective, lcfg = cfglib.objective_config(config, KIND)
    data_cfg = cfglib.data_config(config.data)
    heads = cfglib.head_config(config.model)
    lora_cfg = cfglib.lora_config(config)
    model, tokenizer = build_tqr(cfglib.backbone_spec(config), heads, config.seed)
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    lora_run = LoraRun.adapt(model, lora_cfg, mesh, config.seed) if lora_cfg.enabled else None
    # The baseline (and default reference), never trained: a copy of the weights, or with LoRA the
    # same base weights read without the adapters.
    initial = lora_run.initial(model) if lora_run else nnx.clone(model)
    shd.place_module(initial, mesh)  # as the trained model's parameters: its evaluations share their programs
    reference = load_reference(config, initial, tokenizer)
    scfg = task_sampling(data_cfg, config.sampling, tokenizer)
    scfg = _sampling_reading(config, heads, lcfg, scfg)
    source = _data_source(config, objective)
    if source == "pairs":
        splits, pad_id, extra = load_pair_splits(data_cfg, tokenizer)
    else:
        splits, pad_id, extra = load_demonstration_splits(data_cfg, tokenizer)
        if source == "afd":
            with jax.set_mesh(mesh):
                splits, extra["afd"] = _afd_splits(config, splits, initial, tokenizer, scfg)
    wrap = _as_pair_batch if isinstance(splits["train"], SeqArrays) else None
    t, e = config.train, config.eval
    pad_multiple = data_cfg.pad_to_multiple
    needs_reference = "reference" in objective.frozen and not getattr(lcfg, "reference_free", False)
    with jax.set_mesh(mesh):
        log.info("mesh: %s; %s policy, %d parameters; objective %s; %d train %s", shd.describe(mesh),
                 model.cfg.arch, param_count(model), objective.name, len(splits["train"]),
                 "demonstrations" if wrap else "pairs")
        refs, frozen, views = {}, None, None
        if needs_reference and config.reference.online and lora_run and not config.reference.path:
            views = lora_run.views("reference")  # the base weights the step already holds
        elif needs_reference and config.reference.online:
            frozen = {"reference": reference}
        elif needs_reference:
            cache_dir = config.reference.cache_dir or (os.path.join(config.workdir, "reference")
                                                       if config.workdir else "")
            cache = ReferenceCache(cache_dir, batch_size=e.batch_size, pad_id=pad_id, pad_to_multiple=pad_multiple)
            # The LM alone: its log-probs are all the reference gives DPO, so the TQR's heads (drawn
            # from the run's seed) stay out of the cache key, and every seed's run from one
            # checkpoint reads the same entry.
            g0, p0 = nnx.split(backbone_of(reference), nnx.Param)
            settings = {"max_len": data_cfg.max_len, "format": data_cfg.format}
            for split in ("train", "validation"):
                refs[split] = cache.load_or_compute(g0, p0, splits[split], tokenizer, settings)
            extra["reference_cache"] = {"dir": cache_dir, "computed": refs["train"].computed,
                                        "forward_batches": cache.forward_passes}
        attach = refs["train"].attach if "train" in refs else wrap
        batches = IteratorBatches(make_iterator(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                                                pad_to_multiple=pad_multiple, shard=shd.process_shard()), transform=attach)
        example = make_dataset(splits["train"], t.batch_size, config.seed, pad_id=pad_id,
                               pad_to_multiple=pad_multiple, shard=shd.process_shard())[0]
        example = attach(example) if attach else example
        loss_fn = objective.loss_fn(lcfg)
        run_ = start_run(model, loss_fn, batches, example, mesh=mesh, optimizer=cfglib.optimizer_config(t),
                         loop=cfglib.loop_options(t), step_options=cfglib.step_options(t),
                         workdir=config.workdir, best_metric="loss", best_mode="min", frozen=frozen,
                         trainable=lora_run.trainable if lora_run else None, views=views)
        if lora_run:
            extra["lora"] = lora_run.summary(model)
        val_ref = refs.get("validation")
        val_loss = _validation_loss(run_.graphdef, loss_fn, splits["validation"],
                                    val_ref.attach if val_ref is not None else wrap, run_.step.frozen, e.batch_size,
                                    pad_id, pad_multiple, fixed=run_.fixed)
        if e.split not in ("validation", "test"):
            raise ConfigError(f"eval.split={e.split!r} is not one of ('validation', 'test')")
        judging = PolicyEvaluation(heldout_prompts(splits[e.split], e.num_prompts), scfg,
                                   make_judge(data_cfg, tokenizer, e.judge, pad_id=pad_id, mesh=mesh), pad_id,
                                   jax.random.key(e.seed),
                                   e.samples_per_prompt, e.batch_size, splits[e.split], pad_multiple)
        extra["judge"] = judging.judge.name if judging.judge is not None else None
        before, per0 = judging.evaluate(initial, initial.backbone)
        trajectory = [{"step": 0, **before}]

        def evaluate(s):
            metrics = val_loss(s.params)
            if e.trajectory:  # the held-out judging too, so gold reward can be plotted against KL
                judged, _ = judging.evaluate(run_.model(s), initial.backbone)
                trajectory.append({"step": int(jax.device_get(s.step)), **judged})
                metrics.update({f"judge/{k}": v for k, v in judged.items()})
            return metrics

        state = run_.train(jax.random.key(config.seed), evaluate)
        trained = run_.model(state)
        after, per1 = judging.evaluate(trained, initial.backbone)
        after.update(judging.vs_initial(per1, per0, e.tie_threshold))
        run_.writer.write(int(state.step), {f"initial/{k}": v for k, v in before.items()})
        run_.writer.write(int(state.step), {f"final/{k}": v for k, v in after.items()})
        ckpt_dir = run_.checkpoint_dir
        run_.close()
    if not e.trajectory or trajectory[-1]["step"] != int(state.step):
        trajectory.append({"step": int(state.step), **after})
    result = DirectResult(objective.name, before, after, ckpt_dir, "", time.perf_counter() - t0,
                          {k: v for k, v in extra.items() if not k.endswith("_prefs")},
                          examples=_examples(per0, per1, tokenizer), trajectory=trajectory)
    if config.workdir and config.export and shd.is_primary():
        out = os.path.join(config.workdir, "policy")
        result.policy_dir = (lora_run.export(trained, tokenizer, out, export_policy, base=config.model.path)
                             if lora_run else export_policy(trained, tokenizer, out))
    result.wall_s = time.perf_counter() - t0
    if config.workdir and shd.is_primary():
        write_summary(result, config)
    print(format_result(result, config.workdir))
    result.params, result.graphdef = run_.full_params(state), run_.graphdef
    result.per_sample = {"initial": per0, "final": per1}
    return result


def _as_pair_batch(batch: dict) -> dict:
    """A demonstration batch as the objectives read it: the sequences as the chosen side."""
    return {"chosen": {k: batch[k] for k in ("tokens_BxT", "mask_BxT", "prompt_len_B")}, "index_B": batch["index_B"]}


def _data_source(config, objective) -> str:
    """`data.source`: "auto" is "pairs" for pair objectives and "demonstrations" for the others."""
    source = config.data.source
    if source == "auto":
        return "pairs" if objective.data == "pairs" else "demonstrations"
    if source not in ("pairs", "demonstrations", "afd"):
        raise ConfigError(f"data.source={source!r} is not one of ('auto', 'pairs', 'demonstrations', 'afd')")
    if source == "demonstrations" and objective.data == "pairs":
        raise ConfigError(f"objective {objective.name!r} learns from pairs: data.source='demonstrations' has none; "
                          "use data.source='afd' (pairs built from demonstrations) or 'pairs'")
    if source == "afd" and not config.data.afd_policy:
        raise ConfigError("data.source='afd' needs data.afd_policy=DIR: the SFT policy whose samples are the chosen "
                          "responses (e.g. an SFT run's <workdir>/policy)")
    return source


def _afd_splits(config, demos: dict, initial, tokenizer, scfg):
    """{split: Init-SFT PairArrays} for train and validation (test keeps the demonstrations: only its
    prompts and held-out likelihood are read), plus a description for summary.json."""
    from ava_jax.checkpoints.load import load_pretrained
    from ava_jax.data.afd import afd_pairs
    path = cfglib.resolve_path(config.data.afd_policy)
    sft, sft_tok = load_pretrained(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                   attention=config.model.attention)
    if sft.cfg.vocab_size != initial.cfg.vocab_size or (
            sft_tok is not None and tokenizer is not None
            and tokenizer_fingerprint(sft_tok) != tokenizer_fingerprint(tokenizer)):
        raise ConfigError(f"data.afd_policy={config.data.afd_policy!r} has another vocabulary or tokenizer than the "
                          f"policy (model.path={config.model.path!r})")
    key = jax.random.key(config.seed + 7919)
    out = {name: afd_pairs(demos[name], sft.backbone, initial.backbone, scfg, jax.random.fold_in(key, i),
                           batch_size=config.eval.batch_size)
           for i, name in enumerate(("train", "validation"))}
    out["test"] = demos["test"]
    return out, {"sft_policy": path, "pairs": {k: len(v) for k, v in out.items() if k != "test"}}


def _validation_loss(graphdef, loss_fn, arrays, transform, frozen, batch_size, pad_id, pad_multiple, fixed=None):
    """`fn(params) -> {metric: mean}` of the objective on the validation pairs (the loop's evaluation);
    fixed: the parameters the state does not train (LoRA's base weights)."""
    @xla.jit
    def one(params, frozen_params, fixed, batch):  # the frozen models' parameters are arguments, as in the step
        model = nnx.merge(graphdef, params, *(() if fixed is None else (fixed,)))
        return loss_fn(model, batch, None, frozen.merge(frozen_params, fixed))[1]

    ds = make_dataset(arrays, batch_size, 0, pad_id=pad_id, pad_to_multiple=pad_multiple, shuffle=False,
                      num_epochs=1, drop_remainder=True)

    def fn(params):
        totals = {}
        for batch in ds:
            batch = transform(batch) if transform is not None else batch
            for k, (s, c) in jax.device_get(one(params, frozen.params, fixed, batch)).items():
                a, b = totals.get(k, (0.0, 0.0))
                totals[k] = (a + float(s), b + float(c))
        return metric_means(totals) if totals else {}
    return fn


def _examples(per0, per1, tokenizer, n: int = 3) -> list[dict]:
    """A few held-out prompts with the initial and the final policy's answers (decoded when possible)."""
    out = []
    s0, s1 = per0["samples"], per1["samples"]
    step = s0.per_prompt
    for i in range(0, min(n * step, len(s0.prompts)), step):
        def text(ids):
            return tokenizer.decode(list(ids)) if tokenizer is not None else " ".join(map(str, ids))
        row = {"prompt": text(s0.prompts[i]), "initial": text(s0.responses[i]), "final": text(s1.responses[i])}
        if "gold" in per0:
            row.update(initial_gold=float(per0["gold"][i]), final_gold=float(per1["gold"][i]))
        out.append(row)
    return out


def export_policy(model, tokenizer, out_dir: str) -> str:
    """The policy's LM as a Hugging Face directory (transformers loads it; tokenizer files included
    when the model has a tokenizer). The TQR heads have no Hugging Face counterpart and are not written."""
    from ava_jax.checkpoints.load import save_pretrained
    save_pretrained(model, tokenizer, out_dir)
    log.info("exported the policy to %s", out_dir)
    return out_dir


@dataclasses.dataclass
class DirectResult:
    objective: str
    initial: dict  # metrics of the initial policy
    final: dict  # metrics of the trained policy (+ win / tie / lose against the initial one)
    checkpoint_dir: str | None
    policy_dir: str
    wall_s: float
    extra: dict
    examples: list = dataclasses.field(default_factory=list)
    # [{"step", gold_reward, kl_to_initial, ...}]: the initial policy, every periodic evaluation when
    # eval.trajectory is set, and the final policy
    trajectory: list = dataclasses.field(default_factory=list)
    params: object = dataclasses.field(default=None, repr=False)
    graphdef: object = dataclasses.field(default=None, repr=False)
    # {"initial", "final"} -> {"gold", "logp", "logp_initial", "samples"}: the held-out samples, paired
    per_sample: dict = dataclasses.field(default=None, repr=False)


def write_summary(r: DirectResult, config: ml_collections.ConfigDict) -> str:
    """`<workdir>/summary.json`: the initial and final metrics, machine-readable, with the config."""
    path = os.path.join(config.workdir, "summary.json")
    payload = {"pipeline": "direct", "objective": r.objective, "step": int(config.train.steps), "wall_s": r.wall_s,
               "initial": r.initial, "final": r.final, "checkpoint": r.checkpoint_dir, "policy": r.policy_dir,
               "extra": r.extra, "examples": r.examples, "trajectory": r.trajectory,
               "config": config.to_dict()}
    os.makedirs(config.workdir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float, allow_nan=True)
    return path


def format_result(r: DirectResult, workdir: str = "") -> str:
    rows = [("gold reward of samples", "gold_reward", "{:.3f}"), ("KL to the initial policy (nats)", "kl_to_initial",
            "{:.3f}"), ("initial LM log-lik per sample token", "initial_loglik_per_token", "{:.3f}"),
            ("held-out log-lik of chosen responses (per token)", "heldout_loglik_chosen", "{:.3f}")]
    lines = [f"\n{r.objective} (direct): finished in {r.wall_s:.0f} s", "| | initial | final | change |",
             "|---|---|---|---|"]
    for name, key, fmt in rows:
        if key in r.final:
            a, b = r.initial[key], r.final[key]
            lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b - a:+.3f} |")
    if "vs_initial_win" in r.final:
        f = r.final
        lines.append(f"win / tie / lose against the initial policy: {f['vs_initial_win']:.3f} / "
                     f"{f['vs_initial_tie']:.3f} / {f['vs_initial_lose']:.3f} (win 95% CI "
                     f"[{f['vs_initial_win_ci_low']:.3f}, {f['vs_initial_win_ci_high']:.3f}])")
    lines.append(f"checkpoint: {r.checkpoint_dir or '(none: set --config.workdir=DIR)'}")
    if r.policy_dir:
        lines.append(f"policy (Hugging Face format): {r.policy_dir}")
    if workdir:
        lines.append(f"summary: {os.path.join(workdir, 'summary.json')}")
    return "\n".join(lines)

