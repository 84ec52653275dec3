"""Paper Table 3: PPO with AVA-p's dense per-token rewards against sparse rewards (AVA-p's own
sequence score, Bradley-Terry, the Preference Transformer), and the SFT policy they all start from.

  python launch/table3.py --out docs/table3.md                    # synthetic + stories, 3 seeds each
  python launch/table3.py --datasets synthetic --seeds 0 --tiny --out /tmp/t3.md   # a smoke run

Per (dataset, seed): train the three reward models (`reward_model` pipeline, the task's default
config, the seed setting heads and data order) and the SFT policy (`direct` pipeline on the task's
demonstrations), then four `ppo` runs from that SFT policy, anchored by KL to it: AVA-p dense,
AVA-p sparse (the same reward model's summed score at the last token: the ablation that isolates
density, since with gamma = lambda = 1 both give the same return), BT sparse, PT sparse, and beyond
the paper AVA-p dense with pessimism (mu_t - k sigma_t, AVA's own uncertainty), with the gap
between the proxy's gain and the gold reward's gain (both in standard deviations) that shows
overoptimisation. Every
policy answers the same held-out prompts with the same keys; the table gives gold reward, KL to the
SFT policy and the likelihoods that show what the gain cost, and PPO + AVA-p dense's win / tie / lose
against each other row, judged by the gold reward with the paired bootstrap of `eval.policy`.
Next to it: gold reward against KL along training for every method (PNG). The paper's Table 3
figures are not in this repository's sources; the reading decides its claim from ours.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import tempfile
import time

import numpy as np

from ava_jax.eval.policy import win_rate
from ava_jax.pipelines import ppo, reward_model, table4, tables
from ava_jax.pipelines.tables import mean_sd

log = logging.getLogger(__name__)

# method -> (reward objective, reward mode, pessimism k: mu - k sigma)
PESSIMISM = 1.0
METHODS = {"PPO + AVA-p dense": ("ava_p", "dense", 0.0), "PPO + AVA-p sparse": ("ava_p", "sparse", 0.0),
           "PPO + BT": ("bt", "sparse", 0.0), "PPO + PT": ("pt", "sparse", 0.0),
           f"PPO + AVA-p dense, pessimism {PESSIMISM:g}": ("ava_p", "dense", PESSIMISM)}
FIRST = "PPO + AVA-p dense"
CLAIM = "PPO with AVA-p's dense per-token rewards outperforms PPO with sparse rewards (BT, PT) and the SFT policy"
TITLE = "Table 3: PPO with AVA-p's dense rewards against sparse rewards"
VARIANTS = {"synthetic": "synthetic", "stories": ""}
TINY = {"synthetic": "synthetic_tiny", "stories": "tiny"}
EVAL_POINTS = 4  # held-out judging points along training (for the gold-against-KL figure)


def _record(r) -> dict:
    """What the table keeps of one PPO run. Overoptimisation: the proxy's gain over the rollouts (in
    units of the first rollout's sd, as the pipeline scales it) against the gold reward's gain of
    the held-out samples in units of the initial samples' gold sd; their difference is the gap."""
    g0 = r.per_sample["initial"]["gold"]
    gold_gain = (r.final["gold_reward"] - r.initial["gold_reward"]) / max(float(np.std(g0)), 1e-12)
    proxy_gain = r.rollouts[-1]["objective/scores"] - r.rollouts[0]["objective/scores"] if r.rollouts else np.nan
    r.final.update(proxy_gain_sd=float(proxy_gain), gold_gain_sd=float(gold_gain),
                   overoptimisation_gap_sd=float(proxy_gain - gold_gain))
    return {"initial": r.initial, "final": r.final, "trajectory": r.trajectory, "wall_s": r.wall_s,
            "gold": r.per_sample["final"]["gold"].tolist(), "gold_initial": r.per_sample["initial"]["gold"].tolist(),
            "examples": r.examples[:2], "rollouts": [r.rollouts[0], r.rollouts[-1]] if r.rollouts else [],
            "reward_model_accuracy": r.extra.get("reward_model_accuracy")}


def seed_runs(dataset: str, seed: int, *, tiny: bool) -> dict:
    """{method: record} for one seed, plus the SFT row (the PPO runs' common initial policy)."""
    variant = (TINY if tiny else VARIANTS)[dataset]
    out = {}
    with tempfile.TemporaryDirectory(prefix="ava_table3_") as tmp:
        rms = {}
        for objective in sorted({o for o, _, _ in METHODS.values()}):
            c = reward_model.default_config(objective, variant)
            c.seed, c.workdir, c.train.progress = seed, os.path.join(tmp, f"rm_{objective}"), False
            log.info("table3: %s / %s reward model / seed %d", dataset, objective, seed)
            reward_model.run(c)
            rms[objective] = c.workdir
        base = ppo.default_config(variant)
        base.seed, base.train.progress = seed, False
        policy_path, _ = ppo.prepare_policy(base, tmp)
        for method, (objective, mode, k) in METHODS.items():
            c = ppo.default_config(variant)
            c.seed, c.workdir, c.train.progress = seed, "", False
            c.model.path, c.sft.enabled = policy_path, False
            c.reward.path, c.reward.mode, c.reward.pessimism = rms[objective], mode, k
            c.eval.trajectory = True
            c.train.eval_every = max(1, c.ppo.iterations // EVAL_POINTS)
            log.info("table3: %s / %s / seed %d", dataset, method, seed)
            out[method] = _record(ppo.run(c))
    first = out[FIRST]
    out = {"SFT": {"initial": first["initial"], "final": first["initial"], "gold": first["gold_initial"],
                   "trajectory": [first["trajectory"][0]], "examples": [], "wall_s": 0.0}, **out}
    return out


def run_table(datasets=("synthetic", "stories"), seeds=(0, 1, 2), *, tiny: bool = False, command: str = "") -> dict:
    t0 = time.perf_counter()
    payload = {"date": datetime.date.today().isoformat(), "command": command, "seeds": list(seeds),
               "host": f"{platform.machine()}, Python {platform.python_version()}", "datasets": {}}
    for dataset in datasets:
        per_prompt = ppo.default_config((TINY if tiny else VARIANTS)[dataset]).eval.samples_per_prompt
        runs = {}
        for seed in seeds:
            for method, record in tables.cached("table3", seed_runs)(dataset, seed, tiny=tiny).items():
                runs.setdefault(method, []).append(record)
        duels = {}
        for rival in (m for m in runs if m != FIRST):
            duels[rival] = []
            for a, b in zip(runs[FIRST], runs[rival]):
                groups = np.repeat(np.arange(len(a["gold"]) // per_prompt), per_prompt)
                duels[rival].append(win_rate(a["gold"], b["gold"], tau=0.0, groups_N=groups).as_dict())
        payload["datasets"][dataset] = {"runs": runs, "duels": duels}
    payload["wall_s"] = time.perf_counter() - t0
    return payload


def reading(payload: dict) -> list[str]:
    lines = []
    for dataset, d in payload["datasets"].items():
        parts = []
        for rival, duels in d["duels"].items():
            diff = np.asarray([a["final"]["gold_reward"] - b["final"]["gold_reward"]
                               for a, b in zip(d["runs"][FIRST], d["runs"][rival])])
            win, lose = np.mean([x["win"] for x in duels]), np.mean([x["lose"] for x in duels])
            said, mean, se = tables.verdict(diff, win, lose)
            parts.append(f"against {rival} **{said}** (gold {mean:+.3f}, se {se:.3f} over {diff.size} "
                         f"seed(s); wins {win:.3f}, loses {lose:.3f})")
        kl = {m: np.mean([r["final"]["kl_to_initial"] for r in runs]) for m, runs in d["runs"].items() if m != "SFT"}
        lines.append(f"- **{dataset}:** " + "; ".join(parts) + ". Mean KL to the SFT policy: "
                     + ", ".join(f"{m} {v:.1f}" for m, v in kl.items()) + " nats (a gain bought with more KL is "
                     "not a better trade-off: see the figure).")
        lines += _degeneration(dataset, d["runs"])
    return lines


DEGENERATE_NATS = 1.0  # per-token drop of the samples' log-likelihood under the initial LM


def _degeneration(dataset: str, runs: dict) -> list[str]:
    """A gold gain from text the initial LM finds far less likely than the SFT policy's is suspect:
    the stories gold reward is a lexicon sum (docs/stories.md), which repetition of a joyful word
    raises without bound. Names every method whose samples lost more than DEGENERATE_NATS nats per
    token against SFT."""
    base = np.mean([r["final"]["initial_loglik_per_token"] for r in runs["SFT"]])
    bad = {m: np.mean([r["final"]["initial_loglik_per_token"] for r in rs]) for m, rs in runs.items() if m != "SFT"}
    bad = {m: v for m, v in bad.items() if v < base - DEGENERATE_NATS}
    if not bad:
        return []
    return [f"- **{dataset}, degenerate text:** the samples of " + ", ".join(f"{m} ({v:.2f})" for m, v in bad.items())
            + f" have a log-likelihood under the initial LM more than {DEGENERATE_NATS:g} nat per token below SFT's "
            f"({base:.2f}); " + (
                "read the examples: where they repeat a rewarded word, the gold gain is a hack of the gold reward (a "
                "lexicon sum that grows with repetition), not a better policy, and the verdicts above measure which "
                "reward model is easiest to hack along with the gold." if dataset == "stories" else
                "the policy left the demonstrations' distribution (read the examples and the response lengths).")]


def format_markdown(payload: dict, figures: dict | None = None) -> str:
    out = [f"# {TITLE} ({payload['date']})", ""]
    if payload["command"]:
        out.append(f"Command: `{payload['command']}`  ")
    out += [f"Seeds {', '.join(map(str, payload['seeds']))}; mean ± sample sd over seeds. Host: {payload['host']}; "
            f"wall time {payload['wall_s'] / 60:.1f} min.", ""]
    metrics = table4.METRICS + (("proxy gain (sd)", "proxy_gain_sd", 2), ("gold gain (sd)", "gold_gain_sd", 2),
                                ("proxy - gold gap (sd)", "overoptimisation_gap_sd", 2))
    for dataset, d in payload["datasets"].items():
        out += [f"## {dataset}", "", "| method | reward-model test accuracy | "
                + " | ".join(name for name, _, _ in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for method, runs in d["runs"].items():
            acc = [r.get("reward_model_accuracy") for r in runs]
            acc_s = mean_sd(acc) if all(a is not None for a in acc) else "-"
            cells = []
            for _, k, _ in metrics:
                vals = [r["final"].get(k, np.nan) for r in runs]
                cells.append("-" if all(np.isnan(v) for v in vals) else mean_sd(vals))
            out.append(f"| {method} | {acc_s} | " + " | ".join(cells) + " |")
        out.append("")
        for rival, duels in d["duels"].items():
            out.append(f"- {FIRST} against {rival} (win / tie / lose, same prompts and keys, mean over seeds): "
                       f"{np.mean([x['win'] for x in duels]):.3f} / {np.mean([x['tie'] for x in duels]):.3f} / "
                       f"{np.mean([x['lose'] for x in duels]):.3f}")
        out.append("")
        if figures and dataset in figures:
            out += [f"![gold reward against KL, {dataset}]({os.path.basename(figures[dataset])})", ""]
        for method, runs in d["runs"].items():
            for e in runs[0]["examples"][:1]:
                out.append(f"- {method}, seed {payload['seeds'][0]}: prompt `{e['prompt']}` -> `{e['final']}`")
        out.append("")
    out += ["## Reading", "", f"The claim: \"{CLAIM}\" (`../shared/seed/ava_paper_summary.txt`: \"PPO with "
            "AVA-p reward models shows better win rates than PPO with baseline reward models\"; the paper's "
            "figures are not in this repository's sources). Confirmed when PPO + AVA-p dense's gold reward "
            "exceeds the rival's by more than two paired standard errors and it wins more than it loses, "
            "contradicted when the reverse holds on both."] + reading(payload) + [""]
    return "\n".join(out)


def write_outputs(payload: dict, out: str) -> dict:
    return tables.write_table(payload, out, format_markdown)


def main(argv=None):
    return tables.cli(argv, doc=__doc__, launcher="launch/table3.py", default_out="table3.md", run_fn=run_table,
                      write_fn=write_outputs, render=format_markdown)
