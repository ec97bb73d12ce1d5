"""The reports each stage writes, built from what is on disk: stage 1's top-k file, summary.md and
study plots from the study's trials; stage 2's report.md, comparison chart and pairwise McNemar tests
from the models' rows (a finished model's from its test metrics, an unfinished one's from its last.pt
and claim) and saved test predictions. Nothing here trains, so each is testable alone.
(report.py holds the file writing, TensorBoard and the per-run plots they use.)
"""

import contextlib
import json
import os
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from checkpoint import load_checkpoint
from data import DataError
from report import code_version, plot_curves, pyplot, write_json, write_text
from stats import mcnemar, verdict
from workers import CLAIM, completed_by_value, read_claim


# ----------------------------------------------------------------------------- stage 1: the study


def top_file(top_k: int) -> str:
    """top3.json by default: named for what it holds, and any such file is a valid stage-2 --config."""
    return f"top{top_k}.json"


def write_reports(study: optuna.Study, out_dir: str, top_k: int = 3, plots: bool = True):
    """top{k}.json, summary.md and (with plots) the curves of the top trials and the study plots."""
    done = completed_by_value(study)
    top = done[:top_k]
    write_json(os.path.join(out_dir, top_file(top_k)), [
        {"number": t.number, "params": t.params, "val_acc": t.value,
         "epochs_run": t.user_attrs.get("epochs_run"), "config": t.user_attrs.get("config")}
        for t in top
    ])
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
    write_text(os.path.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    if plots:
        _write_plots(study, done, top_k, out_dir)


def _fmt(value, float_format=".4g") -> str:
    if value is None or (isinstance(value, float) and value < 0):  # -1: no epoch finished
        return ""
    return format(value, float_format) if isinstance(value, float) else str(value)


MIN_TRIALS_FOR_IMPORTANCE = 5  # fANOVA on fewer completed trials gives shares that mean little


def _write_plots(study: optuna.Study, done: list, top_k: int, out_dir: str):
    """done: the completed trials, best first (completed_by_value)."""
    plt = pyplot()  # first: it picks the file-only backend before Optuna's plots import pyplot
    import matplotlib.ticker
    from optuna.visualization import matplotlib as ovm

    for t in done[:top_k]:
        plot_curves(t.user_attrs.get("history", []), os.path.join(out_dir, f"curves_trial_{t.number:04d}.png"),
                    f"trial {t.number}: best val acc {100 * t.value:.2f} %")
    # A parameter that never varied among the completed trials explains nothing; leave it out.
    varied = [k for k in (done[0].params if done else {}) if len({repr(t.params.get(k)) for t in done}) > 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        plots = {"optimization_history.png": lambda s: ovm.plot_optimization_history(s, target_name="validation accuracy")}
        if len(done) >= 2 and varied:
            plots["parallel_coordinate.png"] = lambda s: ovm.plot_parallel_coordinate(
                s, params=varied, target_name="validation accuracy")
            plots["slice.png"] = lambda s: ovm.plot_slice(s, params=varied, target_name="validation accuracy")
        if len(done) >= MIN_TRIALS_FOR_IMPORTANCE and varied:
            plots["param_importances.png"] = lambda s: ovm.plot_param_importances(s, params=varied)
        for name, plot in plots.items():
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
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
            plt.close(fig)


# ----------------------------------------------------------------------------- stage 2: the final models


def test_row(m: dict, run_dir: str) -> dict:
    """A model's report fields from evaluate.py's metrics and its classification_report.txt."""
    with open(os.path.join(run_dir, "classification_report.txt")) as f:
        report = f.read()
    return dict(test_acc=m["accuracy"], test_acc_ci95=m["accuracy_ci95"], precision=m["macro"]["precision"],
                recall=m["macro"]["recall"], f1=m["macro"]["f1"], best_val_acc=m["val_acc"], best_epoch=m["epoch"],
                val_minus_test_ci95=m.get("val_minus_test_ci95"), test_images=m["test_images"],
                classification_report=report)


def unfinished_row(row: dict, run_dir: str) -> dict:
    """A model no worker has finished, as far as its last.pt and claim.json tell (row: what it is)."""
    last, epochs, planned = os.path.join(run_dir, "last.pt"), 0, row["max_epochs"]
    if os.path.isfile(last):
        with contextlib.suppress(DataError):  # an unreadable last.pt is reported when a worker meets it
            state = load_checkpoint(last)
            # the run's own schedule, which --report-only's flags need not repeat
            epochs, planned = state.get("epoch", 0), state["config"].get("epochs", planned)
    holder = read_claim(os.path.join(run_dir, CLAIM))
    who = f", being trained by {holder['host']} pid {holder['pid']}" if holder else ""
    return {**row, "epochs_run": epochs, "stopped_early": False, "failure": "", "max_epochs": planned,
            "unfinished": f"not finished yet ({epochs} of {epochs_phrase(planned)} in last.pt{who})"}


def epochs_phrase(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def plot_comparison(rows: list, path: str):
    """Test accuracy and macro precision, recall and F1, grouped by model."""
    plt = pyplot()
    metrics = [("test_acc", "accuracy"), ("precision", "macro precision"), ("recall", "macro recall"),
               ("f1", "macro F1")]
    x = np.arange(len(rows))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows) + 2), 4.5))
    for k, (key, label) in enumerate(metrics):
        values = [100 * r[key] for r in rows]
        bars = ax.bar(x + (k - (len(metrics) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    lowest = min(100 * r[key] for r in rows for key, _ in metrics)
    # Models a few points apart look identical on a 0-100 axis; start just below the lowest bar.
    ax.set_ylim(max(0, 10 * (lowest // 10) - 10), 104)  # 104: room for the labels of bars near 100
    ax.set_xticks(x, [r["model"] for r in rows])
    bottom = ax.get_ylim()[0]
    # Say it when the axis does not start at 0, so that bar heights are not read as ratios.
    ax.set(ylabel="% on the test set" + (f" (axis starts at {bottom:.0f} %)" if bottom > 0 else ""),
           title="Stage 2: test-set metrics per model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(metrics), fontsize=8)  # below: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def pairwise_tests(rows: list, out_dir: str) -> list:
    """Exact McNemar test for every pair of tested models, best first, from their saved per-image predictions."""
    from evaluate import PREDICTIONS_FILE  # here: evaluate.py's scikit-learn import would slow every stage-1 worker

    correct = {}
    for r in rows:
        path = os.path.join(out_dir, r["model"], PREDICTIONS_FILE)
        if r.get("test_acc") is not None and os.path.isfile(path):
            with open(path) as f:
                p = json.load(f)
            correct[r["model"]] = np.asarray(p["preds"]) == np.asarray(p["labels"])
    order = sorted(correct, key=lambda name: -correct[name].mean())
    return [{"a": a, "b": b, **mcnemar(correct[a], correct[b])}
            for i, a in enumerate(order) for b in order[i + 1:] if len(correct[a]) == len(correct[b])]


def _interval(ci) -> str:
    return "" if not ci else f"{100 * ci[0]:.2f}-{100 * ci[1]:.2f}"


def write_report(rows: list, out_dir: str, args):
    tested = [r for r in rows if r.get("test_acc") is not None]
    pairs = pairwise_tests(rows, out_dir)
    if tested:
        plot_comparison(tested, os.path.join(out_dir, "comparison.png"))
    n_test = tested[0]["test_images"] if tested else 0
    lines = [
        "# Stage 2: final models on the CIFAR-10 test set", "",
        f"{len(rows)} model(s), each retrained from scratch on "
        f"{'all training images' if args.subset >= 1 else f'a stratified {100 * args.subset:g} % of the training images'}"
        f" but the 5,000 held out for "
        f"validation, with early stopping on those (patience {args.patience}, at most "
        f"{epochs_phrase(max(r['max_epochs'] for r in rows))}), "
        + (f"then tested once, at its best validation epoch, on the {n_test:,} test images. " if tested
           else "to be tested once, at its best validation epoch, on the test images; none is tested yet. ") +
        f"Code version `{code_version()}`.", "",
        "Accuracies in percent; each test accuracy with its exact 95 % (Clopper-Pearson) interval over the test "
        "images, and the validation-minus-test gap with its 95 % interval (normal approximation; validation is "
        "the best of many epochs, so the gap leans positive). The test ran in float32 (TF32 off), whatever "
        "precision trained the model; validation ran in float32 too, but in the training's precision (bf16 or "
        "fp16) for a model trained on a CUDA GPU, whose gap then also holds that difference (docs/speed.md).", "",
        "| model | test acc | 95 % interval | macro precision | macro recall | macro F1 | best val acc | val − test "
        "(95 % interval) | epochs run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = f"{r['epochs_run']} of {r['max_epochs']}" + (", stopped early" if r["stopped_early"] else "")
        if r.get("test_acc") is None:
            lines.append(f"| {r['model']} | not tested | | | | | | | {run}: {r['failure'] or r.get('unfinished')} |")
            continue
        gap = f"{100 * (r['best_val_acc'] - r['test_acc']):+.2f} points"
        if r.get("val_minus_test_ci95"):
            gap += f" ({100 * r['val_minus_test_ci95'][0]:+.2f} to {100 * r['val_minus_test_ci95'][1]:+.2f})"
        lines.append(f"| {r['model']} | {_pct(r['test_acc'])} | {_interval(r.get('test_acc_ci95'))} | "
                     f"{_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1'])} | {_pct(r['best_val_acc'])} "
                     f"(epoch {r['best_epoch']}) | {gap} | {run} |")
    if tested:
        lines += ["", "![test accuracy, macro precision, recall and F1 per model](comparison.png)"]
    if pairs:
        lines += ["", "## Is the best model really better?", "",
                  verdict(pairs[0]["a"], pairs[0]["b"], pairs[0]), "",
                  "Every pair on the same test images, exact McNemar test (only images exactly one of the two gets "
                  "right count):", "",
                  "| model A | model B | A right, B wrong | B right, A wrong | p-value | at the 5 % level |",
                  "|---|---|--:|--:|--:|---|"]
        for t in pairs:
            lines.append(f"| {t['a']} | {t['b']} | {t['a_only']} | {t['b_only']} | {t['p_value']:.3g} | "
                         f"{'A better' if t['p_value'] < 0.05 else 'no significant difference'} |")
    for r in rows:
        cfg = " ".join(f"`{k}={v}`" for k, v in r["config"].items())
        stage1 = (f" Its stage-1 validation accuracy was {_pct(r['stage1_val_acc'])}."
                  if r["stage1_val_acc"] is not None else "")
        why = (f"stopped early after {epochs_phrase(r['epochs_run'])} without a better validation accuracy for "
               f"{r['config']['patience']}" if r["stopped_early"]
               else f"trained {r['epochs_run']} of {epochs_phrase(r['max_epochs'])}")
        lines += ["", f"## {r['model']}", "", f"From {r['source']}.{stage1}", "", f"Configuration: {cfg}", ""]
        if r["failure"]:
            lines += [f"Training failed: {r['failure']}.", ""]
        if r.get("unfinished"):
            lines += [f"{r['unfinished'][0].upper()}{r['unfinished'][1:]}.", ""]
        if r.get("test_acc") is None:
            if os.path.isfile(os.path.join(out_dir, r["model"], "curves.png")):  # an unstarted model has none
                lines += [f"![training curves]({r['model']}/curves.png)"]
            continue
        lines += [
            f"It {why}; its best validation accuracy, {_pct(r['best_val_acc'])}, came at epoch {r['best_epoch']}. "
            f"On the test set: accuracy {_pct(r['test_acc'])}, macro precision {_pct(r['precision'])}, "
            f"recall {_pct(r['recall'])}, F1 {_pct(r['f1'])}; validation minus test "
            f"{100 * (r['best_val_acc'] - r['test_acc']):+.2f} points.", "",
            f"![training and validation curves]({r['model']}/curves.png)", "",
            f"![confusion matrix, counts and row-normalised]({r['model']}/confusion_matrix.png)", "",
            f"![per-class test accuracy with 95 % intervals]({r['model']}/per_class_accuracy.png)", "",
            f"![the 36 most confident mistakes]({r['model']}/mistakes.png)", "",
            f"[test_metrics.json]({r['model']}/test_metrics.json) · "
            f"[confusion_matrix.csv]({r['model']}/confusion_matrix.csv)", "",
            "```", r["classification_report"].rstrip(), "```",
        ]
    write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    write_json(os.path.join(out_dir, "summary.json"), {
        "accuracy_unit": "fraction", "models": [{k: v for k, v in r.items() if k != "classification_report"}
                                                for r in rows], "pairwise_mcnemar": pairs})
