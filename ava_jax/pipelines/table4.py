"""Paper Table 4: AVA-p against DPO as direct optimisation of the policy on preference pairs.

  python launch/table4.py --out docs/table4.md                    # synthetic + stories, 3 seeds each
  python launch/table4.py --datasets synthetic --seeds 0 --tiny --out /tmp/t4.md   # a smoke run

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

import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time

import numpy as np

from ava_jax.eval.policy import win_rate
from ava_jax.pipelines import direct

log = logging.getLogger(__name__)

METHODS = {"DPO": "dpo", "AVA-p": "ava_p"}
DUEL = ("AVA-p", "DPO")  # the paper's claim: the first outperforms the second
CLAIM = "AVA-p outperforms DPO"
TITLE = "Table 4: AVA-p against DPO, direct optimisation on preference pairs"
DATASETS = {"synthetic": "synthetic", "stories": ""}
TINY = {"synthetic": "synthetic_tiny", "stories": "tiny"}
METRICS = (("gold reward", "gold_reward", 3), ("KL to initial", "kl_to_initial", 2),
           ("win vs initial", "vs_initial_win", 3), ("held-out log-lik", "heldout_loglik_chosen", 3),
           ("samples' log-lik under initial LM", "initial_loglik_per_token", 3))


def run_config(method: str, dataset: str, seed: int, *, tiny: bool = False, trajectory_points: int = 2,
               objective: str | None = None):
    c = direct.default_config(objective or METHODS[method], (TINY if tiny else DATASETS)[dataset])
    c.seed, c.workdir, c.train.progress = seed, "", False
    c.eval.trajectory = True
    c.train.eval_every = max(1, c.train.steps // trajectory_points)
    return c


def _record(r) -> dict:
    return {"initial": r.initial, "final": r.final, "trajectory": r.trajectory,
            "gold": r.per_sample["final"]["gold"].tolist(), "wall_s": r.wall_s, "examples": r.examples[:2]}


def seed_runs(dataset: str, seed: int, *, tiny: bool) -> dict:
    """{method: record} of one seed: every method of METHODS from the same initial policy."""
    out = {}
    for method in METHODS:
        log.info("table4: %s / %s / seed %d", dataset, method, seed)
        out[method] = _record(direct.run(run_config(method, dataset, seed, tiny=tiny)))
    return out


def run_table(datasets=("synthetic", "stories"), seeds=(0, 1, 2), *, tiny: bool = False, command: str = "",
              methods: dict | None = None, duel: tuple = DUEL, seed_fn=None, table: str = "table4") -> dict:
    """Runs every (dataset, method, seed); returns the JSON payload (`format_markdown` renders it).

    methods, duel, seed_fn, table: another table's (Table 5 reuses this driver); table names its
    stored seeds under `--cache`.
    """
    methods, seed_fn = methods or METHODS, seed_fn or seed_runs
    t0 = time.perf_counter()
    payload = {"date": datetime.date.today().isoformat(), "command": command, "seeds": list(seeds),
               "host": f"{platform.machine()}, Python {platform.python_version()}", "datasets": {},
               "duel": list(duel)}
    for dataset in datasets:
        runs = {m: [] for m in methods}
        for seed in seeds:
            for method, record in cached(table, seed_fn)(dataset, seed, tiny=tiny).items():
                runs[method].append(record)
        duels = []
        per_prompt = direct.default_config("dpo", (TINY if tiny else DATASETS)[dataset]).eval.samples_per_prompt
        for a, b in zip(runs[duel[0]], runs[duel[1]]):
            groups = np.repeat(np.arange(len(a["gold"]) // per_prompt), per_prompt)
            duels.append(win_rate(a["gold"], b["gold"], tau=0.0, groups_N=groups).as_dict())
        payload["datasets"][dataset] = {"runs": runs, "duel": duels}
    payload["wall_s"] = time.perf_counter() - t0
    return payload


def _mean_sd(xs) -> str:
    xs = np.asarray(xs, np.float64)
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if xs.size > 1 else f"{xs.mean():.3f}"


def verdict(diff, win: float, lose: float) -> tuple[str, float, float]:
    """(verdict, mean, standard error) of a claim "the first outperforms the second" from its paired
    per-seed gold differences and head-to-head win / lose rates: confirmed when the mean difference
    exceeds two standard errors and the first wins more than it loses, contradicted when the reverse
    holds on both, otherwise not confirmed (one seed has an infinite standard error)."""
    diff = np.asarray(diff, np.float64)
    se = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else float("inf")
    if diff.mean() > 2 * se and win > lose:
        return "confirmed", float(diff.mean()), se
    if diff.mean() < -2 * se and win < lose:
        return "contradicted", float(diff.mean()), se
    return "not confirmed", float(diff.mean()), se


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
        out += [f"## {dataset}", "", "| method | " + " | ".join(name for name, _, _ in METRICS) + " |",
                "|---|" + "---|" * len(METRICS)]
        base = next(iter(d["runs"].values()))
        out.append("| *initial policy* | " + " | ".join(
            _mean_sd([r["initial"][k] for r in base]) if k in base[0]["initial"] else "-" for _, k, _ in METRICS)
            + " |")
        for method, runs in d["runs"].items():
            out.append(f"| {method} | " + " | ".join(_mean_sd([r["final"].get(k, np.nan) for r in runs])
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


def plot_gold_vs_kl(payload: dict, dataset: str, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    palette = iter(("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"))
    for method, runs in payload["datasets"][dataset]["runs"].items():
        color = next(palette)
        for i, r in enumerate(runs):
            kl = [p["kl_to_initial"] for p in r["trajectory"]]
            gold = [p["gold_reward"] for p in r["trajectory"]]
            ax.plot(kl, gold, marker="o", ms=3, color=color, alpha=0.8,
                    label=method if i == 0 else None)
    ax.set(xlabel="KL to the initial policy (nats, on the policy's samples)", ylabel="gold reward of samples",
           title=f"{dataset}: gold reward against KL along training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def write_table(payload: dict, out: str, render, plot=None) -> dict:
    """`out` (markdown from render(payload, figures)), `<base>.json` and one `<base>_<dataset>.png`
    per dataset from plot(payload, dataset, path) (default: gold reward against KL); the paths."""
    plot = plot or plot_gold_vs_kl
    base = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figures = {d: plot(payload, d, f"{base}_{d}.png") for d in payload["datasets"]}
    with open(f"{base}.json", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(payload, figures))
    return {"md": out, "json": f"{base}.json", **figures}


def write_outputs(payload: dict, out: str, **fmt) -> dict:
    return write_table(payload, out, lambda p, figures: format_markdown(p, figures, **fmt))


_CACHE = {"dir": None}


def cached(table: str, seed_fn):
    """seed_fn(dataset, seed, tiny=) -> JSON-able records, stored per (table, dataset, seed) under the
    directory of `--cache DIR` when one is given: a killed table run, or one given more seeds, reruns
    only the seeds it has not stored. Each file records the date and commit it was made at."""
    def wrapped(dataset: str, seed: int, *, tiny: bool):
        if not _CACHE["dir"]:
            return seed_fn(dataset, seed, tiny=tiny)
        path = os.path.join(_CACHE["dir"], f"{table}_{dataset}_seed{seed}{'_tiny' if tiny else ''}.json")
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            log.info("%s: %s / seed %d from %s (made %s at %s)", table, dataset, seed, path, stored["date"],
                     stored["commit"])
            return stored["records"]
        records = seed_fn(dataset, seed, tiny=tiny)
        os.makedirs(_CACHE["dir"], exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": _commit(),
                       "records": records}, f, default=float)
        os.replace(path + ".tmp", path)
        return json.loads(json.dumps(records, default=float))  # the same types as a stored seed
    return wrapped


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cli(argv, *, doc: str, launcher: str, default_out: str, run_fn, write_fn, fmt: dict | None = None,
        render=None):
    """The command line shared by the table drivers (Tables 2, 4 and 5); render(payload) -> markdown
    (default: this table's format_markdown with fmt)."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic,stories")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tiny", action="store_true", help="the tiny variants (a smoke run)")
    p.add_argument("--out", default=default_out)
    p.add_argument("--cache", default="", metavar="DIR",
                   help="store each (dataset, seed) as it finishes and reuse stored ones (resume a killed run)")
    args = p.parse_args(argv)
    _CACHE["dir"] = args.cache or None
    logging.basicConfig(level=logging.INFO)
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    payload = run_fn(tuple(args.datasets.split(",")), tuple(int(s) for s in args.seeds.split(",")), tiny=args.tiny,
                     command=f"python {launcher} " + " ".join(map(shlex.quote, argv)))
    paths = write_fn(payload, args.out)
    print(render(payload) if render else format_markdown(payload, **(fmt or {})))
    print(f"written: {paths}")
    return payload


def main(argv=None):
    return cli(argv, doc=__doc__, launcher="launch/table4.py", default_out="table4.md", run_fn=run_table,
               write_fn=write_outputs)
