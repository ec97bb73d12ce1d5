"""Stage 1: search ViT hyperparameters with Optuna on cheap proxy runs.

    python stage1_search.py --trials 40    # runs until the study holds 40; run again after a stop: the rest
    python stage1_search.py --trials 40 --jobs 2 --time-limit 2h40m   # two worker processes, stopping in time
    python stage1_search.py --storage postgresql://user:password@host/db   # the same line on every machine

A TPE sampler proposes configurations, a median pruner stops hopeless ones early, and every trial
lives in an Optuna storage (SQLite under results/ by default), so a run can be resumed, watched with
optuna-dashboard and shared by workers on any number of machines (storage.py). The top configurations
go to results/stage1/top3.json (top{K}.json with --top-k K) for stage 2.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from cli import (OneLineParser, StoppedForTime, add_common_flags, add_worker_flags, check_stop, check_writable, clock,
                 nothing_fits, positive, raise_for, resolve_device, run_main, stop_handlers, stop_requested,
                 storage_url)
from data import DataError, find_cifar10, load_cifar10, train_val_splits
from reports import code_version, completed_by_value, log_hparams, top_file, write_json, write_stage1_reports
from storage import (Worker, open_storage, optimize, redact_url, run_workers, storage_error, storage_lost_in_one_line,
                     through_a_restart, train_trial)
from train import AMP_HELP, AMP_MODES, Diverged, TrainConfig, Trainer, add_recipe_flags, recipe_overrides, warmup_note


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


def open_study(storage, url: str, name: str, seed: int, worker: int = 0) -> optuna.Study:
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True,
            # Prune only against 5 finished trials, and not before epoch 5: warmup takes 2,
            # and slow starters (SGD, small lr) are often the ones that end best.
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5))
        study.set_metric_names(["val_acc"])  # optuna-dashboard then says "val_acc", not "Objective 0"
        # 10 random trials (a quarter of 40) give TPE a spread to model; constant_liar keeps parallel workers
        # from proposing one configuration twice. The seed moves with the study's length, so that a resumed
        # run does not replay the first run's proposals, and with the worker, so that workers started together
        # do not propose the same ones.
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) + 100_003 * worker,
                                                   n_startup_trials=10, multivariate=True, constant_liar=True)
        return study
    except Exception as e:  # RDB storages may connect lazily: a server that went away fails here
        raise storage_error(url, e) from None


def finished_count(study: optuna.Study) -> int:
    """Trials with a verdict on their configuration: completed, pruned, or failed on their own (diverged, out of
    memory). A trial cut short or whose worker died is queued again instead, and its retry counts."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "failure" in t.user_attrs
               for t in study.get_trials(deepcopy=False))


def best_so_far(study: optuna.Study) -> str:
    best = completed_by_value(study)[:1]
    return f", best val acc {100 * best[0].value:.2f} % (trial {best[0].number})" if best else ""


# ----------------------------------------------------------------------------- one trial


class OutOfMemory(RuntimeError):
    """A trial's configuration did not fit the device's memory; the trial fails with that reason."""


@dataclass
class Objective:
    """Train one suggested configuration, reporting each epoch to the pruner; a retry goes on from the
    checkpoint of the attempt before it."""
    base: TrainConfig
    splits: object
    device: torch.device
    out_dir: str
    storage: object  # the study's storage: through_a_restart closes its broken session
    worker: Worker
    amp: str = "auto"
    compile: bool = False

    def __call__(self, trial: optuna.Trial) -> float:
        self.worker.current = trial.number
        cfg = suggest_config(trial, self.base)
        run_dir = os.path.join(self.out_dir, f"trial_{trial.number:04d}")
        trial.set_user_attr("config", cfg.to_dict())
        write_json(os.path.join(run_dir, "config.json"),
                   {"trial": trial.number, "config": cfg.to_dict(), "code_version": code_version()})
        s = self.splits
        trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, self.device, amp=self.amp,
                          compile=self.compile, progress=not self.worker.index, stop_check=check_stop)
        self._resume_if_retry(trial, trainer)

        def prune(t: Trainer, record: dict):
            if through_a_restart(self.storage, trial.should_prune):
                trial.set_user_attr("pruned_at_epoch", record["epoch"])
                raise optuna.TrialPruned(f"val_acc {record['val_acc']:.4f} at epoch {record['epoch']} is below the "
                                         f"median")

        state, out_of_memory, t0 = "FAIL", None, time.perf_counter()
        try:
            train_trial(trial, trainer, self.worker, self.storage, run_dir, f"trial {trial.number:4d}", then=prune)
            if trainer.stopped_for_time:
                state = None  # what a resume needs is saved; its retry writes the row
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
            # The configuration's verdict, not the worker's: the trial fails with its reason and the study goes
            # on. Raised below, outside this handler, so that no traceback keeps the trial's tensors alive.
            out_of_memory = f"out of {self.device.type} memory ({str(e).splitlines()[0][:200]})"
            trial.set_user_attr("failure", out_of_memory)
        except KeyboardInterrupt as e:
            state = None  # Ctrl-C or SIGTERM: the last epoch's last.pt is what goes on
            trial.set_user_attr("interrupted", "SIGTERM" if getattr(e, "exit_code", 130) == 143 else "Ctrl-C")
            raise
        finally:
            metrics = {"best_val_acc": trainer.best_acc, "best_epoch": trainer.best_epoch,
                       "epochs_run": trainer.epoch, "train_time_s": time.perf_counter() - t0}
            for key, value in metrics.items():
                trial.set_user_attr(key, value)
            write_json(os.path.join(run_dir, "metrics.json"), {**metrics, "history": trainer.history})
            if state is not None:  # the search in TensorBoard's HParams dashboard: one row per trial
                log_hparams(run_dir, {**trial.params, "trial": trial.number, "state": state},
                            {"best_val_acc": max(trainer.best_acc, 0.0), "epochs_run": trainer.epoch})
        if out_of_memory:
            del trainer  # its tensors must not crowd the next trial
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(out_of_memory)
        return trainer.best_acc

    def _resume_if_retry(self, trial: optuna.Trial, trainer: Trainer):
        """A retry goes on from the newest checkpoint of the attempts before it (Optuna's retry_history): the
        last attempt may have died before its first epoch ended."""
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        for number in reversed(RetryHeartbeatStaleTrialCallback.retry_history(frozen)):
            path = os.path.join(self.out_dir, f"trial_{number:04d}", "last.pt")
            if not os.path.isfile(path):
                continue
            try:  # a checkpoint that cannot be continued is passed over, said once
                trainer.resume(path, again="the retry looks at the attempt before it, or starts over")
            except DataError as e:
                tqdm.write(f"trial {trial.number:4d}: {e}")
                continue
            trial.set_user_attr("resumed_from", {"trial": number, "epoch": trainer.epoch})
            return


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--trials", type=positive(int), default=None,
                          help="run until the study holds this many finished trials (completed, pruned or failed on "
                               "their own), every worker's counted; each worker checks after each of its trials, so "
                               "N workers may finish up to N-1 more. The same command run again after a crash, "
                               "Ctrl-C, kill -9 or --time-limit runs only the missing ones, a cut trial going on "
                               "from its last epoch. Give every worker the same number (default: 40)")
    how_many.add_argument("--total", type=positive(int), default=None, help="the same as --trials (its older name)")
    p.add_argument("--epochs", type=positive(int), default=20, help="epochs per proxy trial (default: 20)")
    p.add_argument("--patience", type=positive(int), default=6, help="early-stopping patience in epochs (default: 6)")
    p.add_argument("--subset", type=positive(float, at_most=1.0), default=0.2,
                   help="share of the 45,000 training images each trial trains on, stratified (default: 0.2)")
    add_common_flags(p, results_help="output folder (default: results)",
                     storage_help="Optuna storage: an RDB URL (sqlite:///..., postgresql://user:password@host/db, "
                                  "mysql://...), the same on every machine, or a journal file path for several "
                                  "processes on one machine, which Optuna gives no heartbeat: a killed worker's trial "
                                  "is not retried there (default: sqlite:///RESULTS/stage1.db); a password is shown "
                                  "as ***")
    p.add_argument("--study-name", default="vit-cifar10", help="study name in the storage (default: vit-cifar10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and the training runs (default: 0)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help=AMP_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each trial's model. Every trial has a new shape and so compiles anew "
                        "(tens of seconds), and proxy trials are short: it rarely pays; stage 2 is where "
                        "compiling can (default: off, on every device)")
    p.add_argument("--top-k", type=positive(int), default=3,
                   help="configurations written to topK.json, best first (default: 3, so top3.json)")
    add_worker_flags(p, "trial")  # 2-4 jobs can fill a big GPU with small proxy trials
    add_recipe_flags(p)
    args = p.parse_args(argv)
    recipe_overrides(vars(args), p.error)
    return args


def run(args, splits=None, worker: Worker | None = None):
    """Run the search (with --jobs, in that many worker processes); `splits` (tests) replaces CIFAR-10."""
    # Ours is one line per trial and one for an error that stops the run; Optuna would add a warning with a
    # traceback for every failed trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.monotonic()
    # --jobs' workers inherit their parent's deadline: CLOCK_MONOTONIC is one clock for every process.
    worker = worker or Worker(deadline=None if args.time_limit is None else started + args.time_limit)
    total, url = args.trials or args.total or 40, storage_url(args.storage, args.results)
    out_dir, who = os.path.join(args.results, "stage1"), f"worker {worker.index}: " if worker.index else ""
    check_writable(out_dir)
    parent = args.jobs > 1 and not worker.index  # it leaves the devices to its workers: no CUDA initialised here
    device = None if parent else resolve_device(worker.device(args.device))
    if splits is None:  # before the storage: a mistyped --data-dir must not leave an empty study behind
        find_cifar10(args.data_dir, download=not args.no_download)
    storage = open_storage(url, args.heartbeat)
    study = open_study(storage, url, args.study_name, args.seed, worker.index)
    if not worker.index:
        tqdm.write(f"study {args.study_name!r} in {redact_url(url)}: {finished_count(study)} of {total} trials "
                   f"finished; running the rest " + (f"in {args.jobs} worker processes" if parent else f"on {device}"))
    if parent:
        stop = run_workers(_run_main, args, splits, worker, "stage1-worker")
        return _end(study, args, out_dir, total, stop, who)
    if splits is None:  # stage 1 never tests
        splits = train_val_splits(load_cifar10(args.data_dir, download=not args.no_download, test=False),
                                  subset_ratio=args.subset)
    splits = splits.to(device)
    base = TrainConfig(epochs=args.epochs, patience=args.patience, subset_ratio=args.subset, seed=args.seed,
                       **recipe_overrides(vars(args)))
    objective = Objective(base, splits, device, out_dir, storage, worker, amp=args.amp, compile=args.compile)
    if warmup_note(base) and not worker.index:
        tqdm.write(warmup_note(base))
    times = []  # this worker's trials' wall times, for the ETA

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial):
        value = f"{100 * trial.value:.2f} %" if trial.value is not None else "-"
        why, resumed = trial.user_attrs.get("failure", ""), trial.user_attrs.get("resumed_from")
        if resumed:
            why = f"(went on from trial {resumed['trial']}'s epoch {resumed['epoch']})"
        times.append(trial.user_attrs.get("train_time_s") or 0.0)
        finished = finished_count(study)
        left = max(0, total - finished)
        eta = f", about {clock(left * sum(times) / len(times) / worker.jobs)} left" if left else ""
        tqdm.write(f"{who}trial {trial.number:4d} {trial.state.name:8s} val_acc {value}  {finished}/{total} finished"
                   f"{best_so_far(study)}{eta}  elapsed {time.monotonic() - started:7.0f}s {why}".rstrip())
        write_stage1_reports(study, out_dir, args.top_k, plots=False)
        if not left or stop_requested() is not None:  # Ctrl-C or SIGTERM between two trials: start no other
            study.stop()

    stop = None
    if finished_count(study) < total:
        stop = optimize(study, objective, worker, [after_trial], catch=(Diverged, OutOfMemory))
    if stop == "time" and not worker.epochs_trained:
        write_stage1_reports(study, out_dir, args.top_k)
        raise nothing_fits(who, worker.last_epoch_s)
    return _end(study, args, out_dir, total, stop, who)


def _end(study, args, out_dir: str, total: int, stop: str | None, who: str):
    """The reports, and the line (or the exception) that says how the run ended."""
    write_stage1_reports(study, out_dir, args.top_k, plots=not who)
    raise_for(stop, StoppedForTime(f"{who}stopped for the time limit: {finished_count(study)} of {total} trials "
                                   f"finished{best_so_far(study)}; a cut trial goes on from its last epoch in the "
                                   f"next run"), kept="the trials finished so far are kept")
    if not who:
        tqdm.write(f"done: {finished_count(study)} trials finished{best_so_far(study)}; top {args.top_k} in "
                   f"{os.path.join(out_dir, top_file(args.top_k))}")
    return study


def _run_main(args, splits=None, argv=None, worker: Worker | None = None) -> int:
    url = storage_url(args.storage, args.results)
    # A --jobs worker prints only its reason; its parent gives the command that continues, once.
    return run_main(lambda: storage_lost_in_one_line(url, lambda: run(args, splits, worker)),
                    script=None if worker else "stage1_search.py", argv=argv, redact=redact_url,
                    unnamed=args.results, kept="the trials told to the study so far are kept",
                    interrupted=None if worker else "interrupted: finished trials are kept, and a trial cut short "
                                                    "goes on from its last finished epoch; run the same command to "
                                                    "continue the study")


def main(argv=None):
    args = parse_args(argv)
    with stop_handlers():
        code = _run_main(args, argv=argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
