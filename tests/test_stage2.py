import json
import os
import re
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import stage2_final
import train
from conftest import synthetic_splits
from data import CIFAR10, DataError
from report import TensorBoardLogger
from stage1_search import StorageError, make_storage, write_reports
from stage2_final import parse_args, run
from train import TrainConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1, lr=3e-3)
OUTPUTS = ("config.json", "best.pt", "last.pt", "curves.png", "metrics.json", "classification_report.txt",
           "confusion_matrix.png", "confusion_matrix.csv")


@pytest.fixture(scope="module")
def ds():
    """CIFAR10-shaped synthetic data: the fixed 5,000 validation images + 200 to train on, and 300 test images."""
    s = synthetic_splits(n_train=5200, n_val=300)
    return CIFAR10(s.train_images, s.train_labels, s.val_images, s.val_labels, s.classes)


def args_for(results, *extra):
    return parse_args(["--results", str(results), "--device", "cpu", "--epochs", "2", "--patience", "2", *extra])


def config_file(path, *configs):
    path.write_text(json.dumps(list(configs)))
    return str(path)


def tiny_study(results, trials):
    """A stage-1 study as stage1_search.py leaves it: (state, value, lr) per trial, config in user_attrs."""
    storage = make_storage(f"sqlite:///{results}/stage1.db", heartbeat=60)
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
        # stage 1's config with stage 2's epochs, patience and all 200 training images
        assert last["config"] == TrainConfig(**{**TINY, "lr": lr}, epochs=2, patience=2, subset_ratio=1.0).to_dict()
        assert last["epoch"] == 2 and {"optimizer", "scheduler", "rng", "early_stopping"} <= last.keys()
        best = torch.load(run_dir / "best.pt", weights_only=True)
        assert best["epoch"] == last["early_stopping"]["best_epoch"] == r["best_epoch"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test_images"] == 300 and metrics["accuracy"] == r["test_acc"]
        assert metrics["val_acc"] == last["early_stopping"]["best_acc"]
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"):
            assert [e.step for e in events.Scalars(tag)] == [1, 2]
    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "comparison.png" in figures and len(figures) == 5  # comparison + curves and confusion matrix per model
    assert all((out / f).stat().st_size > 1000 for f in figures)
    for r in rows:
        assert f"## {r['model']}" in report and f"{100 * r['test_acc']:.2f} %" in report
        assert f"{100 * (r['best_val_acc'] - r['test_acc']):+.2f} points" in report
    assert "stage-1 trial 1" in report and "`lr=0.003`" in report

    # The same models through --config and top3.json's whole entries: already trained, so only re-tested.
    write_reports(study, str(tmp_path / "stage1"), plots=False)
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
    seen = epochs_trained(monkeypatch)
    (again,) = run(args_for(tmp_path, "--config", path, "--epochs", "50", "--patience", "3"), ds=ds)
    assert seen == [] and again["test_acc"] == row["test_acc"] and again["best_epoch"] == 5


def test_an_interrupted_run_resumes_at_the_next_epoch_and_ends_as_an_uninterrupted_one(tmp_path, ds, monkeypatch):
    path = config_file(tmp_path / "c.json", {**TINY, "mixup_alpha": 0.1})  # mixup: the RNG state must carry over too
    full = run(args_for(tmp_path / "full", "--config", path), ds=ds)

    class InterruptAfterEpoch1(TensorBoardLogger):
        def __call__(self, trainer, record):
            super().__call__(trainer, record)
            if record["epoch"] == 1:
                raise KeyboardInterrupt  # Ctrl-C just after epoch 1's checkpoint

    monkeypatch.setattr(stage2_final, "TensorBoardLogger", InterruptAfterEpoch1)
    with pytest.raises(KeyboardInterrupt):
        run(args_for(tmp_path / "cut", "--config", path), ds=ds)
    run_dir = tmp_path / "cut" / "stage2" / "config_0"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1 and not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(stage2_final, "TensorBoardLogger", TensorBoardLogger)
    seen = epochs_trained(monkeypatch)
    resumed = run(args_for(tmp_path / "cut", "--config", path), ds=ds)
    assert seen == [2]
    a = torch.load(tmp_path / "full" / "stage2" / "config_0" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "is_best")
    assert [{k: r[k] for k in keys} for r in a["history"]] == [{k: r[k] for k in keys} for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed[0]["test_acc"] == full[0]["test_acc"] and resumed[0]["f1"] == full[0]["f1"]


def test_a_changed_config_is_not_resumed_silently_and_fresh_starts_over(tmp_path, ds):
    run(args_for(tmp_path, "--config", config_file(tmp_path / "a.json", TINY), "--epochs", "1"), ds=ds)
    changed = config_file(tmp_path / "b.json", {**TINY, "lr": 1e-3})
    with pytest.raises(DataError, match="another configuration.*--fresh"):
        run(args_for(tmp_path, "--config", changed, "--epochs", "1"), ds=ds)
    run(args_for(tmp_path, "--config", changed, "--epochs", "1", "--fresh"), ds=ds)
    run_dir = tmp_path / "stage2" / "config_0"
    assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == 1e-3
    assert len([f for f in os.listdir(run_dir) if f.startswith("events.out")]) == 1  # the old curves are gone


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
    picked = stage2_final.candidates_from_study(args_for(tmp_path, "--trials", "2", "0", "2"))
    assert [c.name for c in picked] == ["trial_0002", "trial_0000"] and picked[0].config.lr == 2e-3
    assert "trial 2 is PRUNED" in capsys.readouterr().out
    top = stage2_final.candidates_from_study(args_for(tmp_path, "--top-k", "1"))
    assert [c.name for c in top] == ["trial_0001"] and top[0].stage1_val_acc == 0.6


@pytest.mark.parametrize("content,message", [
    ('{"patch_size": 8, "learning_rate": 0.1}', "unknown key.*learning_rate"),
    ('{"patch_size": 8, "embed_dim": 32, "num_heads": 3}', "configuration 0: embed_dim 32 is not divisible"),
    ("[]", "non-empty list"),
    ("{not json", "not valid JSON"),
    (None, "cannot read --config"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        stage2_final.candidates_from_file(str(path), args_for(tmp_path))


def test_cli_flags_and_one_line_errors(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "stage2_final.py", "--results", str(tmp_path), "--no-download"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no stage-1 storage") and proc.stderr.strip().count("\n") == 0
    with pytest.raises(SystemExit):
        parse_args(["--trials", "1", "--config", "c.json"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--top-k", "--trials", "--config", "--epochs", "--patience", "--fresh", "--storage", "--study-name",
                 "--data-dir", "--no-download", "--results", "--device"):
        assert flag in help_text
    assert parse_args([]).storage == "sqlite:///results/stage1.db"
