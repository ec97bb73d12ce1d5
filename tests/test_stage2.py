import json
import os
import re
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import cli
import stage2_final
import storage
import train
from candidates import candidates_from_file, candidates_from_study
from conftest import synthetic_cifar, touches_the_edge
from data import DataError, train_val_splits
from cli import StorageError
from reports import TensorBoardLogger, write_stage1_reports
from storage import open_storage
from stage2_final import parse_args, run
from train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1, lr=3e-3)
OUTPUTS = ("config.json", "best.pt", "last.pt", "curves.png", "test_metrics.json", "classification_report.txt",
           "confusion_matrix.png", "confusion_matrix.csv")


@pytest.fixture(scope="module")
def ds():
    return synthetic_cifar()


def args_for(results, *extra):
    return parse_args(["--results", str(results), "--device", "cpu", "--epochs", "2", "--patience", "2", *extra])


def config_file(path, *configs):
    path.write_text(json.dumps(list(configs)))
    return str(path)


def tiny_study(results, trials):
    """A stage-1 study as stage1_search.py leaves it: (state, value, lr) per trial, config in user_attrs."""
    storage = open_storage(f"sqlite:///{results}/stage1.db", heartbeat=60)
    study = optuna.create_study(study_name="vit-cifar10", storage=storage, direction="maximize")
    for state, value, lr in trials:
        cfg = TrainConfig(**{**TINY, "lr": lr}, epochs=20, patience=6, subset_ratio=0.2)
        study.add_trial(create_trial(state=state, value=value, params={"lr": lr},
                                     distributions={"lr": FloatDistribution(1e-5, 1e-2, log=True)},
                                     user_attrs={"config": cfg.to_dict()}))
    return study


def epochs_trained(monkeypatch):
    """Record the number of every epoch Trainer trains."""
    seen, real = [], Trainer.train_epoch

    def recording(self):
        seen.append(self.epoch + 1)
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", recording)
    return seen


def test_after_a_tiny_stage1_it_trains_tests_and_reports_the_top_trials(tmp_path, ds, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = tiny_study(tmp_path, [(TrialState.COMPLETE, 0.4, 1e-3), (TrialState.COMPLETE, 0.6, 3e-3),
                                  (TrialState.PRUNED, None, 2e-3)])
    rows = run(args_for(tmp_path), ds=ds)
    assert "only 2 completed trial(s)" in capsys.readouterr().out  # fewer than the top 3: uses what there is
    assert [r["model"] for r in rows] == ["trial_0001", "trial_0000"]  # best first
    out = tmp_path / "stage2"
    for r, lr in zip(rows, (3e-3, 1e-3)):
        run_dir = out / r["model"]
        assert all((run_dir / name).exists() for name in OUTPUTS)
        last = torch.load(run_dir / "last.pt", weights_only=True)
        # stage 1's config with stage 2's recipe, epochs, patience and all 200 training images
        assert last["config"] == TrainConfig(**{**TINY, "lr": lr, **train.LONG_RECIPE}, epochs=2, patience=2,
                                             subset_ratio=1.0).to_dict()
        assert last["epoch"] == 2 and {"optimizer", "scheduler", "rng", "early_stopping"} <= last.keys()
        best = torch.load(run_dir / "best.pt", weights_only=True)
        assert best["epoch"] == last["early_stopping"]["best_epoch"] == r["best_epoch"]
        metrics = json.loads((run_dir / "test_metrics.json").read_text())
        assert metrics["test_images"] == 300 and metrics["accuracy"] == r["test_acc"]
        assert metrics["val_acc"] == last["early_stopping"]["best_acc"]
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"):
            assert [e.step for e in events.Scalars(tag)] == [1, 2]
    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    # comparison + curves, confusion matrix, per-class accuracy and mistakes per model
    assert "comparison.png" in figures and len(figures) == 9
    assert all((out / f).stat().st_size > 1000 for f in figures)
    assert {f: touches_the_edge(out / f) for f in figures} == {f: [] for f in figures}  # no label cut off
    for r in rows:
        assert f"## {r['model']}" in report and f"{100 * r['test_acc']:.2f} %" in report
        assert f"{100 * (r['best_val_acc'] - r['test_acc']):+.2f} points" in report
        low, high = r["test_acc_ci95"]
        assert low <= r["test_acc"] <= high and f"| {100 * low:.2f}-{100 * high:.2f} |" in report
        hparams = EventAccumulator(str(out / r["model"]))
        hparams.Reload()
        assert hparams.Scalars("hparams/test_acc")[-1].value == pytest.approx(r["test_acc"])
    # McNemar from the saved per-image predictions, counted again here by hand
    preds = {r["model"]: json.loads((out / r["model"] / "test_predictions.json").read_text()) for r in rows}
    right = {m: [p == y for p, y in zip(v["preds"], v["labels"])] for m, v in preds.items()}
    a, b = sorted(right, key=lambda m: -sum(right[m]))
    a_only = sum(x and not y for x, y in zip(right[a], right[b]))
    b_only = sum(y and not x for x, y in zip(right[a], right[b]))
    assert f"| {a} | {b} | {a_only} | {b_only} |" in report
    assert "## Is the best model really better?" in report and (f"{a} beats {b}" in report or f"{a} does not beat {b}"
                                                                 in report)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairwise_mcnemar"][0]["a_only"] == a_only and summary["accuracy_unit"] == "fraction"
    assert "stage-1 trial 1" in report and "`lr=0.003`" in report

    # The same models through --config and top3.json's whole entries: already trained, so only re-tested.
    write_stage1_reports(study, str(tmp_path / "stage1"), plots=False)
    seen = epochs_trained(monkeypatch)
    again = run(args_for(tmp_path, "--config", str(tmp_path / "stage1" / "top3.json")), ds=ds)
    assert seen == [] and "already trained" in capsys.readouterr().out
    assert [(r["model"], r["test_acc"]) for r in again] == [(r["model"], r["test_acc"]) for r in rows]


def test_early_stopping_stops_at_the_right_epoch_and_keeps_the_best(tmp_path, ds, monkeypatch):
    scripted = iter([0.30, 0.50, 0.45, 0.50, 0.60, 0.1, 0.1, 0.1, 0.1, 0.1])
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, loader, **k: {"loss": 1.0, "acc": next(scripted)})
    path = config_file(tmp_path / "c.json", TINY)
    (row,) = run(args_for(tmp_path, "--config", path, "--epochs", "50", "--patience", "3"), ds=ds)
    # best 0.60 at epoch 5, then 3 epochs without better: stop after epoch 8
    assert row["epochs_run"] == 8 and row["stopped_early"] and row["best_epoch"] == 5 and row["best_val_acc"] == 0.60
    run_dir = tmp_path / "stage2" / "config_0"
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 5
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 8
    assert "stopped early after 8 epochs" in (tmp_path / "stage2" / "report.md").read_text()
    # the test metrics are those of epoch 5's model, not the last one
    monkeypatch.setattr(train, "evaluate", real)
    best = stage2_final.evaluate_checkpoint(str(run_dir / "best.pt"), ds)
    assert (best["accuracy"], best["macro"]["f1"]) == (row["test_acc"], row["f1"])
    # a finished model is skipped by the next run, which reports it from its trial in the stage-2 study
    seen = epochs_trained(monkeypatch)
    (again,) = run(args_for(tmp_path, "--config", path, "--epochs", "50", "--patience", "3"), ds=ds)
    assert seen == [] and again == row


def test_an_interrupted_run_resumes_at_the_next_epoch_and_ends_as_an_uninterrupted_one(tmp_path, ds, monkeypatch):
    # Every random draw of the long-schedule recipe (mixing, its box, erasing): the RNG state must carry over too.
    path = config_file(tmp_path / "c.json", {**TINY, "mixup_alpha": 0.1, "cutmix_alpha": 1.0, "mix_prob": 0.5,
                                             "erase_prob": 0.25})
    full = run(args_for(tmp_path / "full", "--config", path), ds=ds)

    class InterruptAfterEpoch1(TensorBoardLogger):
        def __call__(self, trainer, record):
            super().__call__(trainer, record)
            if record["epoch"] == 1:
                raise KeyboardInterrupt  # Ctrl-C just after epoch 1's checkpoint

    monkeypatch.setattr(storage, "TensorBoardLogger", InterruptAfterEpoch1)
    with pytest.raises(KeyboardInterrupt):
        run(args_for(tmp_path / "cut", "--config", path), ds=ds)
    run_dir = tmp_path / "cut" / "stage2" / "config_0"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "test_metrics.json").exists()

    monkeypatch.setattr(storage, "TensorBoardLogger", TensorBoardLogger)
    seen = epochs_trained(monkeypatch)
    resumed = run(args_for(tmp_path / "cut", "--config", path), ds=ds)
    assert seen == [2]
    a = torch.load(tmp_path / "full" / "stage2" / "config_0" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "is_best")
    assert [{k: r[k] for k in keys} for r in a["history"]] == [{k: r[k] for k in keys} for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed[0]["test_acc"] == full[0]["test_acc"] and resumed[0]["f1"] == full[0]["f1"]


def slow_epochs(monkeypatch, seconds=1.0):
    """Every epoch takes at least `seconds` more (a sleep before it trains); records (params, epoch) of each."""
    seen, real = [], Trainer.train_epoch

    def slow(self):
        time.sleep(seconds)
        seen.append((self.cfg.lr, self.cfg.batch_size, self.cfg.patch_size, self.epoch + 1))
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", slow)
    return seen


def test_a_run_cut_by_the_time_limit_and_continued_equals_an_uninterrupted_one(tmp_path, ds, capsys, monkeypatch):
    """--time-limit for real: 4 epochs of over 1 s each cannot fit in 3.5 s, so the first run stops after
    the last epoch that fits and says how to continue; that command, run again until it finishes, gives
    the uninterrupted run's history, weights and test metrics, and no epoch trains twice."""
    path = config_file(tmp_path / "c.json", {**TINY, "mixup_alpha": 0.1, "drop_path": 0.1, "randaug_ops": 2})
    argv = lambda where, *extra: ["--results", str(tmp_path / where), "--device", "cpu", "--epochs", "4",  # noqa: E731
                                  "--patience", "4", "--config", path, *extra]
    stage2_final.main(argv("full"), ds=ds)
    seen = slow_epochs(monkeypatch)
    codes = []
    for _ in range(5):
        try:
            stage2_final.main(argv("cut", "--time-limit", "3.5"), ds=ds)
            codes.append(0)
            break
        except SystemExit as e:
            codes.append(e.code)
    assert codes[0] == cli.EXIT_TIME_LIMIT and set(codes[:-1]) == {cli.EXIT_TIME_LIMIT} and codes[-1] == 0, codes
    assert [epoch for *_, epoch in seen] == [1, 2, 3, 4]  # each epoch once, across the runs
    err = capsys.readouterr().err
    assert re.search(r"config_0 stopped for the time limit after epoch [123] of 4 \(best val acc [\d.]+ % at "
                     r"epoch [123]\); its last.pt holds everything a resume needs; continue with: "
                     + re.escape(f"python stage2_final.py {' '.join(argv('cut', '--time-limit', '3.5'))}"), err), err
    full, cut = (tmp_path / where / "stage2" / "config_0" for where in ("full", "cut"))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, cut))
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "is_best")
    assert [{k: r[k] for k in keys} for r in a["history"]] == [{k: r[k] for k in keys} for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metrics = [json.loads((d / "test_metrics.json").read_text()) for d in (full, cut)]
    for key in ("accuracy", "macro", "per_class", "epoch", "val_acc"):
        assert metrics[0][key] == metrics[1][key]
    assert (tmp_path / "cut" / "stage2" / "report.md").exists()


def test_a_time_limit_shorter_than_an_epoch_says_so_instead_of_stopping_forever(tmp_path, ds, capsys):
    path = config_file(tmp_path / "c.json", TINY)
    argv = ["--results", str(tmp_path), "--device", "cpu", "--epochs", "3", "--config", path, "--time-limit", "0.01"]
    for _ in range(2):  # the first run trains the one epoch it cannot judge; the second knows it cannot fit one
        with pytest.raises(SystemExit) as e:
            stage2_final.main(argv, ds=ds)
        assert e.value.code == cli.EXIT_TIME_LIMIT
    err = capsys.readouterr().err.splitlines()
    assert "stopped for the time limit after epoch 1 of 3" in err[0]
    assert "config_0: not one epoch fits in the time limit (the last took" in err[1] and "give a longer" in err[1]
    assert torch.load(tmp_path / "stage2" / "config_0" / "last.pt", weights_only=True)["epoch"] == 1


def test_report_only_on_an_unfinished_model_says_how_far_it_got_in_its_own_schedule(tmp_path, ds):
    path = config_file(tmp_path / "c.json", TINY)
    common = ["--results", str(tmp_path), "--device", "cpu", "--config", path]
    with pytest.raises(SystemExit):  # one epoch of 3, then cut by the time limit
        stage2_final.main([*common, "--epochs", "3", "--time-limit", "0.01"], ds=ds)
    stage2_final.main([*common, "--report-only"], ds=ds)  # without --epochs: the default 120
    report = (tmp_path / "stage2" / "report.md").read_text()
    assert "not finished yet (1 of 3 epochs so far)" in report and "1 of 3" in report
    assert "none is tested yet" in report and "0 test images" not in report
    assert "curves.png" not in report  # the model has none yet: no broken link


def test_a_time_limit_is_a_duration(tmp_path, capsys):
    assert args_for(tmp_path, "--config", "c.json", "--time-limit", "2h40m").time_limit == 9600
    assert args_for(tmp_path, "--config", "c.json", "--time-limit", "5400").time_limit == 5400
    for bad in ("soon", "0", "2x"):
        with pytest.raises(SystemExit) as e:
            args_for(tmp_path, "--config", "c.json", "--time-limit", bad)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("--time-limit") == 3


def test_a_changed_config_is_not_resumed_silently_and_fresh_starts_over(tmp_path, ds):
    run(args_for(tmp_path, "--config", config_file(tmp_path / "a.json", TINY), "--epochs", "1"), ds=ds)
    changed = config_file(tmp_path / "b.json", {**TINY, "lr": 1e-3})
    with pytest.raises(DataError, match="another configuration.*--fresh"):
        run(args_for(tmp_path, "--config", changed, "--epochs", "1"), ds=ds)
    run(args_for(tmp_path, "--config", changed, "--epochs", "1", "--fresh"), ds=ds)
    run_dir = tmp_path / "stage2" / "config_0"
    assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == 1e-3
    # the old curves and HParams are gone: one file of each from the fresh run
    assert len([f for f in os.listdir(run_dir) if f.startswith("events.out")]) == 2


def test_a_malicious_last_checkpoint_is_refused(tmp_path, ds):
    from test_evaluate import write_malicious

    run_dir = tmp_path / "stage2" / "config_0"
    run_dir.mkdir(parents=True)
    write_malicious(run_dir / "last.pt", tmp_path / "pwned")
    with pytest.raises(DataError, match="refusing to load"):
        run(args_for(tmp_path, "--config", config_file(tmp_path / "c.json", TINY)), ds=ds)
    assert not (tmp_path / "pwned").exists()


def test_missing_or_empty_studies_give_one_line_errors(tmp_path, ds):
    with pytest.raises(StorageError, match="no stage-1 storage at"):
        run(args_for(tmp_path), ds=ds)
    assert not (tmp_path / "stage1.db").exists()  # looking must not create an empty storage
    with pytest.raises(StorageError, match="cannot open Optuna storage 'bogus://nowhere'"):
        run(args_for(tmp_path, "--storage", "bogus://nowhere"), ds=ds)
    tiny_study(tmp_path, [(TrialState.PRUNED, None, 1e-3), (TrialState.FAIL, None, 2e-3)])
    with pytest.raises(StorageError, match="no study 'other'.*'vit-cifar10'"):
        run(args_for(tmp_path, "--study-name", "other"), ds=ds)
    with pytest.raises(StorageError, match="has no completed trial"):
        run(args_for(tmp_path), ds=ds)
    with pytest.raises(StorageError, match="has no trial 7"):
        run(args_for(tmp_path, "--trials", "0", "7"), ds=ds)


def test_trials_are_picked_by_number(tmp_path, capsys):
    tiny_study(tmp_path, [(TrialState.COMPLETE, 0.4, 1e-3), (TrialState.COMPLETE, 0.6, 3e-3),
                          (TrialState.PRUNED, None, 2e-3)])
    url = f"sqlite:///{tmp_path}/stage1.db"

    def pick(*argv):
        args = args_for(tmp_path, *argv)
        return candidates_from_study(open_storage(url), url, args.study_name, args.trials, args.top_k,
                                     stage2_final.model_flags(args))

    picked = pick("--trials", "2", "0", "2")
    assert [c["model"] for c in picked] == ["trial_0002", "trial_0000"] and picked[0]["config"]["lr"] == 2e-3
    assert "trial 2 is PRUNED" in capsys.readouterr().out
    top = pick("--top-k", "1")
    assert [c["model"] for c in top] == ["trial_0001"] and top[0]["stage1_val_acc"] == 0.6


@pytest.mark.parametrize("content,message", [
    ('{"patch_size": 8, "learning_rate": 0.1}', "unknown key.*learning_rate"),
    ('{"embed_dimm": 128}', r"unknown key\(s\) embed_dimm \(did you mean embed_dim\?\); known keys"),
    ('{"patch_size": 8, "embed_dim": 32, "num_heads": 3}', "configuration 0: embed_dim 32 is not divisible"),
    ('[{"patch_size": 8}, {"patch_size": 5}]', "configuration 1: image_size 32 is not divisible by patch_size 5"),
    ('{"patch_size": 8, "batch_size": 0}', "configuration 0: batch_size must be positive"),
    # a file's schedule would be overridden by the flags without a word: refused, naming the flag
    ('{"patch_size": 8, "epochs": 5, "subset_ratio": 0.1}', "epochs, subset_ratio is set by --epochs, --subset"),
    ("[]", "non-empty list"),
    ("{not json", "not valid JSON"),
    (None, "cannot read --config"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        candidates_from_file(str(path), stage2_final.model_flags(args_for(tmp_path)))


def test_cli_flags_and_one_line_errors(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "stage2_final.py", "--results", str(tmp_path), "--no-download"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no stage-1 storage") and proc.stderr.strip().count("\n") == 0
    for flags, message in ((["--trials", "1", "--config", "c.json"], "argument --config: not allowed with"),
                           (["--top-k", "three"], "argument --top-k: invalid int value: 'three'"),
                           (["--patience", "0"], "argument --patience: must be positive, got 0"),
                           (["--report-only", "--fresh"], "--report-only trains nothing")):
        with pytest.raises(SystemExit) as exit:
            parse_args(flags)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"{os.path.basename(sys.argv[0])}: error: {message}"), err
        assert err.count("\n") == 1  # the usage is in --help, not in front of the error
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--top-k", "--trials", "--config", "--epochs", "--patience", "--fresh", "--storage", "--study-name",
                 "--data-dir", "--no-download", "--results", "--device", "--report-only"):
        assert flag in help_text
    assert "(default: sqlite:///RESULTS/stage1.db)" in " ".join(help_text.split())


SECRET = "s3cret-pw"
SECRET_URL = f"postgresql://vit:{SECRET}@127.0.0.1:9/vit"  # nothing listens on port 9


def files_holding(root, text) -> list:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_storage_password_is_never_printed_or_written(tmp_path, ds, capsys, monkeypatch):
    # Where the server cannot be reached: the error names the URL, with *** for the password.
    proc = subprocess.run([sys.executable, "stage2_final.py", "--results", str(tmp_path), "--storage", SECRET_URL,
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: cannot open Optuna storage 'postgresql://vit:***@127.0.0.1:9/vit': ")
    assert SECRET not in proc.stdout + proc.stderr

    # Where it can: a trial retrained, tested and reported while --storage holds the password (an SQLite URL
    # cannot carry one, so the storage opened is the file's whatever the URL).
    tiny_study(tmp_path, [(TrialState.COMPLETE, 0.5, 3e-3)])
    storage = open_storage(f"sqlite:///{tmp_path}/stage1.db")
    monkeypatch.setattr(stage2_final, "open_storage", lambda url, heartbeat: storage)
    (row,) = run(args_for(tmp_path, "--storage", SECRET_URL, "--epochs", "1"), ds=ds)
    c = row["model"]
    shown = "study 'vit-cifar10' in postgresql://vit:***@127.0.0.1:9/vit"
    assert shown in (tmp_path / "stage2" / "report.md").read_text()
    assert shown in json.loads((tmp_path / "stage2" / c / "config.json").read_text())["source"]
    out, err = capsys.readouterr()
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in out + err


def test_bad_command_lines_and_configurations_stop_in_one_line_and_write_nothing(tmp_path):
    """Each through the real command line, all at once."""
    tiny_study(tmp_path, [(TrialState.COMPLETE, 0.5, 3e-3)])
    bad, good = config_file(tmp_path / "bad.json", {**TINY, "patch_size": 5}), config_file(tmp_path / "c.json", TINY)
    (tmp_path / "a_file").write_text("")
    cases = {  # flags: (exit code, the start of stderr's one line)
        ("--epochs", "0"): (2, "stage2_final.py: error: argument --epochs: must be positive, got 0 (see --help)"),
        ("--device", "tpu"): (1, "error: cannot use device 'tpu': not a device name; use auto, cpu, cuda, cuda:N or "
                                 "mps"),
        ("--study-name", "nope"): (1, f"error: no study 'nope' in sqlite:///{tmp_path}/stage1.db (it holds: "
                                      "'vit-cifar10'); pass --study-name"),
        ("--config", bad): (1, f"error: --config {bad}, configuration 0: image_size 32 is not divisible by "
                               "patch_size 5"),
        ("--config", good, "--data-dir", str(tmp_path / "nowhere"), "--no-download"):
            (1, f"error: no CIFAR-10 at {tmp_path}/nowhere/cifar-10-batches-py; pass --data-dir"),
        ("--config", good, "--results", str(tmp_path / "a_file" / "results")):  # below a file: never writable
            (1, f"error: cannot write results to '{tmp_path}/a_file/results/stage2': Not a directory"),
    }
    if not torch.cuda.is_available():
        cases["--device", "cuda"] = (1, "error: cannot use device 'cuda': torch finds no CUDA GPU on this machine; "
                                        "pass --device cpu (or auto, which takes a GPU when there is one)")
    procs = {flags: subprocess.Popen([sys.executable, "stage2_final.py", "--results", str(tmp_path), "--device", "cpu",
                                      *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flags in cases}
    for flags, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        code, message = cases[flags]
        assert proc.returncode == code and err.startswith(message) and err.count("\n") == 1, (flags, err)
        assert "Traceback" not in err
    assert [p for p in (tmp_path / "stage2").rglob("*") if p.is_file()] == []


def test_a_results_folder_this_code_cannot_continue_is_refused_in_one_line_and_kept(tmp_path, ds, capsys):
    """last.pt files of an older version, of another kind, damaged or carrying code: each refused by stage 2's
    main(), and none overwritten; the pickled code also through a process of its own, to see what a shell sees."""
    from test_evaluate import write_malicious

    cfg = config_file(tmp_path / "c.json", TINY)
    run(args_for(tmp_path / "good", "--config", cfg, "--epochs", "1"), ds=ds)
    good = (tmp_path / "good" / "stage2" / "config_0" / "last.pt").read_bytes()
    state = torch.load(tmp_path / "good" / "stage2" / "config_0" / "last.pt", weights_only=True)
    older_config = {k: v for k, v in state["config"].items() if k not in ("label_smoothing", "sgd_lr_scale")}
    cases = {
        "older keys": ({k: state[k] for k in ("config", "model", "epoch")},
                       "comes from an older, incompatible version of this code (no early_stopping, history, "
                       "optimizer, rng, scheduler); pass --fresh to start it over"),
        "older config": ({**state, "config": older_config},
                         "comes from an older, incompatible version of this code (its configuration has other keys)"),
        "other weights": ({**state, "model": {"weights": torch.zeros(3)}}, "does not fit this code's model"),
        "garbage": (b"not a checkpoint", "last.pt"),
        "truncated": (good[: len(good) // 2], "is not a readable PyTorch checkpoint"),
        "pickled code": (None, "refusing to load"),
    }
    for i, (name, (content, message)) in enumerate(cases.items()):
        run_dir = tmp_path / f"r{i}" / "stage2" / "config_0"
        run_dir.mkdir(parents=True)
        if name == "pickled code":
            write_malicious(run_dir / "last.pt", tmp_path / "pwned")
        elif isinstance(content, bytes):
            (run_dir / "last.pt").write_bytes(content)
        else:
            torch.save(content, run_dir / "last.pt")
        argv = ["--results", str(tmp_path / f"r{i}"), "--config", cfg, "--epochs", "1", "--patience", "2",
                "--device", "cpu"]
        with pytest.raises(SystemExit) as stop:
            stage2_final.main(argv, ds=ds)
        code, err = stop.value.code, capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{run_dir}/last.pt" in err and message in err and "Traceback" not in err, (name, err)
        assert sorted(os.listdir(run_dir)) == ["last.pt"]  # nothing written
        if name == "pickled code":  # the same data as ds: synthetic_cifar(n_train=200)
            proc = subprocess.run([sys.executable, os.path.join("tests", "synthetic_stage2.py"), "200", *argv],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert (proc.returncode, proc.stderr) == (code, err)
    assert not (tmp_path / "pwned").exists()


def test_models_train_without_the_test_batch_and_the_same_command_tests_them_once_it_is_there(
        tmp_path, fake_cifar_dir, capsys, monkeypatch):
    """A machine that trains (a rented GPU) need never hold the test images: stage 2 trains, stops in one line
    at the test, and the same command, once test_batch is there, tests the model without training it again."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    source = os.path.join(fake_cifar_dir, "cifar-10-batches-py")
    for name in os.listdir(source):
        if name != "test_batch":
            os.symlink(os.path.join(source, name), folder / name)
    command = ["--config", config_file(tmp_path / "c.json", TINY), "--data-dir", str(tmp_path / "data"),
               "--no-download", "--device", "cpu", "--epochs", "1", "--subset", "0.005", "--results", str(tmp_path)]
    with pytest.raises(SystemExit) as exit:
        stage2_final.main(command)
    out, err = capsys.readouterr()
    assert exit.value.code == 1 and "has no test_batch: the models train without it" in out
    assert err.startswith(f"error: CIFAR-10's test batch {folder}/test_batch is missing (training never reads it)")
    assert err.count("\n") == 1, err
    run_dir = tmp_path / "stage2" / "config_0"
    assert (run_dir / "best.pt").exists() and not (run_dir / "test_metrics.json").exists()

    os.symlink(os.path.join(source, "test_batch"), folder / "test_batch")
    seen = epochs_trained(monkeypatch)
    stage2_final.main(command)
    assert seen == [] and "already trained (1 epoch); evaluating only" in capsys.readouterr().out
    assert json.loads((run_dir / "test_metrics.json").read_text())["test_images"] == 10000


def test_a_finished_run_from_another_kind_of_device_is_tested_without_a_note_about_its_random_stream(
        tmp_path, ds, capsys):
    """A run trained on a GPU and tested on a CPU (results/reference/120ep_long_recipe/): nothing trains any more,
    so the note that the device's random stream cannot carry over would only alarm."""
    path = config_file(tmp_path / "c.json", TINY)
    run(args_for(tmp_path, "--config", path, "--epochs", "1"), ds=ds)
    run_dir = tmp_path / "stage2" / "config_0"
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["rng"] = {**state["rng"], "device_type": "cuda", "device": torch.zeros(16, dtype=torch.uint8)}
    torch.save(state, run_dir / "last.pt")
    optuna.delete_study(study_name="vit-cifar10-stage2", storage=f"sqlite:///{tmp_path}/stage1.db")  # to be tested again
    capsys.readouterr()
    run(args_for(tmp_path, "--config", path, "--epochs", "1"), ds=ds)
    out = capsys.readouterr().out
    assert "already trained (1 epoch); evaluating only" in out and "another kind of device" not in out
