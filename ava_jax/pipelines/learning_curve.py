"""Learning curve on the synthetic task: test accuracy against the number of training pairs.

  python launch/learning_curve.py --out-dir docs/learning_curve            # 4 sizes x 3 seeds x BT, PT, AVA-p
  python launch/learning_curve.py --sizes 512,2048 --seeds 0 --objectives bt,ava_p --steps 300 \\
      --set train.batch_size=64 --set train.learning_rate=2e-3 --out-dir /tmp/lc

Every (size, seed, objective) trains `reward_model.default_config(objective, "synthetic")` from scratch with
`data.synthetic.num_examples = size` and `seed = seed` (the model's initialisation and data order;
the task and the data samples are fixed by `data.synthetic.seed` / `data_seed`, so every run is
scored on the same test pairs). Two rows need no network: the Bayes ceiling of the test pairs and
logistic regression on bigram + target-hit counts (`ava_jax.eval.references`), the well-specified
model of the labels, fitted on the same training pairs. Writes to --out-dir: learning_curve.png
(mean +- sd over seeds, log2 x axis), learning_curve.md and learning_curve.json.
"""
from __future__ import annotations

import ast
import datetime
import json
import logging
import math
import os
import time

import ml_collections
import numpy as np

from ava_jax import config as cfglib
from ava_jax import malloc, xla
from ava_jax import objectives as registry
from ava_jax.data.load import load_pair_splits
from ava_jax.eval.references import bigram_logistic_regression
from ava_jax.pipelines import reward_model
from ava_jax.pipelines.tables import int_list, parser

log = logging.getLogger(__name__)

DEFAULT_SIZES = (512, 2048, 8192, 32768)
DEFAULT_OBJECTIVES = ("bt", "pt", "ava_p")
NAMES = {"bt": "BT", "pt": "PT", "ava_p": "AVA-p", "ava_d": "AVA-d"}
REFERENCES = {"bayes_ceiling": "Bayes ceiling", "bigram_lr": "bigram logistic regression",
              "true_return": "true return (sampled labels)"}


def parse_override(text: str) -> tuple[str, object]:
    """"a.b=value" -> ("a.b", value); the value is a Python literal when it parses as one, else a string."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=128")
    key, raw = text.split("=", 1)
    if raw.lower() in ("true", "false"):
        return key.strip(), raw.lower() == "true"
    try:
        return key.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key.strip(), raw


def apply_overrides(c: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Sets each (dotted key, value) on `c`; a key the config does not have is an error.

    An int given for a float field becomes a float (ConfigDict keeps field types).
    """
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = c
        for i, p in enumerate(parents):
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise KeyError(f"config has no section {'.'.join(parents[: i + 1])!r} (from override {key!r})")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no key {key!r}; known in that section: {sorted(node.keys())}")
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[leaf] = value
    return c


def run_config(objective: str, size: int, seed: int, *, variant: str = "synthetic", steps: int | None = None,
               epochs: float = 0.0, overrides=()) -> ml_collections.ConfigDict:
    """The reward-model config of one point of the curve.

    Args:
      objective: a reward-model objective (`ava_jax.objectives.names("reward_model")`).
      size: training pairs (data.synthetic.num_examples).
      seed: config.seed.
      variant: "synthetic" or "synthetic_tiny".
      steps: train.steps (None: the variant's).
      epochs: when > 0, train.steps = ceil(epochs * size / batch_size) instead (same passes over
        the data at every size).
      overrides: (dotted key, value) pairs applied last but before `epochs`.

    Returns:
      The ConfigDict for reward_model.run.
    """
    c = reward_model.default_config(objective, variant)
    if c.data.format != "synthetic":
        raise ValueError(f"variant={variant!r} is not a synthetic variant")
    c.data.synthetic.num_examples = int(size)
    c.seed = int(seed)
    c.workdir = ""  # every point trains from scratch: no run directory to resume from
    c.train.progress = False
    if steps:
        c.train.steps = int(steps)
    apply_overrides(c, overrides)
    if epochs > 0:
        c.train.steps = max(1, math.ceil(epochs * size / (c.train.batch_size * c.train.accum_steps)))
    return c


def reference_rows(c: ml_collections.ConfigDict) -> dict[str, float]:
    """Bayes ceiling, bigram logistic regression and true-return accuracy on `c`'s own train/test pairs."""
    _, _, extra = load_pair_splits(cfglib.data_config(c.data))
    test = extra["test_prefs"]
    return {"bayes_ceiling": float(test.bayes_optimal_accuracy),
            "bigram_lr": bigram_logistic_regression(extra["train_prefs"], test),
            "true_return": float(test.true_ranking_accuracy)}


def run_learning_curve(sizes=DEFAULT_SIZES, seeds=(0, 1, 2), objectives=DEFAULT_OBJECTIVES, *,
                       variant: str = "synthetic", steps: int | None = None, epochs: float = 0.0, overrides=(),
                       out_dir: str = "", command: str = "") -> dict:
    """Trains every (size, seed, objective), adds the reference rows, and writes the outputs.

    Args:
      sizes: training-pair counts.
      seeds: config seeds.
      objectives: reward-model objectives (e.g. "bt", "pt", "ava_p").
      variant: "synthetic" or "synthetic_tiny".
      steps: train.steps override (None: the variant's).
      epochs: if > 0, steps scale with the size (see `run_config`).
      overrides: (dotted key, value) pairs for every run, e.g. (("train.batch_size", 128),).
      out_dir: where learning_curve.{png,md,json} go ("" writes nothing).
      command: the command line, recorded in the outputs.

    Returns:
      The JSON payload: {"accuracy": {objective: {size: [per seed]}}, "references": {row: {size: value}},
      "steps": {size: train steps}, "wall_s": {objective: {size: [per seed]}}, plus the settings.
    """
    sizes, seeds, objectives = tuple(int(s) for s in sizes), tuple(int(s) for s in seeds), tuple(objectives)
    for o in objectives:
        registry.get(o, "reward_model")  # an unknown name is an error listing the known ones
    overrides = tuple(overrides)
    t0 = time.perf_counter()
    acc = {o: {str(n): [] for n in sizes} for o in objectives}
    wall = {o: {str(n): [] for n in sizes} for o in objectives}
    # Finished points of a killed run with the same settings are kept (out_dir/learning_curve.partial.json).
    settings = {"variant": variant, "steps": steps, "epochs": epochs, "overrides": [list(o) for o in overrides]}
    partial_path = os.path.join(out_dir, "learning_curve.partial.json") if out_dir else ""
    done = _load_partial(partial_path, settings)
    refs = {k: {} for k in REFERENCES}
    steps_by_size = {}
    for n in sizes:
        c0 = run_config(objectives[0], n, seeds[0], variant=variant, steps=steps, epochs=epochs, overrides=overrides)
        steps_by_size[str(n)] = int(c0.train.steps)
        tr = time.perf_counter()
        for k, v in reference_rows(c0).items():
            refs[k][str(n)] = v
        log.info("learning_curve: %d pairs: references %s (%.1f s)", n, {k: refs[k][str(n)] for k in refs},
                 time.perf_counter() - tr)
        for o in objectives:
            for s in seeds:
                point = f"{o}/{n}/{s}"
                if point not in done:
                    log.info("learning_curve: %d pairs / %s / seed %d", n, o, s)
                    r = reward_model.run(run_config(o, n, s, variant=variant, steps=steps, epochs=epochs,
                                                    overrides=overrides))
                    done[point] = [float(r.metrics["test"]["accuracy"]), float(r.wall_s)]
                    _save_partial(partial_path, settings, done)
                else:
                    log.info("learning_curve: %s already measured (%s)", point, partial_path)
                acc[o][str(n)].append(done[point][0])
                wall[o][str(n)].append(done[point][1])
    payload = {"date": datetime.date.today().isoformat(), "command": command, "variant": variant,
               "sizes": list(sizes), "seeds": list(seeds), "objectives": list(objectives),
               "overrides": {k: v for k, v in overrides}, "epochs": epochs, "steps": steps_by_size,
               "accuracy": acc, "references": refs, "wall_s": wall, "total_wall_s": time.perf_counter() - t0}
    if out_dir:
        write_outputs(payload, out_dir)
        if os.path.exists(partial_path):
            os.remove(partial_path)
    return payload


def _load_partial(path: str, settings: dict) -> dict:
    """{"objective/size/seed": [test accuracy, wall s]} of an interrupted run with the same settings."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("settings") != settings:
        log.warning("learning_curve: %s was made with other settings (%s); starting afresh", path,
                    saved.get("settings"))
        return {}
    return dict(saved["points"])


def _save_partial(path: str, settings: dict, points: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "points": points}, f)
    os.replace(tmp, path)  # a kill mid-write leaves the previous file


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_markdown(payload: dict) -> str:
    """The curve as a markdown table: test accuracy (%) per method and size, mean ± sd over seeds."""
    sizes = [str(n) for n in payload["sizes"]]
    out = [f"# Learning curve on the synthetic task ({payload['date']})", ""]
    if payload["command"]:
        out.append(f"Command: `{payload['command']}`  ")
    steps = ", ".join(f"{n}: {payload['steps'][n]}" for n in sizes)
    out += [f"Variant `{payload['variant']}`; seeds {', '.join(map(str, payload['seeds']))}; train steps per size "
            f"{steps}; overrides {payload['overrides'] or 'none'}. "
            f"Test accuracy (%), mean ± sample sd over seeds; training time summed over runs "
            f"{sum(w for by in payload['wall_s'].values() for ws in by.values() for w in ws) / 60:.1f} min.", "",
            "| method | " + " | ".join(f"{n} pairs" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for o, by_size in payload["accuracy"].items():
        cells = []
        for n in sizes:
            m, sd = _mean_sd(by_size[n])
            cells.append(f"{100 * m:.2f} ± {100 * sd:.2f}")
        out.append(f"| {NAMES.get(o, o)} | " + " | ".join(cells) + " |")
    for k, by_size in payload["references"].items():
        out.append(f"| {REFERENCES[k]} | " + " | ".join(f"{100 * by_size[n]:.2f}" for n in sizes) + " |")
    out.append("")
    return "\n".join(out)


def plot_learning_curve(payload: dict, path: str) -> str:
    """One PNG: every objective (mean ± sd error bars over seeds), the Bayes ceiling and bigram LR.

    Args:
      payload: `run_learning_curve`'s result.
      path: the PNG to write.

    Returns:
      path.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # a test extra, not a core dependency
        raise ImportError("the learning-curve plot needs matplotlib: pip install 'ava_jax[test]'") from e
    sizes = payload["sizes"]
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for o, by_size in payload["accuracy"].items():
        ms = np.asarray([_mean_sd(by_size[str(n)]) for n in sizes])
        ax.errorbar(sizes, ms[:, 0], yerr=ms[:, 1], marker="o", capsize=3, label=NAMES.get(o, o))
    refs = payload["references"]
    ax.plot(sizes, [refs["bayes_ceiling"][str(n)] for n in sizes], "k--", label=REFERENCES["bayes_ceiling"])
    ax.plot(sizes, [refs["bigram_lr"][str(n)] for n in sizes], "s:", color="gray", label=REFERENCES["bigram_lr"])
    ax.axhline(0.5, color="lightgray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set(xlabel="training pairs", ylabel="test accuracy",
           title=f"Synthetic task ({payload['variant']}), {len(payload['seeds'])} seed(s)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def write_outputs(payload: dict, out_dir: str) -> dict[str, str]:
    """learning_curve.{json,md,png} under out_dir; returns their paths by extension."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"learning_curve.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(format_markdown(payload))
    plot_learning_curve(payload, paths["png"])
    return paths


def main(argv=None):
    import sys
    p = parser(__doc__)
    p.add_argument("--sizes", type=int_list, default=",".join(map(str, DEFAULT_SIZES)))
    p.add_argument("--seeds", type=int_list, default="0,1,2")
    p.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES))
    p.add_argument("--steps", type=int, default=0, help="override train.steps (default: the variant's)")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="if > 0, train.steps = ceil(epochs * size / batch_size) at each size")
    p.add_argument("--variant", default="synthetic", choices=("synthetic", "synthetic_tiny"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key for every run (repeatable), e.g. --set train.batch_size=128")
    p.add_argument("--out-dir", default="learning_curve")
    args = p.parse_args(argv)
    malloc.keep_temporaries_on_heap()
    xla.cache_compilations_for_this_process()  # the cells' runs share their programs
    logging.basicConfig(level=logging.INFO)
    payload = run_learning_curve(
        args.sizes, args.seeds,
        tuple(args.objectives.split(",")), variant=args.variant, steps=args.steps or None, epochs=args.epochs,
        overrides=tuple(parse_override(s) for s in args.set), out_dir=args.out_dir,
        command="python launch/learning_curve.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(format_markdown(payload))
    return payload
