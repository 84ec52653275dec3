"""Paper Table 4: AVA-p against DPO as direct optimisation of the policy on preference pairs.

  python launch/table4.py --out docs/table4.md                    # synthetic + stories, 3 seeds each
  python launch/table4.py --datasets synthetic --seeds 0 --tiny --out /tmp/t4.md   # a smoke run
  python launch/table4.py --datasets paper --model-path PATH --judge RUN_DIR [--data-path HH.jsonl] \
      --out docs/table4_paper.md   # the paper's setting on an accelerator (tables.Paper)

Every (dataset, method, seed) is one `direct` run from the same initial policy on the same pairs; the
seed sets the heads' initialisation and the data order. Both methods are judged on the same held-out
test prompts with the same sampling keys, so their samples are paired: the table gives each method's
gold reward (initial -> final), KL to the initial policy, win rate against the initial policy and the
likelihoods that show what the gain cost, and AVA-p's head-to-head win / tie / lose against DPO.
Next to the table: the gold reward against KL along training for every method and seed (PNG).
The paper's own Table 4 figures are not in this repository's sources (../shared/seed has the claim,
"AVA-p outperforms DPO", not the numbers), so the reading below the table decides the claim from ours.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import time

import numpy as np

from ava_jax import paths
from ava_jax.eval.policy import win_rate
from ava_jax.pipelines import direct
from ava_jax.pipelines.tables import (PAPER, Paper, cached, cli, dataset_config, mean_sd, setup_lines, verdict,
                                     write_table)

log = logging.getLogger(__name__)

METHODS = {"DPO": "dpo", "AVA-p": "ava_p"}
DUEL = ("AVA-p", "DPO")  # the paper's claim: the first outperforms the second
CLAIM = "AVA-p outperforms DPO"
TITLE = "Table 4: AVA-p against DPO, direct optimisation on preference pairs"
DATASETS = {"synthetic": "synthetic", "stories": "", PAPER: "paper"}  # dataset -> the direct pipeline's variant
TINY = {"synthetic": "synthetic_tiny", "stories": "tiny", PAPER: "paper"}  # with --tiny (paper: Paper.apply shrinks)
METRICS = (("gold reward", "gold_reward", 3), ("KL to initial", "kl_to_initial", 2),
           ("win vs initial", "vs_initial_win", 3), ("held-out log-lik", "heldout_loglik_chosen", 3),
           ("samples' log-lik under initial LM", "initial_loglik_per_token", 3))


def run_config(method: str, dataset: str, seed: int, *, tiny: bool = False, trajectory_points: int = 2,
               objective: str | None = None, paper: Paper | None = None):
    """The direct run of one (method, dataset, seed); the `paper` dataset needs `paper`."""
    c = dataset_config(lambda v: direct.default_config(objective or METHODS[method], v), dataset, DATASETS, TINY,
                       tiny=tiny, paper=paper)
    c.seed, c.workdir, c.train.progress = seed, "", False
    # DPO's reference log-probs of the train and validation pairs: the same in every seed's run from
    # a pretrained policy (their key covers the data, the weights and the settings, so a scratch
    # policy, which differs by seed, computes its own); the table's runs share them.
    c.reference.cache_dir = c.reference.cache_dir or paths.process_scratch("reference")
    c.eval.trajectory = True
    c.train.eval_every = max(1, c.train.steps // trajectory_points)
    return c


def _record(r) -> dict:
    return {"initial": r.initial, "final": r.final, "trajectory": r.trajectory,
            "gold": r.per_sample["final"]["gold"].tolist(), "wall_s": r.wall_s, "examples": r.examples[:2]}


def seed_runs(dataset: str, seed: int, *, tiny: bool, paper: Paper | None = None) -> dict:
    """{method: record} of one seed: every method of METHODS from the same initial policy."""
    out = {}
    for method in METHODS:
        log.info("table4: %s / %s / seed %d", dataset, method, seed)
        out[method] = _record(direct.run(run_config(method, dataset, seed, tiny=tiny, paper=paper)))
    return out


def run_table(datasets=("synthetic", "stories"), seeds=(0, 1, 2), *, tiny: bool = False, command: str = "",
              methods: dict | None = None, duel: tuple = DUEL, seed_fn=None, table: str = "table4",
              paper: Paper | None = None) -> dict:
    """Runs every (dataset, method, seed); returns the JSON payload (`format_markdown` renders it).

    methods, duel, seed_fn, table: another table's (Table 5 reuses this driver); table names its
    stored seeds under `--cache`. paper: the checkpoint, data and judge of the `paper` dataset.
    """
    methods, seed_fn = methods or METHODS, seed_fn or seed_runs
    t0 = time.perf_counter()
    payload = {"date": datetime.date.today().isoformat(), "command": command, "seeds": list(seeds),
               "host": f"{platform.machine()}, Python {platform.python_version()}", "datasets": {},
               "duel": list(duel)}
    # samples per prompt (the duel's bootstrap groups) by dataset; an unknown dataset fails before any run
    per_prompt = {d: run_config(next(iter(methods)), d, seeds[0], tiny=tiny, paper=paper,
                                objective=next(iter(methods.values()))).eval.samples_per_prompt for d in datasets}
    for dataset in datasets:
        runs = {m: [] for m in methods}
        for seed in seeds:
            for method, record in cached(table, seed_fn)(dataset, seed, tiny=tiny,
                                                         paper=paper if dataset == PAPER else None).items():
                runs[method].append(record)
        duels = []
        for a, b in zip(runs[duel[0]], runs[duel[1]]):
            k = per_prompt[dataset]
            groups = np.repeat(np.arange(len(a["gold"]) // k), k)
            duels.append(win_rate(a["gold"], b["gold"], tau=0.0, groups_N=groups).as_dict())
        payload["datasets"][dataset] = {"runs": runs, "duel": duels}
        if dataset == PAPER:
            payload["datasets"][dataset]["setup"] = dataclasses.asdict(paper)
    payload["wall_s"] = time.perf_counter() - t0
    return payload


def reading(payload: dict) -> list[str]:
    """The table's claim (its duel's first method outperforms the second) per dataset, decided on the
    seeds' paired gold differences and the head-to-head."""
    first, second = payload["duel"]
    lines = []
    for dataset, d in payload["datasets"].items():
        diff = np.asarray([a["final"]["gold_reward"] - b["final"]["gold_reward"]
                           for a, b in zip(d["runs"][first], d["runs"][second])])
        win = np.mean([x["win"] for x in d["duel"]])
        lose = np.mean([x["lose"] for x in d["duel"]])
        said, _, se = verdict(diff, win, lose)
        kl = [np.mean([r["final"]["kl_to_initial"] for r in d["runs"][m]]) for m in (first, second)]
        lines.append(f"- **{dataset}: {said}.** {first} minus {second} gold reward {diff.mean():+.3f} (paired over "
                     f"{diff.size} seed(s), standard error {se:.3f}); head-to-head {first} wins {win:.3f}, loses "
                     f"{lose:.3f}; mean KL to the initial policy {first} {kl[0]:.2f} vs {second} {kl[1]:.2f} nats "
                     "(a gain bought with more KL is not a better trade-off: see the figure).")
    return lines


def format_markdown(payload: dict, figures: dict | None = None, title: str = TITLE, claim: str = CLAIM) -> str:
    first, second = payload["duel"]
    out = [f"# {title} ({payload['date']})", ""]
    if payload["command"]:
        out.append(f"Command: `{payload['command']}`  ")
    out += [f"Seeds {', '.join(map(str, payload['seeds']))}; mean ± sample sd over seeds. Host: {payload['host']}; "
            f"wall time {payload['wall_s'] / 60:.1f} min.", ""]
    for dataset, d in payload["datasets"].items():
        out += [f"## {dataset}", "", *setup_lines(d), "| method | " + " | ".join(name for name, _, _ in METRICS) + " |",
                "|---|" + "---|" * len(METRICS)]
        base = next(iter(d["runs"].values()))
        out.append("| *initial policy* | " + " | ".join(
            mean_sd([r["initial"][k] for r in base]) if k in base[0]["initial"] else "-" for _, k, _ in METRICS)
            + " |")
        for method, runs in d["runs"].items():
            out.append(f"| {method} | " + " | ".join(mean_sd([r["final"].get(k, np.nan) for r in runs])
                                                     for _, k, _ in METRICS) + " |")
        duels = d["duel"]
        out += ["", f"{first} against {second} on the same prompts and keys (win / tie / lose, mean over seeds): "
                f"{np.mean([x['win'] for x in duels]):.3f} / {np.mean([x['tie'] for x in duels]):.3f} / "
                f"{np.mean([x['lose'] for x in duels]):.3f}.", ""]
        if figures and dataset in figures:
            out += [f"![gold reward against KL, {dataset}]({os.path.basename(figures[dataset])})", ""]
        for method, runs in d["runs"].items():
            for e in runs[0]["examples"][:1]:
                out.append(f"- {method}, seed {payload['seeds'][0]}: prompt `{e['prompt']}` -> `{e['final']}`")
        out.append("")
    out += ["## Reading", "", f"The claim: \"{claim}\"."] + reading(payload) + [""]
    return "\n".join(out)


def write_outputs(payload: dict, out: str, **fmt) -> dict:
    return write_table(payload, out, lambda p, figures: format_markdown(p, figures, **fmt))


def main(argv=None):
    return cli(argv, doc=__doc__, launcher="launch/table4.py", default_out="table4.md", run_fn=run_table,
               write_fn=write_outputs, render=format_markdown, paper=True)
