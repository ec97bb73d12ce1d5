"""bench.py's device handling and its end-to-end comparison, on the CPU (and on CUDA GPUs where there are some)."""

import pytest
import torch

import bench
from conftest import synthetic_splits
from train import resolve_amp


def test_device_helpers_work_on_the_cpu():
    cpu = torch.device("cpu")
    bench.sync(cpu)
    assert isinstance(bench.device_name(cpu), str) and bench.device_name(cpu)
    assert bench.peak_memory_mb(cpu) > 0
    assert bench.use_device("cpu") == cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_device_helpers_act_on_the_named_gpu():
    last = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    assert bench.use_device(str(last)) == last and torch.cuda.current_device() == last.index
    x = torch.ones(2**20, device=last)
    bench.sync(last)
    assert bench.peak_memory_mb(last) >= x.numel() * 4 / 2**20
    assert bench.device_name(last) == torch.cuda.get_device_name(last.index)


@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16"])
def test_both_end_to_end_contenders_train_with_the_same_step_settings(amp):
    """Only the data pipeline may differ: the same autocast dtype, loss scaling, AdamW kind and clipping."""
    cpu = torch.device("cpu")
    s = synthetic_splits(n_train=256, n_val=64)
    ours = bench.our_trainer(s.train_images, s.train_labels, cpu, amp)
    usual = bench.Baseline(s.train_images, s.train_labels, cpu, amp)
    assert ours.amp_dtype == usual.amp_dtype == resolve_amp(cpu, amp)
    assert ours.optimizer.defaults["fused"] == usual.opt.defaults["fused"] == bench.step_settings(cpu, amp)["fused"]
    assert ours.scaler.is_enabled() == usual.scaler.is_enabled() == (amp == "fp16")
    assert ours.cfg.grad_clip == usual.cfg.grad_clip > 0
    assert ours.cfg.vit_config() == usual.cfg.vit_config()
    if amp == "auto":  # and both really train (two batches each); bf16 and fp16 are emulated on a CPU: slow
        assert usual.epoch() > 0 and ours.train_epoch()["train_img_s"] > 0


def test_the_model_step_runs_in_the_precision_training_uses(monkeypatch):
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        seen.append((dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    step = bench.make_step(dict(patch_size=8, embed_dim=32, depth=1, num_heads=2), torch.device("cpu"), amp="bf16")
    step()
    assert seen and all(s == (torch.bfloat16, True) for s in seen)


@pytest.mark.parametrize("argv", [["--images", "5"], ["--rounds", "0"], ["--amp", "fp8"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2


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


def test_the_bench_reports_a_steps_operations_eager_and_fewer_compiled():
    """The seed's recipe (drop-path 0.1, RandAugment) at a tiny shape, counted as the bench counts it: each mode in
    a fresh process, a whole Trainer step with its share of the augmentation."""
    cfg = bench.seed_config(patch_size=8, embed_dim=32, depth=2, num_heads=2, batch_size=64)
    r = bench.ops_figures(torch.device("cpu"), "auto", "both", cfg)
    assert r["ops_precision"] == "bf16" and r["ops_shape"]["drop_path"] == 0.1  # a GPU's precision, on a CPU
    assert r["ops_per_step_eager"] > r["ops_per_step_compiled"] > 0
    assert r["ops_per_step_eager"] > 50  # forward, backward, clipping, AdamW and augmentation: dozens at least
    assert [row[0] for row in bench.ops_rows(r)] == ["operations per step, eager", "operations per step, compiled"]


def test_the_grid_holds_every_configuration_of_the_search_space_that_differs_in_cost():
    import itertools

    from stage1_search import suggest_config
    from train import TrainConfig

    probe = bench._Proposer()
    suggest_config(probe, TrainConfig())
    grid = bench.search_grid()
    keys = [tuple(getattr(c, k) for k in bench.GRID_KEYS) for c in grid]
    assert sorted(keys) == sorted(itertools.product(*(probe.choices[k] for k in bench.GRID_KEYS)))
    assert len(grid) == 64  # 2 patches x 2 widths x 2 depths x 2 head counts x 2 batches x 2 optimizers
    # each step at its costliest: Mixup at its largest, and CutMix, erasing and label smoothing on every batch
    assert all(c.mixup_alpha == max(probe.choices["mixup_alpha"]) and c.cutmix_alpha > 0 and c.erase_prob > 0
               and c.label_smoothing > 0 and c.mix_prob == 1.0 for c in grid)


def test_a_configurations_costs_are_timed_as_a_stage_runs_it(tmp_path):
    from train import TrainConfig

    cfg = TrainConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=32)
    row = bench.config_times(cfg, torch.device("cpu"), "auto", images=64, val_images=16, folder=str(tmp_path))
    assert row["steps"] == 2 and len(row["step_s"]) == 2 and all(t > 0 for t in row["step_s"])
    assert row["setup_s"] > 0 and row["val_s"] > 0 and row["warmup_s"] >= 0
    assert row["save_s"] > 0 and (tmp_path / "last.pt").is_file()
    assert {k: row[k] for k in bench.GRID_KEYS} == {k: getattr(cfg, k) for k in bench.GRID_KEYS}
