"""Paper Table 1: reward-model accuracy of BT, PT, AVA-p, its ablations and AVA-d, over seeds,
on the bundled HH-RLHF harmless split and on the synthetic ground-truth task.

  python launch/table1.py --out docs/table1.md                       # everything (CPU: about an hour)
  python launch/table1.py --datasets synthetic --seeds 0,1,2 --out /tmp/t1.md

Each cell is mean +- standard deviation of test accuracy over seeds; the synthetic rows also give
the Bayes-optimal accuracy of the test pairs, the prefix-pair accuracy and the Spearman correlation
between learned per-token reward means and the true per-token rewards.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import platform
import time

import ml_collections
import numpy as np

from ava_jax.config import reward_model_config
from ava_jax.pipelines import reward_model

log = logging.getLogger(__name__)

# Paper figures (GPT-2 backbone, reward accuracy %), Anthropic-Harmless column.
PAPER_HARMLESS = {"BT": 70.02, "PT": 70.26, "AVA-p": 70.27}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    objective: str
    overrides: tuple = ()  # (dotted key, value) pairs applied to the config


ROWS = (
    Row("BT", "bt"),
    Row("PT", "pt"),
    Row("AVA-p", "ava_p"),
    Row("AVA-p w/o rwt", "ava_p", (("model.reward_weighting", "none"),)),
    Row("AVA-p w/o neg", "ava_p", (("loss.use_neg", False),)),
    Row("AVA-p w/o irl", "ava_p", (("loss.use_irl", False),)),
    Row("AVA-p w/o cer", "ava_p", (("loss.use_cer", False),)),
    Row("AVA-p w/o ptq", "ava_p", (("model.q_param", "fresh"),)),
    Row("AVA-p (reward_align=state)", "ava_p", (("model.reward_align", "state"),)),
    Row("AVA-p (weight_norm=sum, as printed)", "ava_p", (("model.weight_norm", "sum"),)),
    Row("AVA-d", "ava_d"),
)

DATASETS = {"hh": "", "synthetic": "synthetic"}


def _set(c: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value


def row_config(row: Row, dataset: str, seed: int, overrides: dict) -> ml_collections.ConfigDict:
    c = reward_model_config(row.objective, DATASETS[dataset])
    c.seed = seed
    c.workdir = ""  # every (row, seed) trains from scratch: no run directory to resume from
    c.train.progress = False
    for k, v in list(row.overrides) + list(overrides.get(dataset, {}).items()):
        _set(c, k, v)
    return c


def run_table(datasets=("synthetic", "hh"), seeds=(0, 1, 2), rows=ROWS, overrides: dict | None = None):
    """Runs every (dataset, row, seed); returns {dataset: {row name: [RewardModelResult, ...]}}."""
    overrides = overrides or {}
    results = {}
    for ds in datasets:
        results[ds] = {}
        for row in rows:
            results[ds][row.name] = []
            for seed in seeds:
                log.info("table1: %s / %s / seed %d", ds, row.name, seed)
                results[ds][row.name].append(reward_model.run(row_config(row, ds, seed, overrides)))
    return results


def _ms(values) -> str:
    v = 100 * np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def format_table(results, seeds, command: str, wall_s: float) -> str:
    out = [f"# Table 1 as measured on this machine ({datetime.date.today().isoformat()})", "",
           f"Command: `{command}`  ", f"Seeds: {', '.join(map(str, seeds))}; mean ± sample standard deviation "
           f"over seeds of test accuracy (%). Host: {platform.machine()}, {platform.python_version()}; "
           f"wall time {wall_s / 60:.1f} min.", ""]
    if "hh" in results:
        out += ["## (a) Anthropic HH-RLHF harmless-base (bundled split), TinyStories-260K backbone", "",
                "| method | test accuracy % | validation accuracy % | test acc, low sigma half % | "
                "test acc, high sigma half % | paper (GPT-2, Harmless) |", "|---|---|---|---|---|---|"]
        for name, rs in results["hh"].items():
            low = [r.metrics["test"].get("acc_low_sigma", np.nan) for r in rs]
            high = [r.metrics["test"].get("acc_high_sigma", np.nan) for r in rs]
            paper = PAPER_HARMLESS.get(name, "")
            out.append(f"| {name} | {_ms([r.metrics['test']['accuracy'] for r in rs])} | "
                       f"{_ms([r.metrics['validation']['accuracy'] for r in rs])} | "
                       f"{_ms(low) if not np.isnan(low).any() else '-'} | "
                       f"{_ms(high) if not np.isnan(high).any() else '-'} | {paper} |")
        out.append("")
    if "synthetic" in results:
        out += ["## (b) Synthetic token MDP (known per-token rewards)", "",
                "| method | test accuracy % | Bayes-optimal % | prefix-pair accuracy % | Spearman(mu_t, r*_t) |",
                "|---|---|---|---|---|"]
        for name, rs in results["synthetic"].items():
            rho = np.asarray([r.extra["test_reward_spearman"] for r in rs])
            out.append(f"| {name} | {_ms([r.metrics['test']['accuracy'] for r in rs])} | "
                       f"{_ms([r.extra['test_bayes_optimal_accuracy'] for r in rs])} | "
                       f"{_ms([r.extra['test_prefix_accuracy'] for r in rs])} | "
                       f"{rho.mean():.3f} ± {rho.std(ddof=1) if rho.size > 1 else 0.0:.3f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    import argparse
    import sys
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic,hh")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--hh-steps", type=int, default=0, help="override train.steps for the HH runs")
    p.add_argument("--hh-max-len", type=int, default=0, help="override data.max_len for the HH runs")
    p.add_argument("--synthetic-steps", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rows = tuple(r for r in ROWS if not args.rows or r.name in args.rows.split(","))
    overrides = {"hh": {}, "synthetic": {}}
    if args.hh_steps:
        overrides["hh"]["train.steps"] = args.hh_steps
    if args.hh_max_len:
        overrides["hh"]["data.max_len"] = args.hh_max_len
    if args.synthetic_steps:
        overrides["synthetic"]["train.steps"] = args.synthetic_steps
    t0 = time.perf_counter()
    results = run_table(tuple(args.datasets.split(",")), seeds, rows, overrides)
    text = format_table(results, seeds, "python launch/table1.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        time.perf_counter() - t0)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
