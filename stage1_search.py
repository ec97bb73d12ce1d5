"""Stage 1: search ViT hyperparameters with Optuna on cheap proxy runs.

    python stage1_search.py --trials 40

A TPE sampler proposes configurations, a median pruner stops hopeless ones early, and every
trial lives in an Optuna storage (SQLite under results/ by default), so a run can be resumed,
watched with optuna-dashboard and shared by several workers. The top configurations go to
results/stage1/top3.json for stage 2.
"""

import argparse
import contextlib
import os
import random
import re
import socket
import sys
import time
import warnings
from dataclasses import replace

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the retry in _make_storage still covers the race
    fcntl = None

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from data import DataError, load_cifar10, train_val_splits
from report import TensorBoardLogger, code_version, plot_curves, write_json, write_text
from train import Diverged, TrainConfig, Trainer, pick_device


def suggest_config(trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
    """The whole search space, in one place. Every name is a TrainConfig field."""
    return replace(
        base,
        patch_size=trial.suggest_categorical("patch_size", [2, 4]),
        embed_dim=trial.suggest_categorical("embed_dim", [128, 192]),
        depth=trial.suggest_categorical("depth", [4, 6]),
        num_heads=trial.suggest_categorical("num_heads", [2, 4]),
        lr=trial.suggest_float("lr", 1e-5, 1e-3, log=True),
        optimizer=trial.suggest_categorical("optimizer", ["adamw", "sgd"]),
        scheduler=trial.suggest_categorical("scheduler", ["cosine", "step"]),
        batch_size=trial.suggest_categorical("batch_size", [64, 128]),
        mixup_alpha=trial.suggest_categorical("mixup_alpha", [0.0, 0.1]),
    )


# ----------------------------------------------------------------------------- storage and study


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message says which and why."""


def redact_url(url: str) -> str:
    """The URL with its password shown as ***: postgresql://user:***@host/db. Use it wherever a URL is shown."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", str(url))


def storage_error(url: str, e: Exception) -> StorageError:
    first_line = (str(e).splitlines() or [""])[0]  # drivers add pages of SQL and links below it
    if "://" in url:  # drivers may quote the URL, password included
        first_line = first_line.replace(url, redact_url(url))
        password = re.match(r"[^:]+://[^/@:]*:([^/@]*)@", url)
        if password and password.group(1):
            first_line = first_line.replace(password.group(1), "***")
    return StorageError(f"cannot open Optuna storage {redact_url(url)!r}: {type(e).__name__}: {first_line}")


def make_storage(url: str, heartbeat: int):
    """An RDB URL (sqlite:///, postgresql://, mysql://) or a path to a journal file.

    RDB storages run Optuna's heartbeat: a trial whose worker stops beating for 3 intervals is
    marked FAIL by the next worker and re-queued once (RetryHeartbeatStaleTrialCallback), and the
    retry continues from the dead trial's last checkpoint. Journal files have no heartbeat, so
    `fail_dead_local_trials` does the same for dead processes on this machine.
    Any failure (a bad URL, a missing driver, an unreachable server, a foreign file) is a StorageError.
    """
    try:
        return _make_storage(url, heartbeat)
    except Exception as e:
        raise storage_error(url, e) from None


# Raised by workers that create Optuna's schema at the same moment; the loser's retry finds it made.
SCHEMA_RACE = ("already exists", "duplicate", "unique constraint", "database is locked")


def _make_storage(url: str, heartbeat: int):
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine_kwargs, lock_path = {}, None
    if url.startswith("sqlite:///"):
        path = os.path.abspath(url[len("sqlite:///"):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Several workers on one SQLite file: wait for a lock instead of failing with "database is locked".
        engine_kwargs, lock_path = {"connect_args": {"timeout": 60}}, path + ".lock"
    for attempt in range(8):
        try:
            with _file_lock(lock_path):  # one local worker at a time creates the tables
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                    )
        except Exception as e:  # workers on other machines cannot share a file lock: retry the race
            if attempt == 7 or not any(m in str(e).lower() for m in SCHEMA_RACE):
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive advisory lock on `path` (created if missing); no-op for None or without fcntl."""
    if path is None or fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_study(storage, study_name: str, seed: int) -> optuna.Study:
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
        # Prune only against 5 finished trials, and not before epoch 5: warmup takes 2,
        # and slow starters (SGD, small lr) are often the ones that end best.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
    )
    # 10 random trials (a quarter of the default 40) give TPE a spread to model before it exploits;
    # constant_liar keeps parallel workers from proposing the same configuration. The seed moves
    # with the study's length, so a resumed run does not replay the first run's proposals.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=10, multivariate=True, constant_liar=True
    )
    return study


def fail_dead_local_trials(study: optuna.Study):
    """Mark RUNNING trials of dead processes on this host FAIL and queue them again (journal storage)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != socket.gethostname() or "pid" not in t.user_attrs:
            continue
        try:
            os.kill(t.user_attrs["pid"], 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.user_attrs.get("retry_of", t.number)})


def completed_by_value(study: optuna.Study) -> list:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.value, reverse=True)


# ----------------------------------------------------------------------------- one trial


class Objective:
    """Train one suggested configuration; report each epoch to the pruner."""

    def __init__(self, base: TrainConfig, splits, device, out_dir: str, amp=None, compile=False):
        self.base, self.splits, self.device, self.out_dir = base, splits, device, out_dir
        self.amp, self.compile = amp, compile

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = suggest_config(trial, self.base)
        run_dir = os.path.join(self.out_dir, f"trial_{trial.number:04d}")
        trial.set_user_attr("config", cfg.to_dict())
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        write_json(os.path.join(run_dir, "config.json"),
                   {"trial": trial.number, "config": cfg.to_dict(), "code_version": code_version()})
        s = self.splits
        trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, self.device,
                          amp=self.amp, compile=self.compile)
        self._resume_if_retry(trial, trainer)
        tensorboard = TensorBoardLogger(run_dir)
        checkpoint = os.path.join(run_dir, "last.pt")
        t0 = time.perf_counter()

        def on_epoch(t: Trainer, record: dict):
            tensorboard(t, record)
            torch.save(t.state_dict(), checkpoint)  # lets a retry of this trial continue from here
            trial.set_user_attr("history", t.history)
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {record['epoch']} is below the median")

        try:
            trainer.fit(on_epoch)
        except Diverged as e:
            trial.set_user_attr("failure", str(e))
            raise
        finally:
            tensorboard.close()
            metrics = {"best_val_acc": trainer.best_acc, "best_epoch": trainer.best_epoch,
                       "epochs_run": trainer.epoch, "train_time_s": time.perf_counter() - t0}
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            write_json(os.path.join(run_dir, "metrics.json"), {**metrics, "history": trainer.history})
        return trainer.best_acc

    def _resume_if_retry(self, trial: optuna.Trial, trainer: Trainer):
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        original = trial.user_attrs.get("retry_of", original)  # journal storage: see fail_dead_local_trials
        path = os.path.join(self.out_dir, f"trial_{original:04d}", "last.pt") if original is not None else None
        if path is None or not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        if state["config"] != trainer.cfg.to_dict():
            return
        trainer.load_state_dict(state)
        for record in trainer.history:  # the pruner judges the whole curve, so replay it
            trial.report(record["val_acc"], record["epoch"])
        trial.set_user_attr("resumed_from", {"trial": original, "epoch": trainer.epoch})


# ----------------------------------------------------------------------------- reports


def write_reports(study: optuna.Study, out_dir: str, top_k: int = 3, plots: bool = True):
    """top3.json, summary.md and (with plots) the curves of the top trials and the study plots."""
    top = completed_by_value(study)[:top_k]
    write_json(os.path.join(out_dir, "top3.json"), [
        {"number": t.number, "params": t.params, "val_acc": t.value,
         "epochs_run": t.user_attrs.get("epochs_run"), "config": t.user_attrs.get("config")}
        for t in top
    ])
    trials = study.get_trials(deepcopy=False)
    keys = next((list(t.params) for t in trials if t.params), [])
    best = f"best validation accuracy {top[0].value:.4f} (trial {top[0].number})" if top else "none completed yet"
    lines = [f"# Stage 1: study `{study.study_name}`", "", f"{len(trials)} trials; {best}.", "",
             "| trial | state | " + " | ".join(keys) + " | best val acc | epochs | time (s) | note |",
             "|" + "---|" * (len(keys) + 6)]
    for t in trials:
        a = t.user_attrs
        cells = [t.number, t.state.name, *(_fmt(t.params.get(k)) for k in keys), _fmt(a.get("best_val_acc")),
                 _fmt(a.get("epochs_run")), _fmt(a.get("train_time_s"), ".0f"), a.get("failure", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    write_text(os.path.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    if plots:
        _write_plots(study, top, out_dir)


def _fmt(value, float_format=".4g") -> str:
    if value is None or (isinstance(value, float) and value < 0):  # -1: no epoch finished
        return ""
    return format(value, float_format) if isinstance(value, float) else str(value)


def _write_plots(study: optuna.Study, top: list, out_dir: str):
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    for t in top:
        plot_curves(t.user_attrs.get("history", []), os.path.join(out_dir, f"curves_trial_{t.number:04d}.png"),
                    f"trial {t.number}: val acc {t.value:.4f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        plots = {"optimization_history.png": ovm.plot_optimization_history}
        if len(top) >= 2:  # importances need at least two completed trials
            plots["param_importances.png"] = ovm.plot_param_importances
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. all completed trials share one value
                tqdm.write(f"skipped {name}: {e}")
                continue
            ax.figure.set_size_inches(9, 5)
            ax.figure.tight_layout()
            ax.figure.savefig(os.path.join(out_dir, name), dpi=100)
            plt.close(ax.figure)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="trials to add to the study in this run (default: 40)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per proxy trial (default: 20)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs (default: 6)")
    p.add_argument("--subset", type=float, default=0.2,
                   help="share of the 45,000 training images each trial trains on, stratified (default: 0.2)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--results", default="results", help="output folder (default: results)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (sqlite:///..., postgresql://..., mysql://...) or a "
                        "journal file path for several processes on one machine "
                        "(default: sqlite:///RESULTS/stage1.db)")
    p.add_argument("--study-name", default="vit-cifar10", help="study name in the storage (default: vit-cifar10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sampler and the training runs; give each parallel worker its own (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: auto)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trials run at once in this process (threads); >1 can fill a big GPU (default: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs for long runs)")
    p.add_argument("--top-k", type=int, default=3, help="configurations written to top3.json (default: 3)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats in RDB storage; a trial silent for 3 "
                        "intervals is failed and retried (default: 60)")
    args = p.parse_args(argv)
    for name in ("trials", "epochs", "patience", "jobs", "top_k", "heartbeat"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    if args.storage is None:
        args.storage = f"sqlite:///{os.path.join(args.results, 'stage1.db')}"
    return args


def run(args, splits=None):
    """Run the search; `splits` (tests) replaces CIFAR-10."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line of ours per trial instead
    out_dir = os.path.join(args.results, "stage1")
    device = pick_device(args.device)
    storage = make_storage(args.storage, args.heartbeat)
    try:
        study = make_study(storage, args.study_name, args.seed)
    except Exception as e:  # RDB storages may connect lazily: a server that went away fails here
        raise storage_error(args.storage, e) from None
    if splits is None:
        ds = load_cifar10(args.data_dir, download=not args.no_download)
        splits = train_val_splits(ds, subset_ratio=args.subset)
    splits = splits.to(device)
    if isinstance(storage, optuna.storages.JournalStorage):
        fail_dead_local_trials(study)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, subset_ratio=args.subset, seed=args.seed)
    objective = Objective(base, splits, device, out_dir, compile=args.compile)
    t0 = time.perf_counter()
    tqdm.write(f"study {args.study_name!r} in {redact_url(args.storage)}: {len(study.trials)} trials so far; adding "
               f"{args.trials} on {device} ({len(splits.train_images)} training, {len(splits.val_images)} validation images)")

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial):
        done = completed_by_value(study)
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best = f"{done[0].value:.4f} (trial {done[0].number})" if done else "-"
        why = trial.user_attrs.get("failure", "")
        tqdm.write(f"trial {trial.number:4d} {trial.state.name:8s} val_acc {value}  best {best}  "
                   f"elapsed {time.perf_counter() - t0:7.0f}s {why}".rstrip())
        write_reports(study, out_dir, args.top_k, plots=False)

    try:
        study.optimize(objective, n_trials=args.trials, n_jobs=args.jobs, callbacks=[after_trial],
                       catch=(Diverged,), gc_after_trial=False)
    except KeyboardInterrupt:
        tqdm.write("interrupted: the running trial is marked FAIL, finished trials are kept; "
                   "run the same command to continue the study")
        write_reports(study, out_dir, args.top_k)
        raise
    write_reports(study, out_dir, args.top_k)
    done = completed_by_value(study)
    tqdm.write(f"done: {len(done)} completed trials; top {args.top_k} in {os.path.join(out_dir, 'top3.json')}")
    return study


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, StorageError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
