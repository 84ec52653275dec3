"""What the paper-table drivers share (Tables 2, 3, 4 and 5): the per-seed cache behind `--cache`,
the claim verdict from paired seeds, mean ± sd cells, the gold-against-KL figure, writing a table's
markdown / JSON / PNG files, and the command line.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import sys

import numpy as np

log = logging.getLogger(__name__)


def mean_sd(xs) -> str:
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


CACHE = {"dir": None}


def cached(table: str, seed_fn):
    """seed_fn(dataset, seed, tiny=) -> JSON-able records, stored per (table, dataset, seed) under the
    directory of `--cache DIR` when one is given: a killed table run, or one given more seeds, reruns
    only the seeds it has not stored. Each file records the date and commit it was made at."""
    def wrapped(dataset: str, seed: int, *, tiny: bool):
        if not CACHE["dir"]:
            return seed_fn(dataset, seed, tiny=tiny)
        path = os.path.join(CACHE["dir"], f"{table}_{dataset}_seed{seed}{'_tiny' if tiny else ''}.json")
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            log.info("%s: %s / seed %d from %s (made %s at %s)", table, dataset, seed, path, stored["date"],
                     stored["commit"])
            return stored["records"]
        records = seed_fn(dataset, seed, tiny=tiny)
        os.makedirs(CACHE["dir"], exist_ok=True)
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


def cli(argv, *, doc: str, launcher: str, default_out: str, run_fn, write_fn, render):
    """The command line shared by the table drivers (Tables 2, 3, 4 and 5): run_fn(datasets, seeds,
    tiny=, command=) -> payload, write_fn(payload, out) -> paths, render(payload) -> markdown."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic,stories")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tiny", action="store_true", help="the tiny variants (a smoke run)")
    p.add_argument("--out", default=default_out)
    p.add_argument("--cache", default="", metavar="DIR",
                   help="store each (dataset, seed) as it finishes and reuse stored ones (resume a killed run)")
    args = p.parse_args(argv)
    CACHE["dir"] = args.cache or None
    logging.basicConfig(level=logging.INFO)
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    payload = run_fn(tuple(args.datasets.split(",")), tuple(int(s) for s in args.seeds.split(",")), tiny=args.tiny,
                     command=f"python {launcher} " + " ".join(map(shlex.quote, argv)))
    paths = write_fn(payload, args.out)
    print(render(payload))
    print(f"written: {paths}")
    return payload
