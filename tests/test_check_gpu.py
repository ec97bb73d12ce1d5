"""tools/check_gpu.py: its CPU smoke run end to end, the projection's arithmetic, the subset that travels, packing
and its one-line errors."""

import glob
import json
import os
import statistics
import subprocess
import sys
import tarfile

import pytest

from conftest import HAVE_REAL_DATA, REAL_DATA, needs_real_data
from tools import bench, check_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")  # beside the checkout, as the module's docstring has it
JPEG_NPZ = os.path.join(SHARED, "data", "cifar10-jpeg.npz")
WHEELS = sorted(glob.glob(os.path.join(SHARED, "device-wheels", "*.whl")))
needs_jpeg_copy = pytest.mark.skipif(
    not (os.path.isfile(JPEG_NPZ) and WHEELS) and not os.environ.get("CI"),
    reason=f"no JPEG copy of CIFAR-10 or no Optuna wheels in {os.path.normpath(SHARED)}: what a device call carries "
           f"cannot be made here")


@pytest.fixture
def data_dir(request):
    """The real CIFAR-10 where there is one, else a full-size fake: the check runs the same either way."""
    return REAL_DATA if HAVE_REAL_DATA else request.getfixturevalue("fake_cifar_dir")


def test_the_cpu_smoke_check_runs_every_step_and_writes_its_figures(tmp_path, data_dir):
    """About 2 minutes on 2 free cores: the bench, the grid, a 2-trial stage 1, a 1-epoch stage 2 and its test;
    where the JPEG copy is, on the subset rebuilt as the documented device call does it."""
    out, data = tmp_path / "check", ["--data-dir", data_dir]
    if os.path.isfile(JPEG_NPZ):
        check_gpu.make_check_data(JPEG_NPZ, str(tmp_path / "subset.npz"))
        data = ["--data-npz", str(tmp_path / "subset.npz"), "--data-dir", str(tmp_path / "data")]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_gpu.py"), "--device", "cpu", "--smoke",
                        "--out", str(out), *data], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check = json.loads((out / "check.json").read_text())
    assert check["ok"] and check["smoke"] and (check["device"], check["precision"]) == ("cpu", "fp32")
    assert all(check[name]["ok"] and check[name]["wall_s"] > 0 for name in check_gpu.RUNS)
    assert check["bench"]["figures"]["seed"]["img_s"] > 0 and len(check["grid"]["figures"]["configs"]) == 1
    trials = check["stage1"]["trials"]
    assert len(trials) == 2 and all(t["epochs_run"] == 1 and t["step_s"] > 0 and t["span_s"] > 0 for t in trials)
    (model,) = check["stage2"]["models"]
    assert model["epochs_run"] == 1 and 0 < model["test_acc"] <= 1 and model["epochs_s"] > 0
    plan = check["plan"]
    for kind in ("bound", "estimate"):
        assert plan[kind]["total_s"] == pytest.approx(plan[kind]["stage1_s"] + plan[kind]["stage2_s"])
    assert plan["bound"]["total_s"] >= plan["estimate"]["total_s"]
    assert sorted(os.listdir(out)) == ["check.json", "check.md", "results"]
    for name in ("bench.json", "grid.json", "logs/bench.log", "logs/grid.log", "logs/stage1.log", "logs/stage2.log"):
        assert (out / "results" / name).is_file(), name
    summary = (out / "check.md").read_text()
    assert "whole plan, estimate" in summary and "upper bound" in summary and "FAILED" not in summary
    assert "mean nothing" in summary and "whole plan, estimate" in r.stdout


def grid_row(patch, width, depth, heads, batch, optimizer, setup, steps, val, test, warmup, save):
    return {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads, "batch_size": batch,
            "optimizer": optimizer, "setup_s": setup, "step_s": steps, "val_s": val, "test_s": test, "warmup_s": warmup,
            "save_s": save}


SEED = grid_row(4, 128, 6, 4, 128, "adamw", setup=1.0, steps=[0.010, 0.012], val=0.5, test=1.2, warmup=2.0, save=0.1)
SLOW = grid_row(2, 192, 6, 4, 64, "sgd", setup=2.0, steps=[0.05, 0.06], val=3.0, test=7.0, warmup=5.0, save=0.2)
SMALL = grid_row(4, 128, 4, 2, 64, "adamw", setup=0.5, steps=[0.008, 0.008], val=0.3, test=0.8, warmup=1.0, save=0.05)
GRID = {"configs": [SEED, SLOW, SMALL]}


def config(row):
    return {k: row[k] for k in bench.COST_CHOICES}


def measured_trial(number, row, step_s, after_epoch, overhead, warm_extra=0.0):
    """A stage-1 trial of 3 epochs of row's configuration on the proxy: each step step_s, after_epoch seconds after
    each epoch, overhead seconds of its own besides its Trainer's setup, a first epoch warm_extra seconds slower
    than the grid's."""
    epochs_s = 3 * (9000 // row["batch_size"] * step_s + row["val_s"]) + row["warmup_s"] + warm_extra
    train_time = epochs_s + 3 * after_epoch
    return {"trial": number, "config": config(row), "train_time_s": train_time, "epochs_run": 3, "epochs_s": epochs_s,
            "step_s": step_s, "warmup_s": row["warmup_s"] + warm_extra, "span_s": train_time + row["setup_s"] + overhead}


def stages():
    t0 = measured_trial(0, SMALL, 0.008, after_epoch=0.30, overhead=4.0)
    t1 = measured_trial(1, SEED, 0.0121, after_epoch=0.40, overhead=2.0, warm_extra=1.0)
    stage1 = {"wall_s": t0["span_s"] + t1["span_s"] + 7.0, "trials": [t0, t1]}  # 7 s of start, data and reports
    epochs_s = 3 * (45000 // 128 * 0.011 + 0.5) + 2.0
    model = {"model": "config_0", "config": config(SEED), "epochs_run": 3, "epochs_s": epochs_s,
             "step_s": 0.011, "warmup_s": 2.0}
    # 10 s of its own: start, data, report; besides 6 checkpoints, 3 epochs' extras (0.3 s), setup and the test
    stage2 = {"wall_s": epochs_s + 6 * 0.1 + 3 * 0.3 + 1.0 + 1.2 + 10.0, "models": [model]}
    return stage1, stage2


def test_the_costs_around_the_steps_come_from_the_stages_runs_per_epoch_per_trial_and_once():
    stage1, stage2 = stages()
    plan = check_gpu.project(GRID, stage1, stage2)
    worst = plan["bound"]
    assert worst["epoch_extra_s"] == pytest.approx(0.3)  # 0.40 after an epoch, less its 0.1 s checkpoint
    assert worst["trial_overhead_s"] == pytest.approx(4.0)  # each trial's own (trial 1: 2 s, and 1 s of warm-up)
    assert worst["stage1_one_off_s"] == pytest.approx(7.0)
    assert worst["model_fixed_s"] == pytest.approx(10.0)
    mean = plan["estimate"]
    assert mean["epoch_extra_s"] == pytest.approx(0.275) and mean["trial_overhead_s"] == pytest.approx(3.5)


def test_the_projection_counts_each_configurations_steps_and_bounds_with_the_costliest():
    stage1, stage2 = stages()
    plan = check_gpu.project(GRID, stage1, stage2)
    assert plan["step_ratios"] == pytest.approx([1.0, 1.1, 1.0])  # trial 1's steps ran 10 % over the grid's
    b, e = plan["bound"], plan["estimate"]
    assert b["step_scale"] == pytest.approx(1.1) and e["step_scale"] == pytest.approx(1.0)
    # a trial: overhead, setup, warm-up, 20 x (steps of 9,000 images, validation, checkpoint, extras)
    slow_trial = 4.0 + 2.0 + 5.0 + 20 * (140 * 1.1 * 0.06 + 3.0 + 0.2 + 0.3)
    assert b["trial_s"] == pytest.approx(slow_trial)
    assert b["stage1_s"] == pytest.approx(7.0 + 40 * slow_trial)  # every trial pays its overhead
    # a model: its own, setup, warm-up, 120 x (steps of 45,000, validation, 2 checkpoints, extras), the float32 test
    slow_model = 10.0 + 2.0 + 5.0 + 120 * (703 * 1.1 * 0.06 + 3.0 + 2 * 0.2 + 0.3) + 7.0
    assert b["model_s"] == pytest.approx(slow_model) and b["stage2_s"] == pytest.approx(3 * slow_model)
    assert "patch 2, width 192" in b["stage1_configs"] and "patch 2, width 192" in b["stage2_configs"]
    # the estimate: stage 1 evenly over the configurations, stage 2 the seed's, the grid's mean steps
    assert e["trial_s"] == pytest.approx(statistics.mean(
        check_gpu.run_s(r, statistics.mean(r["step_s"]), e, 1) for r in GRID["configs"]))
    seed_model = e["model_fixed_s"] + 1.0 + 2.0 + 120 * (351 * 0.011 + 0.5 + 2 * 0.1 + 0.275) + 1.2
    assert e["model_s"] == pytest.approx(seed_model) and "the seed's" in e["stage2_configs"]
    assert b["total_s"] > e["total_s"] and plan["upper_bound"] == "bound"
    assert "bound" not in check_gpu.project({"configs": []}, stage1, stage2)


def test_without_the_studys_storage_the_projection_goes_without_stage_1s_costs(tmp_path):
    """The trials, their spans included, all come from the study: no study, no trials, and a projection still."""
    assert check_gpu.stage1_figures(str(tmp_path)) == {"trials": []}
    _, stage2 = stages()
    plan = check_gpu.project(GRID, {"wall_s": 9.0, "trials": []}, stage2)
    assert plan["bound"]["trial_overhead_s"] == plan["bound"]["stage1_one_off_s"] == 0
    assert plan["bound"]["total_s"] > plan["estimate"]["total_s"] > 0


def travelling_tree() -> int:
    """Bytes of what a device call sends besides the carried paths: tracked and untracked-not-ignored files
    (and a shared/ folder inside the checkout, where there is one)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = {os.path.join(ROOT, os.fsdecode(p)) for p in listed if p}
    for folder, _, names in os.walk(os.path.join(ROOT, "shared")):
        paths.update(os.path.join(folder, n) for n in names)
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p))


@needs_jpeg_copy
def test_the_documented_device_call_carries_at_most_56_mib(tmp_path):
    """The call as the docstring prescribes it: the tree, and .devdata/check holding the wheels and the subset."""
    doc = " ".join(check_gpu.__doc__.replace("\\\n", " ").split())
    assert 'carry [".devdata/check"]' in doc and "cp ../shared/device-wheels/*.whl .devdata/check/" in doc
    assert "tools/check_gpu.py --make-data ../shared/data/cifar10-jpeg.npz .devdata/check/cifar10-check.npz" in doc
    assert ("python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/check/*.whl && export "
            "PYTHONPATH=/tmp/site && python3 tools/check_gpu.py --data-npz .devdata/check/cifar10-check.npz --data-dir "
            '/tmp/data --out "$OUT" --pack') in doc
    subset = tmp_path / "cifar10-check.npz"
    check_gpu.make_check_data(JPEG_NPZ, str(subset))
    tree, carried = travelling_tree(), subset.stat().st_size + sum(os.path.getsize(w) for w in WHEELS)
    total = (tree + carried) / 2**20
    assert total <= 56 and 64 - total >= 8, (f"{total:.1f} MiB would travel (tree {tree / 2**20:.1f}, subset "
                                             f"{subset.stat().st_size / 2**20:.1f}, wheels "
                                             f"{(carried - subset.stat().st_size) / 2**20:.1f})")


@needs_jpeg_copy
@needs_real_data
def test_the_subset_rebuilds_stage_1s_images_the_split_and_the_test_set_as_cifar_10s_own(tmp_path):
    import torch

    from data import load_cifar10, split_indices

    made = check_gpu.make_check_data(JPEG_NPZ, str(tmp_path / "subset.npz"))
    assert (made["proxy"], made["val"]) == (9000, 5000) and made["bytes"] < 12 * 2**20  # the black slots compressed
    check_gpu.rebuild_check_data(str(tmp_path / "subset.npz"), str(tmp_path / "data"))
    ours, real = load_cifar10(str(tmp_path / "data"), download=False), load_cifar10(REAL_DATA, download=False)
    assert torch.equal(ours.train_labels, real.train_labels)  # so both stages draw the same split from it
    assert torch.equal(ours.test_images, real.test_images) and torch.equal(ours.test_labels, real.test_labels)
    proxy, _ = split_indices(real.train_labels, subset_ratio=0.2)
    _, val = split_indices(real.train_labels)
    read = torch.zeros(len(real.train_labels), dtype=torch.bool)
    for idx in (proxy, val, split_indices(real.train_labels, subset_ratio=0.01)[0]):  # the smoke test's too
        assert torch.equal(ours.train_images[idx], real.train_images[idx])
        read[idx] = True
    assert int(ours.train_images[~read].max()) == 0  # the slots no run of the check reads: black


def test_a_cifar_folder_is_never_overwritten_by_a_rebuild(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(SystemExit) as e:
        check_gpu.rebuild_check_data(str(tmp_path / "none.npz"), str(tmp_path))
    assert "already holds cifar-10-batches-py/" in str(e.value.code) and not os.listdir(tmp_path / "cifar-10-batches-py")


def test_pack_keeps_everything_but_the_checkpoints(tmp_path):
    (tmp_path / "results" / "stage2" / "m").mkdir(parents=True)
    for name in ("stage2/m/best.pt", "stage2/m/test_metrics.json", "stage2/report.md"):
        (tmp_path / "results" / name).write_text("x")
    with tarfile.open(tmp_path / check_gpu.pack(str(tmp_path))) as tar:
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
        check_gpu.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--data-dir", str(tmp_path / "none")])
    assert str(e.value.code).startswith("error: no CIFAR-10 at") and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()
