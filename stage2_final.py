"""Stage 2: retrain the best stage-1 configurations on all 45,000 training images, then test them.

    python stage2_final.py                      # the top 3 completed trials of the stage-1 study
    python stage2_final.py --trials 12 31 7     # these trials of the study
    python stage2_final.py --config top3.json   # exactly these configurations, no study needed

The models are the enqueued trials of a stage-2 study ("<study>-stage2") in stage 1's storage, so that
workers anywhere share them as they share stage 1 (storage.py): each takes the next waiting model, a
killed worker's model is retried from its last.pt, and optuna-dashboard shows every epoch's validation
accuracy. Each model trains from scratch with early stopping on the fixed 5,000 validation images into
results/stage2/<model>/ (config.json, TensorBoard curves, best.pt, last.pt, curves.png); the same command
after any stop goes on from the last finished epoch (--fresh starts over). evaluate.py then tests each
best.pt once on the 10,000 test images, and the last worker to finish writes results/stage2/report.md.
"""

import argparse
import os
import sys
import time

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from candidates import (CONFIG_KEYS, LIVE, MODEL_ATTRS, SCHEDULE_FLAGS, candidates_from_file, candidates_from_study,
                        queue_models, report_row, rows_of)
from cli import (OneLineParser, StorageError, StoppedForTime, add_common_flags, add_worker_flags, check_stop,
                 check_writable, nothing_fits, positive, raise_for, resolve_device, run_main, stop_handlers,
                 stop_requested, storage_url)
from data import TEST_FILE, find_cifar10, load_cifar10, train_val_splits
from evaluate import TEST_OUTPUTS, evaluate_checkpoint
from reports import code_version, epochs_phrase, log_hparams, plot_curves, test_row, write_json, write_stage2_report
from storage import (Worker, open_storage, optimize, redact_url, run_workers, storage_error, storage_lost_in_one_line,
                     train_trial)
from train import (AMP_HELP, AMP_MODES, COMPILE_HELP, COMPILE_MODES, LONG_RECIPE, Diverged, TrainConfig, Trainer,
                   add_recipe_flags, recipe_overrides, warmup_note)

# Everything a run writes into its folder; --fresh removes exactly these, nothing a person put there.
RUN_OUTPUTS = ("last.pt", "best.pt", "curves.png", "metrics.json", *TEST_OUTPUTS)


# ----------------------------------------------------------------------------- training and testing one model


def train_and_test(trial: optuna.Trial, storage, args, splits, ds, device, out_dir: str, w: Worker) -> float:
    """The objective of a stage-2 trial: train (or resume) its model, test its best.pt, keep its report row."""
    w.current = trial.number
    if "model" not in trial.user_attrs:  # workers raced for the last waiting model and this one lost
        raise optuna.TrialPruned("no model was left waiting")
    name, cfg = trial.user_attrs["model"], TrainConfig.from_dict(trial.user_attrs["config"])
    # queue_models looks, then enqueues: workers started together may each enqueue the same model, and the
    # lowest-numbered live trial trains it.
    twin = next((t.number for t in trial.study.get_trials(deepcopy=False, states=LIVE)
                 if t.number < trial.number and t.user_attrs.get("model") == name), None)
    if twin is not None:
        raise optuna.TrialPruned(f"trial {twin} has {name} in hand")
    run_dir = os.path.join(out_dir, name)
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    trainer = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels, device,
                      amp=args.amp, compile=args.compile, stop_check=check_stop, progress=not w.index)
    if os.path.isfile(last) and not args.fresh:  # one this run cannot continue is refused, never overwritten
        trainer.resume(last, again="pass --fresh to start it over (its checkpoints are deleted), or --results "
                                   "to write elsewhere")
    else:  # from scratch: no curves or checkpoints of an older run
        for f in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
            if f in RUN_OUTPUTS or f.startswith("events.out.tfevents"):
                os.remove(os.path.join(run_dir, f))
    if trainer.epoch == 0 or not os.path.isfile(os.path.join(run_dir, "config.json")):
        write_json(os.path.join(run_dir, "config.json"), {**{k: trial.user_attrs[k] for k in MODEL_ATTRS},
                                                          "code_version": code_version()})
    if trainer.finished:
        tqdm.write(f"{name}: already trained ({epochs_phrase(trainer.epoch)}); evaluating only")
    elif trainer.epoch:
        tqdm.write(f"{name}: resuming after epoch {trainer.epoch} of {cfg.epochs} (best val acc "
                   f"{100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch})"
                   + ("" if trainer.replays_exactly else "; its last.pt was written on another kind of device, whose "
                      "random stream cannot carry over: not exactly as an uninterrupted run would go on"))
    else:
        tqdm.write(f"{name}: training from scratch, at most {epochs_phrase(cfg.epochs)} on {len(splits.train_images)} "
                   f"images, early stopping on {len(splits.val_images)} (patience {cfg.patience}), on {device}")
        if warmup_note(cfg) and not w.epochs_trained:
            tqdm.write(f"{name}: {warmup_note(cfg)}")
    failure, first_epoch = "", trainer.epoch
    try:
        train_trial(trial, trainer, w, storage, run_dir, name, best=best)
    except Diverged as e:  # best.pt, from before the divergence, is still a model worth testing
        failure = str(e)
        tqdm.write(f"{name}: {e}; evaluating its best checkpoint")
    if trainer.stopped_for_time:
        w.stopped = nothing_fits(f"{name}: ", w.last_epoch_s) if not w.epochs_trained else StoppedForTime(
            f"{name} stopped for the time limit after epoch {trainer.epoch} of {cfg.epochs}"
            + (f" (best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch})"
               if trainer.epoch > first_epoch else " (not one epoch of it fitted)")
            + "; its last.pt holds everything a resume needs")
        raise w.stopped
    why = (f"stopped early: no better validation accuracy for {epochs_phrase(cfg.patience)}" if trainer.stopped_early
           else f"ran all {epochs_phrase(cfg.epochs)}")
    tqdm.write(f"{name}: {epochs_phrase(trainer.epoch)}, {why}; best val acc {100 * trainer.best_acc:.2f} % at epoch "
               f"{trainer.best_epoch}")
    plot_curves(trainer.history, os.path.join(run_dir, "curves.png"),
                f"{name}: best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch}")
    row = {**report_row(trial.user_attrs), "epochs_run": trainer.epoch, "stopped_early": trainer.stopped_early,
           "failure": failure}
    if os.path.isfile(best):  # the one place the test images are read, after the model's training
        m = evaluate_checkpoint(best, ds, device)
        row.update(test_row(m, run_dir))
        log_hparams(run_dir, {**cfg.to_dict(), "model": name},
                    {"test_acc": m["accuracy"], "best_val_acc": m["val_acc"], "epochs_run": trainer.epoch})
        tqdm.write(f"{name}: test accuracy {100 * m['accuracy']:.2f} % (best val acc {100 * m['val_acc']:.2f} %), "
                   f"macro F1 {100 * m['macro']['f1']:.2f} %")
    trial.set_user_attr("row", row)
    return max(trainer.best_acc, 0.0)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trials", type=int, nargs="+", metavar="N", default=None,
                       help="retrain these stage-1 trials by number instead of the top k (default: the top k)")
    which.add_argument("--config", metavar="FILE.json", default=None,
                       help="retrain the configuration(s) in this JSON file (one object or a list, or whole "
                            "top3.json entries); no stage-1 study needed. Keys: "
                            + ", ".join(k for k in CONFIG_KEYS if k not in SCHEDULE_FLAGS)
                            + " (configs/seed_best.json has them all; missing ones take the defaults; epochs, "
                              "patience and the subset come from the flags) (default: none)")
    p.add_argument("--top-k", type=positive(int), default=3, help="completed stage-1 trials to retrain, best first "
                                                                  "(default: 3)")
    p.add_argument("--epochs", type=positive(int), default=120, help="most epochs per model (default: 120)")
    p.add_argument("--patience", type=positive(int), default=15,
                   help="stop a model after this many epochs without a better validation accuracy (default: 15)")
    p.add_argument("--fresh", action="store_true",
                   help="start every model over: the stage-2 study and the models' checkpoints are deleted (give "
                        "it to one worker, and start the others after it)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild report.md from the study and the models' folders as they are now")
    add_common_flags(p, results_help="output folder: reads stage 1's study there, writes RESULTS/stage2/ "
                                     "(default: results)",
                     storage_help="the Optuna storage of stage 1's study, which stage 2's study joins: an RDB URL, "
                                  "the same on every machine, or a journal file path (no heartbeat there: a killed "
                                  "worker's model is not retried) (default: sqlite:///RESULTS/stage1.db)")
    p.add_argument("--study-name", default="vit-cifar10", help="stage 1's study name in the storage; stage 2's is "
                                                               "it with -stage2 (default: vit-cifar10)")
    p.add_argument("--subset", type=positive(float, at_most=1.0), default=1.0,
                   help="share of the 45,000 training images each model trains on, stratified, as stage 1's --subset; "
                        "for a quick look at the whole pipeline (default: 1.0, all of them)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help=AMP_HELP)
    p.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES, help=COMPILE_HELP)
    add_worker_flags(p, "model")
    add_recipe_flags(p, LONG_RECIPE, "the long-schedule recipe, over a stage-1 trial's; a --config file's own keys "
                                     "win over it")
    args = p.parse_args(argv)
    recipe_overrides(vars(args), p.error)
    if args.report_only and args.fresh:
        p.error("--report-only trains nothing, so --fresh has nothing to start over")
    if args.trials is not None and min(args.trials) < 0:
        p.error(f"--trials takes trial numbers (0 or more), got {min(args.trials)}")
    return args


def model_flags(args) -> dict:
    """What the flags set for every model: the schedule and any recipe flag, as TrainConfig values."""
    return {**recipe_overrides(vars(args)), "epochs": args.epochs, "patience": args.patience,
            "subset_ratio": args.subset}


def run(args, ds=None, worker: Worker | None = None) -> list:
    """Train and test every waiting model, then report them all if none is left; `ds` (tests) replaces CIFAR-10.
    Returns every model's row, as far as it got."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    w = worker or Worker(deadline=None if args.time_limit is None else time.monotonic() + args.time_limit)
    url = storage_url(args.storage, args.results)
    # The parent of --jobs' workers leaves the devices to them: it must not initialise CUDA.
    parent = args.jobs > 1 and not w.index
    device = None if args.report_only or parent else resolve_device(w.device(args.device))
    if args.config is None and url.startswith("sqlite:///") and not os.path.isfile(url[len("sqlite:///"):]):
        raise StorageError(f"no stage-1 storage at {url[len('sqlite:///'):]}; run stage1_search.py first, point "
                           f"--storage (or --results) at its output, or pass --config")
    out_dir, name = os.path.join(args.results, "stage2"), f"{args.study_name}-stage2"
    storage = None if args.config else open_storage(url, args.heartbeat)
    # Configurations first: a missing study should fail in a second, not after loading the data.
    flags = model_flags(args)
    candidates = (candidates_from_file(args.config, flags) if args.config else
                  candidates_from_study(storage, url, args.study_name, args.trials, args.top_k, flags))
    if not args.report_only:  # every check before the stage-2 study is touched: bad input changes nothing
        check_writable(out_dir)
        if ds is None:  # a mistyped --data-dir or a damaged file fails here, naming it
            folder = find_cifar10(args.data_dir, download=not args.no_download)
            if not w.index and not os.path.isfile(os.path.join(folder, TEST_FILE)):
                tqdm.write(f"note: {folder} has no {TEST_FILE}: the models train without it (they never read it), "
                           f"and their test waits until it is there; this same command then tests them")
            if not parent:  # the test images are read when a model is tested
                ds = load_cifar10(args.data_dir, download=not args.no_download, test=False)
    storage = storage or open_storage(url, args.heartbeat)
    try:
        if args.fresh and not w.index and name in optuna.study.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)
        exists = name in optuna.study.get_all_study_names(storage)
        study = None if args.report_only and not exists else optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    except Exception as e:  # RDB storages may connect lazily: a server that went away fails here
        raise storage_error(url, e) from None
    if args.report_only:
        rows = rows_of(study, candidates)
        write_stage2_report(rows, out_dir, args.subset, args.patience)
        tqdm.write(f"report of {len(rows)} model(s), {sum('unfinished' not in r for r in rows)} of them finished, "
                   f"in {os.path.join(out_dir, 'report.md')}")
        return rows
    if not w.index:
        study.set_metric_names(["val_acc"])
        queue_models(study, candidates)
        tqdm.write(f"stage 2: {len(candidates)} model(s): {', '.join(c['model'] for c in candidates)}")
    waiting = lambda: study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # noqa: E731
    optuna.storages.fail_stale_trials(study)  # a model whose worker stopped beating: queued again now
    stop = None
    if parent:
        stop = run_workers(_run_main, args, ds, w, "stage2-worker")
    elif waiting():
        splits = train_val_splits(ds, subset_ratio=args.subset, device=device)
        stop = optimize(study, lambda t: train_and_test(t, storage, args, splits, ds, device, out_dir, w), w,
                        [lambda s, t: None if waiting() and stop_requested() is None else s.stop()], keep=MODEL_ATTRS)
    raise_for(stop, w.stopped or StoppedForTime("stopped for the time limit; each model's last.pt holds its last "
                                                "finished epoch"), kept="every model's last.pt is kept")
    rows = rows_of(study, candidates)
    unfinished = [r["model"] for r in rows if "unfinished" in r]
    if unfinished and not w.index:  # a --jobs worker leaves it to its parent
        tqdm.write(f"stage 2: {', '.join(unfinished)} not finished yet: other workers are on them (if one has died, "
                   f"its model is retried once its heartbeat is 2 intervals old); the last worker to finish writes "
                   f"report.md, or run with --report-only")
    elif not w.index:
        write_stage2_report(rows, out_dir, args.subset, args.patience)
        tqdm.write(f"done: report in {os.path.join(out_dir, 'report.md')}")
    return rows


def _run_main(args, ds=None, argv=None, worker: Worker | None = None) -> int:
    url = storage_url(args.storage, args.results)
    return run_main(lambda: storage_lost_in_one_line(url, lambda: run(args, ds, worker)),
                    script=None if worker else "stage2_final.py", argv=argv, redact=redact_url,
                    kept="each model's last.pt and best.pt keep its last finished epoch: free some space (or "
                         "fix --results) and run the same command again",
                    interrupted=None if worker else "interrupted: each model's last.pt holds its last finished "
                                                    "epoch; run the same command to continue from there")


def main(argv=None, ds=None):
    args = parse_args(argv)
    with stop_handlers():
        code = _run_main(args, ds, argv=argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
