"""Stage 1: search ViT hyperparameters with Optuna on cheap proxy runs.

    python stage1_search.py --trials 40    # adds 40 trials to the study
    python stage1_search.py --total 40     # runs until the study holds 40; after a crash, the rest

A TPE sampler proposes configurations, a median pruner stops hopeless ones early, and every
trial lives in an Optuna storage (SQLite under results/ by default), so a run can be resumed,
watched with optuna-dashboard and shared by several workers. The top configurations go to
results/stage1/top3.json (top{K}.json with --top-k K) for stage 2.
"""

import argparse
import contextlib
import io
import os
import random
import re
import socket
import sys
import tempfile
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
from report import TensorBoardLogger, code_version, log_hparams, plot_curves, write_bytes, write_json, write_text
from train import Diverged, TrainConfig, Trainer, add_recipe_flags, pick_device, recipe_overrides


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

    A trial whose worker died is failed and queued again (at most MAX_RETRIES times), and the retry
    continues from the dead trial's last checkpoint: `fail_dead_local_trials` finds dead processes
    of this machine on any storage; on RDB storages Optuna's heartbeat also catches workers of other
    machines that stopped beating for 3 intervals.
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
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
        # Several workers on one SQLite file: wait for a lock instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    lock = StudyLock(url)
    for attempt in range(8):
        try:
            with lock.local():  # one local worker at a time creates the tables
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                        heartbeat_stale_trial_callback=RequeueStaleTrial(lock),
                    )
        except Exception as e:  # workers on other machines cannot share a file lock: retry the race
            if attempt == 7 or not any(m in str(e).lower() for m in SCHEMA_RACE):
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))


class StudyLock:
    """Serialises what two workers must not do at once: fail a dead worker's trial and queue it
    again (twice would run it twice), and with --total, decide that one more trial is due.

    All workers of an SQLite or journal file share one machine, so a file lock beside it does; on
    PostgreSQL an advisory lock spans machines. Other servers get no lock: there two workers may
    each start the last trial of a --total.
    """

    def __init__(self, url: str):
        self.path = None
        if url.startswith("sqlite:///"):
            self.path = os.path.abspath(url[len("sqlite:///"):]) + ".workers.lock"
        elif "://" not in url:  # not .lock: Optuna's journal backend uses that name for its own lock
            self.path = os.path.abspath(url) + ".workers.lock"
        self.engine = None
        if url.startswith(("postgresql", "postgres://")):
            import sqlalchemy

            # A connection of its own per lock, closed after: the lock dies with a killed worker.
            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @contextlib.contextmanager
    def __call__(self):
        if self.engine is None:
            with self.local():
                yield
            return
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(hashtext('vit-stage1-workers'))"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext('vit-stage1-workers'))"))

    def local(self):
        """The file lock alone (a no-op for servers): enough to keep local workers apart."""
        return file_lock(self.path)


@contextlib.contextmanager
def file_lock(path):
    """An exclusive advisory lock on `path` (created if missing); no-op for None or without fcntl.
    Each call opens the file anew, so two threads of one process exclude each other too."""
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


# ----------------------------------------------------------------------------- workers that die


MAX_RETRIES = 2  # a configuration that kills its worker every time (out of memory) is given up after this


def process_identity(pid: int | None = None) -> dict:
    """What a trial records about its worker, so that a later worker can tell whether it still runs:
    host, pid, and on Linux the pid's start time (a recycled pid has another) and pid namespace
    (two containers may share a host name but not their pids)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_stat(pid)[1], "pid_ns": _pid_namespace()}


def _proc_stat(pid: int) -> tuple:
    """(state, start time in clock ticks since boot) from /proc; (None, None) without /proc;
    ("gone", None) for no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], fields[19]  # fields 3 and 22 of proc(5)
    except FileNotFoundError:
        return ("gone", None) if os.path.isdir("/proc/self") else (None, None)
    except (OSError, IndexError):
        return None, None


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def is_dead_local_worker(attrs: dict) -> bool:
    """True when the trial's worker ran on this machine and no longer does; trials of other
    machines (or other pid namespaces) are never judged here: the heartbeat covers those."""
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return False
    if "pid_ns" in attrs and attrs["pid_ns"] != _pid_namespace():
        return False
    state, start = _proc_stat(attrs["pid"])
    if state == "gone" or state == "Z":  # Z: killed, not yet reaped by its parent
        return True
    if state is not None:
        return attrs.get("pid_start") not in (None, start)  # the pid now names another process
    try:  # no /proc (macOS): existence is all we can see
        os.kill(attrs["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return False


def fail_dead_local_trials(study: optuna.Study) -> list:
    """Mark FAIL the RUNNING trials whose worker on this machine died, and queue each again.

    The caller holds the study's lock (StudyLock): Optuna's heartbeat may be failing the same trial
    in another worker, and `requeue` must see the other's retry to skip its own.
    """
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead_local_worker(t.user_attrs):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # the heartbeat of another worker was first
            continue
        failed.append(t.number)
        requeue(study, t)
    return failed


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial):
    """Queue the failed `trial`'s parameters again, unless a retry of it is queued already or its
    configuration has had MAX_RETRIES. The caller holds the study's lock."""
    history = [*trial.user_attrs.get("retry_history", []), trial.number]  # every attempt, oldest first
    if any(t.user_attrs.get("retry_history", [None])[-1] == trial.number for t in study.get_trials(deepcopy=False)):
        return
    worker = f"its worker ({trial.user_attrs.get('host')} pid {trial.user_attrs.get('pid')}) died"
    if len(history) > MAX_RETRIES:
        tqdm.write(f"trial {trial.number:4d} FAIL     {worker}, the configuration's attempt {len(history)} to die: given up")
        return
    # A worker that died before its first suggestion holds its queued parameters only as fixed_params.
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    study.enqueue_trial(params, user_attrs={"retry_of": history[0], "retry_history": history})
    tqdm.write(f"trial {trial.number:4d} FAIL     {worker}; queued again, to go on from its last checkpoint")


class RequeueStaleTrial:
    """Optuna's heartbeat callback: a worker anywhere stopped beating and Optuna failed its trial."""

    def __init__(self, lock: StudyLock):
        self.lock = lock

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        with self.lock():
            requeue(study, trial)


class TotalReached(Exception):
    """--total: the finished trials, with those running or queued, make the asked total."""


def counts_toward_total(t: optuna.trial.FrozenTrial) -> bool:
    """Finished with a verdict on its configuration: completed, pruned, or failed on its own (diverged).
    A trial that failed because its worker died or was interrupted is retried or replaced instead."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "failure" in t.user_attrs


class WorkerStudy(optuna.Study):
    """The study as one of several workers sees it: before each trial it takes over the trials of
    dead workers on this machine, and with `total` it starts no trial beyond that many."""

    def __init__(self, study: optuna.Study, lock: StudyLock, total: int | None = None):
        super().__init__(study_name=study.study_name, storage=study._storage, sampler=study.sampler,
                         pruner=study.pruner)
        self.lock, self.total = lock, total

    def ask(self, fixed_distributions=None):
        with self.lock():
            fail_dead_local_trials(self)
            if self.total is not None:
                trials = self.get_trials(deepcopy=False)
                queued = any(t.state == TrialState.WAITING for t in trials)  # a retry to take over
                due = sum(counts_toward_total(t) or t.state == TrialState.RUNNING for t in trials)
                if not queued and due >= self.total:
                    raise TotalReached
            return super().ask(fixed_distributions)


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
        for key, value in process_identity().items():  # lets a later worker see that this one died
            trial.set_user_attr(key, value)
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
            # Lets a retry of this trial continue from here. Written whole (write_bytes): a worker
            # killed while writing leaves the previous epoch's checkpoint, not a torn one.
            buf = io.BytesIO()
            torch.save(t.state_dict(), buf)
            write_bytes(checkpoint, buf.getbuffer())
            trial.set_user_attr("history", t.history)
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {record['epoch']} is below the median")

        state = "FAIL"
        try:
            trainer.fit(on_epoch)
            state = "COMPLETE"
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Diverged as e:
            trial.set_user_attr("failure", str(e))
            raise
        except KeyboardInterrupt:
            state = None  # Ctrl-C: save what a resume needs and stop, nothing more
            raise
        finally:
            tensorboard.close()
            metrics = {"best_val_acc": trainer.best_acc, "best_epoch": trainer.best_epoch,
                       "epochs_run": trainer.epoch, "train_time_s": time.perf_counter() - t0}
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            write_json(os.path.join(run_dir, "metrics.json"), {**metrics, "history": trainer.history})
            # The search in TensorBoard's HParams dashboard: one row per trial, whatever its end.
            if state is not None:
                log_hparams(run_dir, {**trial.params, "trial": trial.number, "state": state},
                            {"best_val_acc": max(trainer.best_acc, 0.0), "epochs_run": trainer.epoch})
        return trainer.best_acc

    def _resume_if_retry(self, trial: optuna.Trial, trainer: Trainer):
        """A retry continues from the newest checkpoint of the attempts before it: the last attempt
        may have died before its first epoch ended."""
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        with warnings.catch_warnings():  # retries queued by Optuna's own callback (studies of older versions)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            earlier = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        for number in reversed(trial.user_attrs.get("retry_history", earlier)):
            path = os.path.join(self.out_dir, f"trial_{number:04d}", "last.pt")
            if not os.path.isfile(path):
                continue
            state = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
            if state["config"] != trainer.cfg.to_dict():
                continue
            trainer.load_state_dict(state)
            for record in trainer.history:  # the pruner judges the whole curve, so replay it
                trial.report(record["val_acc"], record["epoch"])
            trial.set_user_attr("resumed_from", {"trial": number, "epoch": trainer.epoch})
            return


# ----------------------------------------------------------------------------- reports


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
    import matplotlib.pyplot as plt
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
                ax.set_xlabel("trial")
            # the slice plot is one row of panels, one per parameter: keep each panel readable
            fig.set_size_inches(*(9, 5) if name != "slice.png" else (2.6 * len(varied) + 1.5, 3.8))
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, name), dpi=100)
            plt.close(fig)


# ----------------------------------------------------------------------------- command line


class ResultsError(RuntimeError):
    """The results folder cannot be written; the message says which and why."""


def check_writable(folder: str):
    """Fail now, in one line, rather than after the first epoch of the first trial."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ResultsError(f"cannot write results to {folder!r}: {e.strerror or e}") from None


def usable_device(name: str) -> torch.device:
    """--device as a torch.device; a DataError in one line for a name torch does not know or a
    device this machine lacks, before any data is loaded. (Not evaluate.resolve_device: its
    scikit-learn import would add 2 s to every worker's start.)"""
    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise DataError(f"--device {name!r} is not a device: {str(e).splitlines()[0]}") from None
    if device.type == "cuda":
        present = (device.index or 0) < torch.cuda.device_count()
    elif device.type == "mps":
        present = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    else:  # xpu, meta, ...: names torch knows that this code was never run on
        present = device.type == "cpu"
    if not present:
        raise DataError(f"--device {name}: torch {torch.__version__} finds no such device on this machine "
                        f"({torch.cuda.device_count()} CUDA GPUs); use --device auto, cuda, mps or cpu")
    return device


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line: the usage is in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--trials", type=int, default=None,
                          help="trials to add to the study in this run (default: 40); a retry of a trial whose "
                               "worker died counts as one of them")
    how_many.add_argument("--total", type=int, default=None,
                          help="instead of --trials: run until the study holds this many finished trials (completed, "
                               "pruned or diverged), every worker's counted; run the same command again after a "
                               "crash, Ctrl-C or kill -9 and it runs only the missing ones, a killed trial "
                               "continuing from its last epoch. Give every worker the same number")
    p.add_argument("--epochs", type=int, default=20, help="epochs per proxy trial (default: 20)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs (default: 6)")
    p.add_argument("--subset", type=float, default=0.2,
                   help="share of the 45,000 training images each trial trains on, stratified (default: 0.2)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--results", default="results", help="output folder (default: results)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (sqlite:///..., postgresql://user:password@host/db, "
                        "mysql://...) or a journal file path for several processes on one machine "
                        "(default: sqlite:///RESULTS/stage1.db); a password is shown as ***")
    p.add_argument("--study-name", default="vit-cifar10", help="study name in the storage (default: vit-cifar10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sampler and the training runs; give each parallel worker its own (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: auto)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trials run at once in this process (threads); >1 can fill a big GPU (default: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs for long runs)")
    p.add_argument("--top-k", type=int, default=3,
                   help="configurations written to topK.json, best first (default: 3, so top3.json)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats in RDB storage; a trial silent for 3 "
                        "intervals is failed and retried by another worker (default: 60)")
    add_recipe_flags(p)
    args = p.parse_args(argv)
    recipe_overrides(args, p)
    if args.trials is None and args.total is None:
        args.trials = 40
    for name in ("trials", "total", "epochs", "patience", "jobs", "top_k", "heartbeat"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    if args.storage is None:
        args.storage = f"sqlite:///{os.path.join(args.results, 'stage1.db')}"
    return args


def run(args, splits=None):
    """Run the search; `splits` (tests) replaces CIFAR-10."""
    # Ours is one line per trial (after_trial) and one for an error that stops the run (main);
    # Optuna would add a warning with a traceback for every failed trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out_dir = os.path.join(args.results, "stage1")
    device = usable_device(args.device)
    check_writable(out_dir)
    storage = make_storage(args.storage, args.heartbeat)
    try:
        study = WorkerStudy(make_study(storage, args.study_name, args.seed), StudyLock(args.storage), args.total)
    except Exception as e:  # RDB storages may connect lazily: a server that went away fails here
        raise storage_error(args.storage, e) from None
    if splits is None:
        ds = load_cifar10(args.data_dir, download=not args.no_download)
        splits = train_val_splits(ds, subset_ratio=args.subset)
    splits = splits.to(device)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, subset_ratio=args.subset, seed=args.seed,
                       **recipe_overrides(args))
    objective = Objective(base, splits, device, out_dir, compile=args.compile)
    t0 = time.perf_counter()
    goal = f"adding {args.trials}" if args.total is None else f"running until {args.total} have finished"
    tqdm.write(f"study {args.study_name!r} in {redact_url(args.storage)}: {len(study.trials)} trials so far; {goal} "
               f"on {device} ({len(splits.train_images)} training, {len(splits.val_images)} validation images)")

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial):
        done = completed_by_value(study)
        value = f"{100 * trial.value:.2f} %" if trial.value is not None else "-"
        best = f"{100 * done[0].value:.2f} % (trial {done[0].number})" if done else "-"
        why, resumed = trial.user_attrs.get("failure", ""), trial.user_attrs.get("resumed_from")
        if resumed:
            why = f"(went on from trial {resumed['trial']}'s epoch {resumed['epoch']})"
        tqdm.write(f"trial {trial.number:4d} {trial.state.name:8s} val_acc {value}  best {best}  "
                   f"elapsed {time.perf_counter() - t0:7.0f}s {why}".rstrip())
        write_reports(study, out_dir, args.top_k, plots=False)

    try:
        study.optimize(objective, n_trials=args.trials, n_jobs=args.jobs, callbacks=[after_trial],
                       catch=(Diverged,), gc_after_trial=False)
    except TotalReached:  # raised by the next ask once the total is in hand
        pass
    except KeyboardInterrupt:
        tqdm.write("interrupted: the running trial is marked FAIL, finished trials are kept; "
                   "run the same command to continue the study")
        write_reports(study, out_dir, args.top_k)
        raise
    write_reports(study, out_dir, args.top_k)
    done = completed_by_value(study)
    tqdm.write(f"done: {len(done)} completed trials; top {args.top_k} in {os.path.join(out_dir, top_file(args.top_k))}")
    return study


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, StorageError, ResultsError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # during the run: a full disk, a results folder removed or made read-only
        sys.exit(f"error: cannot write {e.filename or args.results!r}: {e.strerror or e}; "
                 f"the trials told to the study so far are kept")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
