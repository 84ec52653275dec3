"""What the paper-table drivers share (Tables 2, 3, 4 and 5): the per-seed cache behind `--cache`,
the claim verdict from paired seeds, mean ± sd cells, the gold-against-KL figure, writing a table's
markdown / JSON / PNG files, and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shlex
import sys

import numpy as np

from ava_jax import errors, malloc, xla
from ava_jax.errors import ConfigError

log = logging.getLogger(__name__)

PAPER = "paper"  # the dataset name of the accelerator-scale rows (Tables 2, 4, 5)


@dataclasses.dataclass(frozen=True)
class Paper:
    """The `paper` dataset of Tables 2, 4 and 5: the paper's setting on an accelerator.

    Every run starts from the checkpoint at `model_path` (a local GPT-2 117M HF directory or the
    SmolLM2-135M GGUF: the initial policy, the backbone of Table 2's reward models and the policy
    Best-of-N samples) on HH-RLHF (`data_path`, a JSONL in the HH format; empty: the bundled
    harmless-base test file), in each pipeline's `paper` variant (bf16, 512 tokens). HH has no gold
    reward, so `judge`, a reward-model run directory trained on more data (Gao et al. 2022; e.g.
    `python -m ava_jax.main --config=configs/bt.py:paper --config.model.path=... --config.workdir=runs/judge`
    on the full training set), scores every sample in place of one. With `tiny`, each run shrinks to
    a few steps on a few pairs, short samples and float32: a smoke run that CPUs finish in minutes.
    """
    model_path: str
    judge: str
    data_path: str = ""

    def __post_init__(self):
        missing = [flag for flag, v in (("--model-path", self.model_path), ("--judge", self.judge)) if not v]
        if missing:
            raise ConfigError(f"the {PAPER!r} dataset needs {' and '.join(missing)} (a local GPT-2 or SmolLM2-135M "
                              "checkpoint; a reward-model run directory that judges the samples in place of a "
                              "gold reward, which HH-RLHF lacks)")

    def tag(self) -> str:
        """A short hash of the settings, so stored seeds of another checkpoint, judge or data are not reused."""
        return settings_tag(dataclasses.asdict(self))

    def apply(self, c, *, tiny: bool):
        """Points a pipeline's `paper`-variant config `c` (reward_model, direct or best_of_n) at this
        checkpoint, data and judge, and with `tiny` shrinks it to a smoke run. Returns `c`."""
        c.model.path = self.model_path
        if self.data_path:
            c.data.path = self.data_path
        if c.pipeline == "direct":
            c.eval.judge = self.judge
        elif c.pipeline == "best_of_n":
            c.best_of_n.judge = self.judge
        if tiny:
            c.model.dtype = "float32"
            c.data.update(max_len=64, max_train_pairs=16, max_validation_pairs=8, max_test_pairs=8)
            c.sampling.max_new_tokens = 8
            if "train" in c:
                c.train.update(steps=2, batch_size=4, warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=0)
            if c.pipeline == "direct":
                c.eval.update(num_prompts=4, samples_per_prompt=2, batch_size=8)
            elif c.pipeline == "best_of_n":
                c.best_of_n.update(num_prompts=3, samples_per_prompt=4, batch_size=12)
            elif c.pipeline == "reward_model":
                c.eval.batch_size = 8
        return c


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


def variant_of(dataset: str, variants: dict, tiny_variants: dict, tiny: bool, paper: Paper | None) -> str:
    """The pipeline variant of a table's dataset; an unknown dataset, or `paper` without its setup, is
    a ConfigError naming the known ones."""
    table = tiny_variants if tiny else variants
    if dataset not in table:
        raise ConfigError(f"--datasets: unknown dataset {dataset!r}; known: {sorted(table)}")
    if dataset == PAPER and paper is None:
        raise ConfigError(f"the {PAPER!r} dataset needs --model-path and --judge")
    return table[dataset]


def dataset_config(default_config, dataset: str, variants: dict, tiny_variants: dict, *, tiny: bool,
                   paper: Paper | None):
    """default_config(variant) for a table's dataset (`variant_of`), pointed at `paper`'s checkpoint,
    data and judge when the dataset is `paper` (`Paper.apply`)."""
    c = default_config(variant_of(dataset, variants, tiny_variants, tiny, paper))
    return paper.apply(c, tiny=tiny) if dataset == PAPER else c


def setup_lines(d: dict) -> list[str]:
    """The lines under a `paper` dataset's heading that say what it ran on and what judged it."""
    setup = d.get("setup")
    if not setup:
        return []
    return [f"Initial checkpoint `{setup['model_path']}`, data `{setup['data_path'] or 'bundled HH-RLHF harmless-base test'}`; "
            f"\"gold reward\" here is the score of the judge reward model at `{setup['judge']}`, not a true reward.", ""]


CACHE = {"dir": None}


def stored(path: str, compute, what: str = ""):
    """compute() -> JSON-able records, kept at `path` (with the date and commit they were made at)
    and read back instead of recomputed when the file exists; `what` names them in the log."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        log.info("%s from %s (made %s at %s)", what or "records", path, kept["date"], kept["commit"])
        return kept["records"]
    records = compute()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": _commit(),
                   "records": records}, f, default=float)
    os.replace(path + ".tmp", path)
    return json.loads(json.dumps(records, default=float))  # the same types as stored records


def settings_tag(settings) -> str:
    """A short hash of JSON-able settings, for file names that must change when the settings do."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cached(table: str, seed_fn):
    """seed_fn(dataset, seed, tiny=[, paper=]) -> JSON-able records, stored per (table, dataset, seed)
    under the directory of `--cache DIR` when one is given: a killed table run, or one given more
    seeds, reruns only the seeds it has not stored. Each file records the date and commit it was made
    at; `paper` (a `Paper`, passed on only when given) adds its tag to the file name."""
    def wrapped(dataset: str, seed: int, *, tiny: bool, paper: Paper | None = None):
        kwargs = {"tiny": tiny, **({"paper": paper} if paper is not None else {})}
        if not CACHE["dir"]:
            return seed_fn(dataset, seed, **kwargs)
        name = f"{dataset}-{paper.tag()}" if paper is not None else dataset
        path = os.path.join(CACHE["dir"], f"{table}_{name}_seed{seed}{'_tiny' if tiny else ''}.json")
        return stored(path, lambda: seed_fn(dataset, seed, **kwargs), f"{table}: {dataset} / seed {seed}")
    return wrapped


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parser(doc: str):
    """The table and curve drivers' argparse parser: a bad flag or value is one line on stderr,
    `error: PROG: ...`, and exit status 2 (argparse's usage block stays in --help)."""

    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message):
            print(f"error: {self.prog}: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
    return OneLineErrors(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type for `--seeds 0,1,2` and the like: a malformed list is a one-line error
    (`argument --seeds: ...`, exit 2), not a traceback."""
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    return values


def cli(argv, *, doc: str, launcher: str, default_out: str, run_fn, write_fn, render, paper: bool = False):
    """The command line shared by the table drivers (Tables 2, 3, 4 and 5): run_fn(datasets, seeds,
    tiny=, command=[, paper=]) -> payload, write_fn(payload, out) -> paths, render(payload) -> markdown.
    `paper`: the table has the `paper` dataset (--model-path, --judge, --data-path). A user error (a
    missing flag or file, an unknown dataset) is one line, `error: ...`, and exit status 2."""
    p = parser(doc)
    p.add_argument("--datasets", default="synthetic,stories")
    p.add_argument("--seeds", type=int_list, default="0,1,2")
    p.add_argument("--tiny", action="store_true", help="the tiny variants (a smoke run)")
    p.add_argument("--out", default=default_out)
    p.add_argument("--cache", default="", metavar="DIR",
                   help="store each (dataset, seed) as it finishes and reuse stored ones (resume a killed run)")
    if paper:
        p.add_argument("--model-path", default="", help=f"the {PAPER!r} dataset: the initial checkpoint (GPT-2 "
                       "117M HF dir or SmolLM2-135M GGUF)")
        p.add_argument("--judge", default="", help=f"the {PAPER!r} dataset: a reward-model run directory that "
                       "judges the samples (trained on more data)")
        p.add_argument("--data-path", default="", help=f"the {PAPER!r} dataset: an HH-RLHF JSONL (default: "
                       "the bundled harmless-base test file)")
    args = p.parse_args(argv)
    malloc.keep_temporaries_on_heap()
    xla.cache_compilations_for_this_process()  # the cells' runs share their programs
    CACHE["dir"] = args.cache or None
    logging.basicConfig(level=logging.INFO)
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    datasets = tuple(args.datasets.split(","))
    kwargs = {}
    try:
        if paper and PAPER in datasets:
            kwargs["paper"] = Paper(args.model_path, args.judge, args.data_path)
        payload = run_fn(datasets, args.seeds, tiny=args.tiny,
                         command=f"python {launcher} " + " ".join(map(shlex.quote, argv)), **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's to fix
        if not errors.is_user_error(e):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    paths = write_fn(payload, args.out)
    print(render(payload))
    print(f"written: {paths}")
    return payload
