"""check_gpu.py: its CPU smoke run end to end, the projection's arithmetic, packing and its one-line errors."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

import check_gpu
from conftest import HAVE_REAL_DATA, REAL_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir(request):
    """The real CIFAR-10 where there is one, else a full-size fake: the check runs the same either way."""
    return REAL_DATA if HAVE_REAL_DATA else request.getfixturevalue("fake_cifar_dir")


def test_the_cpu_smoke_check_runs_every_step_and_writes_its_figures(tmp_path, data_dir):
    """About 2 minutes on 2 free cores: the bench, a 2-trial stage 1, a 1-epoch stage 2 and its test."""
    out = tmp_path / "check"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "check_gpu.py"), "--device", "cpu", "--smoke", "--out",
                        str(out), "--data-dir", data_dir, "--no-download"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check = json.loads((out / "check.json").read_text())
    assert check["check"]["ok"] and check["check"]["smoke"] and check["check"]["wall_s"] > 0
    assert check["environment"]["device"] == "cpu" and check["environment"]["precision"] == "fp32"

    bench = check["bench"]
    assert bench["ok"] and bench["wall_s"] > 0
    for key in ("matmul_peak_tflops", "aug_img_s", "baseline_aug_img_s", "step_img_s", "step_mfu", "e2e_img_s",
                "baseline_e2e_img_s", "e2e_ratio", "e2e_over_step", "peak_mem_mb", "baseline_peak_mem_mb"):
        assert bench["figures"][key] > 0, key
    assert bench["figures"]["precision"] == bench["figures"]["matmul_peak_dtype"] == "fp32"

    stage1 = check["stage1"]
    assert stage1["ok"] and len(stage1["trials"]) == 2
    for t in stage1["trials"]:
        assert t["epochs_run"] == 1 and 0 <= t["best_val_acc"] <= 1
        assert all(x > 0 for x in t["epoch_s"] + t["train_img_s"]) and t["plan_epoch_s"] > t["steady_epoch_s"]

    stage2 = check["stage2"]
    assert stage2["ok"] and [m["model"] for m in stage2["models"]] == ["config_0"]
    m = stage2["models"][0]
    assert m["epochs_run"] == 1 and 0 < m["test_acc"] <= 1 and m["test_images"] == 10000
    assert m["epoch_s"][0] > 0 and m["plan_epoch_s"] > m["steady_epoch_s"]  # 1 % of the images: scaled up

    plan = check["plan"]
    assert plan["upper_bound"] and plan["stage1_s"] > 0 and plan["stage2_s"] > 0
    assert plan["total_s"] == pytest.approx(plan["stage1_s"] + plan["stage2_s"])

    assert sorted(os.listdir(out)) == ["check.json", "check.md", "results"]
    results = out / "results"
    for path in ("bench.json", "logs/bench.log", "logs/stage1.log", "logs/stage2.log", "stage1/summary.md",
                 "stage1/top3.json", "stage1/trial_0000/metrics.json", "stage1/trial_0001/metrics.json",
                 "stage2/report.md", "stage2/config_0/test_metrics.json", "stage2/config_0/best.pt"):
        assert (results / path).is_file(), path
    summary = (out / "check.md").read_text()
    assert "whole plan: at most" in summary and "FAILED" not in summary
    assert "whole plan: at most" in r.stdout


def history(epochs: int, train_images: int, train_s: float, val_s: float, first_extra: float = 5.0) -> list:
    return [{"epoch": e + 1, "epoch_time": train_s + (first_extra if e == 0 else 0),
             "epoch_s": train_s + val_s + (first_extra if e == 0 else 0),
             "train_img_s": train_images / (train_s + (first_extra if e == 0 else 0))} for e in range(epochs)]


def test_an_epoch_at_the_plans_size_is_the_measured_one_and_smaller_runs_scale_their_training_part():
    at_plan = check_gpu.epoch_figures(history(3, 9000, train_s=4.0, val_s=1.0), plan_images=9000)
    assert at_plan["steady_epoch_s"] == at_plan["plan_epoch_s"] == pytest.approx(5.0)  # the warm-up epoch left out
    assert at_plan["warmup_s"] == pytest.approx(5.0) and at_plan["train_images"] == 9000
    tiny = check_gpu.epoch_figures(history(1, 450, train_s=0.2, val_s=1.0, first_extra=0), plan_images=9000)
    assert tiny["plan_epoch_s"] == pytest.approx(20 * 0.2 + 1.0)  # 20x the images, the same validation


def test_the_projection_counts_every_trial_and_model_at_full_length():
    trial = {"shape": "s", "train_time_s": 23.0, **check_gpu.epoch_figures(history(3, 9000, 4.0, 1.0), 9000)}
    trial["after_epoch_s"] = (23.0 - sum(trial["epoch_s"])) / 3  # 20 s of epochs: 1 s after each
    model = {**check_gpu.epoch_figures(history(3, 45000, 20.0, 1.0), 45000)}
    plan = check_gpu.project({"wall_s": 54.0, "trials": [trial, trial]},  # 8 s outside the trials
                             {"wall_s": sum(model["epoch_s"]) + 30.0, "models": [model]})
    assert plan["stage1_epoch_s"] == pytest.approx(5.0 + 1.0)
    assert plan["stage1_s"] == pytest.approx(40 * (20 * 6.0 + 5.0) + 8.0)  # each trial warms up once
    assert plan["stage2_s"] == pytest.approx(3 * (120 * 21.0 + 5.0 + 30.0))
    assert plan["total_s"] == pytest.approx(plan["stage1_s"] + plan["stage2_s"]) and plan["upper_bound"]
    assert "total_s" not in check_gpu.project({"wall_s": 1.0, "trials": []}, {"wall_s": 1.0, "models": [model]})


def test_pack_keeps_everything_but_the_checkpoints(tmp_path):
    (tmp_path / "results" / "stage2" / "m").mkdir(parents=True)
    for name in ("stage2/m/best.pt", "stage2/m/test_metrics.json", "stage2/report.md"):
        (tmp_path / "results" / name).write_text("x")
    archive = check_gpu.pack(str(tmp_path))
    with tarfile.open(archive) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {"results/stage2/m/test_metrics.json", "results/stage2/report.md"}
    assert sorted(os.listdir(tmp_path)) == ["results.tar.gz"]


def test_a_folder_of_someone_elses_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        check_gpu.main(["--out", str(tmp_path), "--device", "cpu", "--smoke"])
    assert str(e.value.code).startswith("error: --out") and "notes.txt" in str(e.value.code)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_missing_data_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        check_gpu.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--data-dir", str(tmp_path / "none"),
                        "--no-download"])
    assert str(e.value.code).startswith("error: no CIFAR-10 at") and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()
