import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import optuna
import pytest
import torch
from optuna.trial import TrialState

import cli
import stage1_search
import storage
from conftest import synthetic_splits, touches_the_edge
from stage1_search import parse_args, run, suggest_config
from train import TrainConfig, Trainer
from reports import write_stage1_reports
from storage import Worker, open_storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_study(url, name="vit-cifar10"):
    return stage1_search.open_study(open_storage(url, heartbeat=5), url, name, seed=0)


def tiny_splits():
    return synthetic_splits(n_train=128, n_val=64)


def small_args(tmp_path, *extra):
    return parse_args(["--results", str(tmp_path), "--epochs", "2", "--patience", "2", "--heartbeat", "5", *extra])


def test_jobs_runs_trials_side_by_side_in_worker_processes(tmp_path):
    run(small_args(tmp_path, "--trials", "2", "--jobs", "2", "--epochs", "1"), splits=tiny_splits())
    trials = optuna.load_study(study_name="vit-cifar10", storage=f"sqlite:///{tmp_path / 'stage1.db'}").trials
    assert 2 <= len(trials) <= 2 + 1  # each worker checks the total after its trial: one more at most
    assert all(t.state == TrialState.COMPLETE and len(t.user_attrs["history"]) >= 1 for t in trials)
    starts, ends = sorted(t.datetime_start for t in trials), sorted(t.datetime_complete for t in trials)
    assert starts[1] < ends[0]  # the second trial started before the first one finished
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two processes of their own, not threads of this one
    # Started together, the workers still proposed different configurations (a sampler seed each).
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)
    top = json.loads((tmp_path / "stage1" / "top3.json").read_text())
    assert len(top) == min(3, len(trials))


def test_total_stops_at_that_many_finished_trials_and_the_same_command_then_adds_none(tmp_path, monkeypatch):
    real = stage1_search.suggest_config
    monkeypatch.setattr(stage1_search, "suggest_config",  # the cheapest shape: this is about counting
                        lambda trial, base: replace(real(trial, base), patch_size=4, embed_dim=128, depth=4))
    # (Workers racing for the last trial of a total: test_stage1_workers' four workers started at once.)
    study = run(small_args(tmp_path, "--total", "3", "--epochs", "1"), splits=tiny_splits())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len(run(small_args(tmp_path, "--total", "3", "--epochs", "1"), splits=tiny_splits()).trials) == 3
    assert len(run(small_args(tmp_path, "--total", "4", "--epochs", "1"), splits=tiny_splits()).trials) == 4


def test_a_study_cut_mid_trial_by_the_time_limit_and_continued_reaches_its_total(tmp_path, capsys, monkeypatch):
    """--time-limit for real: 2 trials of 3 epochs, each over 2.5 s, cannot fit in 8 s; each run stops between
    epochs, the cut trial is queued again, and the next run goes on from its checkpoint. (With 1.5 s in 5 s, an
    epoch under a loaded machine's suite once took over 5 s: then nothing ever fits, and the test failed.)"""
    seen, real = [], Trainer.train_epoch

    def slow(self):
        time.sleep(2.5)
        seen.append((self.cfg.lr, self.epoch + 1))
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", slow)
    suggest = stage1_search.suggest_config  # the cheapest shape: an epoch must fit in the limit
    monkeypatch.setattr(stage1_search, "suggest_config",
                        lambda trial, base: replace(suggest(trial, base), patch_size=4, embed_dim=128, depth=4))
    codes = []
    for _ in range(12):
        args = small_args(tmp_path, "--trials", "2", "--epochs", "3", "--patience", "3", "--time-limit", "8")
        codes.append(stage1_search._run_main(args, tiny_splits(), argv=["--trials", "2", "--time-limit", "8"]))
        if codes[-1] == 0:
            break
    assert codes[0] == cli.EXIT_TIME_LIMIT and set(codes[:-1]) == {cli.EXIT_TIME_LIMIT} and codes[-1] == 0, codes
    assert "continue with: python stage1_search.py --trials 2 --time-limit 8" in capsys.readouterr().err
    assert sorted(seen) == sorted({(lr, epoch) for lr, epoch in seen}) and len(seen) == 6  # no epoch twice
    study = optuna.load_study(study_name="vit-cifar10", storage=f"sqlite:///{tmp_path / 'stage1.db'}")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    cut = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(done) == 2 and len(cut) >= 1 and len(study.trials) == len(done) + len(cut)  # none left waiting
    assert all(t.user_attrs.get("stopped_for_time") and "failure" not in t.user_attrs for t in cut)
    for t in done:  # each configuration trained epochs 1 to 3 once, over its cuts
        assert [r["epoch"] for r in t.user_attrs["history"]] == [1, 2, 3]
        assert all(study.trials[n].params == t.params for n in t.system_attrs.get("retry_history", []))
    assert sum(len(t.system_attrs.get("retry_history", [])) for t in done) == len(cut)
    assert done[0].params != done[1].params
    summary = (tmp_path / "stage1" / "summary.md").read_text()
    assert summary.count("stopped for the time limit after epoch") == len(cut)


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_study_goes_on(tmp_path, monkeypatch):
    real = Trainer.train_epoch

    def out_of_memory_in_the_first_trial(self):
        if not getattr(out_of_memory_in_the_first_trial, "done", False):
            out_of_memory_in_the_first_trial.done = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", out_of_memory_in_the_first_trial)
    study = run(small_args(tmp_path, "--trials", "2", "--epochs", "1"), splits=tiny_splits())
    first, second = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["failure"].startswith("out of cpu memory (CUDA out of")
    assert second.state == TrialState.COMPLETE
    assert "out of cpu memory" in (tmp_path / "stage1" / "summary.md").read_text()


def test_search_space_is_the_seeds():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(64):
        trial = study.ask()
        cfg = suggest_config(trial, TrainConfig())
        for k, v in trial.params.items():
            seen.setdefault(k, set()).add(v)
            assert getattr(cfg, k) == v
        study.tell(trial, 0.0)
    assert seen["patch_size"] == {2, 4} and seen["embed_dim"] == {128, 192}
    assert seen["depth"] == {4, 6} and seen["num_heads"] == {2, 4}
    assert seen["optimizer"] == {"adamw", "sgd"} and seen["scheduler"] == {"cosine", "step"}
    assert seen["batch_size"] == {64, 128} and seen["mixup_alpha"] == {0.0, 0.1}
    assert 1e-5 <= min(seen["lr"]) and max(seen["lr"]) <= 1e-3


def test_end_to_end_writes_study_attrs_reports_and_plots(tmp_path):
    run(small_args(tmp_path, "--trials", "3"), splits=tiny_splits())
    db = tmp_path / "stage1.db"
    assert db.exists()
    loaded = optuna.load_study(study_name="vit-cifar10", storage=f"sqlite:///{db}")
    trials = loaded.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert len(t.user_attrs["history"]) == t.user_attrs["epochs_run"] >= 1
        assert t.user_attrs["config"]["patch_size"] == t.params["patch_size"]
        assert t.value == t.user_attrs["best_val_acc"]
        run_dir = tmp_path / "stage1" / f"trial_{t.number:04d}"
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
        assert (run_dir / "config.json").exists() and (run_dir / "metrics.json").exists()
    top = json.loads((tmp_path / "stage1" / "top3.json").read_text())
    assert [e["val_acc"] for e in top] == sorted((t.value for t in trials), reverse=True)
    assert set(top[0]["params"]) == {"patch_size", "embed_dim", "depth", "num_heads", "lr", "optimizer",
                                     "scheduler", "batch_size", "mixup_alpha"}
    summary = (tmp_path / "stage1" / "summary.md").read_text()
    assert summary.count("| COMPLETE |") == 3
    for e in top:
        assert (tmp_path / "stage1" / f"curves_trial_{e['number']:04d}.png").stat().st_size > 1000
    assert (tmp_path / "stage1" / "optimization_history.png").exists()
    for name in ("parallel_coordinate.png", "slice.png"):  # 3 completed trials: enough to draw, too few to rank
        assert (tmp_path / "stage1" / name).stat().st_size > 5000
    assert not (tmp_path / "stage1" / "param_importances.png").exists() and "No parameter importances" in summary
    for png in (tmp_path / "stage1").glob("*.png"):
        assert touches_the_edge(png) == [], png  # no title or label cut off
    # each trial in TensorBoard's HParams dashboard, read back with TensorBoard's own reader
    from test_report import read_hparams

    for t in trials:
        values, metric_tags, scalars = read_hparams(str(tmp_path / "stage1" / f"trial_{t.number:04d}"))
        assert values["state"] == "COMPLETE" and values["patch_size"] == t.params["patch_size"]
        assert scalars["hparams/best_val_acc"] == pytest.approx(t.value)


def test_importances_count_every_completed_trial_not_only_the_top_k(tmp_path):
    # 6 completed trials, top 2 kept: enough to rank parameters, so no "too few trials" note.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for value in (0.3, 0.5, 0.4, 0.2, 0.6, 0.35):
        trial = study.ask()
        suggest_config(trial, TrainConfig())
        study.tell(trial, value)
    write_stage1_reports(study, str(tmp_path), top_k=2, plots=True)
    assert "No parameter importances" not in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "param_importances.png").stat().st_size > 5000
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("curves_trial_")) == [
        "curves_trial_0001.png", "curves_trial_0004.png"]


def test_top_k_names_its_file_and_pruned_trials_say_when(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/s.db", "s")
    for value in (0.3, 0.5):
        trial = study.ask()
        suggest_config(trial, TrainConfig())
        study.tell(trial, value)
    pruned = study.ask()
    suggest_config(pruned, TrainConfig())
    pruned.set_user_attr("pruned_at_epoch", 5)
    study.tell(pruned, state=TrialState.PRUNED)
    write_stage1_reports(study, str(tmp_path), top_k=2, plots=False)
    top = json.loads((tmp_path / "top2.json").read_text())
    assert [e["val_acc"] for e in top] == [0.5, 0.3] and not (tmp_path / "top3.json").exists()
    assert "| PRUNED |" in (tmp_path / "summary.md").read_text() and "pruned at epoch 5" in (tmp_path / "summary.md").read_text()


def test_recipe_flags_reach_every_trial(tmp_path):
    study = run(small_args(tmp_path, "--trials", "1", "--epochs", "1", "--label-smoothing", "0.2", "--drop-path", "0.2",
                           "--sgd-lr-scale", "10", "--pool", "mean"), splits=tiny_splits())
    cfg = study.trials[0].user_attrs["config"]
    assert (cfg["label_smoothing"], cfg["drop_path"], cfg["sgd_lr_scale"], cfg["pool"]) == (0.2, 0.2, 10.0, "mean")
    bad = subprocess.run([sys.executable, "stage1_search.py", "--label-smoothing", "1.5"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "label_smoothing must be in [0, 1)" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "stage1_search.py", "--pool", "max"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "pool must be 'cls' or 'mean'" in bad.stderr and "Traceback" not in bad.stderr


def test_resuming_continues_the_same_study_to_its_total(tmp_path):
    run(small_args(tmp_path, "--trials", "1", "--epochs", "1"), splits=tiny_splits())
    study = run(small_args(tmp_path, "--trials", "2", "--epochs", "1"), splits=tiny_splits())
    assert [t.number for t in study.trials] == [0, 1]  # --trials is the study's total, not trials to add
    assert len(run(small_args(tmp_path, "--trials", "2", "--epochs", "1"), splits=tiny_splits()).trials) == 2
    # the resumed sampler must not replay the first run's start-up proposal
    assert study.trials[1].params != study.trials[0].params
    assert study.metric_names == ["val_acc"]  # what optuna-dashboard shows instead of "Objective 0"


def test_median_pruner_prunes_a_trial_below_the_median(tmp_path):
    study = new_study(f"sqlite:///{tmp_path}/p.db", "prune")

    def objective(trial):  # deterministic: trial k scores k/100 at every epoch, so later ones beat earlier ones...
        level = trial.number / 100 if trial.number < 6 else 0.0  # ...until trial 6, which is the worst
        for epoch in range(1, 11):
            trial.report(level, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return level

    study.optimize(objective, n_trials=7)
    states = [t.state for t in study.trials]
    assert states[:6] == [TrialState.COMPLETE] * 6
    assert states[6] == TrialState.PRUNED
    # pruned at the first epoch past the pruner's warmup, not before
    assert max(study.trials[6].intermediate_values) == 5


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path, monkeypatch):
    real = stage1_search.suggest_config

    def first_diverges(trial, base):
        cfg = real(trial, base)
        return cfg if trial.number else cfg.__class__(**{**cfg.to_dict(), "lr": 1e30, "optimizer": "sgd"})

    monkeypatch.setattr(stage1_search, "suggest_config", first_diverges)
    study = run(small_args(tmp_path, "--trials", "2", "--epochs", "1"), splits=tiny_splits())
    assert study.trials[0].state == TrialState.FAIL
    assert "loss became" in study.trials[0].user_attrs["failure"]
    assert study.trials[1].state == TrialState.COMPLETE
    assert "loss became" in (tmp_path / "stage1" / "summary.md").read_text()


def test_cli_rejects_bad_flags_and_missing_data_with_one_line(tmp_path, fake_cifar_dir):
    bad = subprocess.run([sys.executable, "stage1_search.py", "--subset", "1.5"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "argument --subset: must be in (0, 1]" in bad.stderr
    missing = subprocess.run([sys.executable, "stage1_search.py", "--no-download", "--data-dir", str(tmp_path),
                              "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "--data-dir" in missing.stderr
    assert f"no CIFAR-10 at {tmp_path}/cifar-10-batches-py" in missing.stderr
    assert not (tmp_path / "stage1.db").exists()  # the data is looked for before the study is created
    bad_storage = subprocess.run([sys.executable, "stage1_search.py", "--storage", "bogus://nowhere", "--data-dir",
                                  fake_cifar_dir, "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert bad_storage.returncode == 1 and "Traceback" not in bad_storage.stderr
    assert "cannot open Optuna storage 'bogus://nowhere'" in bad_storage.stderr
    help_text = subprocess.run([sys.executable, "stage1_search.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    for flag in ("--trials", "--total", "--storage", "--study-name", "--jobs", "--subset", "--data-dir", "--heartbeat"):
        assert flag in help_text


def test_jobs_workers_take_gpu_i_mod_n_and_the_parent_initialises_no_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a machine with 3 GPUs, faked
    assert [Worker(index=i).device("auto") for i in range(1, 6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert [Worker(index=5).device("cuda"), Worker(index=1).device("cuda:2"), Worker(index=2).device("cpu"),
            Worker(index=0).device("auto")] == ["cuda:1", "cuda:2", "cpu", "auto"]  # 0: no --jobs worker
    # The parent resolves no device (on a GPU machine that would initialise CUDA) and hands each worker its index.
    handed = []
    monkeypatch.setattr(stage1_search, "resolve_device", lambda name: pytest.fail(f"the parent resolved {name}"))
    monkeypatch.setattr(storage, "run_processes", lambda target, arg_tuples, name: handed.extend(arg_tuples))
    run(small_args(tmp_path, "--trials", "1", "--jobs", "3"), splits=tiny_splits())
    assert [(w.index, w.jobs) for *_, w in handed] == [(1, 3), (2, 3), (3, 3)]
    assert not torch.cuda.is_initialized()
