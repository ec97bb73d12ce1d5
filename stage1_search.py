"""Stage 1: search ViT hyperparameters with Optuna on cheap proxy runs.

    python stage1_search.py --trials 40    # runs until the study holds 40; run again after a stop: the rest
    python stage1_search.py --trials 40 --jobs 2 --time-limit 2h40m   # two worker processes, stopping in time

A TPE sampler proposes configurations, a median pruner stops hopeless ones early, and every
trial lives in an Optuna storage (SQLite under results/ by default), so a run can be resumed,
watched with optuna-dashboard and shared by several workers. The top configurations go to
results/stage1/top3.json (top{K}.json with --top-k K) for stage 2.
"""

import argparse
import os
import signal
import sys
import time
import warnings
from dataclasses import replace

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from checkpoint import load_into, save_checkpoint
from cli import (EXIT_TIME_LIMIT, Interrupted, OneLineParser, ResultsError, StoppedForTime, add_common_flags,
                 add_time_limit, check_positive, check_stop, check_writable, clock, default_storage, epoch_line,
                 stop_handlers, nothing_fits, resolve_device, run_main, stop_requested)
from data import DataError, find_cifar10, load_cifar10, train_val_splits
from report import TensorBoardLogger, code_version, log_hparams, write_json
from reports import top_file, write_reports
from train import AMP_HELP, AMP_MODES, Diverged, TrainConfig, Trainer, add_recipe_flags, recipe_overrides, warmup_note
from workers import (TotalReached, best_so_far, completed_by_value, finished_count, open_worker_study,
                     process_identity, redact_url, requeue, run_processes, stop_workers_on_sigterm,
                     storage_lost_in_one_line, through_a_restart)


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


# ----------------------------------------------------------------------------- one trial


class _Skip(Exception):
    """A retry's earlier checkpoint of another configuration: not this trial's to continue."""


class OutOfMemory(RuntimeError):
    """A trial's configuration did not fit the device's memory; the trial fails with that reason."""


class Objective:
    """Train one suggested configuration; report each epoch to the pruner.

    deadline (time.monotonic()): a trial whose next epoch would end after it stops there, saved, and
    raises StoppedForTime; `last_epoch_s` carries the latest epoch's wall time from trial to trial.
    """

    def __init__(self, base: TrainConfig, splits, device, out_dir: str, amp="auto", compile=False,
                 deadline: float | None = None, progress: bool = True):
        self.base, self.splits, self.device, self.out_dir = base, splits, device, out_dir
        self.amp, self.compile, self.deadline, self.progress = amp, compile, deadline, progress
        self.last_epoch_s = None
        self.epochs_trained = 0  # by this process, over all its trials
        self.current = None  # the number of the trial this process runs, or ran last

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        cfg = suggest_config(trial, self.base)
        run_dir = os.path.join(self.out_dir, f"trial_{trial.number:04d}")
        trial.set_user_attr("config", cfg.to_dict())
        for key, value in process_identity().items():  # lets a later worker see that this one died
            trial.set_user_attr(key, value)
        write_json(os.path.join(run_dir, "config.json"),
                   {"trial": trial.number, "config": cfg.to_dict(), "code_version": code_version()})
        s = self.splits
        trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, self.device,
                          amp=self.amp, compile=self.compile, progress=self.progress, stop_check=check_stop)
        self._resume_if_retry(trial, trainer)
        tensorboard = TensorBoardLogger(run_dir)
        checkpoint = os.path.join(run_dir, "last.pt")
        t0 = time.perf_counter()

        def on_epoch(t: Trainer, record: dict):
            self.epochs_trained += 1
            tensorboard(t, record)
            # Lets a retry of this trial continue from here. Written whole: a worker killed while
            # writing leaves the previous epoch's checkpoint, not a torn one.
            save_checkpoint(t.state_dict(), checkpoint)
            db = getattr(trial.study, "db", None)  # a database may restart under a long search: ride it out
            through_a_restart(db, trial.set_user_attr, "history", t.history)
            # Every epoch in the log too, terminal or not: where a search stands, without the dashboard.
            tqdm.write(epoch_line(f"trial {trial.number:4d}", record, t.history, cfg.epochs))
            through_a_restart(db, trial.report, record["val_acc"], record["epoch"])
            if through_a_restart(db, trial.should_prune):
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {record['epoch']} is below the median")

        state, out_of_memory = "FAIL", None
        try:
            trainer.fit(on_epoch, deadline=self.deadline, epoch_estimate_s=self.last_epoch_s)
            if trainer.stopped_for_time:
                state = None  # like Ctrl-C: what a resume needs is saved; its retry writes the row
                trial.set_user_attr("stopped_for_time", True)
                raise StoppedForTime(trial.number)
            state = "COMPLETE"
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Diverged as e:
            trial.set_user_attr("failure", str(e))
            raise
        except torch.OutOfMemoryError as e:
            # The configuration's verdict, not the worker's: the trial fails with its reason and the study
            # goes on. Raised below, outside this handler, so that no traceback keeps the trial's tensors alive.
            out_of_memory = f"out of {self.device.type} memory ({str(e).splitlines()[0][:200]})"
            trial.set_user_attr("failure", out_of_memory)
        except KeyboardInterrupt as e:
            state = None  # Ctrl-C or SIGTERM: what a resume needs is saved (the last epoch's last.pt); stop
            trial.set_user_attr("interrupted", "SIGTERM" if getattr(e, "exit_code", 130) == 143 else "Ctrl-C")
            raise
        finally:
            if trainer.history:
                self.last_epoch_s = trainer.history[-1].get("epoch_s")
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
        best_acc = trainer.best_acc
        if out_of_memory:
            del trainer  # its tensors must not crowd the next trial
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(out_of_memory)
        return best_acc

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
            try:  # the checks a stage-2 resume makes; a checkpoint that fails them is passed over, said once
                load_into(trainer, path, again="the retry looks at the attempt before it, or starts over",
                          other_config=lambda: _Skip())
            except _Skip:
                continue
            except DataError as e:
                tqdm.write(f"trial {trial.number:4d}: {e}")
                continue
            for record in trainer.history:  # the pruner judges the whole curve, so replay it
                trial.report(record["val_acc"], record["epoch"])
            trial.set_user_attr("resumed_from", {"trial": number, "epoch": trainer.epoch})
            return


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--trials", type=int, default=None,
                          help="run until the study holds this many finished trials (completed, pruned or failed on "
                               "their own), every worker's counted; the same command run again after a crash, "
                               "Ctrl-C, kill -9 or --time-limit runs only the missing ones, a cut trial going on "
                               "from its last epoch. Give every worker the same number (default: 40)")
    how_many.add_argument("--total", type=int, default=None, help="the same as --trials (its older name)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per proxy trial (default: 20)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs (default: 6)")
    p.add_argument("--subset", type=float, default=0.2,
                   help="share of the 45,000 training images each trial trains on, stratified (default: 0.2)")
    add_common_flags(p, results_help="output folder (default: results)",
                     storage_help="Optuna storage: an RDB URL (sqlite:///..., postgresql://user:password@host/db, "
                                  "mysql://...) or a journal file path for several processes on one machine "
                                  "(default: sqlite:///RESULTS/stage1.db); a password is shown as ***")
    p.add_argument("--study-name", default="vit-cifar10", help="study name in the storage (default: vit-cifar10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sampler and the training runs (default: 0)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes on this machine, sharing the study's storage as workers on several "
                        "machines do; 2-4 can fill a big GPU with small proxy trials. On a CPU each process "
                        "gets cores/N threads (default: 1)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help=AMP_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each trial's model. Every trial has a new shape and so compiles anew "
                        "(tens of seconds), and proxy trials are short: it rarely pays; stage 2 is where "
                        "compiling can (default: off, on every device)")
    p.add_argument("--top-k", type=int, default=3,
                   help="configurations written to topK.json, best first (default: 3, so top3.json)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running trial's heartbeats in RDB storage; a trial silent for 3 "
                        "intervals is failed and retried by another worker (default: 60)")
    add_time_limit(p)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set by --jobs for its workers
    add_recipe_flags(p)
    args = p.parse_args(argv)
    recipe_overrides(args, p)
    check_positive(p, args, ("trials", "total", "epochs", "patience", "jobs", "top_k", "heartbeat"))
    args.trials = args.total or args.trials or 40
    args.total = None
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    default_storage(args)
    return args


INTERRUPTED = ("interrupted: finished trials are kept, and a trial cut short goes on from its last finished epoch; "
               "run the same command to continue the study")


def _stopped_for_time(study: optuna.Study, total: int) -> str:
    return f"stopped for the time limit: {finished_count(study)} of {total} trials finished"


def run(args, splits=None):
    """Run the search (with --jobs, in that many worker processes); `splits` (tests) replaces CIFAR-10."""
    # Ours is one line per trial (after_trial) and one for an error that stops the run (main);
    # Optuna would add a warning with a traceback for every failed trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.monotonic()
    # --jobs' workers inherit their parent's deadline: CLOCK_MONOTONIC is one clock for every process.
    if getattr(args, "deadline", None) is None and args.time_limit is not None:
        args.deadline = started + args.time_limit
    deadline = getattr(args, "deadline", None)
    out_dir = os.path.join(args.results, "stage1")
    device = resolve_device(args.device)
    check_writable(out_dir)
    if splits is None:  # before the storage: a mistyped --data-dir must not leave an empty study behind
        find_cifar10(args.data_dir, download=not args.no_download)
    # Before any worker starts: the schema exists once they do.
    study = open_worker_study(args.storage, args.study_name, args.seed, args.heartbeat, args.worker_index, args.trials)
    if args.jobs > 1:
        return run_workers(args, study, splits, out_dir)
    if splits is None:
        ds = load_cifar10(args.data_dir, download=not args.no_download, test=False)  # stage 1 never tests
        splits = train_val_splits(ds, subset_ratio=args.subset)
    splits = splits.to(device)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, subset_ratio=args.subset, seed=args.seed,
                       **recipe_overrides(args))
    worker = args.worker_index > 0
    objective = Objective(base, splits, device, out_dir, amp=args.amp, compile=args.compile, deadline=deadline,
                          progress=not worker)  # --jobs' workers share one terminal: no progress bars
    who = f"worker {args.worker_index}: " if worker else ""
    if not worker:
        tqdm.write(f"study {args.study_name!r} in {redact_url(args.storage)}: {finished_count(study)} of {args.trials} "
                   f"trials finished; running the rest on {device} ({len(splits.train_images)} training, "
                   f"{len(splits.val_images)} validation images)")
    note = warmup_note(base)
    if note and not worker:
        tqdm.write(note)
    times = []  # this worker's trials' wall times, for the ETA

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial):
        done = completed_by_value(study)
        value = f"{100 * trial.value:.2f} %" if trial.value is not None else "-"
        best = f"{100 * done[0].value:.2f} % (trial {done[0].number})" if done else "-"
        why, resumed = trial.user_attrs.get("failure", ""), trial.user_attrs.get("resumed_from")
        if resumed:
            why = f"(went on from trial {resumed['trial']}'s epoch {resumed['epoch']})"
        times.append(trial.user_attrs.get("train_time_s") or 0.0)
        finished = finished_count(study)
        left = max(0, args.trials - finished)
        eta = f", about {clock(left * sum(times) / len(times) / args.jobs_running)} left" if left and times else ""
        tqdm.write(f"{who}trial {trial.number:4d} {trial.state.name:8s} val_acc {value}  best {best}  "
                   f"{finished}/{args.trials} finished{eta}  elapsed {time.monotonic() - started:7.0f}s {why}".rstrip())
        write_reports(study, out_dir, args.top_k, plots=False)
        if stop_requested() is not None:  # Ctrl-C or SIGTERM between two trials: start no other
            study.stop()
        elif left and deadline is not None and objective.last_epoch_s is not None \
                and time.monotonic() + objective.last_epoch_s > deadline:
            nonlocal stopped
            stopped = True
            study.stop()  # not even one epoch of another trial fits

    args.jobs_running = getattr(args, "jobs_running", 1)
    stopped, cut_where = False, ""  # --time-limit: whether it stopped the run, and where a trial was cut
    try:
        study.optimize(objective, n_trials=None, callbacks=[after_trial], catch=(Diverged, OutOfMemory),
                       gc_after_trial=False)
    except TotalReached:  # raised by the next ask once the total is in hand
        pass
    except StoppedForTime as e:  # mid-trial: Optuna has marked it FAIL; queue it to go on in the next run
        cut = next(t for t in study.get_trials(deepcopy=False) if t.number == e.args[0])
        with study.lock():
            requeue(study, cut, cut="stopped for the time limit")
        stopped = True
        cut_where = (f" (trial {cut.number} after epoch {cut.user_attrs.get('epochs_run', 0)} of {args.epochs} goes "
                     f"on in the next run)")
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut the queueing below short
        cut = next((t for t in study.get_trials(deepcopy=False) if t.number == objective.current), None)
        if cut is not None and cut.state == TrialState.FAIL and "interrupted" in cut.user_attrs:
            with study.lock():  # Optuna has failed it; its retry goes on from its last finished epoch
                requeue(study, cut, cut=f"stopped by {cut.user_attrs['interrupted']}")
        write_reports(study, out_dir, args.top_k)
        if not worker:  # the --jobs parent says it for all its workers
            tqdm.write(INTERRUPTED)
        raise Interrupted(stop_requested() or signal.SIGINT) from e
    write_reports(study, out_dir, args.top_k)
    if stop_requested() is not None:  # between two trials: none was cut
        if not worker:
            tqdm.write(INTERRUPTED)
        raise Interrupted(stop_requested())
    if stopped:
        if not objective.epochs_trained:
            raise nothing_fits(who, objective.last_epoch_s)
        raise StoppedForTime(f"{who}{_stopped_for_time(study, args.trials)}{cut_where}{best_so_far(study)}")
    if not worker:
        done = completed_by_value(study)
        tqdm.write(f"done: {len(done)} completed trials; top {args.top_k} in "
                   f"{os.path.join(out_dir, top_file(args.top_k))}")
    return study


def run_workers(args, study: optuna.Study, splits, out_dir: str):
    """--jobs N: N worker processes on the study's storage, the mechanism several machines use (and
    that survives kill -9)."""
    tqdm.write(f"study {args.study_name!r} in {redact_url(args.storage)}: {finished_count(study)} of {args.trials} "
               f"trials finished; running the rest in {args.jobs} worker processes")
    codes, signum = run_processes(_worker_main, [
        (argparse.Namespace(**{**vars(args), "jobs": 1, "worker_index": k + 1, "jobs_running": args.jobs}), splits)
        for k in range(args.jobs)], name="stage1-worker")
    write_reports(study, out_dir, args.top_k)
    if signum is not None or {130, 143} & set(codes):
        tqdm.write(INTERRUPTED)
        raise Interrupted(signum or signal.SIGINT)
    if EXIT_TIME_LIMIT in codes:
        raise StoppedForTime(f"{_stopped_for_time(study, args.trials)}{best_so_far(study)}; cut trials go on in "
                             f"the next run")
    failed = [f"worker {k + 1} (exit code {c})" for k, c in enumerate(codes) if c != 0]
    if failed:
        raise ResultsError(f"{', '.join(failed)} stopped with an error (its line is above); the trials finished so "
                           f"far are kept: run the same command to continue")
    done = completed_by_value(study)
    tqdm.write(f"done: {len(done)} completed trials; top {args.top_k} in {os.path.join(out_dir, top_file(args.top_k))}")
    return study


def _worker_main(args, splits):
    """One --jobs worker process: the whole search loop, its errors as one line and an exit code."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs_running)
    torch.set_num_threads(threads)  # N workers x all cores each would oversubscribe the CPU many times over
    stop_workers_on_sigterm()
    sys.exit(_run_main(args, splits))


def _run_main(args, splits=None) -> int:
    """run(), with the project's errors as one line on stderr; returns the exit code."""
    # The --jobs parent gives the command that continues, once, for all its workers.
    return run_main(lambda: storage_lost_in_one_line(args.storage, run, args, splits),
                    script=None if args.worker_index else "stage1_search.py",
                    argv=getattr(args, "argv", None), redact=redact_url, unnamed=args.results,
                    kept="the trials told to the study so far are kept")


def main(argv=None):
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    with stop_handlers():
        code = _run_main(args)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
