import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import REAL_DATA, needs_real_data, synthetic_splits
from data import DeviceLoader, load_cifar10, train_val_splits
from train import Diverged, TrainConfig, Trainer, cpu_micro_batch, lr_factor, pick_device

TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1)


def make_trainer(splits=None, **overrides):
    splits = splits or synthetic_splits()
    cfg = TrainConfig(**{**TINY, **overrides})
    return Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                   device=torch.device("cpu"), progress=False)


def test_training_learns_a_synthetic_task_and_records_every_epoch():
    seen = []
    trainer = make_trainer(epochs=4, lr=3e-3, patience=10)
    history = trainer.fit(on_epoch=lambda t, rec: seen.append(rec["epoch"]))
    assert seen == [1, 2, 3, 4] and len(history) == 4
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time"):
        assert key in history[-1]
    assert history[-1]["val_acc"] > 0.5  # chance is 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("optimizer,scheduler,mixup_alpha", [("sgd", "step", 0.1), ("adamw", "cosine", 0.1),
                                                           ("adamw", "step", 0.0)])
def test_every_optimizer_scheduler_and_mixup_learns_on_its_schedule(optimizer, scheduler, mixup_alpha):
    trainer = make_trainer(epochs=4, optimizer=optimizer, scheduler=scheduler, mixup_alpha=mixup_alpha, lr=1e-3)
    history = trainer.fit()
    assert isinstance(trainer.optimizer, torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_acc"] > 0.2  # chance: 0.1
    # Each epoch starts at the schedule's learning rate for its first step (SGD: times its scale).
    cfg, steps = trainer.cfg, len(trainer.train_loader)
    peak = cfg.lr * (cfg.sgd_lr_scale if optimizer == "sgd" else 1.0)
    assert [r["lr"] for r in history] == pytest.approx([peak * lr_factor(e * steps, cfg, steps) for e in range(4)])


def test_seeded_cpu_runs_repeat_exactly():
    a = make_trainer(epochs=2, mixup_alpha=0.1).fit()
    b = make_trainer(epochs=2, mixup_alpha=0.1).fit()
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_acc"] for r in a] == [r["val_acc"] for r in b]


def test_early_stopping_stops_after_patience_epochs_without_improvement(monkeypatch):
    scripted = iter([0.30, 0.50, 0.45, 0.50, 0.60, 0.1, 0.1, 0.1, 0.1, 0.1])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"loss": 1.0, "acc": next(scripted)})
    trainer = make_trainer(epochs=50, patience=3)
    history = trainer.fit()
    # best 0.50 at epoch 2 (0.50 again at 4 is not better), 0.60 at 5, then 3 epochs worse: stop after 8
    assert len(history) == 8 and trainer.best_epoch == 5 and trainer.best_acc == 0.60
    assert [r["is_best"] for r in history] == [True, True, False, False, True, False, False, False]


def test_a_diverging_run_raises_diverged():
    trainer = make_trainer(epochs=3)
    with torch.no_grad():
        trainer.model.head.weight.fill_(float("nan"))
    with pytest.raises(Diverged, match="nan"):
        trainer.fit()


# Every random draw of a run: mixup alone, and the long-schedule recipe's fields with both mixings on, so that
# whether a batch is mixed, which way, its box and each image's erasing all come from the run's own streams.
RANDOM_RECIPES = {"mixup": dict(mixup_alpha=0.1),
                  "long": dict(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.5, erase_prob=0.25,
                               label_smoothing=0.1)}


@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
def test_resuming_from_a_state_dict_matches_an_uninterrupted_run(recipe):
    recipe = dict(depth=2, drop_path=0.2, **RANDOM_RECIPES[recipe])  # depth 2: the second block's drop-path is on
    full = make_trainer(epochs=4, **recipe).fit()
    first = make_trainer(epochs=4, **recipe)
    first.fit(on_epoch=lambda t, rec: setattr(t, "bad_epochs", 10**6) if rec["epoch"] == 2 else None)
    state = first.state_dict()
    state["early_stopping"]["bad_epochs"] = 0  # undo the forced stop
    second = make_trainer(epochs=4, **recipe)
    second.load_state_dict(state)
    resumed = second.fit()
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
    assert [r["val_acc"] for r in resumed] == [r["val_acc"] for r in full]


def test_a_warmup_longer_than_a_fifth_of_the_schedule_is_cut_and_said():
    from train import warmup_note

    assert warmup_note(TrainConfig(epochs=20, warmup_epochs=2)) is None
    short = TrainConfig(epochs=1, warmup_epochs=2)
    assert "cut to the first fifth" in warmup_note(short)
    factors = [lr_factor(s, short, steps_per_epoch=10) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] < 0.1  # 2 warmup steps of 10, then the decay


def test_schedules_warm_up_then_decay():
    cfg = TrainConfig(epochs=10, warmup_epochs=1, scheduler="cosine")
    f = [lr_factor(s, cfg, steps_per_epoch=10) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[50] < 0.6 and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    step = TrainConfig(epochs=10, warmup_epochs=1, scheduler="step")
    g = [lr_factor(s, step, steps_per_epoch=10) for s in range(100)]
    assert g[20] == 1.0 and g[60] == pytest.approx(0.1) and g[95] == pytest.approx(0.01)


def test_invalid_train_config_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="num_heads"):
        TrainConfig(embed_dim=130)


def test_auto_device_takes_cuda_then_mps_then_the_cpu(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    for cuda, apple, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        if mps is not None:
            monkeypatch.setattr(mps, "is_available", lambda apple=apple: apple)
        elif expected == "mps":
            continue
        assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu") and pick_device("cuda:1") == torch.device("cuda", 1)


@needs_real_data
def test_seed_best_shape_learns_real_cifar10_in_one_epoch():
    ds = load_cifar10(REAL_DATA, download=False)
    splits = train_val_splits(ds, seed=0, subset_ratio=5000 / 45000)
    assert len(splits.train_images) == 5000 and len(splits.val_images) == 5000
    # Augmentation and stochastic depth pay over long runs but slow the first epochs: off here (30 % vs 26 %
    # after two epochs).
    cfg = TrainConfig(patch_size=4, embed_dim=128, depth=6, num_heads=4, optimizer="adamw", lr=5.8e-4,
                      batch_size=64, epochs=1, augment=False, drop_path=0.0, grad_clip=0.0)
    # Judged on 1,000 of the 5,000 validation images, a quarter of this test's time: 25.4 % there after one
    # epoch (29.8 % after two, twice the time) on a 2-core EPYC; 22 % is 2.2x chance, and noise labels would not
    # reach it (p < 1e-28).
    trainer = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images[:1000],
                      splits.val_labels[:1000], device=torch.device("cpu"), progress=False)
    history = trainer.fit()
    assert history[-1]["val_acc"] >= 0.22, history


def test_micro_batches_give_the_same_training_as_whole_batches():
    whole = make_trainer(epochs=2, drop_path=0.0, mixup_alpha=0.1).fit()
    trainer = make_trainer(epochs=2, drop_path=0.0, mixup_alpha=0.1)
    trainer.micro_batch = 24  # 64 = 24 + 24 + 16: uneven on purpose
    split = trainer.fit()
    assert [r["train_loss"] for r in split] == pytest.approx([r["train_loss"] for r in whole], rel=1e-5)
    assert [r["val_loss"] for r in split] == pytest.approx([r["val_loss"] for r in whole], rel=1e-5)


def test_inference_batches_suit_the_device_and_any_of_them_gives_the_same_figures():
    cpu = torch.device("cpu")
    assert train.eval_batch_size(cpu) == 128 and train.eval_batch_size(torch.device("cuda")) == 500
    assert train.eval_batch_size(cpu, micro_batch=8) == 32  # a big shape's micro-batch bounds it too
    splits = synthetic_splits(n_train=256, n_val=300)
    trainer = make_trainer(splits, epochs=1)
    trainer.fit()
    assert trainer.val_loader.batch_size == 128
    figures = [train.evaluate(trainer.model, DeviceLoader(splits.val_images, splits.val_labels, size, train=False),
                              return_preds=True) for size in (128, 500, 7)]
    for other in figures[1:]:  # 300 images: 3 batches, 1 batch, 43 batches
        assert torch.equal(other["preds"], figures[0]["preds"])
        assert other["loss"] == pytest.approx(figures[0]["loss"], rel=1e-5)


def test_cpu_micro_batch_splits_only_the_big_shapes():
    assert cpu_micro_batch(TrainConfig(patch_size=4, embed_dim=128, depth=6, batch_size=128)) == 128
    largest = cpu_micro_batch(TrainConfig(patch_size=2, embed_dim=192, depth=6, batch_size=128))
    assert 8 <= largest < 64


FAULTS_PER_STEP = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train
from vit import ViT, ViTConfig
tuned = train.keep_freed_memory() if sys.argv[1] == "tuned" else None
# One thread: with more, worker threads allocate from arenas of their own, and the counts of both
# modes swung 20x from run to run (default 3,316-107,745 faults, tuned 0-1,041); with one, the
# default faults 51,000-97,000 times in 5 steps and the tuned run at most 780.
torch.set_num_threads(1)
torch.manual_seed(0)
model = ViT(ViTConfig())
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_stops_the_page_faults_of_every_step():
    root = str(Path(train.__file__).parent)

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP.format(root=root), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    # The median of three runs of each: glibc's own mmap threshold moves at run time, so a single default run
    # faulted anywhere from 8,224 to 77,845 times here (once too few for the bar below, with 1,300 tuned).
    default = statistics.median(faults("default")[1] for _ in range(3))
    assert default > 5000  # 20 MB in 4 KB pages: glibc hands activations back and faults them in again
    tuned = [faults("tuned") for _ in range(3)]
    # Alone: about 20,000 against 500-1,000. A test suite running beside it adds faults of its own (1,040 once
    # against a bar of default / 20): a tenth still tells the setting's effect from its absence.
    assert all(took == "True" for took, _ in tuned) and statistics.median(n for _, n in tuned) < default / 10


def test_off_a_terminal_progress_comes_as_steady_lines(capsys):
    """stdout is captured here (no terminal): the bar switches itself off, and lines take its place."""
    splits = synthetic_splits(n_train=256, n_val=64)
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    quiet = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                    device=torch.device("cpu"), progress=False, log_every_s=0.0)
    quiet.train_epoch()
    assert capsys.readouterr().out == ""
    chatty = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                     device=torch.device("cpu"), progress=True, log_every_s=0.0)
    chatty.train_epoch()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(chatty.train_loader) == 4  # every batch, at a 0-second pace
    assert lines[0].split()[:4] == ["epoch", "1/1", "batch", "1/4"] and "img/s" in lines[0] and "ends in" in lines[-1]


@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
def test_a_run_gives_the_same_history_alone_and_beside_another(recipe):
    """Each Trainer draws from its own generators: a second run started mid-way (its init, its shuffling,
    augmentation, erasing, drop-path and mixing) moves nothing of the first. Before, every Trainer re-seeded
    torch's global RNG, which all of those drew from."""
    import threading

    recipe = dict(epochs=3, depth=2, drop_path=0.2, randaug_ops=2, **RANDOM_RECIPES[recipe])  # depth 2: see above
    alone = make_trainer(**recipe).fit()
    first = make_trainer(**recipe)
    other_started, threads = threading.Event(), []

    def start_another(t, record):
        if record["epoch"] == 1:  # a second run starts, seeded alike, and trains beside this one
            other = make_trainer(**recipe)
            threads.append(threading.Thread(target=lambda: (other_started.set(), other.fit()), daemon=True))
            threads[0].start()
            other_started.wait()
            torch.manual_seed(12345)  # and someone re-seeds the global RNGs for good measure
            random.seed(12345)

    beside = first.fit(on_epoch=start_another)
    # Waited for: a run left going would switch the process-wide float32 settings (each validation's) under the
    # tests after this one, which once failed a precision test that way.
    threads[0].join()
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in beside] == [[r[k] for k in keys] for r in alone]


def test_a_checkpoint_of_another_kind_of_device_resumes_without_replaying_its_device_stream():
    trainer = make_trainer(epochs=2)
    state = trainer.state_dict()
    assert set(state["rng"]) == {"device_type", "device", "host", "python"}  # the training device's own, no more
    state["rng"] = {**state["rng"], "device_type": "cuda", "device": torch.zeros(16, dtype=torch.uint8)}
    other = make_trainer(epochs=2)
    other.load_state_dict(state)  # no IndexError from a list of every visible GPU's state
    assert other.replays_exactly is False
    same = make_trainer(epochs=2)
    same.load_state_dict(trainer.state_dict())
    assert same.replays_exactly is True


def test_amp_auto_picks_what_the_card_runs_natively(monkeypatch):
    from train import resolve_amp

    assert resolve_amp(torch.device("cpu"), "auto") is None  # bf16 is emulated on CPUs: 4x slower
    assert resolve_amp(torch.device("cpu"), "bf16") is torch.bfloat16  # asked for: given
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):  # Ampere and newer; T4, V100
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert resolve_amp(torch.device("cuda:1"), "auto") is expected
    assert resolve_amp(torch.device("cuda"), "off") is None
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp(torch.device("cpu"), "fp8")


def precision_now() -> tuple:
    """What a forward runs under: cuBLAS's and cuDNN's float32 settings (settable on a CPU-only torch too),
    and the CPU's autocast dtype, None when autocast is off."""
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no fp32_precision settings")
def test_strict_float32_turns_tf32_off_for_matmuls_and_convolutions_and_puts_the_settings_back():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        for outside in (saved, ("tf32", "tf32")):  # torch's defaults (conv TF32, matmul not), then TF32 everywhere
            matmul.fp32_precision, conv.fp32_precision = outside
            with pytest.raises(KeyError):  # an error inside still puts them back
                with train.strict_float32():
                    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
                    with train.strict_float32():  # nested, as evaluate inside evaluate
                        pass
                    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
                    raise KeyError
            assert (matmul.fp32_precision, conv.fp32_precision) == outside
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no fp32_precision settings")
def test_evaluate_runs_strict_float32_by_default_and_autocasts_when_given_a_dtype():
    trainer = make_trainer(epochs=1)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(precision_now()))
    before = precision_now()
    plain = train.evaluate(trainer.model, trainer.val_loader)
    assert seen and set(seen) == {("ieee", "ieee", None)} and precision_now() == before
    seen.clear()
    bf16 = train.evaluate(trainer.model, trainer.val_loader, amp_dtype=torch.bfloat16)
    assert seen and set(seen) == {(*before[:2], torch.bfloat16)} and precision_now() == before
    assert bf16["loss"] != plain["loss"] and bf16["loss"] == pytest.approx(plain["loss"], rel=2e-2)


def test_validation_runs_in_the_training_precision_on_a_gpu_and_in_float32_elsewhere(monkeypatch):
    from train import validation_amp

    for dtype in (torch.bfloat16, torch.float16, None):
        assert validation_amp(torch.device("cuda", 1), dtype) is dtype
        assert validation_amp(torch.device("cpu"), dtype) is None  # --amp bf16 on a CPU still validates in fp32
        assert validation_amp(torch.device("mps"), dtype) is None
    splits = synthetic_splits(n_train=128, n_val=64)
    cpu = Trainer(TrainConfig(**TINY, epochs=2), splits.train_images, splits.train_labels, splits.val_images,
                  splits.val_labels, device=torch.device("cpu"), amp="bf16", progress=False)
    assert cpu.amp_dtype is torch.bfloat16 and cpu.val_amp_dtype is None
    # fit validates in val_amp_dtype: after the first epoch, forced to bf16 as a GPU's would be
    asked, real = [], train.evaluate

    def spy(model, *args, **kwargs):
        if model is cpu.model:  # not another test's run still going in a thread of its own
            asked.append(kwargs.get("amp_dtype"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    cpu.fit(on_epoch=lambda t, record: setattr(t, "val_amp_dtype", torch.bfloat16))
    assert asked == [None, torch.bfloat16]


def test_sgd_is_fused_where_torch_has_the_kernel_and_trains_alike():
    splits = synthetic_splits(n_train=256, n_val=64)

    def sgd(**options):
        return Trainer(TrainConfig(**TINY, epochs=2, optimizer="sgd", lr=1e-3), splits.train_images,
                       splits.train_labels, splits.val_images, splits.val_labels, device=torch.device("cpu"),
                       progress=False, **options)

    fused, plain = sgd(), sgd(fused=False)
    assert fused.optimizer.defaults["fused"] is True and plain.optimizer.defaults["fused"] is False
    a, b = fused.fit(), plain.fit()
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)
    assert [r["val_loss"] for r in a] == pytest.approx([r["val_loss"] for r in b], rel=1e-5)


def test_the_progress_event_is_recorded_on_the_training_device_s_stream(monkeypatch):
    """With --device cuda:1, an event recorded on the current device's stream (GPU 0's) would not follow the copy."""
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return True

    class SumOnGpu1:  # a running sum on cuda:1, as far as _LateValue looks at it
        device = torch.device("cuda", 1)

        def to(self, *args, **kwargs):
            return torch.tensor(6.0)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"the current stream of {device}")
    late = train._LateValue(SumOnGpu1(), 3)
    assert recorded == ["the current stream of cuda:1"] and late.ready() and late.value == 2.0


def test_fp16_trains_with_a_loss_scaler_that_checkpoints_carry():
    trainer = make_trainer(epochs=1)
    assert not trainer.scaler.is_enabled()
    splits = synthetic_splits()
    fp16 = Trainer(TrainConfig(**TINY, epochs=1), splits.train_images, splits.train_labels, splits.val_images,
                   splits.val_labels, device=torch.device("cpu"), amp="fp16", progress=False)
    assert fp16.scaler.is_enabled()
    fp16.fit()
    state = fp16.state_dict()
    assert state["scaler"]["scale"] > 0
    again = Trainer(TrainConfig(**TINY, epochs=1), splits.train_images, splits.train_labels, splits.val_images,
                    splits.val_labels, device=torch.device("cpu"), amp="fp16", progress=False)
    again.load_state_dict(state)
    assert again.scaler.state_dict() == state["scaler"]


def test_a_deadline_stops_before_the_first_epoch_that_would_not_fit():
    import time

    trainer = make_trainer(epochs=5, patience=10)
    # Epochs of at least 0.3 s (the callback sleeps), a deadline 0.5 s away: the first epoch runs (nothing to
    # judge it by), the second would end past the deadline and never starts.
    history = trainer.fit(on_epoch=lambda t, r: time.sleep(0.3), deadline=time.monotonic() + 0.5)
    assert len(history) == 1 and trainer.stopped_for_time and not trainer.finished
    # A resumed run judges its first epoch by the history's last one.
    again = make_trainer(epochs=5, patience=10)
    again.load_state_dict(trainer.state_dict())
    again.history[-1]["epoch_s"] = 3600.0
    assert again.fit(deadline=time.monotonic() + 60) == again.history and again.epoch == 1 and again.stopped_for_time
    # No deadline: the run goes to its end.
    assert len(trainer.fit()) == 5 and not trainer.stopped_for_time and trainer.finished
