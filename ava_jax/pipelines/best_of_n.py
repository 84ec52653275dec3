"""The `best_of_n` pipeline (paper Table 2): draw K samples per held-out prompt from a policy once,
score them with each reward model given (finished reward-model run directories: AVA-p, BT, PT...),
and give the whole Best-of-N curve N = 1..K from that one pool (`eval.best_of_n`): gold and proxy
reward against the KL bound log N - (N-1)/N, and win / tie / lose between the choices of every two
reward models at each N.

    python -m ava_jax.main --config=configs/best_of_n.py \\
        --config.best_of_n.reward_models=runs/ava_p,runs/bt,runs/pt

Every reward model must share the policy's tokenizer (the samples are scored as token ids); one that
does not is an error naming it. Writes `<workdir>/best_of_n.json`, `best_of_n.png` and `summary.json`.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time

import jax
import ml_collections

from ava_jax import config as cfglib
from ava_jax import sharding as shd
from ava_jax.data.load import load_pair_splits
from ava_jax.errors import ConfigError
from ava_jax.eval.best_of_n import best_of_n_curve, head_to_head
from ava_jax.eval.judges import score_sequences
from ava_jax.eval.policy import sample_responses
from ava_jax.models.build import build_tqr
from ava_jax.pipelines import reward_model
from ava_jax.pipelines.direct import heldout_prompts, make_judge, task_sampling
from ava_jax.train.reference import tokenizer_fingerprint

log = logging.getLogger(__name__)

VARIANTS = ("", "tiny", "synthetic", "paper")


def default_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Variants: "" (stories prompts, the bundled TinyStories-260K as the policy), "tiny" (the
    tests), "synthetic" (the synthetic MDP; give the policy with model.path, e.g. a direct run's
    <workdir>/policy), "paper" (an accelerator: the SFT'd SmolLM2-135M or GPT-2 policy from
    --config.model.path on HH-RLHF prompts, bf16; needs best_of_n.judge, a reward-model run trained on
    more data, as the gold judge)."""
    variant = variant or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for best_of_n; known: {VARIANTS}")
    c = cfglib.base_config()
    c.pipeline = "best_of_n"
    c.model.scratch = cfglib.scratch_section()
    c.data = cfglib.data_section()
    c.data.format = "stories"
    c.data.stories.update(num_pairs=64, num_eval_pairs=256)  # only the test split's prompts are used
    c.sampling.temperature = 1.0
    # reward_models: comma-separated reward-model run directories; K samples per prompt; curves at
    # every N in 1..K; head-to-head ties when |gold difference| <= tie_threshold.
    # ns: the N values to report ("" = every N in 1..K), each at most K.
    c.best_of_n = ml_collections.ConfigDict(dict(reward_models="", num_prompts=128, samples_per_prompt=16, ns="",
                                                 tie_threshold=0.0, batch_size=64, seed=1234, judge=""))
    c.workdir = "runs/best_of_n" if variant in ("", "synthetic") else ""
    if variant == "tiny":
        c.data.stories.update(num_pairs=16, num_eval_pairs=16)
        c.best_of_n.update(num_prompts=3, samples_per_prompt=4, batch_size=12)
    elif variant == "paper":
        c.model.path, c.model.dtype = "", "bfloat16"
        c.data.format = "hh"
        c.data.update(max_len=512)
        c.sampling.update(max_new_tokens=128)
        c.best_of_n.update(num_prompts=256, samples_per_prompt=16, batch_size=64)
        c.workdir = "runs/best_of_n_paper"
    elif variant == "synthetic":
        c.data.format = "synthetic"
        c.data.synthetic.update(vocab_size=8, num_examples=64, num_eval_examples=1024)
        c.best_of_n.update(num_prompts=256, batch_size=256)
    return c


def _reward_model_dirs(b: ml_collections.ConfigDict) -> list[str]:
    dirs = [d.strip() for d in b.reward_models.split(",") if d.strip()]
    if not dirs:
        raise ConfigError("best_of_n.reward_models is empty: give reward-model run directories, e.g. "
                          "--config.best_of_n.reward_models=runs/ava_p,runs/bt")
    return dirs


def _ns(b: ml_collections.ConfigDict) -> list[int]:
    k = b.samples_per_prompt
    if k < 1:
        raise ConfigError(f"best_of_n.samples_per_prompt={k} must be >= 1")
    try:
        ns = [int(x) for x in str(b.ns).split(",") if x.strip()] or list(range(1, k + 1))
    except ValueError:
        raise ConfigError(f"best_of_n.ns={b.ns!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    bad = [n for n in ns if not 1 <= n <= k]
    if bad:
        raise ConfigError(f"best_of_n.ns={b.ns!r}: N={bad[0]} needs at least N samples per prompt, but "
                          f"best_of_n.samples_per_prompt={k} (K must be >= N)")
    return sorted(set(ns))


def run(config: ml_collections.ConfigDict) -> dict:
    t0 = time.perf_counter()
    b = config.best_of_n
    dirs = _reward_model_dirs(b)
    k = b.samples_per_prompt
    _ns(b)  # a bad N fails before any sampling
    data_cfg = cfglib.data_config(config.data)
    policy, tokenizer = build_tqr(cfglib.backbone_spec(config), cfglib.head_config(config.model), config.seed)
    splits, pad_id, _ = load_pair_splits(data_cfg, tokenizer)
    mesh = shd.make_mesh(**vars(cfglib.mesh_config(config.mesh)))
    rms = {}
    for d in dirs:
        rm = reward_model.load_trained(d, mesh)
        if tokenizer_fingerprint(rm.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"best_of_n.reward_models: {d!r} was trained with another tokenizer than the "
                              f"policy (model.path={config.model.path!r}); it would score other token ids. "
                              "Train it on the policy's tokenizer")
        if "reward_model" not in rm.objective.kinds:
            raise ConfigError(f"best_of_n.reward_models: {d!r} is not a reward model")
        rms[f"{rm.objective.title} ({os.path.basename(os.path.normpath(d))})"] = rm
    scfg = task_sampling(data_cfg, config.sampling, tokenizer)
    judge = make_judge(data_cfg, tokenizer, b.judge, pad_id=pad_id, mesh=mesh)
    if judge is None:
        raise ConfigError(f"data.format={data_cfg.format!r} has no gold judge; give best_of_n.judge=DIR (a "
                          "reward-model run trained on more data) or use the synthetic or the stories task")
    prompts = heldout_prompts(splits["test"], b.num_prompts)
    log.info("best_of_n: %d prompts x %d samples; reward models: %s", len(prompts), k, list(rms))
    with jax.set_mesh(mesh):
        samples = sample_responses(policy.backbone, prompts, jax.random.key(b.seed), scfg, k, b.batch_size)
        gold = judge(samples.prompts, samples.responses).reshape(len(prompts), k)
        proxies = {name: score_sequences(rm, samples.prompts, samples.responses, pad_id=pad_id,
                                       batch_size=b.batch_size).reshape(len(prompts), k)
                   for name, rm in rms.items()}
    ns = _ns(b)
    curves = {name: best_of_n_curve(gold, proxy, ns) for name, proxy in proxies.items()}
    duels = {f"{a} vs {c}": head_to_head(gold, proxies[a], proxies[c], ns, tau=float(b.tie_threshold))
             for a, c in itertools.combinations(proxies, 2)}
    payload = {"date": time.strftime("%Y-%m-%d"), "policy": config.model.path, "reward_models": dict(zip(rms, dirs)),
               "num_prompts": len(prompts), "samples_per_prompt": k, "judge": judge.name,
               "tie_threshold": float(b.tie_threshold), "curves": curves, "head_to_head": duels,
               "wall_s": time.perf_counter() - t0}
    if config.workdir and shd.is_primary():
        os.makedirs(config.workdir, exist_ok=True)
        with open(os.path.join(config.workdir, "best_of_n.json"), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        plot_curves(payload, os.path.join(config.workdir, "best_of_n.png"))
        with open(os.path.join(config.workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"pipeline": "best_of_n", **payload, "config": config.to_dict()}, f, indent=1, default=float)
    print(format_result(payload, config.workdir))
    return payload


def plot_curves(payload: dict, path: str) -> str:
    """Gold reward (with standard errors) and proxy reward against the KL bound, one line per reward model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_gold, ax_proxy = fig.subplots(1, 2)
    for name, c in payload["curves"].items():
        ax_gold.errorbar(c["kl_bound"], c["gold"], yerr=c["gold_se"], marker="o", ms=3, capsize=2, label=name)
        ax_proxy.plot(c["kl_bound"], c["proxy"], marker="o", ms=3, label=name)
    ax_gold.set(xlabel="KL bound log N - (N-1)/N (nats)", ylabel=f"gold reward ({payload['judge']})",
                title=f"Best-of-N, N = 1..{payload['samples_per_prompt']}, {payload['num_prompts']} prompts")
    ax_proxy.set(xlabel="KL bound log N - (N-1)/N (nats)", ylabel="proxy reward (each model's own scale)",
                 title="what each reward model believes")
    for ax in (ax_gold, ax_proxy):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def format_result(payload: dict, workdir: str = "") -> str:
    ns = payload["curves"][next(iter(payload["curves"]))]["n"]
    show = [n for n in ns if n in (1, 2, 4, 8, 16, 32, 64) or n == ns[-1]]
    col = {n: i for i, n in enumerate(ns)}
    lines = [f"\nBest-of-N on {payload['num_prompts']} prompts x {payload['samples_per_prompt']} samples "
             f"({payload['judge']}), {payload['wall_s']:.0f} s",
             "| reward model | " + " | ".join(f"N={n}" for n in show) + " |", "|---|" + "---|" * len(show)]
    for name, c in payload["curves"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['gold'][col[n]]:.3f}" for n in show) + " |")
    for name, h in payload["head_to_head"].items():
        n = show[-1]
        i = col[n]
        lines.append(f"{name} at N={n}: win / tie / lose {h['win'][i]:.3f} / {h['tie'][i]:.3f} / {h['lose'][i]:.3f}")
    if workdir:
        lines.append(f"curves: {os.path.join(workdir, 'best_of_n.png')}; summary: {os.path.join(workdir, 'summary.json')}")
    return "\n".join(lines)
