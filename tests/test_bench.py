"""tools/bench.py: its timings through the Trainer, its operation counts and its grid, on the CPU (and on CUDA GPUs
where there are some)."""

import itertools
import json

import pytest
import torch

from tools import bench
from train import TrainConfig


def test_device_helpers_work_on_the_cpu():
    cpu = bench.open_device("cpu")
    assert cpu == torch.device("cpu") and bench.device_name(cpu)
    assert bench.timed(lambda: torch.ones(1000).sum(), cpu) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_device_helpers_act_on_the_named_gpu():
    last = f"cuda:{torch.cuda.device_count() - 1}"
    assert bench.open_device(last) == torch.device(last) and torch.cuda.current_device() == torch.device(last).index
    assert bench.device_name(torch.device(last)) == torch.cuda.get_device_name(torch.device(last).index)


def test_bad_flags_are_usage_errors_and_a_bad_device_one_line():
    with pytest.raises(SystemExit) as e:
        bench.main(["--amp", "fp8"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "gpu"])
    assert str(e.value.code).startswith("error: cannot use device 'gpu'") and "\n" not in str(e.value.code)


def test_a_configurations_costs_are_timed_as_a_stage_runs_it():
    """Two augmentation calls' images an epoch (2,048: 64 steps of 32), a validation of 500 images on a CPU."""
    cfg = TrainConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=32)
    row = bench.config_times(cfg, torch.device("cpu"), "auto")
    assert row["steps"] == 64 and len(row["step_s"]) == 2 and all(t > 0 for t in row["step_s"])
    assert min(row["setup_s"], row["val_s"], row["test_s"], row["save_s"], row["img_s"]) > 0 and row["warmup_s"] >= 0
    assert {k: row[k] for k in bench.COST_CHOICES} == {k: getattr(cfg, k) for k in bench.COST_CHOICES}


def test_the_default_run_and_the_grid_write_the_figures_check_gpu_reads(tmp_path, capsys):
    """--smoke: the seed's configuration, and the grid's first, at a 16th of the batch, one step an epoch; no
    operation count (the next tests')."""
    bench.main(["--device", "cpu", "--smoke", "--json", str(tmp_path / "bench.json")])
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["precision"] == "fp32" and r["seed"]["img_s"] > 0 and r["seed"]["steps"] == 1
    assert (r["seed"]["patch_size"], r["seed"]["batch_size"]) == (4, 8) and "img/s training" in capsys.readouterr().out
    bench.main(["--device", "cpu", "--grid", "--smoke", "--json", str(tmp_path / "grid.json")])
    (row,) = json.loads((tmp_path / "grid.json").read_text())["configs"]
    assert row["batch_size"] == 4 and min(row["setup_s"], *row["step_s"], row["val_s"], row["test_s"]) > 0


def test_an_operation_counts_once_whatever_it_calls_and_views_and_no_op_casts_count_none():
    from torch.profiler import profile

    x, w = torch.randn(8, 4), torch.randn(3, 4)
    with profile() as prof:
        x.view(4, 8), x.t(), x.reshape(32), x.to(torch.float32), x.detach()
    assert bench.count_dispatched(prof.events()) == {"ops": 0}
    with profile() as prof:
        torch.nn.functional.linear(x, w)  # a transpose and a matmul inside: one operation
        x.to(torch.float64)  # a real cast
        x + 1
    assert bench.count_dispatched(prof.events()) == {"ops": 3}


def test_the_bench_counts_a_steps_operations_eager_and_fewer_compiled():
    """The seed's recipe (drop-path 0.1, RandAugment) at a tiny shape, each mode in a fresh process: a whole Trainer
    step with its share of the augmentation."""
    cfg = bench.seed_config(patch_size=8, embed_dim=32, depth=2, num_heads=2, batch_size=64)
    r = bench.ops_figures("cpu", "auto", ("off", "default"), cfg)
    assert r["ops_precision"] == "bf16" and r["ops_drop_path"] == 0.1  # a GPU's precision, on a CPU
    assert r["ops_per_step_eager"] > r["ops_per_step_compiled"] > 0
    assert r["ops_per_step_eager"] > 50  # forward, backward, clipping, AdamW and augmentation: dozens at least


def test_the_grid_holds_every_configuration_of_the_search_space_that_differs_in_cost():
    """Against stage 1's own search space: every categorical choice but the schedule's (which costs no step)."""
    from stage1_search import suggest_config

    class Proposer:  # an Optuna trial's stand-in that notes the choices offered
        choices = {}

        def suggest_categorical(self, name, choices):
            self.choices[name] = list(choices)
            return choices[0]

        def suggest_float(self, name, low, high, log=False):
            return low

    probe = Proposer()
    suggest_config(probe, TrainConfig())
    assert set(probe.choices) - set(bench.COST_CHOICES) == {"scheduler", "mixup_alpha"}
    grid = bench.search_grid()
    keys = [tuple(getattr(c, k) for k in bench.COST_CHOICES) for c in grid]
    assert len(grid) == 64
    assert sorted(keys) == sorted(itertools.product(*(probe.choices[k] for k in bench.COST_CHOICES)))
    # each step at its costliest: Mixup at its largest, and CutMix, erasing and label smoothing on every batch
    assert all(c.mixup_alpha == max(probe.choices["mixup_alpha"]) and c.cutmix_alpha > 0 and c.erase_prob > 0
               and c.label_smoothing > 0 and c.mix_prob == 1.0 for c in grid)
