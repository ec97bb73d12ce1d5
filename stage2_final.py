"""Stage 2: retrain the best stage-1 configurations on all 45,000 training images, then test them.

    python stage2_final.py                      # the top 3 completed trials of the stage-1 study
    python stage2_final.py --trials 12 31 7     # these trials of the study
    python stage2_final.py --config top3.json   # exactly these configurations, no study needed

candidates.py turns the study or the file into the models to train. Each model trains from
scratch, with early stopping on the fixed 5,000 validation images, into results/stage2/<model>/:
config.json, TensorBoard curves, best.pt and last.pt (everything needed to continue, so running the
same command again after an interruption picks up at the next epoch; --fresh starts over) and
curves.png. evaluate.py then tests each best.pt on the 10,000 test images, and
results/stage2/report.md and comparison.png put the models side by side.

Several workers (processes, GPUs, machines sharing the folder) may run the same command on one
results folder: each model is trained by the one worker holding its claim.json, a finished model
is marked by done.json and skipped, a dead local worker's model is taken over and resumed, and the
last worker to finish writes the report (--report-only rebuilds it from the folders at any time).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from candidates import CONFIG_KEYS, SCHEDULE_FLAGS, Candidate, candidates_from_file, candidates_from_study
from checkpoint import load_into, save_checkpoint
from cli import (OneLineParser, StoppedForTime, add_common_flags, add_time_limit, check_positive, check_stop,
                 check_writable, default_storage, epoch_line, stop_handlers, nothing_fits, resolve_device,
                 run_main)
from data import TEST_FILE, DataError, find_cifar10, load_cifar10, train_val_splits
from evaluate import TEST_OUTPUTS, evaluate_checkpoint
from report import TensorBoardLogger, code_version, log_hparams, plot_curves, write_json
from reports import epochs_phrase, test_row, unfinished_row, write_report
from train import (AMP_HELP, AMP_MODES, COMPILE_HELP, COMPILE_MODES, LONG_RECIPE, Diverged, Trainer,
                   add_recipe_flags, recipe_overrides, warmup_note)
from workers import DONE, finished_row, process_identity, redact_url, release_claim, take_claim

# Everything a run writes into its folder; --fresh removes exactly these, nothing a person put there
# (metrics.json: what evaluate.py called test_metrics.json before it stopped overwriting stage 1's).
RUN_OUTPUTS = ("last.pt", "best.pt", "curves.png", "metrics.json", *TEST_OUTPUTS, DONE)


# ----------------------------------------------------------------------------- sharing the models between workers


def _other_config(c: Candidate, path: str) -> DataError:
    return DataError(f"{path} was trained with another configuration than {c.source}; pass --fresh to start it "
                     f"over, or --results to write elsewhere")


def finished(c: Candidate, run_dir: str, fresh_since: float | None = None) -> dict | None:
    """The model's report row if a worker has trained and tested it, else None (workers.finished_row)."""
    return finished_row(run_dir, c.config.to_dict(), lambda path: _other_config(c, path), fresh_since)


def row_from_disk(c: Candidate, run_dir: str) -> dict:
    """What the report says about a model: its finished row, or how far it has got."""
    return finished(c, run_dir) or unfinished_row(_row(c), run_dir)


# ----------------------------------------------------------------------------- training one model


def clear_run(run_dir: str):
    for name in os.listdir(run_dir):
        if name in RUN_OUTPUTS or name.startswith("events.out.tfevents"):
            os.remove(os.path.join(run_dir, name))


@dataclass
class Progress:
    """What one stage-2 process carries from model to model."""
    deadline: float | None = None  # --time-limit's end, time.monotonic()
    last_epoch_s: float | None = None  # the latest epoch's wall time: the next model's first epoch is judged by it
    epochs_trained: int = 0  # by this process, over all its models
    warmup_noted: bool = False  # warmup_note said once already


def train_model(c: Candidate, splits, args, device, run_dir: str, progress: Progress) -> dict:
    """Train (or resume, or skip if done) one model; return its training summary."""
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    os.makedirs(run_dir, exist_ok=True)
    cfg, s = c.config, splits
    trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, device, amp=args.amp,
                      compile=args.compile, stop_check=check_stop)
    if os.path.isfile(last) and not args.fresh:  # one this run cannot continue is refused, never overwritten
        load_into(trainer, last, again="pass --fresh to start it over (its checkpoints are deleted), or --results to "
                                       "write elsewhere", other_config=lambda: _other_config(c, last))
    else:
        clear_run(run_dir)  # a run from scratch must not inherit the curves or checkpoints of an older one
    if trainer.epoch == 0 or not os.path.isfile(os.path.join(run_dir, "config.json")):
        write_json(os.path.join(run_dir, "config.json"), {"model": c.name, "source": c.source,
                   "stage1_val_acc": c.stage1_val_acc, "config": cfg.to_dict(), "code_version": code_version()})

    done = trainer.epoch >= cfg.epochs or trainer.stopped_early
    if not done and not trainer.replays_exactly:  # a finished run trains no more: nothing for the note to warn of
        tqdm.write(f"note: {last} was written on another kind of device, whose random stream cannot carry over "
                   f"here: the run goes on, but not exactly as an uninterrupted one would have")
    if done:
        tqdm.write(f"{c.name}: already trained ({epochs_phrase(trainer.epoch)}); evaluating only")
    else:
        if trainer.epoch:
            tqdm.write(f"{c.name}: resuming after epoch {trainer.epoch} of {cfg.epochs} "
                       f"(best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch})")
        else:
            tqdm.write(f"{c.name}: training from scratch, at most {epochs_phrase(cfg.epochs)} on {len(s.train_images)} "
                       f"images, early stopping on {len(s.val_images)} (patience {cfg.patience}), on {device}")
            note = warmup_note(cfg)
            if note and not progress.warmup_noted:  # once per process: every model has the same schedule
                progress.warmup_noted = True
                tqdm.write(f"{c.name}: {note}")
        tensorboard = TensorBoardLogger(run_dir)
        first_epoch = trainer.epoch

        def on_epoch(t: Trainer, record: dict):
            progress.epochs_trained += 1
            state = t.state_dict()
            # best.pt before last.pt: a kill between the two then replays this epoch rather than
            # leaving a last.pt whose best epoch has no best.pt.
            if record["is_best"]:
                save_checkpoint(state, best)
            save_checkpoint(state, last)
            tensorboard(t, record)
            tqdm.write(epoch_line(c.name, record, t.history, cfg.epochs))

        try:
            # A model's first epoch is judged by the last model's: the best guess there is.
            trainer.fit(on_epoch, deadline=progress.deadline, epoch_estimate_s=progress.last_epoch_s)
            if trainer.history:
                progress.last_epoch_s = trainer.history[-1].get("epoch_s")
        except Diverged as e:
            # Keep going: best.pt, from before the divergence, is still a model worth testing.
            tqdm.write(f"{c.name}: {e}; evaluating its best checkpoint")
            return _summary(c, trainer, run_dir, failure=str(e))
        finally:
            tensorboard.close()
        if trainer.stopped_for_time:
            if not progress.epochs_trained:
                final = trainer.history[-1] if trainer.history else {}
                raise nothing_fits(f"{c.name}: ", final.get("epoch_s", final.get("epoch_time")))
            if trainer.epoch == first_epoch:
                raise StoppedForTime(f"{c.name} not started: its first epoch would not end within the time limit")
            raise StoppedForTime(f"{c.name} stopped for the time limit after epoch {trainer.epoch} of {cfg.epochs} "
                                 f"(best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch}); "
                                 f"its last.pt holds everything a resume needs")
    why = (f"stopped early: no better validation accuracy for {epochs_phrase(cfg.patience)}" if trainer.stopped_early
           else f"ran all {epochs_phrase(cfg.epochs)}")
    tqdm.write(f"{c.name}: {epochs_phrase(trainer.epoch)}, {why}; best val acc {100 * trainer.best_acc:.2f} % "
               f"at epoch {trainer.best_epoch}")
    return _summary(c, trainer, run_dir)


def _summary(c: Candidate, trainer: Trainer, run_dir: str, failure: str = "") -> dict:
    plot_curves(trainer.history, os.path.join(run_dir, "curves.png"),
                f"{c.name}: best val acc {100 * trainer.best_acc:.2f} % at epoch {trainer.best_epoch}")
    return {**_row(c), "epochs_run": trainer.epoch, "stopped_early": trainer.stopped_early, "failure": failure}


def _row(c: Candidate) -> dict:
    return {"model": c.name, "source": c.source, "config": c.config.to_dict(), "stage1_val_acc": c.stage1_val_acc,
            "max_epochs": c.config.epochs}


def train_and_test(c: Candidate, splits, ds, args, device, run_dir: str, progress: Progress | None = None):
    """Train one model, test its best checkpoint, and mark it done with its report row."""
    row = train_model(c, splits, args, device, run_dir, progress or Progress())
    best = os.path.join(run_dir, "best.pt")
    if os.path.isfile(best):
        m = evaluate_checkpoint(best, ds, device)
        row.update(test_row(m, run_dir))
        log_hparams(run_dir, {**c.config.to_dict(), "model": c.name},
                    {"test_acc": m["accuracy"], "best_val_acc": m["val_acc"], "epochs_run": row["epochs_run"]})
        tqdm.write(f"{c.name}: test accuracy {100 * m['accuracy']:.2f} % (best val acc {100 * m['val_acc']:.2f} %), "
                   f"macro F1 {100 * m['macro']['f1']:.2f} %")
    # Last: a worker killed before this line leaves the model to the next one, which resumes it.
    write_json(os.path.join(run_dir, DONE), {**row, "finished_at": time.time(), "worker": process_identity()})


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trials", type=int, nargs="+", metavar="N", default=None,
                       help="retrain these stage-1 trials by number instead of the top k (default: the top k)")
    which.add_argument("--config", metavar="FILE.json", default=None,
                       help="retrain the configuration(s) in this JSON file (one object or a list, or whole "
                            "top3.json entries); no study needed. Keys: "
                            + ", ".join(k for k in CONFIG_KEYS if k not in SCHEDULE_FLAGS)
                            + " (configs/seed_best.json has them all; missing ones take the defaults; epochs, "
                              "patience and the subset come from the flags) (default: none)")
    p.add_argument("--top-k", type=int, default=3, help="completed stage-1 trials to retrain, best first (default: 3)")
    p.add_argument("--epochs", type=int, default=120, help="most epochs per model (default: 120)")
    p.add_argument("--patience", type=int, default=15,
                   help="stop a model after this many epochs without a better validation accuracy (default: 15)")
    p.add_argument("--fresh", action="store_true",
                   help="start every model over instead of continuing from its last.pt or skipping it when done "
                        "(models other workers finish after this one started are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild report.md from the models' folders as they are now")
    add_common_flags(p, results_help="output folder: reads stage 1's study there, writes RESULTS/stage2/ "
                                     "(default: results)",
                     storage_help="stage 1's Optuna storage: an RDB URL or a journal file path "
                                  "(default: sqlite:///RESULTS/stage1.db)")
    p.add_argument("--study-name", default="vit-cifar10",
                   help="stage 1's study name in the storage (default: vit-cifar10)")
    p.add_argument("--subset", type=float, default=1.0,
                   help="share of the 45,000 training images each model trains on, stratified, as stage 1's --subset; "
                        "for a quick look at the whole pipeline (default: 1.0, all of them)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help=AMP_HELP)
    p.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES, help=COMPILE_HELP)
    add_time_limit(p)
    add_recipe_flags(p, LONG_RECIPE, "the long-schedule recipe, over a stage-1 trial's; a --config file's own keys "
                                     "win over it")
    args = p.parse_args(argv)
    recipe_overrides(args, p)
    check_positive(p, args, ("top_k", "epochs", "patience"))
    if args.report_only and args.fresh:
        p.error("--report-only trains nothing, so --fresh has nothing to start over")
    if args.trials is not None and min(args.trials) < 0:
        p.error(f"--trials takes trial numbers (0 or more), got {min(args.trials)}")
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    default_storage(args)
    return args


def run(args, ds=None) -> list:
    """Train and test every chosen model that no other worker has taken or finished, then report
    them all if none is left; `ds` (tests) replaces CIFAR-10. Returns every model's row, as far as it got."""
    started = time.time()
    limit = getattr(args, "time_limit", None)
    progress = Progress(deadline=None if limit is None else time.monotonic() + limit)
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
    if ds is None:  # before any model is claimed: a mistyped --data-dir fails here, naming the folder
        folder = find_cifar10(args.data_dir, download=not args.no_download)
        if not os.path.isfile(os.path.join(folder, TEST_FILE)):
            tqdm.write(f"note: {folder} has no {TEST_FILE}: the models train without it (they never read it), and "
                       f"their test waits until it is there; this same command then tests them")
    tqdm.write(f"stage 2: {len(candidates)} model(s): {', '.join(c.name for c in candidates)}")
    fresh_since = started if args.fresh else None
    todo = []
    for c in candidates:
        if finished(c, run_dirs[c.name], fresh_since) is None:
            todo.append(c)
        else:
            tqdm.write(f"{c.name}: already trained and tested; skipping it (delete its {DONE} to test it again)")
    if todo:
        if ds is None:
            ds = load_cifar10(args.data_dir, download=not args.no_download, test=False)  # read when tested
        splits = train_val_splits(ds, subset_ratio=args.subset, device=device)
    for c in todo:
        check_stop()  # a Ctrl-C or SIGTERM during the last model's test: start no other
        run_dir = run_dirs[c.name]
        holder = take_claim(run_dir)
        if holder is not None:
            tqdm.write(f"{c.name}: being trained by {holder}; leaving it to that worker")
            continue
        try:
            # Checked again under the claim: another worker may have finished it since the list was made.
            if finished(c, run_dir, fresh_since) is None:
                train_and_test(c, splits, ds, args, device, run_dir, progress)
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
    with stop_handlers():
        code = run_main(lambda: run(args, ds), script="stage2_final.py", argv=argv, redact=redact_url,
                        kept="each model's last.pt and best.pt keep its last finished epoch: free some space (or "
                             "fix --results) and run the same command again",
                        interrupted="interrupted: each model's last.pt holds its last finished epoch; run the same "
                                    "command to continue from there")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
