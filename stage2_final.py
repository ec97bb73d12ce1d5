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
import json
import os
import sys
import time
from dataclasses import dataclass, fields

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from checkpoint import load_into, save_checkpoint
from cli import (EXIT_TIME_LIMIT, OneLineParser, ResultsError, StoppedForTime, add_time_limit, check_writable, clock,
                 continue_command, resolve_device)
from data import DataError, find_cifar10, load_cifar10, train_val_splits
from evaluate import TEST_OUTPUTS, evaluate_checkpoint, load_checkpoint
from report import TensorBoardLogger, code_version, log_hparams, plot_curves, write_json
from reports import epochs_phrase, write_report
from train import (AMP_HELP, AMP_MODES, COMPILE_MODES, Diverged, TrainConfig, Trainer, add_recipe_flags,
                   recipe_overrides, warmup_note)
from workers import (CLAIM, StorageError, completed_by_value, make_storage, process_identity, read_claim, read_json,
                     redact_url, release_claim, storage_error, take_claim)

CONFIG_KEYS = [f.name for f in fields(TrainConfig)]
SCHEDULE_FLAGS = {"epochs": "--epochs", "patience": "--patience", "subset_ratio": "--subset"}  # stage 2's, not a file's
DONE = "done.json"  # in a model's folder: its finished report row (CLAIM: who is training it)
# Everything a run writes into its folder; --fresh removes exactly these, nothing a person put there
# (metrics.json: what evaluate.py called test_metrics.json before it stopped overwriting stage 1's).
RUN_OUTPUTS = ("last.pt", "best.pt", "curves.png", "metrics.json", *TEST_OUTPUTS, DONE)


@dataclass
class Candidate:
    name: str  # its folder under results/stage2/, e.g. trial_0012 or config_0
    config: TrainConfig  # the stage-2 configuration: stage 1's with stage 2's epochs, patience and all the data
    source: str  # where the configuration came from, in words, for config.json and the report
    stage1_val_acc: float | None = None


def stage2_config(d: dict, args) -> TrainConfig:
    # Recipe flags given on the command line win over the configuration's own values.
    return TrainConfig.from_dict({**d, **recipe_overrides(args), "epochs": args.epochs, "patience": args.patience,
                                  "subset_ratio": args.subset})


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
        if "params" in entry:  # a top3.json entry: its full config (stage 1's schedule), Optuna's params on top
            d = {**(entry.get("config") or {}), **entry["params"]}
        else:
            d, number, val_acc = entry, None, None
            # Stage 2's schedule comes from its flags; a file's value would be silently overridden.
            scheduled = [k for k in SCHEDULE_FLAGS if k in d]
            if scheduled:
                raise DataError(f"--config {path}, configuration {i}: {', '.join(scheduled)} is set by "
                                f"{', '.join(SCHEDULE_FLAGS[k] for k in scheduled)} for every model, not by the file; "
                                f"remove it from the file")
        unknown = sorted(set(d) - set(CONFIG_KEYS))
        if unknown:
            raise DataError(f"--config {path}, configuration {i}: unknown key(s) {', '.join(unknown)}; "
                            f"known keys: {', '.join(k for k in CONFIG_KEYS if k not in SCHEDULE_FLAGS)}")
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
        row = read_json(path)
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
    last, epochs, planned = os.path.join(run_dir, "last.pt"), 0, c.config.epochs
    if os.path.isfile(last):
        with contextlib.suppress(DataError):  # an unreadable last.pt is reported when a worker meets it
            state = load_checkpoint(last)
            # the run's own schedule, which --report-only's flags need not repeat
            epochs, planned = state.get("epoch", 0), state["config"].get("epochs", planned)
    holder = read_claim(os.path.join(run_dir, CLAIM))
    who = f", being trained by {holder['host']} pid {holder['pid']}" if holder else ""
    return {**_row(c), "epochs_run": epochs, "stopped_early": False, "failure": "",
            "max_epochs": planned,
            "unfinished": f"not finished yet ({epochs} of {epochs_phrase(planned)} in last.pt{who})"}


# ----------------------------------------------------------------------------- training one model


def clear_run(run_dir: str):
    for name in os.listdir(run_dir):
        if name in RUN_OUTPUTS or name.startswith("events.out.tfevents"):
            os.remove(os.path.join(run_dir, name))


def resume(trainer: Trainer, c: Candidate, last: str):
    """Load last.pt into the trainer, or refuse one this run cannot continue; it is never overwritten silently."""
    load_into(trainer, last, again="pass --fresh to start it over (its checkpoints are deleted), or --results to "
                                   "write elsewhere", other_config=lambda: _other_config(c, last))


def train_model(c: Candidate, splits, args, device, run_dir: str) -> dict:
    """Train (or resume, or skip if done) one model; return its training summary."""
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    os.makedirs(run_dir, exist_ok=True)
    cfg, s = c.config, splits
    trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, device, amp=args.amp,
                      compile=args.compile)
    if os.path.isfile(last) and not args.fresh:
        resume(trainer, c, last)
        if not trainer.replays_exactly:
            tqdm.write(f"note: {last} was written on another kind of device, whose random stream cannot carry over "
                       f"here: the run goes on, but not exactly as an uninterrupted one would have")
    else:
        clear_run(run_dir)  # a run from scratch must not inherit the curves or checkpoints of an older one
    if trainer.epoch == 0 or not os.path.isfile(os.path.join(run_dir, "config.json")):
        write_json(os.path.join(run_dir, "config.json"), {"model": c.name, "source": c.source,
                   "stage1_val_acc": c.stage1_val_acc, "config": cfg.to_dict(), "code_version": code_version()})

    done = trainer.epoch >= cfg.epochs or trainer.stopped_early
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
            if note:
                tqdm.write(f"{c.name}: {note}")
        tensorboard = TensorBoardLogger(run_dir)
        first_epoch = trainer.epoch

        def on_epoch(t: Trainer, record: dict):
            args.epochs_trained = getattr(args, "epochs_trained", 0) + 1  # by this run, over all its models
            state = t.state_dict()
            # best.pt before last.pt: a kill between the two then replays this epoch rather than
            # leaving a last.pt whose best epoch has no best.pt.
            if record["is_best"]:
                save_checkpoint(state, best)
            save_checkpoint(state, last)
            tensorboard(t, record)
            recent = [r.get("epoch_s", r["epoch_time"]) for r in t.history[-5:]]
            left = (cfg.epochs - t.epoch) * sum(recent) / len(recent)
            eta = f", at most {clock(left)} left" if left > 0 else ""  # early stopping may end it sooner
            tqdm.write(f"{c.name} epoch {record['epoch']:3d}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                       f"acc {100 * record['train_acc']:.2f} %, val loss {record['val_loss']:.4f} "
                       f"acc {100 * record['val_acc']:.2f} %"
                       f"{' (best)' if record['is_best'] else ''}, lr {record['lr']:.2e}, {record['epoch_time']:.0f}s"
                       f"{eta}")

        try:
            # A model's first epoch is judged by the last model's: the best guess there is.
            trainer.fit(on_epoch, deadline=getattr(args, "deadline", None),
                        epoch_estimate_s=getattr(args, "last_epoch_s", None))
            if trainer.history:
                args.last_epoch_s = trainer.history[-1].get("epoch_s")
        except Diverged as e:
            # Keep going: best.pt, from before the divergence, is still a model worth testing.
            tqdm.write(f"{c.name}: {e}; evaluating its best checkpoint")
            return _summary(c, trainer, run_dir, failure=str(e))
        finally:
            tensorboard.close()
        if trainer.stopped_for_time:
            if not getattr(args, "epochs_trained", 0):  # a limit shorter than one epoch would never get anywhere
                final = trainer.history[-1] if trainer.history else {}
                took = f" (the last took {final.get('epoch_s', final.get('epoch_time', 0)):.0f} s)" if final else ""
                raise StoppedForTime(f"{c.name}: not one epoch fits in the time limit{took}, so nothing was "
                                     f"trained; give a longer --time-limit")
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
    p.add_argument("--subset", type=float, default=1.0,
                   help="share of the 45,000 training images each model trains on, stratified, as stage 1's --subset; "
                        "for a quick look at the whole pipeline (default: 1.0, all of them)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                                                    "(default: auto)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help=AMP_HELP)
    p.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                   help="torch.compile the model: --compile alone is torch's default mode; reduce-overhead adds CUDA "
                        "graphs, which cut the launch overhead that bounds small models on big GPUs. Stage 2's "
                        "shape is fixed for its whole run, so the one compile (tens of seconds) can repay itself "
                        "on a GPU; on a CPU it measured no gain (default: off, on every device)")
    add_time_limit(p)
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
    if not 0.0 < args.subset <= 1.0:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    if args.storage is None:
        args.storage = f"sqlite:///{os.path.join(args.results, 'stage1.db')}"
    return args


def run(args, ds=None) -> list:
    """Train and test every chosen model that no other worker has taken or finished, then report
    them all if none is left; `ds` (tests) replaces CIFAR-10. Returns every model's row, as far as it got."""
    started = time.time()
    limit = getattr(args, "time_limit", None)
    args.deadline = None if limit is None else time.monotonic() + limit
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
        find_cifar10(args.data_dir, download=not args.no_download)
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
        splits = train_val_splits(ds, subset_ratio=args.subset, device=device)
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
    except StoppedForTime as e:
        print(f"{e}; continue with: {continue_command('stage2_final.py', argv, redact_url)}", file=sys.stderr)
        sys.exit(EXIT_TIME_LIMIT)
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
