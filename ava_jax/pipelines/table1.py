"""Paper Table 1, second edition: reward-model accuracy of BT, PT, AVA-p (its ablations and readings)
and AVA-d over seeds, on the two ground-truth tasks (synthetic token MDP, stories) and on HH-RLHF.

  python launch/table1.py --out docs/table1.md                          # everything (CPU: hours)
  python launch/table1.py --cache docs/table1_cells --out docs/table1.md   # the same, resumable across sessions
  python launch/table1.py --cache docs/table1_cells --kept-only --out docs/table1.md   # tabulate what is kept
  python launch/table1.py --datasets synthetic --seeds 0,1,2 --out /tmp/t1.md
  python launch/table1.py --datasets stories --rows BT,PT,AVA-p --seeds 0 --tiny --out /tmp/t1.md   # smoke test

Each cell is mean ± sample standard deviation over seeds. Beside the methods: the Bayes ceiling and
reference rows that need no network (bigram logistic regression on the synthetic task, unigram
logistic regression and length heuristics elsewhere); a low-data column (`--low-data` pairs); on the
ground-truth tasks prefix-pair accuracy and Spearman(mu_t, r*_t); for AVA rows the ECE of
Phi(dmu / sigma) and the backbone LM's log-likelihood of chosen responses after training; on HH the
accuracy on pairs where both responses end with EOS. Below the tables, each of the paper's
reward-modelling claims is marked confirmed, not confirmed or contradicted by `verdict`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import shlex
import time

import ml_collections
import numpy as np

from ava_jax import config as cfglib
from ava_jax import malloc, xla
from ava_jax.data.load import load_pair_splits
from ava_jax.eval.calibration import ReliabilityBins, preference_probability, reliability_bins
from ava_jax.pipelines import reward_model, tables

log = logging.getLogger(__name__)

# Paper figures (GPT-2 backbone, reward accuracy %), Anthropic-Harmless column.
PAPER_HARMLESS = {"BT": 70.02, "PT": 70.26, "AVA-p": 70.27}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    objective: str
    overrides: tuple = ()  # (dotted key, value) pairs applied to the config


# AVA-p's readings as the paper prints them (method.md); the AVA-p default differs in each of these.
AS_PRINTED = (("loss.normalize", "token"), ("loss.cer", "sigmoid"), ("loss.cer_score", "last"),
              ("loss.td_terminal", "none"), ("model.weight_heads", "both"), ("eval.score", "last"))


def _printed_with(**changes) -> tuple:
    keys = {k.replace("__", "."): v for k, v in changes.items()}
    return tuple((k, keys.pop(k, v)) for k, v in AS_PRINTED) + tuple(keys.items())


ROWS = (
    Row("BT", "bt"),
    Row("PT", "pt"),
    Row("PT w/o rwt", "pt", (("model.reward_weighting", "none"),)),
    Row("AVA-p", "ava_p"),  # the chosen default (config.py, docs/lab.md)
    Row("AVA-p w/o rwt", "ava_p", (("model.reward_weighting", "none"),)),
    Row("AVA-p w/o neg", "ava_p", (("loss.use_neg", False),)),
    Row("AVA-p w/o irl", "ava_p", (("loss.use_irl", False),)),
    Row("AVA-p w/o cer", "ava_p", (("loss.use_cer", False),)),
    Row("AVA-p w/o ptq", "ava_p", (("model.q_param", "fresh"),)),
    Row("AVA-p (as printed)", "ava_p", AS_PRINTED),
    Row("AVA-p (as printed, eval.score=sum)", "ava_p", _printed_with(eval__score="sum")),
    Row("AVA-p (as printed, reward_align=state)", "ava_p", _printed_with(loss__reward_align="state")),
    Row("AVA-p (as printed, weight_norm=sum)", "ava_p", _printed_with(model__weight_norm="sum")),
    Row("AVA-p (as printed, normalize=sequence, cer=logsigmoid)", "ava_p",
        _printed_with(loss__normalize="sequence", loss__cer="logsigmoid")),
    Row("AVA-p (as printed, td_terminal=zero)", "ava_p", _printed_with(loss__td_terminal="zero")),
    Row("AVA-p (as printed, weight_heads=reward)", "ava_p", _printed_with(model__weight_heads="reward")),
    Row("AVA-p (as printed, sigma_init=4)", "ava_p", _printed_with(model__sigma_init=4.0)),
    Row("AVA-p (as printed, neg_floor=-5)", "ava_p", _printed_with(loss__neg_floor=-5.0)),
    Row("AVA-p (default, td_terminal=none)", "ava_p", (("loss.td_terminal", "none"),)),
    Row("AVA-p (default, weight_heads=both)", "ava_p", (("model.weight_heads", "both"),)),
    Row("AVA-p (default, sigma_init=4)", "ava_p", (("model.sigma_init", 4.0),)),
    Row("AVA-d", "ava_d"),
    Row("AVA-d (sequence, terminal, weight_heads=reward, eval.score=sum)", "ava_d",
        (("loss.normalize", "sequence"), ("loss.td_terminal", "zero"), ("model.weight_heads", "reward"),
         ("eval.score", "sum"))),
)
ABLATIONS = ("AVA-p w/o rwt", "AVA-p w/o neg", "AVA-p w/o irl", "AVA-p w/o cer", "AVA-p w/o ptq")

DATASETS = {"synthetic": "synthetic", "stories": "", "hh": "hh"}
TINY = {"synthetic": "synthetic_tiny", "stories": "tiny", "hh": "hh_tiny"}
GROUND_TRUTH = ("synthetic", "stories")
# The rows with a low-data run by default: those the low-data claims compare (`--low-data-rows`).
LOW_DATA_ROWS = ("BT", "PT", "AVA-p")

# The config key that sets the number of training pairs, per dataset (for the low-data column).
TRAIN_PAIRS_KEY = {"synthetic": "data.synthetic.num_examples", "stories": "data.stories.num_pairs",
                   "hh": "data.max_train_pairs"}


def _set(c: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value


def row_config(row: Row, dataset: str, seed: int, overrides: dict, *, tiny: bool = False,
               train_pairs: int = 0) -> ml_collections.ConfigDict:
    c = reward_model.default_config(row.objective, (TINY if tiny else DATASETS)[dataset])
    c.seed = seed
    c.workdir = ""  # every (row, seed) trains from scratch: no run directory to resume from
    c.train.progress = False
    for k, v in list(row.overrides) + list(overrides.get(dataset, {}).items()):
        _set(c, k, v)
    if train_pairs:
        _set(c, TRAIN_PAIRS_KEY[dataset], train_pairs)
    return c


@dataclasses.dataclass
class Cell:
    """What the table keeps of one (dataset, row, seed) run."""

    test: float
    validation: float
    extra: dict
    test_metrics: dict
    both_eos: float = float("nan")  # HH: accuracy on test pairs whose two responses end with EOS
    low_data_test: float = float("nan")
    # Rows with a sigma: the test split's reliability bins of Phi(dmu / sigma) ({mean_pred, freq,
    # count}: lists over 10 equal-width bins, symmetrised), pooled over seeds for the plot.
    reliability: dict = dataclasses.field(default_factory=dict)
    # Why the run stopped before the end ("" when it finished): a reading whose loss goes non-finite
    # is a result, kept with NaN accuracies and counted as diverged in the table.
    diverged: str = ""


def _both_eos_accuracy(result, eos_id: int) -> float:
    arrays, scores = result.splits["test"], result.scores["test"]
    ends = [np.asarray([len(s) > 0 and s[-1] == eos_id for s in side.tokens]) for side in (arrays.chosen,
                                                                                            arrays.rejected)]
    both = ends[0] & ends[1]
    if not both.any():
        return float("nan")
    diff = (scores["score_c"] - scores["score_r"])[both]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def run_cell(row: Row, dataset: str, seed: int, overrides: dict, *, tiny: bool, train_pairs: int = 0) -> Cell:
    """One training run; train_pairs > 0 cuts the training split to that many pairs (the low-data column)."""
    from ava_jax.train.loop import NonFiniteError
    try:
        result = reward_model.run(row_config(row, dataset, seed, overrides, tiny=tiny, train_pairs=train_pairs))
    except NonFiniteError as e:
        log.warning("table1: %s / %s / seed %d diverged: %s", dataset, row.name, seed, e)
        return Cell(float("nan"), float("nan"), {}, {}, diverged=str(e))
    cell = Cell(result.metrics["test"]["accuracy"], result.metrics["validation"]["accuracy"], dict(result.extra),
                dict(result.metrics["test"]))
    if dataset == "hh":
        cell.both_eos = _both_eos_accuracy(result, result.eos_id)
    p_N = preference_probability(result.scores["test"])
    if not np.isnan(p_N).all():
        bins = reliability_bins(p_N[~np.isnan(p_N)])
        cell.reliability = {"mean_pred": bins.mean_pred_B.tolist(), "freq": bins.freq_B.tolist(),
                            "count": bins.count_B.tolist()}
    return cell


def reference_rows(dataset: str, overrides: dict, *, tiny: bool) -> dict[str, float]:
    """Rows that need no network, on the same train and test pairs the runs see (seed-independent)."""
    from ava_jax.checkpoints.load import load_pretrained
    from ava_jax.config import resolve_path
    from ava_jax.eval import references
    c = row_config(ROWS[0], dataset, 0, overrides, tiny=tiny)
    tokenizer = None if dataset == "synthetic" else load_pretrained(resolve_path(c.model.path))[1]
    splits, pad_id, extra = load_pair_splits(cfglib.data_config(c.data), tokenizer)
    refs = {}
    if dataset in GROUND_TRUTH:
        refs["Bayes ceiling"] = extra["test_bayes_optimal_accuracy"]
        refs["true return (sampled labels)"] = extra["test_prefs"].true_ranking_accuracy
    if dataset == "synthetic":
        refs["bigram logistic regression"] = references.bigram_logistic_regression(extra["train_prefs"],
                                                                                  extra["test_prefs"])
    else:
        refs["unigram logistic regression"] = references.unigram_logistic_regression(splits["train"],
                                                                                    splits["test"])
        for name, acc in references.length_heuristics(splits["test"], eos_id=tokenizer.eos_id).items():
            if name != "both_eos_pairs":
                refs[f"heuristic: {name.replace('_', ' ')}"] = acc
    return refs


def _scalars(d: dict) -> dict:
    """The JSON-able scalar entries of a metrics dict (what the table reads)."""
    return {k: (v if isinstance(v, str) else float(v)) for k, v in d.items()
            if isinstance(v, (str, int, float, np.floating, np.integer)) and not isinstance(v, bool)}


def cell_path(cache_dir: str, row: Row, dataset: str, seed: int, overrides: dict, *, tiny: bool,
              train_pairs: int = 0) -> str:
    """Where `--cache` keeps one (dataset, row, seed) run: the name carries a hash of everything that
    decides it (the row's and the dataset's overrides, tiny, the training-pair cut), so a changed
    setting runs afresh instead of reusing a stale cell. The low-data run is a cell of its own, so the
    full-data cells are reused whatever `--low-data` is."""
    tag = tables.settings_tag({"objective": row.objective, "row": list(map(list, row.overrides)),
                               "dataset": sorted(overrides.get(dataset, {}).items()), "tiny": tiny,
                               "train_pairs": train_pairs})
    slug = "".join(ch if ch.isalnum() else "_" for ch in row.name).strip("_")
    size = f"_pairs{train_pairs}" if train_pairs else ""
    return os.path.join(cache_dir, f"table1_{dataset}_{slug}_seed{seed}{size}_{tag}.json")


def cached_cell(row: Row, dataset: str, seed: int, overrides: dict, *, tiny: bool, train_pairs: int = 0,
                cache_dir: str = "", kept_only: bool = False) -> Cell | None:
    """run_cell, kept under `cache_dir` when given (a killed or extended table reruns only what is
    missing). kept_only: return the kept cell, or None where there is none (nothing is run)."""
    if not cache_dir:
        return run_cell(row, dataset, seed, overrides, tiny=tiny, train_pairs=train_pairs)

    def compute():
        c = run_cell(row, dataset, seed, overrides, tiny=tiny, train_pairs=train_pairs)
        return {**dataclasses.asdict(c), "extra": _scalars(c.extra), "test_metrics": _scalars(c.test_metrics)}
    path = cell_path(cache_dir, row, dataset, seed, overrides, tiny=tiny, train_pairs=train_pairs)
    if kept_only and not os.path.exists(path):
        return None
    size = f" / {train_pairs} pairs" if train_pairs else ""
    return Cell(**tables.stored(path, compute, f"table1: {dataset} / {row.name} / seed {seed}{size}"))


def run_table(datasets=("synthetic", "stories", "hh"), seeds=(0, 1, 2), rows=ROWS, overrides: dict | None = None,
              *, tiny: bool = False, low_data: int = 256, low_data_rows: tuple[str, ...] | None = LOW_DATA_ROWS,
              cache_dir: str = "", kept_only: bool = False):
    """Runs every (dataset, row, seed); returns ({dataset: {row: [Cell]}}, {dataset: reference rows},
    [(dataset, row, seed, training pairs or 0) of each cell not run]).

    low_data_rows: the rows that also get a run on `low_data` training pairs (None: every row). The
    default is the rows the low-data claims compare; an ablation's low-data run would decide nothing.

    cache_dir: keep each cell there as it finishes and reuse kept ones (`--cache`; see `cell_path`).
    kept_only: run nothing, tabulate the kept cells (`--kept-only`: a table that several sessions fill);
    a row keeps the seeds it has, one with none is left out, and the missing cells are listed.
    """
    overrides = overrides or {}
    cells, refs, missing = {}, {}, []
    for ds in datasets:
        refs[ds] = reference_rows(ds, overrides, tiny=tiny)
        cells[ds] = {}
        for row in rows:
            kept = []
            for seed in seeds:
                log.info("table1: %s / %s / seed %d", ds, row.name, seed)
                cell = cached_cell(row, ds, seed, overrides, tiny=tiny, cache_dir=cache_dir, kept_only=kept_only)
                if cell is None:
                    missing.append((ds, row.name, seed, 0))
                    continue
                if low_data and (low_data_rows is None or row.name in low_data_rows):
                    small = cached_cell(row, ds, seed, overrides, tiny=tiny, train_pairs=low_data,
                                        cache_dir=cache_dir, kept_only=kept_only)
                    if small is None:
                        missing.append((ds, row.name, seed, low_data))
                    else:
                        cell.low_data_test = small.test
                kept.append(cell)
            if kept:
                cells[ds][row.name] = kept
    return cells, refs, missing


def _stats(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _ms(values, scale=100.0, digits=2) -> str:
    v = scale * np.asarray(values, np.float64)
    v = v[np.isfinite(v)]  # a diverged seed has none (the row's label counts it)
    if v.size == 0:
        return "-"
    m, s = _stats(v)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def verdict(a, b, name_a: str, name_b: str) -> tuple[str, str]:
    """Is mean(a) > mean(b) beyond the seed spread? (difference > 2 standard errors of the difference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:  # every seed of one side diverged
        return "not decided (no seed finished)", f"{name_a}: {a.size} seeds, {name_b}: {b.size} seeds finished"
    if a.size < 2 or b.size < 2:
        return "not decided (one seed)", f"{name_a} {100 * a.mean():.2f} vs {name_b} {100 * b.mean():.2f}"
    d = a.mean() - b.mean()
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    text = f"{name_a} {100 * a.mean():.2f} vs {name_b} {100 * b.mean():.2f} (diff {100 * d:+.2f}, 2 SE {200 * se:.2f})"
    if d > 2 * se:
        return "confirmed", text
    if d < -2 * se:
        return "contradicted", text
    return "not confirmed (within the seed spread)", text


def format_table(cells, refs, seeds, command: str, wall_s: float, low_data: int, plots: dict | None = None,
                 missing=()) -> str:
    out = [f"# Table 1, second edition, as measured on this machine ({datetime.date.today().isoformat()})", "",
           f"Command: `{command}`  ", f"Seeds: {', '.join(map(str, seeds))}; mean ± sample standard deviation "
           f"over seeds (%). Host: {platform.machine()}, Python {platform.python_version()}; "
           f"wall time {wall_s / 60:.1f} min (cells kept by `--cache` count as no time).", "",
           "ECE and MAE to true P: Phi(dmu / sigma) against the labels (symmetrised, 10 bins) and against the "
           "true preference probability; the sigma quarters split the test pairs by their total sigma.", ""]
    if plots:
        out += ["Plots: " + ", ".join(f"[{name}]({os.path.basename(path)})" for name, path in plots.items()), ""]
    titles = {"synthetic": "Synthetic token MDP (known per-token rewards), scratch 2-layer model",
              "stories": "Stories (TinyStories-260K samples, gold word-rule rewards), pretrained TinyStories-260K",
              "hh": "Anthropic HH-RLHF harmless-base (bundled split), pretrained TinyStories-260K"}
    for ds, rows in cells.items():
        gt = ds in GROUND_TRUTH
        head = ["method", "test acc", "val acc"] + ([f"test acc, {low_data} pairs"] if low_data else [])
        head += ["prefix-pair acc", "Spearman(mu, r*)"] if gt else ["both-EOS pairs acc"]
        head += ["ECE"] + (["MAE to true P"] if gt else [])
        head += ["acc, lowest-sigma quarter", "acc, highest-sigma quarter", "LM log-lik chosen"]
        if ds == "hh":
            head.append("paper (GPT-2, Harmless)")
        out += [f"## {titles[ds]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, value in refs[ds].items():
            out.append(f"| *{name}* | {100 * value:.2f} |" + " |" * (len(head) - 2))
        for name, cs in rows.items():
            label = name if len(cs) == len(seeds) else f"{name} ({len(cs)} of {len(seeds)} seeds)"
            if n_div := sum(bool(c.diverged) for c in cs):
                label += f" (diverged: {n_div} of {len(cs)} seeds; the rest shown)"
            line = [label, _ms([c.test for c in cs]), _ms([c.validation for c in cs])]
            if low_data:
                line.append(_ms([c.low_data_test for c in cs]))
            if gt:
                line += [_ms([c.extra.get("test_prefix_accuracy", np.nan) for c in cs]),
                         _ms([c.extra.get("test_reward_spearman", np.nan) for c in cs], scale=1.0, digits=3)]
            else:
                line.append(_ms([c.both_eos for c in cs]))
            line.append(_ms([c.test_metrics.get("ece", np.nan) for c in cs], scale=1.0, digits=3))
            if gt:
                line.append(_ms([c.test_metrics.get("mae_to_truth", np.nan) for c in cs], scale=1.0, digits=3))
            line += [_ms([c.test_metrics.get("acc_sigma_q1", np.nan) for c in cs]),
                     _ms([c.test_metrics.get("acc_sigma_q4", np.nan) for c in cs]),
                     _ms([c.test_metrics.get("lm_loglik_chosen", np.nan) for c in cs], scale=1.0)]
            if ds == "hh":
                line.append(str(PAPER_HARMLESS.get(name, "")))
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    out += claims(cells)
    if missing:
        n_low = sum(1 for m in missing if m[3])
        out += [f"## Not run yet ({len(missing) - n_low} cells, {n_low} more low-data runs)", "",
                "The command without `--kept-only` fills them. Per dataset and row, the seeds not run "
                "(with their low-data runs) and, in brackets, the seeds that lack only the low-data run:", ""]
        for ds in dict.fromkeys(m[0] for m in missing):
            for name in dict.fromkeys(m[1] for m in missing if m[0] == ds):
                full = [str(m[2]) for m in missing if m[:2] == (ds, name) and not m[3]]
                low = [str(m[2]) for m in missing if m[:2] == (ds, name) and m[3]]
                out.append(f"- {ds} / {name}: " + ", ".join(filter(None, [
                    f"seeds {','.join(full)}" if full else "", f"[{','.join(low)}]" if low else ""])))
        out.append("")
    return "\n".join(out)


def pooled_reliability(cs) -> ReliabilityBins | None:
    """The seeds' reliability bins pooled into one (counts summed, means weighted by count)."""
    cs = [c for c in cs if c.reliability]
    if not cs:
        return None
    count = np.sum([np.asarray(c.reliability["count"], np.float64) for c in cs], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = {k: np.nansum([np.asarray(c.reliability[k], np.float64) * np.asarray(c.reliability["count"])
                                for c in cs], axis=0) / count for k in ("mean_pred", "freq")}
    return ReliabilityBins(edges_Bp1=np.linspace(0.0, 1.0, count.size + 1), mean_pred_B=pooled["mean_pred"],
                           freq_B=pooled["freq"], count_B=count.astype(np.int64))


def write_plots(cells, refs, base: str) -> dict[str, str]:
    """`<base>_accuracy.png` (each row's test accuracy per seed and its mean, the ceiling and the
    reference rows as lines, one panel per dataset) and `<base>_reliability.png` (Phi(dmu / sigma)
    against the label frequency for every row with a sigma, seeds pooled); {name: path}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    paths = {}
    n = len(cells)
    fig = Figure(figsize=(6.0 * n, 0.32 * max(len(r) for r in cells.values()) + 2.4))
    FigureCanvasAgg(fig)
    # Row names on the first panel only when every dataset has the same rows; else each its own.
    same_rows = len({tuple(rows) for rows in cells.values()}) == 1
    axes = np.atleast_1d(fig.subplots(1, n))
    for i, (ax, (ds, rows)) in enumerate(zip(axes, cells.items())):
        names = list(rows)[::-1]
        for y, name in enumerate(names):
            acc = 100 * np.asarray([c.test for c in rows[name] if not c.diverged])
            if acc.size:
                ax.plot(acc, [y] * acc.size, "o", color="tab:blue", ms=3, alpha=0.6)
                ax.plot([acc.mean()], [y], "|", color="k", ms=12, mew=2)
            if acc.size < len(rows[name]):  # diverged seeds: said on the row, not silently absent
                ax.annotate(f"diverged: {len(rows[name]) - acc.size} of {len(rows[name])}", (0.02, y),
                            xycoords=("axes fraction", "data"), va="center", fontsize=6, color="tab:red")
        for (name, value), style in zip(refs[ds].items(), ("-", "--", ":", "-.", (0, (1, 3)), (0, (5, 5)))):
            ax.axvline(100 * value, color="tab:red", ls=style, lw=1, label=name)
        ax.set_yticks(range(len(names)), names if i == 0 or not same_rows else [], fontsize=7)
        ax.set(xlabel="test accuracy (%)", title=ds)
        ax.grid(axis="x", alpha=0.3)
        # Below the panel, so no point hides behind it (the reference lines sit at the panels' edges).
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    paths["accuracy"] = f"{base}_accuracy.png"
    fig.savefig(paths["accuracy"], format="png", dpi=110)

    pooled = {ds: {name: b for name, cs in rows.items() if (b := pooled_reliability(cs)) is not None}
              for ds, rows in cells.items()}
    pooled = {ds: rows for ds, rows in pooled.items() if rows}
    if pooled:
        fig = Figure(figsize=(4.8 * len(pooled), 4.8))
        FigureCanvasAgg(fig)
        for ax, (ds, rows) in zip(np.atleast_1d(fig.subplots(1, len(pooled))), pooled.items()):
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
            for name, b in rows.items():
                full = b.count_B > 0
                ax.plot(b.mean_pred_B[full], b.freq_B[full], "o-", ms=3, lw=1, label=name)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Phi(dmu / sigma), binned", ylabel="label frequency",
                   title=f"{ds}: test pairs, seeds pooled")
            ax.legend(fontsize=5)
        fig.tight_layout()
        paths["reliability"] = f"{base}_reliability.png"
        fig.savefig(paths["reliability"], format="png", dpi=110)
    return paths


def claims(cells) -> list[str]:
    """The paper's reward-modelling claims, each decided per dataset by `verdict`."""
    out = ["## The paper's reward-modelling claims at this scale", "",
           "| claim | dataset | verdict | numbers (test %) |", "|---|---|---|---|"]

    def acc(ds, row, field="test"):  # the seeds that finished (a diverged run has no accuracy)
        return [getattr(c, field) if field != "prefix" else c.extra.get("test_prefix_accuracy", np.nan)
                for c in cells[ds].get(row, []) if not c.diverged]
    for ds in cells:
        if "AVA-p" not in cells[ds]:
            continue
        for base in ("BT", "PT"):
            if base in cells[ds]:
                v, text = verdict(acc(ds, "AVA-p"), acc(ds, base), "AVA-p", base)
                out.append(f"| AVA-p more accurate than {base} | {ds} | {v} | {text} |")
        low = {row: [a for a in acc(ds, row, "low_data_test") if np.isfinite(a)] for row in ("AVA-p", "BT", "PT")}
        for base in ("BT", "PT"):
            if len(low["AVA-p"]) > 1 and len(low[base]) > 1:  # not a paper claim: where a Bayesian method should help
                v, text = verdict(low["AVA-p"], low[base], "AVA-p", base)
                out.append(f"| AVA-p more accurate than {base} with few training pairs (low-data column) "
                           f"| {ds} | {v} | {text} |")
        if ds in GROUND_TRUTH:
            for base in ("BT", "PT"):
                if base in cells[ds]:
                    v, text = verdict(acc(ds, "AVA-p", "prefix"), acc(ds, base, "prefix"), "AVA-p", base)
                    out.append(f"| AVA-p orders partial responses better than {base} (intermediate rewards, "
                               f"prefix pairs) | {ds} | {v} | {text} |")
        for ab in ABLATIONS:
            if ab in cells[ds]:
                v, text = verdict(acc(ds, "AVA-p"), acc(ds, ab), "AVA-p", ab)
                out.append(f"| removing {ab.split('w/o ')[1]} hurts | {ds} | {v} | {text} |")
    out.append("")
    return out


def _parse_value(text: str):
    """A JSON literal (150, -5.0, true, null) or else the string itself (sequence)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None):
    import sys
    p = tables.parser(__doc__)
    p.add_argument("--datasets", default="synthetic,stories,hh")
    p.add_argument("--seeds", type=tables.int_list, default="0,1,2")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--low-data", type=int, default=256, help="training pairs of the low-data column (0: skip)")
    p.add_argument("--low-data-rows", default=",".join(LOW_DATA_ROWS),
                   help="comma-separated rows that get the low-data run ('all': every row)")
    p.add_argument("--tiny", action="store_true", help="the datasets' tiny variants (a smoke test, not a result)")
    p.add_argument("--set", action="append", default=[], metavar="DATASET:KEY=VALUE",
                   help="override a config key for one dataset, e.g. hh:train.steps=150 (repeatable)")
    p.add_argument("--out", default="")
    p.add_argument("--cache", default="", metavar="DIR",
                   help="keep each (dataset, row, seed) cell as it finishes and reuse kept ones (resume a killed run)")
    p.add_argument("--kept-only", action="store_true",
                   help="with --cache: run nothing, tabulate the kept cells and list the missing ones")
    args = p.parse_args(argv)
    malloc.keep_temporaries_on_heap()
    xla.cache_compilations_for_this_process()  # the cells' runs share their programs
    if args.kept_only and not args.cache:
        p.error("--kept-only needs --cache DIR (the kept cells)")
    if args.out:  # made now, so that a path that cannot be written fails before hours of runs, not after
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        except OSError as e:
            p.error(f"--out {args.out!r}: cannot create its directory ({e.strerror})")
    logging.basicConfig(level=logging.INFO)
    names = [r.strip() for r in re.split(r",(?![^()]*\))", args.rows) if r.strip()]  # commas inside (...) belong to a name
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        p.error(f"unknown rows {unknown}; known: {[r.name for r in ROWS]}")
    rows = tuple(r for r in ROWS if not names or r.name in names)
    low_rows = None if args.low_data_rows.strip() == "all" else tuple(
        r.strip() for r in re.split(r",(?![^()]*\))", args.low_data_rows) if r.strip())
    unknown = sorted(set(low_rows or ()) - {r.name for r in ROWS})
    if unknown:
        p.error(f"--low-data-rows: unknown rows {unknown}; known: {[r.name for r in ROWS]}")
    datasets = tuple(args.datasets.split(","))
    if set(datasets) - set(DATASETS):
        p.error(f"--datasets: unknown {sorted(set(datasets) - set(DATASETS))}; known: {sorted(DATASETS)}")
    overrides: dict = {ds: {} for ds in datasets}
    for item in args.set:
        ds, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if ds not in overrides or not key or not value:
            p.error(f"--set {item!r}: expected DATASET:KEY=VALUE with DATASET in {datasets}")
        overrides[ds][key] = _parse_value(value)
    t0 = time.perf_counter()
    cells, refs, missing = run_table(datasets, args.seeds, rows, overrides, tiny=args.tiny, low_data=args.low_data,
                                     low_data_rows=low_rows, cache_dir=args.cache, kept_only=args.kept_only)
    plots = write_plots(cells, refs, os.path.splitext(args.out)[0]) if args.out else {}
    text = format_table(cells, refs, args.seeds, "python launch/table1.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                        time.perf_counter() - t0, args.low_data, plots, missing)
    print(text)
    if args.out:
        write_keeping_reading(args.out, text)


READING = "<!-- reading: kept when the table above is regenerated -->"


def write_keeping_reading(path: str, text: str) -> None:
    """Writes the generated table to `path`, keeping a hand-written reading that follows the
    `READING` marker line in the file it replaces (the numbers change, the reading is revised)."""
    tail = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if READING in old:
            tail = "\n" + old[old.index(READING):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n" + tail)
