"""Each recipe switch of TrainConfig does what it says, and each has an off position."""

import copy

import pytest
import torch
import torch.nn.functional as F

import augment
from conftest import synthetic_splits
from data import AUGMENT_CHUNK, DeviceLoader, loss_fn
from train import TrainConfig, Trainer, evaluate, lr_factor, make_optimizer
from vit import ViT

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, batch_size=64)


def smoothed_ce_by_hand(logits, targets, eps):
    """The formula: cross-entropy against (1 - eps) * target + eps / C, written out."""
    c = logits.shape[1]
    if targets.dtype == torch.long:
        targets = F.one_hot(targets, c).float()
    smoothed = (1 - eps) * targets + eps / c
    return -(smoothed * logits.log_softmax(1)).sum(1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_changes_the_loss_exactly_as_its_formula_says(eps):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(16, 10, generator=g)
    hard = torch.randint(0, 10, (16,), generator=g)
    soft = torch.softmax(torch.randn(16, 10, generator=g), 1)  # mixup's soft targets: rows summing to 1
    for targets in (hard, soft):
        assert loss_fn(logits, targets, eps).item() == pytest.approx(smoothed_ce_by_hand(logits, targets, eps).item(),
                                                                     rel=1e-6)
    if eps:  # and it is not a no-op: confident, correct logits lose more under smoothing
        confident = 10 * F.one_hot(hard, 10).float()
        assert loss_fn(confident, hard, eps) > loss_fn(confident, hard, 0.0) + 0.1


def test_the_trainer_trains_against_smoothed_labels():
    """An epoch at a vanishing lr reports the smoothed loss of the initial model on the very same batches."""
    splits = synthetic_splits(n_train=256, n_val=64)
    cfg = TrainConfig(**TINY, lr=1e-12, epochs=1, warmup_epochs=0, drop_path=0.0, augment=False,
                      label_smoothing=0.2)
    trainer = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                      torch.device("cpu"), progress=False)
    initial = copy.deepcopy(trainer.model).train()
    replay = torch.Generator().manual_seed(0)
    replay.set_state(trainer.random.device.get_state())  # the loader shuffles with the run's generator
    batches = list(DeviceLoader(splits.train_images, splits.train_labels, cfg.batch_size, train=True, augment=False,
                                generator=replay))
    record = trainer.train_epoch()
    with torch.no_grad():
        smoothed = torch.stack([loss_fn(initial(x), y, 0.2) for x, y in batches]).mean().item()
        plain = torch.stack([loss_fn(initial(x), y, 0.0) for x, y in batches]).mean().item()
    assert record["train_loss"] == pytest.approx(smoothed, abs=1e-5)
    assert abs(smoothed - plain) > 1e-4  # 10x the tolerance above: that check could tell the two apart


def test_validation_loss_is_never_smoothed():
    splits = synthetic_splits(n_train=128, n_val=64)
    losses = []
    for eps in (0.0, 0.3):
        cfg = TrainConfig(**TINY, epochs=1, label_smoothing=eps)
        t = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                    torch.device("cpu"), progress=False)
        losses.append(evaluate(t.model, t.val_loader)["loss"])
    assert losses[0] == pytest.approx(losses[1])  # same seed, same initial model: same unsmoothed loss


def test_sgd_lr_scale_reaches_the_optimizer_and_adamw_ignores_it():
    model = ViT(TrainConfig(**TINY).vit_config())
    sgd = make_optimizer(model, TrainConfig(**TINY, optimizer="sgd", lr=1e-3, sgd_lr_scale=100.0))
    assert all(g["lr"] == pytest.approx(0.1) for g in sgd.param_groups)
    off = make_optimizer(model, TrainConfig(**TINY, optimizer="sgd", lr=1e-3, sgd_lr_scale=1.0))
    assert all(g["lr"] == pytest.approx(1e-3) for g in off.param_groups)
    adamw = make_optimizer(model, TrainConfig(**TINY, optimizer="adamw", lr=1e-3, sgd_lr_scale=100.0))
    assert all(g["lr"] == pytest.approx(1e-3) for g in adamw.param_groups)
    # and the schedule multiplies the scaled value: the trainer's first SGD step runs at lr x scale x warmup
    splits = synthetic_splits(n_train=128, n_val=64)
    cfg = TrainConfig(**TINY, optimizer="sgd", lr=1e-4, sgd_lr_scale=50.0, warmup_epochs=0, epochs=2)
    t = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                torch.device("cpu"), progress=False)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_weight_decay_and_its_off_position():
    model = ViT(TrainConfig(**TINY).vit_config())
    for wd in (0.05, 0.0):
        groups = make_optimizer(model, TrainConfig(**TINY, weight_decay=wd)).param_groups
        assert sorted(g["weight_decay"] for g in groups) == sorted([wd, 0.0])


def test_warmup_and_its_off_position():
    on = TrainConfig(**TINY, epochs=10, warmup_epochs=2)
    assert lr_factor(0, on, 10) == pytest.approx(1 / 20) and lr_factor(19, on, 10) == pytest.approx(1.0)
    off = TrainConfig(**TINY, epochs=10, warmup_epochs=0)
    assert lr_factor(0, off, 10) == pytest.approx(1.0)  # full lr from the first step


def test_drop_path_and_its_off_position():
    x = torch.randn(4, 3, 32, 32)
    for rate, same in ((0.0, True), (0.5, False)):
        torch.manual_seed(0)
        model = ViT(TrainConfig(**TINY, drop_path=rate).vit_config()).train()
        outs = [model(x) for _ in range(2)]  # training mode: only drop-path is random here
        assert torch.equal(outs[0], outs[1]) == same


def test_gradient_clipping_and_its_off_position():
    splits = synthetic_splits(n_train=64, n_val=64)
    norms = {}
    for clip in (0.0, 1e-3):
        cfg = TrainConfig(**TINY, epochs=1, grad_clip=clip, lr=1e-12, warmup_epochs=0)
        t = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels,
                    torch.device("cpu"), progress=False)
        t.train_epoch()  # one batch of 64
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()])).item()
    assert norms[0.0] > 1e-2 and norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_pool_reaches_the_model_and_cls_is_the_papers_class_token():
    x = torch.randn(2, 3, 32, 32)
    cls = ViT(TrainConfig(**TINY, pool="cls").vit_config()).eval()  # eval: no drop-path draws
    mean = ViT(TrainConfig(**TINY, pool="mean").vit_config()).eval()
    assert cls.cls_token is not None and cls.pos_embed.shape[1] == 16 + 1  # (32 / 8)^2 patches + the class token
    assert mean.cls_token is None and mean.pos_embed.shape[1] == 16
    # "mean" classifies the average of the final (normed) patch tokens: the head of that average, by hand
    tokens = mean.norm(mean.blocks[1](mean.blocks[0](mean.patch_embed(x) + mean.pos_embed)))
    assert torch.allclose(mean(x), mean.head(tokens.mean(dim=1)), atol=1e-6)


def test_recipe_values_are_checked():
    for bad in (dict(label_smoothing=1.0), dict(label_smoothing=-0.1), dict(sgd_lr_scale=0.0),
                dict(warmup_epochs=-1), dict(weight_decay=-1.0), dict(grad_clip=-1.0), dict(drop_path=1.0),
                dict(randaug_ops=-1), dict(randaug_magnitude=31), dict(randaug_magnitude=-1), dict(pool="max")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def first_training_batch(trainer):
    return next(iter(trainer.train_loader))[0]


def by_hand(images, batch_size, seed, num_ops, magnitude):
    """DeviceLoader's first batch, written out from the run's seed: the shuffle, crop and flip on the device
    generator (seed), then RandAugment's ops on the host one (seed + 1) unless off."""
    device, host = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(images), generator=device)[: (len(images) // batch_size) * batch_size]
    x = augment.random_crop_flip(images[order[: (AUGMENT_CHUNK // batch_size) * batch_size]], device)
    if num_ops:
        x = augment.rand_augment(x, host, num_ops=num_ops, magnitude=magnitude)
    return augment.normalize(x)[:batch_size]


def test_randaugment_settings_reach_the_training_batches_and_zero_ops_turns_it_off():
    s = synthetic_splits(n_train=256, n_val=64)
    batches = {}
    for ops, mag in ((2, 9), (2, 5), (0, 9)):
        cfg = TrainConfig(**TINY, epochs=1, randaug_ops=ops, randaug_magnitude=mag, seed=5)
        trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, torch.device("cpu"),
                          progress=False)
        torch.manual_seed(99)  # the global RNG plays no part
        batches[ops, mag] = first_training_batch(trainer)
        assert torch.equal(batches[ops, mag], by_hand(s.train_images, cfg.batch_size, 5, ops, mag))
    # the settings change the batches: a weaker magnitude, and no RandAugment at all
    assert not torch.equal(batches[2, 9], batches[2, 5]) and not torch.equal(batches[2, 9], batches[0, 9])
