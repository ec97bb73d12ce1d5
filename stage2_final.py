"""Stage 2: retrain the best stage-1 configurations on all 45,000 training images, then test them.

    python stage2_final.py                      # the top 3 completed trials of the stage-1 study
    python stage2_final.py --trials 12 31 7     # these trials of the study
    python stage2_final.py --config top3.json   # exactly these configurations, no study needed

Each model trains from scratch, with early stopping on the fixed 5,000 validation images, into
results/stage2/<model>/: config.json, TensorBoard curves, best.pt and last.pt (everything needed
to continue, so running the same command again after an interruption picks up at the next epoch;
--fresh starts over) and curves.png. evaluate.py then tests each best.pt on the 10,000 test images,
and results/stage2/report.md and comparison.png put the models side by side.

Several workers (processes, GPUs, machines sharing the folder) may run the same command on one
results folder: each model is trained by the one worker holding its claim.json, a finished model
is marked by done.json and skipped, a dead local worker's model is taken over and resumed, and the
last worker to finish writes the report (--report-only rebuilds it from the folders at any time).
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from data import DataError, load_cifar10, train_val_splits
from evaluate import PREDICTIONS_FILE, TEST_OUTPUTS, evaluate_checkpoint, load_checkpoint, resolve_device
from report import TensorBoardLogger, code_version, log_hparams, plot_curves, write_bytes, write_json, write_text
from stage1_search import (OneLineParser, ResultsError, StorageError, file_lock, check_writable, completed_by_value,
                           is_dead_local_worker, make_storage, process_identity, redact_url, storage_error)
from stats import mcnemar, verdict
from train import Diverged, TrainConfig, Trainer, add_recipe_flags, recipe_overrides

CONFIG_KEYS = [f.name for f in fields(TrainConfig)]
CLAIM, DONE = "claim.json", "done.json"  # in a model's folder: who is training it; its finished report row
# Everything a run writes into its folder; --fresh removes exactly these, nothing a person put there
# (metrics.json: what evaluate.py called test_metrics.json before it stopped overwriting stage 1's).
RUN_OUTPUTS = ("last.pt", "best.pt", "curves.png", "metrics.json", *TEST_OUTPUTS, DONE)
# What a last.pt must hold to be resumed; one written by an older version of this code may lack some.
CHECKPOINT_KEYS = {"config", "model", "optimizer", "scheduler", "epoch", "history", "early_stopping", "rng"}


@dataclass
class Candidate:
    name: str  # its folder under results/stage2/, e.g. trial_0012 or config_0
    config: TrainConfig  # the stage-2 configuration: stage 1's with stage 2's epochs, patience and all the data
    source: str  # where the configuration came from, in words, for config.json and the report
    stage1_val_acc: float | None = None


def stage2_config(d: dict, args) -> TrainConfig:
    # Recipe flags given on the command line win over the configuration's own values.
    return TrainConfig.from_dict({**d, **recipe_overrides(args), "epochs": args.epochs, "patience": args.patience,
                                  "subset_ratio": 1.0})


# ----------------------------------------------------------------------------- where configurations come from


def open_study(args) -> optuna.Study:
    url = args.storage
    # make_storage would create a missing SQLite or journal file, and then report an empty study.
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else (url if "://" not in url else None)
    if path is not None and not os.path.isfile(path):
        raise StorageError(f"no stage-1 storage at {path}; run stage1_search.py first, point --storage (or --results) "
                           f"at its output, or pass --config")
    storage = make_storage(url, heartbeat=60)
    try:
        names = optuna.study.get_all_study_names(storage)
    except Exception as e:  # RDB storages may connect lazily
        raise storage_error(url, e) from None
    if args.study_name not in names:
        held = ", ".join(repr(n) for n in names) or "none"
        raise StorageError(f"no study {args.study_name!r} in {redact_url(url)} (it holds: {held}); pass --study-name")
    return optuna.load_study(study_name=args.study_name, storage=storage)


def candidates_from_study(args) -> list:
    return candidates_from_trials(open_study(args), args)


def candidates_from_trials(study: optuna.Study, args) -> list:
    """The chosen trials of the study, as stage-2 candidates; args.storage only names where they come from."""
    # Into config.json, the report and the log: never the storage's password.
    where = f"study {args.study_name!r} in {redact_url(args.storage)}"
    if args.trials:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        missing = [n for n in args.trials if n not in by_number]
        if missing:
            raise StorageError(f"{where} has no trial {', '.join(map(str, missing))} "
                               f"(its trials are numbered 0 to {len(by_number) - 1})")
        chosen = [by_number[n] for n in dict.fromkeys(args.trials)]  # a number given twice trains once
        for t in chosen:
            if not t.params:
                raise StorageError(f"trial {t.number} of {where} is {t.state.name} and has no configuration yet")
            if t.state != TrialState.COMPLETE:
                tqdm.write(f"note: trial {t.number} is {t.state.name}, not COMPLETE; retraining it as asked")
    else:
        completed = completed_by_value(study)
        if not completed:
            raise StorageError(f"{where} has no completed trial yet ({len(study.trials)} trials in all); "
                               f"let stage1_search.py finish one, or pass --config")
        chosen = completed[:args.top_k]
        if len(chosen) < args.top_k:
            tqdm.write(f"note: {where} has only {len(chosen)} completed trial(s); retraining those instead of "
                       f"the top {args.top_k}")
    # params win over the stored config: they are what Optuna proposed, and every key is a TrainConfig field.
    return [Candidate(f"trial_{t.number:04d}", stage2_config({**t.user_attrs.get("config", {}), **t.params}, args),
                      f"stage-1 trial {t.number} of {where}", t.value)
            for t in chosen]


def candidates_from_file(path: str, args) -> list:
    """One configuration or a list: TrainConfig keys (top3.json's params), or whole top3.json entries."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--config {path} is not valid JSON: {e}") from None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"--config {path} must hold a configuration (a JSON object) or a non-empty list of them")
    candidates, names = [], set()
    for i, entry in enumerate(entries):
        number, val_acc = entry.get("number"), entry.get("val_acc")
        if "params" in entry:  # a top3.json entry: its full config, with Optuna's params on top
            d = {**(entry.get("config") or {}), **entry["params"]}
        else:
            d, number, val_acc = entry, None, None
        unknown = sorted(set(d) - set(CONFIG_KEYS))
        if unknown:
            raise DataError(f"--config {path}, configuration {i}: unknown key(s) {', '.join(unknown)}; "
                            f"known keys: {', '.join(CONFIG_KEYS)}")
        try:
            cfg = stage2_config(d, args)
        except (TypeError, ValueError) as e:
            raise DataError(f"--config {path}, configuration {i}: {e}") from None
        name = f"trial_{number:04d}" if isinstance(number, int) else f"config_{i}"
        name = name if name not in names else f"config_{i}"
        names.add(name)
        origin = f" (stage-1 trial {number})" if isinstance(number, int) else ""
        candidates.append(Candidate(name, cfg, f"configuration {i} of {path}{origin}", val_acc))
    return candidates


# ----------------------------------------------------------------------------- sharing the models between workers


def _load_json(path: str):
    """The file's JSON, or None if there is no such file (OSError or ValueError if it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _read_claim(path: str) -> dict | None:
    try:
        claim = _load_json(path)
    except (OSError, ValueError):
        claim = "unreadable"
    if claim is None:
        return None
    if not isinstance(claim, dict) or not isinstance(claim.get("pid"), int) or "host" not in claim:
        raise DataError(f"{path} is not a claim written by stage2_final.py; delete it if no worker is training "
                        f"that model")
    return claim


def take_claim(run_dir: str) -> str | None:
    """Make this process the one worker that trains the model in run_dir: None if it now is, else who is.

    The claim is a file that appears atomically, already complete (a hard link to a written temporary
    file: the O_EXCL of a file with content), so that two workers, even on two machines sharing the
    folder, never both get it. A claim whose process is dead on this host is taken over, and the
    model resumes from its last.pt; a claim of another host is left alone, since only that host can
    tell whether its worker lives (delete the file if that machine is gone for good).
    """
    path = os.path.join(run_dir, CLAIM)
    me = {**process_identity(), "claimed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(run_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=CLAIM + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        with file_lock(path + ".lock"):  # one local worker at a time judges and removes a dead claim
            for _ in range(3):  # a claim may be released or removed between two steps: look again
                try:
                    os.link(tmp, path)
                    return None
                except FileExistsError:
                    holder = _read_claim(path)
                if holder is None:
                    continue
                if not is_dead_local_worker(holder):  # alive, or on another host: only that host can tell
                    return (f"{holder['host']} pid {holder['pid']} (claimed {holder.get('claimed_at', '?')}; "
                            f"{path})")
                tqdm.write(f"{os.path.basename(run_dir)}: its worker, pid {holder['pid']} on this host, is dead; "
                           f"taking the model over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            return f"another worker ({path})"
    finally:
        os.remove(tmp)


def release_claim(run_dir: str):
    path = os.path.join(run_dir, CLAIM)
    holder = _read_claim(path)
    me = process_identity()
    if holder is not None and (holder["host"], holder["pid"]) == (me["host"], me["pid"]):
        os.remove(path)


def _other_config(c: Candidate, path: str) -> DataError:
    return DataError(f"{path} was trained with another configuration than {c.source}; pass --fresh to start it "
                     f"over, or --results to write elsewhere")


def finished_row(c: Candidate, run_dir: str, fresh_since: float | None = None) -> dict | None:
    """The model's report row if a worker has trained and tested it (its done.json), else None.

    fresh_since (--fresh: when this worker started): a model finished before then is to be done
    again; one finished since is another worker's share of the same fresh start.
    """
    path = os.path.join(run_dir, DONE)
    try:
        row = _load_json(path)
        if row is not None and not isinstance(row, dict):
            raise ValueError
    except (OSError, ValueError):
        raise DataError(f"{path} is unreadable; delete it to train and test {c.name} again") from None
    if row is None:
        return None
    if fresh_since is not None and row.get("finished_at", 0) < fresh_since:
        return None
    if row.get("config") != c.config.to_dict():
        raise _other_config(c, path)
    return row


def row_from_disk(c: Candidate, run_dir: str) -> dict:
    """What the report says about a model: its finished row, or how far it has got."""
    row = finished_row(c, run_dir)
    if row is not None:
        return row
    last, epochs = os.path.join(run_dir, "last.pt"), 0
    if os.path.isfile(last):
        with contextlib.suppress(DataError):  # an unreadable last.pt is reported when a worker meets it
            epochs = load_checkpoint(last).get("epoch", 0)
    holder = _read_claim(os.path.join(run_dir, CLAIM))
    who = f", being trained by {holder['host']} pid {holder['pid']}" if holder else ""
    return {**_row(c), "epochs_run": epochs, "stopped_early": False, "failure": "",
            "unfinished": f"not finished yet ({epochs} of {_epochs(c.config.epochs)} in last.pt{who})"}


# ----------------------------------------------------------------------------- training one model


def save_checkpoint(state: dict, path: str):
    # Serialised in memory, then written whole through a temporary file (write_bytes): a kill or a
    # full disk mid-write keeps the checkpoint a resume needs, and a full disk raises a plain OSError,
    # which torch's own file writer turns into an opaque RuntimeError.
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getbuffer())


def clear_run(run_dir: str):
    for name in os.listdir(run_dir):
        if name in RUN_OUTPUTS or name.startswith("events.out.tfevents"):
            os.remove(os.path.join(run_dir, name))


def resume(trainer: Trainer, c: Candidate, last: str):
    """Load last.pt into the trainer, or refuse one this run cannot continue; it is never overwritten silently."""
    state = load_checkpoint(last)  # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    again = "pass --fresh to start it over (its checkpoints are deleted), or --results to write elsewhere"
    missing = sorted(CHECKPOINT_KEYS - state.keys())
    if missing:
        raise DataError(f"{last} comes from an older, incompatible version of this code (no {', '.join(missing)}); "
                        f"{again}")
    if not isinstance(state["config"], dict) or state["config"].keys() != set(CONFIG_KEYS):
        raise DataError(f"{last} comes from an older, incompatible version of this code (its configuration has "
                        f"other keys); {again}")
    if state["config"] != c.config.to_dict():
        raise _other_config(c, last)
    try:
        trainer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{last} does not fit this code's model or optimizer ({str(e).splitlines()[0]}); "
                        f"{again}") from None


def train_model(c: Candidate, splits, args, device, run_dir: str) -> dict:
    """Train (or resume, or skip if done) one model; return its training summary."""
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    os.makedirs(run_dir, exist_ok=True)
    cfg, s = c.config, splits
    trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, device, compile=args.compile)
    if os.path.isfile(last) and not args.fresh:
        resume(trainer, c, last)
    else:
        clear_run(run_dir)  # a run from scratch must not inherit the curves or checkpoints of an older one
    if trainer.epoch == 0 or not os.path.isfile(os.path.join(run_dir, "config.json")):
        write_json(os.path.join(run_dir, "config.json"), {"model": c.name, "source": c.source,
                   "stage1_val_acc": c.stage1_val_acc, "config": cfg.to_dict(), "code_version": code_version()})

    done = trainer.epoch >= cfg.epochs or trainer.stopped_early
    if done:
        tqdm.write(f"{c.name}: already trained ({_epochs(trainer.epoch)}); evaluating only")
    else:
        if trainer.epoch:
            tqdm.write(f"{c.name}: resuming after epoch {trainer.epoch} of {cfg.epochs} "
                       f"(best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch})")
        else:
            tqdm.write(f"{c.name}: training from scratch, at most {_epochs(cfg.epochs)} on {len(s.train_images)} "
                       f"images, early stopping on {len(s.val_images)} (patience {cfg.patience}), on {device}")
        tensorboard = TensorBoardLogger(run_dir)

        def on_epoch(t: Trainer, record: dict):
            state = t.state_dict()
            # best.pt before last.pt: a kill between the two then replays this epoch rather than
            # leaving a last.pt whose best epoch has no best.pt.
            if record["is_best"]:
                save_checkpoint(state, best)
            save_checkpoint(state, last)
            tensorboard(t, record)
            tqdm.write(f"{c.name} epoch {record['epoch']:3d}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                       f"acc {100 * record['train_acc']:.2f} %, val loss {record['val_loss']:.4f} "
                       f"acc {100 * record['val_acc']:.2f} %"
                       f"{' (best)' if record['is_best'] else ''}, lr {record['lr']:.2e}, {record['epoch_time']:.0f}s")

        try:
            trainer.fit(on_epoch)
        except Diverged as e:
            # Keep going: best.pt, from before the divergence, is still a model worth testing.
            tqdm.write(f"{c.name}: {e}; evaluating its best checkpoint")
            return _summary(c, trainer, run_dir, failure=str(e))
        finally:
            tensorboard.close()
    why = (f"stopped early: no better validation accuracy for {_epochs(cfg.patience)}" if trainer.stopped_early
           else f"ran all {_epochs(cfg.epochs)}")
    tqdm.write(f"{c.name}: {_epochs(trainer.epoch)}, {why}; best val acc {100 * trainer.best_acc:.2f} % "
               f"at epoch {trainer.best_epoch}")
    return _summary(c, trainer, run_dir)


def _summary(c: Candidate, trainer: Trainer, run_dir: str, failure: str = "") -> dict:
    plot_curves(trainer.history, os.path.join(run_dir, "curves.png"),
                f"{c.name}: best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch}")
    return {**_row(c), "epochs_run": trainer.epoch, "stopped_early": trainer.stopped_early, "failure": failure}


def _row(c: Candidate) -> dict:
    return {"model": c.name, "source": c.source, "config": c.config.to_dict(), "stage1_val_acc": c.stage1_val_acc,
            "max_epochs": c.config.epochs}


def train_and_test(c: Candidate, splits, ds, args, device, run_dir: str):
    """Train one model, test its best checkpoint, and mark it done with its report row."""
    row = train_model(c, splits, args, device, run_dir)
    best = os.path.join(run_dir, "best.pt")
    if os.path.isfile(best):
        m = evaluate_checkpoint(best, ds, device)
        with open(os.path.join(run_dir, "classification_report.txt")) as f:
            report = f.read()
        row.update(test_acc=m["accuracy"], test_acc_ci95=m["accuracy_ci95"], precision=m["macro"]["precision"],
                   recall=m["macro"]["recall"], f1=m["macro"]["f1"], best_val_acc=m["val_acc"], best_epoch=m["epoch"],
                   val_minus_test_ci95=m.get("val_minus_test_ci95"), test_images=m["test_images"],
                   classification_report=report)
        log_hparams(run_dir, {**c.config.to_dict(), "model": c.name},
                    {"test_acc": m["accuracy"], "best_val_acc": m["val_acc"], "epochs_run": row["epochs_run"]})
        tqdm.write(f"{c.name}: test accuracy {100 * m['accuracy']:.2f} % (best val acc {100 * m['val_acc']:.2f} %), "
                   f"macro F1 {100 * m['macro']['f1']:.2f} %")
    # Last: a worker killed before this line leaves the model to the next one, which resumes it.
    write_json(os.path.join(run_dir, DONE), {**row, "finished_at": time.time(), "worker": process_identity()})


# ----------------------------------------------------------------------------- report


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def plot_comparison(rows: list, path: str):
    """Test accuracy and macro precision, recall and F1, grouped by model."""
    import matplotlib.pyplot as plt  # report.py has already chosen the Agg backend

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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pairwise_tests(rows: list, out_dir: str) -> list:
    """Exact McNemar test for every pair of tested models, best first, from their saved per-image predictions."""
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
        f"{len(rows)} model(s), each retrained from scratch on all training images but the 5,000 held out for "
        f"validation, with early stopping on those (patience {args.patience}, at most {_epochs(args.epochs)}), "
        f"then tested once, at its best validation epoch, on the {n_test:,} test images. "
        f"Code version `{code_version()}`.", "",
        "Accuracies in percent; each test accuracy with its exact 95 % (Clopper-Pearson) interval over the test "
        "images, and the validation-minus-test gap with its 95 % interval (normal approximation; validation is "
        "the best of many epochs, so the gap leans positive).", "",
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
        why = (f"stopped early after {_epochs(r['epochs_run'])} without a better validation accuracy for "
               f"{r['config']['patience']}" if r["stopped_early"]
               else f"trained {r['epochs_run']} of {_epochs(r['max_epochs'])}")
        lines += ["", f"## {r['model']}", "", f"From {r['source']}.{stage1}", "", f"Configuration: {cfg}", ""]
        if r["failure"]:
            lines += [f"Training failed: {r['failure']}.", ""]
        if r.get("unfinished"):
            lines += [f"{r['unfinished'][0].upper()}{r['unfinished'][1:]}.", ""]
        if r.get("test_acc") is None:
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


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trials", type=int, nargs="+", metavar="N", default=None,
                       help="retrain these stage-1 trials by number instead of the top k (default: the top k)")
    which.add_argument("--config", metavar="FILE.json", default=None,
                       help="retrain the configuration(s) in this JSON file (one object or a list, in the keys of "
                            "top3.json's params, or whole top3.json entries); no study needed (default: none)")
    p.add_argument("--top-k", type=int, default=3, help="completed stage-1 trials to retrain, best first (default: 3)")
    p.add_argument("--epochs", type=int, default=120, help="most epochs per model (default: 120)")
    p.add_argument("--patience", type=int, default=15,
                   help="stop a model after this many epochs without a better validation accuracy (default: 15)")
    p.add_argument("--fresh", action="store_true",
                   help="start every model over instead of continuing from its last.pt or skipping it when done "
                        "(models other workers finish after this one started are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild report.md from the models' folders as they are now")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--results", default="results",
                   help="output folder: reads stage 1's study there, writes RESULTS/stage2/ (default: results)")
    p.add_argument("--storage", default=None,
                   help="stage 1's Optuna storage: an RDB URL or a journal file path "
                        "(default: sqlite:///RESULTS/stage1.db)")
    p.add_argument("--study-name", default="vit-cifar10",
                   help="stage 1's study name in the storage (default: vit-cifar10)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs for long runs)")
    add_recipe_flags(p)
    args = p.parse_args(argv)
    recipe_overrides(args, p)
    for name in ("top_k", "epochs", "patience"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.report_only and args.fresh:
        p.error("--report-only trains nothing, so --fresh has nothing to start over")
    if args.trials is not None and min(args.trials) < 0:
        p.error(f"--trials takes trial numbers (0 or more), got {min(args.trials)}")
    if args.storage is None:
        args.storage = f"sqlite:///{os.path.join(args.results, 'stage1.db')}"
    return args


def run(args, ds=None) -> list:
    """Train and test every chosen model that no other worker has taken or finished, then report
    them all if none is left; `ds` (tests) replaces CIFAR-10. Returns every model's row, as far as it got."""
    started = time.time()
    device = None if args.report_only else resolve_device(args.device)
    # Configurations first: a missing study should fail in a second, not after loading the data.
    candidates = candidates_from_file(args.config, args) if args.config else candidates_from_study(args)
    out_dir = os.path.join(args.results, "stage2")
    run_dirs = {c.name: os.path.join(out_dir, c.name) for c in candidates}
    if args.report_only:
        rows = [row_from_disk(c, run_dirs[c.name]) for c in candidates]
        write_report(rows, out_dir, args)
        tqdm.write(f"report of {len(rows)} model(s), {sum('unfinished' not in r for r in rows)} of them finished, "
                   f"in {os.path.join(out_dir, 'report.md')}")
        return rows
    check_writable(out_dir)
    tqdm.write(f"stage 2: {len(candidates)} model(s): {', '.join(c.name for c in candidates)}")
    fresh_since = started if args.fresh else None
    todo = []
    for c in candidates:
        if finished_row(c, run_dirs[c.name], fresh_since) is None:
            todo.append(c)
        else:
            tqdm.write(f"{c.name}: already trained and tested; skipping it (delete its {DONE} to test it again)")
    if todo:
        if ds is None:
            ds = load_cifar10(args.data_dir, download=not args.no_download)
        splits = train_val_splits(ds, subset_ratio=1.0, device=device)
    for c in todo:
        run_dir = run_dirs[c.name]
        holder = take_claim(run_dir)
        if holder is not None:
            tqdm.write(f"{c.name}: being trained by {holder}; leaving it to that worker")
            continue
        try:
            # Checked again under the claim: another worker may have finished it since the list was made.
            if finished_row(c, run_dir, fresh_since) is None:
                train_and_test(c, splits, ds, args, device, run_dir)
        finally:
            release_claim(run_dir)
    rows = [row_from_disk(c, run_dirs[c.name]) for c in candidates]
    waiting = [r["model"] for r in rows if "unfinished" in r]
    if waiting:
        # Every worker marks its models done before it looks here, so the last one to finish sees none left.
        tqdm.write(f"stage 2: {', '.join(waiting)} not finished yet: other workers are on them (if one has died, "
                   f"start a worker again to resume its model); the last worker to finish writes report.md, or run "
                   f"with --report-only")
    else:
        write_report(rows, out_dir, args)
        tqdm.write(f"done: report in {os.path.join(out_dir, 'report.md')}")
    return rows


def main(argv=None, ds=None):
    args = parse_args(argv)
    try:
        run(args, ds)
    except (DataError, StorageError, ResultsError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, or a results folder that stopped being writable mid-run
        what = f" {e.filename!r}" if e.filename else ""
        sys.exit(f"error: cannot write{what}: {e.strerror or e}; each model's last.pt and best.pt keep its last "
                 f"finished epoch: free some space (or fix --results) and run the same command again")
    except KeyboardInterrupt:
        print("interrupted: each model's last.pt holds its last finished epoch; run the same command to continue",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
