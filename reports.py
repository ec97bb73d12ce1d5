"""Everything written about a run: atomic files, the code version, TensorBoard, the plots, exact statistics and
each stage's report (stage 1: top-k file, summary.md, study plots; stage 2: report.md, comparison chart, pairwise
McNemar tests). Nothing here trains, so each is testable alone.

Statistics are exact, so that a small test set or a rare class gets an honest answer: Clopper-Pearson intervals
for accuracies, the exact McNemar test for two models on the same images.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import tempfile
import warnings

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_TRIALS_FOR_IMPORTANCE = 5  # fANOVA on fewer completed trials gives shares that mean little


def pyplot():
    """pyplot drawing to files only (servers have no display), imported on first use: most starts draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def code_version() -> str:
    """The git commit of this code ('+dirty' with uncommitted changes), so a result can be rebuilt."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_bytes(path: str, data: bytes | str):
    """Replace `path` with `data` (text as UTF-8) all at once: a kill or a full disk leaves the old file whole and
    no temporary file behind; an OSError names `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        # A unique name per writer: two workers may write the same report at once.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename, or a power cut could leave an empty file
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from None
    # The rename must outlast a power cut too; Windows and some file systems refuse to fsync folders (atomic there).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str, obj):
    write_bytes(path, json.dumps(obj, indent=2, default=float) + "\n")


class TensorBoardLogger:
    """An on_epoch callback that writes the epoch's curves for `tensorboard --logdir results`."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # slow import; only runs that log pay it

        self.writer = SummaryWriter(log_dir)

    def __call__(self, trainer, record: dict):
        for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_acc"),
                         ("accuracy/val", "val_acc"), ("lr", "lr"), ("throughput/train_img_s", "train_img_s")):
            self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self):
        self.writer.close()


def log_hparams(log_dir: str, hparams_dict: dict, metrics: dict):
    """One run's parameters and final figures for TensorBoard's HParams dashboard. None becomes "none" and a
    range "MIN MAX" (it takes numbers, strings and booleans only); metrics become scalars "hparams/<name>"."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    clean = {k: ("none" if v is None else " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
             for k, v in hparams_dict.items()}
    tags = {f"hparams/{k}": v for k, v in metrics.items()}
    # SummaryWriter.add_hparams would open a second writer in a time-stamped subfolder; one file beside
    # the run's curves keeps each run a single row of the dashboard.
    with SummaryWriter(log_dir) as writer:
        for summary in hparams(clean, tags):
            writer.file_writer.add_summary(summary)
        for tag, value in tags.items():
            writer.add_scalar(tag, value)


def save_figure(fig, path: str, title: str | None = None, dpi: int = 100):
    """Write `fig` to `path`, making its folder, and free it: pyplot keeps every figure until it is closed."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)


def plot_curves(history: list, path: str, title: str):
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, (key, name, scale, unit) in zip(axes, (("loss", "loss", 1, ""), ("acc", "accuracy", 100, " (%)"))):
        for split, style in (("train", "-"), ("val", "--")):
            ax.plot(epochs, [scale * r[f"{split}_{key}"] for r in history], style, marker=".", label=split)
        ax.set(xlabel="epoch", ylabel=name + unit, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        if len(epochs) == 1:  # matplotlib would zoom into 0.95-1.05 around a single point
            ax.set_xlim(0.5, 1.5)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, title)


def most_confident_mistakes(probs, labels, k: int = 36) -> list:
    """Indices of up to k misclassified images, the most confident (highest predicted probability) first."""
    conf, pred = torch.as_tensor(probs).max(1)
    wrong = (pred != torch.as_tensor(labels)).nonzero().flatten()
    return wrong[conf[wrong].argsort(descending=True)][:k].tolist()


def plot_mistakes(images, labels, probs, classes: list, path: str, title: str) -> list:
    """A grid of the 36 most confident mistakes, each with true class, prediction and confidence; returns their
    indices. images: uint8 (N, 3, 32, 32); probs: (N, classes) softmax outputs."""
    picked = most_confident_mistakes(probs, labels)
    conf, pred = torch.as_tensor(probs).max(1)
    cols = 6
    rows = max(1, -(-len(picked) // cols))
    fig, axes = pyplot().subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picked):
        # nearest-neighbour upscaling shows the 32x32 pixels as they are, not a blur of them
        ax.imshow(torch.as_tensor(images[i]).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"true: {classes[int(labels[i])]}\npred: {classes[pred[i]]} ({100 * conf[i]:.0f} %)", fontsize=8)
    if not picked:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    save_figure(fig, path, title, dpi=110)
    return picked


def plot_per_class_accuracy(classes: list, correct: list, totals: list, path: str, title: str):
    acc = 100 * np.asarray(correct) / np.asarray(totals)
    low, high = 100 * np.array([accuracy_interval(c, n) for c, n in zip(correct, totals)]).T
    fig, ax = pyplot().subplots(figsize=(9, 4))
    ax.bar(classes, acc, yerr=[acc - low, high - acc], capsize=4, color="tab:blue", alpha=0.8)
    ax.set(ylabel="test accuracy (%), 95 % interval", ylim=(0, 105), title=title)
    ax.grid(axis="y", alpha=0.3)
    for x, (a, top) in enumerate(zip(acc, high)):
        ax.text(x, top + 1.5, f"{a:.1f}", ha="center", fontsize=8)  # above the interval, readable at any height
    save_figure(fig, path)


def accuracy_interval(correct: int, total: int, level: float = 0.95) -> tuple:
    """Clopper-Pearson interval (low, high) of correct/total, as fractions (0/n and n/n included); impossible
    counts raise scipy's ValueError."""
    from scipy.stats import binomtest  # here: scipy.stats takes half a second to import, which most starts never need

    ci = binomtest(correct, total).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two models' per-image correctness on the same images: the disagreement counts
    (a_only: A right and B wrong; b_only: the reverse) and the two-sided p-value of "equally accurate"."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two models must be tested on the same images, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def verdict(name_a: str, name_b: str, test: dict, alpha: float = 0.05) -> str:
    """One plain sentence on an exact McNemar result (A is the model with the higher accuracy)."""
    counts = (f"{name_a} alone is right on {test['a_only']} images, {name_b} alone on {test['b_only']}; "
              f"exact McNemar p = {test['p_value']:.3g}")
    if test["p_value"] < alpha:
        return f"{name_a} beats {name_b} at the {alpha:.0%} level ({counts})."
    return f"{name_a} does not beat {name_b} at the {alpha:.0%} level: the difference may be chance ({counts})."


def difference_interval(acc_a: float, n_a: int, acc_b: float, n_b: int, level: float = 0.95) -> tuple:
    """Interval of acc_a - acc_b on disjoint image sets, whose errors are independent (normal approximation).
    For the validation-minus-test gap, biased upwards since a kept checkpoint's validation accuracy is the
    best of many epochs: an interval that excludes 0 says the test images are harder or the choice overfitted."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    se = (acc_a * (1 - acc_a) / n_a + acc_b * (1 - acc_b) / n_b) ** 0.5
    return acc_a - acc_b - z * se, acc_a - acc_b + z * se


def completed_by_value(study: optuna.Study) -> list:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.value, reverse=True)


def top_file(top_k: int) -> str:
    """top3.json by default: named for what it holds, and any such file is a valid stage-2 --config."""
    return f"top{top_k}.json"


def _fmt(value, float_format=".4g") -> str:
    if value is None or (isinstance(value, float) and value < 0):  # -1: no epoch finished
        return ""
    return format(value, float_format) if isinstance(value, float) else str(value)


def write_stage1_reports(study: optuna.Study, out_dir: str, top_k: int = 3, plots: bool = True):
    """top{k}.json, summary.md and (with plots) the curves of the top trials and the study plots."""
    done = completed_by_value(study)
    top = done[:top_k]
    write_json(os.path.join(out_dir, top_file(top_k)), [
        {"number": t.number, "params": t.params, "val_acc": t.value, "epochs_run": t.user_attrs.get("epochs_run"),
         "config": t.user_attrs.get("config")} for t in top])
    trials = study.get_trials(deepcopy=False)
    keys = next((list(t.params) for t in trials if t.params), [])
    best = (f"best validation accuracy {100 * top[0].value:.2f} % (trial {top[0].number})" if top
            else "none completed yet")
    lines = [f"# Stage 1: study `{study.study_name}`", "", f"{len(trials)} trials; {best}. Accuracies in percent.", "",
             "| trial | state | " + " | ".join(keys) + " | best val acc (%) | epochs | time (s) | note |",
             "|" + "---|" * (len(keys) + 6)]
    for t in trials:
        a = t.user_attrs
        acc = a.get("best_val_acc")
        note = a.get("failure", "")
        if t.state == TrialState.PRUNED and a.get("pruned_at_epoch"):
            note = f"pruned at epoch {a['pruned_at_epoch']}"
        if a.get("stopped_for_time") or a.get("interrupted"):
            why = "stopped for the time limit" if a.get("stopped_for_time") else f"stopped by {a['interrupted']}"
            note = f"{why} after epoch {a.get('epochs_run', 0)}; its retry goes on from there"
        elif a.get("resumed_from"):
            note = (f"went on from trial {a['resumed_from']['trial']}'s epoch {a['resumed_from']['epoch']}"
                    + (f"; {note}" if note else ""))
        cells = [t.number, t.state.name, *(_fmt(t.params.get(k)) for k in keys),
                 _fmt(100 * acc if acc is not None and acc >= 0 else None, ".2f"),
                 _fmt(a.get("epochs_run")), _fmt(a.get("train_time_s"), ".0f"), note]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if plots and len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        lines += ["", f"No parameter importances: {len(done)} completed trial(s); they mean little below "
                      f"{MIN_TRIALS_FOR_IMPORTANCE}."]
    write_bytes(os.path.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    if not plots:
        return
    pyplot()  # first: it picks the file-only backend before Optuna's plots import pyplot
    import matplotlib.ticker
    from optuna.visualization import matplotlib as ovm

    for t in top:
        plot_curves(t.user_attrs.get("history", []), os.path.join(out_dir, f"curves_trial_{t.number:04d}.png"),
                    f"trial {t.number}: best val acc {100 * t.value:.2f} %")
    # A parameter that never varied among the completed trials explains nothing; leave it out.
    varied = [k for k in (done[0].params if done else {}) if len({repr(t.params.get(k)) for t in done}) > 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        target = "validation accuracy"
        charts = {"optimization_history.png": lambda s: ovm.plot_optimization_history(s, target_name=target)}
        if len(done) >= 2 and varied:
            charts["parallel_coordinate.png"] = lambda s: ovm.plot_parallel_coordinate(s, varied, target_name=target)
            charts["slice.png"] = lambda s: ovm.plot_slice(s, params=varied, target_name=target)
        if len(done) >= MIN_TRIALS_FOR_IMPORTANCE and varied:
            charts["param_importances.png"] = lambda s: ovm.plot_param_importances(s, params=varied)
        for name, plot in charts.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. all completed trials share one value
                tqdm.write(f"skipped {name}: {e}")
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure  # plot_slice: one axis per parameter
            if name == "optimization_history.png":
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trials are whole
                ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))  # percent, as everywhere else
                ax.set_xlabel("trial")
            # the slice plot is one row of panels, one per parameter: keep each panel readable
            fig.set_size_inches(*(9, 5) if name != "slice.png" else (2.6 * len(varied) + 1.5, 3.8))
            save_figure(fig, os.path.join(out_dir, name))


def test_row(m: dict, run_dir: str) -> dict:
    """A model's report fields from evaluate.py's metrics and its classification_report.txt."""
    return dict(test_acc=m["accuracy"], test_acc_ci95=m["accuracy_ci95"], precision=m["macro"]["precision"],
                recall=m["macro"]["recall"], f1=m["macro"]["f1"], best_val_acc=m["val_acc"], best_epoch=m["epoch"],
                val_minus_test_ci95=m.get("val_minus_test_ci95"), test_images=m["test_images"],
                classification_report=pathlib.Path(run_dir, "classification_report.txt").read_text())


def epochs_phrase(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def plot_comparison(rows: list, path: str):
    metrics = {"test_acc": "accuracy", "precision": "macro precision", "recall": "macro recall", "f1": "macro F1"}
    x, width = np.arange(len(rows)), 0.8 / len(metrics)
    fig, ax = pyplot().subplots(figsize=(max(6, 2.2 * len(rows) + 2), 4.5))
    for k, (key, label) in enumerate(metrics.items()):
        bars = ax.bar(x + (k - (len(metrics) - 1) / 2) * width, [100 * r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    # Models a few points apart look identical on a 0-100 axis; start just below the lowest bar, and say it when
    # the axis does not start at 0, so that bar heights are not read as ratios.
    bottom = max(0, 10 * (min(100 * r[key] for r in rows for key in metrics) // 10) - 10)
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set(ylim=(bottom, 104), title="Stage 2: test-set metrics per model",  # 104: room for labels of bars near 100
           ylabel="% on the test set" + (f" (axis starts at {bottom:.0f} %)" if bottom > 0 else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics), fontsize=8)  # below: never over a bar
    save_figure(fig, path)


def pairwise_tests(tested: list, out_dir: str) -> list:
    """Exact McNemar test for every pair of tested models, best first, from their saved per-image predictions."""
    from evaluate import PREDICTIONS_FILE  # here: evaluate.py's scikit-learn import would slow every stage-1 worker

    correct = {}
    for r in tested:
        path = os.path.join(out_dir, r["model"], PREDICTIONS_FILE)
        if os.path.isfile(path):
            p = json.loads(pathlib.Path(path).read_text())
            correct[r["model"]] = np.asarray(p["preds"]) == np.asarray(p["labels"])
    order = sorted(correct, key=lambda name: -correct[name].mean())
    return [{"a": a, "b": b, **mcnemar(correct[a], correct[b])}
            for i, a in enumerate(order) for b in order[i + 1:] if len(correct[a]) == len(correct[b])]


def write_stage2_report(rows: list, out_dir: str, subset: float, patience: int):
    tested = [r for r in rows if r.get("test_acc") is not None]
    pairs = pairwise_tests(tested, out_dir)
    lines = [
        "# Stage 2: final models on the CIFAR-10 test set", "",
        f"{len(rows)} model(s), each retrained from scratch on "
        f"{'all training images' if subset >= 1 else f'a stratified {100 * subset:g} % of the training images'}"
        f" but the 5,000 held out for validation, with early stopping on those (patience {patience}, at most "
        f"{epochs_phrase(max(r['max_epochs'] for r in rows))}), "
        + (f"then tested once, at its best validation epoch, on the {tested[0]['test_images']:,} test images. "
           if tested else "to be tested once, at its best validation epoch, on the test images; none is tested yet. ") +
        f"Code version `{code_version()}`.", "",
        "Accuracies in percent; each test accuracy with its exact 95 % (Clopper-Pearson) interval over the test "
        "images, and the validation-minus-test gap with its 95 % interval (normal approximation; validation is "
        "the best of many epochs, so the gap leans positive). The test ran in float32 (TF32 off), whatever "
        "precision trained the model; validation ran in float32 too, but in the training's precision (bf16 or "
        "fp16) for a model trained on a CUDA GPU, whose gap then also holds that difference (docs/speed.md).", "",
        "| model | test acc | 95 % interval | macro precision | macro recall | macro F1 | best val acc | val − test "
        "(95 % interval) | epochs run |", "|---|---|---|---|---|---|---|---|---|"]
    sections = []  # each model's own part, after the table and the tests
    for r in rows:
        run = f"{r['epochs_run']} of {r['max_epochs']}" + (", stopped early" if r["stopped_early"] else "")
        cfg = " ".join(f"`{k}={v}`" for k, v in r["config"].items())
        stage1 = (f" Its stage-1 validation accuracy was {_pct(r['stage1_val_acc'])}."
                  if r["stage1_val_acc"] is not None else "")
        sections += ["", f"## {r['model']}", "", f"From {r['source']}.{stage1}", "", f"Configuration: {cfg}", ""]
        if r["failure"]:
            sections += [f"Training failed: {r['failure']}.", ""]
        if r.get("unfinished"):
            sections += [f"{r['unfinished'][0].upper()}{r['unfinished'][1:]}.", ""]
        if r.get("test_acc") is None:
            lines.append(f"| {r['model']} | not tested | | | | | | | {run}: {r['failure'] or r.get('unfinished')} |")
            if os.path.isfile(os.path.join(out_dir, r["model"], "curves.png")):  # an unstarted model has none
                sections += [f"![training curves]({r['model']}/curves.png)"]
            continue
        gap = f"{100 * (r['best_val_acc'] - r['test_acc']):+.2f} points"
        gap_ci = r.get("val_minus_test_ci95")
        gap_cell = gap + (f" ({100 * gap_ci[0]:+.2f} to {100 * gap_ci[1]:+.2f})" if gap_ci else "")
        interval = "-".join(f"{100 * end:.2f}" for end in r.get("test_acc_ci95") or ())
        acc, prec, rec, f1, val = (_pct(r[k]) for k in ("test_acc", "precision", "recall", "f1", "best_val_acc"))
        lines.append(f"| {r['model']} | {acc} | {interval} | {prec} | {rec} | {f1} | {val} (epoch {r['best_epoch']}) | "
                     f"{gap_cell} | {run} |")
        why = (f"stopped early after {epochs_phrase(r['epochs_run'])} without a better validation accuracy for "
               f"{r['config']['patience']}" if r["stopped_early"]
               else f"trained {r['epochs_run']} of {epochs_phrase(r['max_epochs'])}")
        sections += [
            f"It {why}; its best validation accuracy, {val}, came at epoch {r['best_epoch']}. On the test set: "
            f"accuracy {acc}, macro precision {prec}, recall {rec}, F1 {f1}; validation minus test {gap}.", "",
            f"![training and validation curves]({r['model']}/curves.png)", "",
            f"![confusion matrix, counts and row-normalised]({r['model']}/confusion_matrix.png)", "",
            f"![per-class test accuracy with 95 % intervals]({r['model']}/per_class_accuracy.png)", "",
            f"![the 36 most confident mistakes]({r['model']}/mistakes.png)", "",
            f"[test_metrics.json]({r['model']}/test_metrics.json) · "
            f"[confusion_matrix.csv]({r['model']}/confusion_matrix.csv)", "",
            "```", r["classification_report"].rstrip(), "```"]
    if tested:
        plot_comparison(tested, os.path.join(out_dir, "comparison.png"))
        lines += ["", "![test accuracy, macro precision, recall and F1 per model](comparison.png)"]
    if pairs:
        lines += ["", "## Is the best model really better?", "",
                  verdict(pairs[0]["a"], pairs[0]["b"], pairs[0]), "",
                  "Every pair on the same test images, exact McNemar test (only images exactly one of the two gets "
                  "right count):", "",
                  "| model A | model B | A right, B wrong | B right, A wrong | p-value | at the 5 % level |",
                  "|---|---|--:|--:|--:|---|"]
        lines += [f"| {t['a']} | {t['b']} | {t['a_only']} | {t['b_only']} | {t['p_value']:.3g} | "
                  f"{'A better' if t['p_value'] < 0.05 else 'no significant difference'} |" for t in pairs]
    write_bytes(os.path.join(out_dir, "report.md"), "\n".join(lines + sections) + "\n")
    models = [{k: v for k, v in r.items() if k != "classification_report"} for r in rows]
    write_json(os.path.join(out_dir, "summary.json"), {"accuracy_unit": "fraction", "models": models,
                                                       "pairwise_mcnemar": pairs})
