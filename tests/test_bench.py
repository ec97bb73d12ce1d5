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
