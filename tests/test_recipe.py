"""Each recipe switch of TrainConfig does what it says, and each has an off position."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

import augment
from conftest import synthetic_splits
from data import AUGMENT_CHUNK, DeviceLoader, cutmix_box, loss_fn, mix_batch
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


# ----------------------------------------------------------------------------- the long-schedule fields


def constant_batch(n: int, size: int = 32):
    """Image i holds the value i everywhere, its label i % 10: each pixel says which image it came from."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_one_box_and_weighs_the_targets_by_the_area_pasted(seed):
    x, y = constant_batch(10)
    rng = random.Random(seed)
    xm, t = mix_batch(x, y, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(seed), rng=rng)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))  # the partners it drew
    torch.testing.assert_close(t.sum(1), torch.ones(10))
    pasted = (xm == x[perm]).all(1) & (xm != x).all(1)  # (B, H, W): the partner's pixels, where it is another image
    moved = perm != torch.arange(10)
    assert moved.any()
    share = pasted[moved].float().mean(dim=(1, 2))
    # the reference: each image keeps 1 - share of its own target and takes share of its partner's
    hard = F.one_hot(y, 10).float()
    lam = 1 - share[0].item()
    torch.testing.assert_close(t, lam * hard + (1 - lam) * hard[perm])
    assert torch.all(share == share[0])  # one box for the whole batch
    rows, cols = pasted[moved][0].nonzero().unbind(1)
    if len(rows):  # one solid rectangle: its bounding box is all pasted
        assert pasted[moved][0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    unpasted = ~(xm == x[perm]).all(1)
    assert torch.equal(xm.permute(0, 2, 3, 1)[unpasted], x.permute(0, 2, 3, 1)[unpasted])  # the rest untouched


def test_cutmix_boxes_are_clipped_at_the_border_and_the_area_follows():
    # A lambda near 0 asks for a box nearly the image's size, which a centre near a corner clips.
    shares = []
    for seed in range(200):
        rng = random.Random(seed)
        lam = rng.betavariate(1.0, 1.0)
        top, bottom, left, right = cutmix_box(lam, 32, 32, random.Random(seed + 1000))
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        shares.append((bottom - top) * (right - left) / 1024 / (1 - lam) if lam < 0.99 else 1.0)
    assert min(shares) < 0.5 and max(shares) <= 1.0 + 1e-9  # clipped boxes paste less than asked, never more


def mixed_kinds(n_batches: int, **settings):
    """How each of n_batches tiny batches came out: 'none', 'mixup' (every pixel blended) or 'cutmix' (a box)."""
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    x, y = constant_batch(16, size=8)  # 16: a partner order that moves no image is (practically) never drawn
    kinds = []
    for _ in range(n_batches):
        xm, t = mix_batch(x, y, generator=g, rng=rng, **settings)
        if t.dtype == torch.long:
            kinds.append("none")
        else:
            kinds.append("cutmix" if torch.all(xm == xm.round()) else "mixup")
    return kinds


def test_mix_prob_is_the_share_of_mixed_batches_and_switch_prob_the_share_of_cutmix():
    n = 4000
    kinds = mixed_kinds(n, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.3)
    mixed = n - kinds.count("none")
    # binomial: 4 standard deviations
    assert abs(mixed / n - 0.5) < 4 * (0.25 / n) ** 0.5
    assert abs(kinds.count("cutmix") / mixed - 0.3) < 4 * (0.21 / mixed) ** 0.5
    assert set(mixed_kinds(50, cutmix_alpha=1.0)) == {"cutmix"}  # alone, CutMix mixes every batch
    assert set(mixed_kinds(50, mixup_alpha=0.8)) == {"mixup"}
    assert set(mixed_kinds(50, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0)) == {"cutmix"}
    assert set(mixed_kinds(50, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)) == {"none"}


def erased_boxes(batch: torch.Tensor):
    """Per image of a batch of zeros erased with noise: (erased, height, width) of its erased box."""
    hit = (batch != 0).any(1)  # (B, H, W); N(0, 1) noise is never exactly 0 in practice
    rows, cols = hit.any(2), hit.any(1)
    return rows.any(1), rows.sum(1).float(), cols.sum(1).float()


def test_random_erasing_draws_timm_s_areas_aspects_and_shares():
    """Against timm's RandomErasing itself (pixel mode), image by image: the share of images erased, and the
    quantiles of the boxes' areas and aspects."""
    from timm.data.random_erasing import RandomErasing

    n, area, aspect = 3000, (0.02, 1 / 3), (0.3, 3.3)
    for p in (1.0, 0.25):
        ours = augment.random_erasing(torch.zeros(n, 3, 32, 32), p, area, aspect,
                                      generator=torch.Generator().manual_seed(0))
        random.seed(0)  # timm draws from Python's global RNG
        theirs = torch.stack([RandomErasing(p, area[0], area[1], aspect[0], aspect[1], mode="pixel",
                                            device="cpu")(torch.zeros(3, 32, 32)) for _ in range(n)])
        (e1, h1, w1), (e2, h2, w2) = erased_boxes(ours), erased_boxes(theirs)
        assert abs(e1.float().mean() - e2.float().mean()) < 0.04, p
        for a, b in (((h1 * w1)[e1] / 1024, (h2 * w2)[e2] / 1024), ((h1 / w1)[e1].log(), (h2 / w2)[e2].log())):
            q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
            torch.testing.assert_close(a.quantile(q), b.quantile(q), atol=0.05, rtol=0.05)
    # the parameters bound what is drawn: every box within the area range (up to rounding of its sides)
    e, h, w = erased_boxes(augment.random_erasing(torch.zeros(500, 3, 32, 32), 1.0, (0.1, 0.2), (0.5, 2.0),
                                                  generator=torch.Generator().manual_seed(1)))
    assert e.all() and ((h * w / 1024) > 0.06).all() and ((h * w / 1024) < 0.26).all()
    assert ((h / w) > 0.5 * 0.8).all() and ((h / w) < 2.0 * 1.25).all()


def test_random_erasing_reaches_the_training_batches_from_the_run_s_generator():
    s = synthetic_splits(n_train=256, n_val=64)
    cfg = TrainConfig(**TINY, epochs=1, erase_prob=0.5, seed=5)
    trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, torch.device("cpu"),
                      progress=False)
    torch.manual_seed(99)  # the global RNG plays no part
    batch = first_training_batch(trainer)
    # by hand: the loader's augmentation of the first chunk, then erasing with the same device generator
    device, host = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    order = torch.randperm(256, generator=device)[:256]
    x = augment.random_crop_flip(s.train_images[order[:256]], device)
    x = augment.normalize(augment.rand_augment(x, host))
    expected = augment.random_erasing(x, 0.5, cfg.erase_area, cfg.erase_aspect, device)[:64]
    assert torch.equal(batch, expected)
    erased = (batch != x[:64]).any(1).any(1).any(1)
    assert 0 < erased.sum() < 64


def test_long_recipe_values_are_checked_and_a_bad_flag_is_one_line_naming_it(tmp_path, capsys):
    for bad in (dict(cutmix_alpha=-1.0), dict(mixup_alpha=-0.1), dict(mix_prob=1.5), dict(switch_prob=-0.1),
                dict(erase_prob=2.0), dict(erase_area=(0.3, 0.1)), dict(erase_area=(0.0, 0.3)),
                dict(erase_area=(0.1, 1.5)), dict(erase_aspect=(3.0, 0.3)), dict(erase_aspect=(0.0, 1.0)),
                dict(erase_area=(0.1,))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    # a JSON file's list is a range too, and a checkpoint's config compares equal after the round trip
    cfg = TrainConfig.from_dict({"erase_area": [0.05, 0.2]})
    assert cfg.erase_area == (0.05, 0.2) and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["erase_area"] == [0.05, 0.2]
    import stage1_search
    import stage2_final

    for parse in (stage1_search.parse_args, stage2_final.parse_args):
        for flags, message in ((["--cutmix-alpha", "-1"], "--cutmix-alpha: cutmix_alpha must be >= 0"),
                               (["--mix-prob", "1.5"], "--mix-prob: mix_prob is a probability, in [0, 1]"),
                               (["--erase-area", "0.3", "0.1"], "--erase-area: erase_area must be two shares")):
            with pytest.raises(SystemExit) as exit:
                parse(["--results", str(tmp_path), *flags])
            err = capsys.readouterr().err
            assert exit.value.code == 2 and message in err and err.count("\n") == 1, err
        args = parse(["--results", str(tmp_path), "--cutmix-alpha", "1", "--mix-prob", "0.5", "--erase-prob", "0.25",
                      "--erase-aspect", "0.5", "2"])
        assert (args.cutmix_alpha, args.mix_prob, args.erase_prob, args.erase_aspect) == (1.0, 0.5, 0.25, [0.5, 2.0])
    with pytest.raises(SystemExit):
        stage2_final.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--cutmix-alpha", "--mix-prob", "--switch-prob", "--erase-prob", "--erase-area", "--erase-aspect"):
        assert flag in help_text


def test_a_checkpoint_from_before_the_long_recipe_fields_still_resumes(tmp_path):
    """Its configuration lacks the new keys, whose defaults (off) are what its code did: it continues, and
    counts as the same configuration; a key this code does not know still means another version."""
    from train import save_checkpoint
    from data import DataError

    s = synthetic_splits(n_train=128, n_val=64)
    make = lambda: Trainer(TrainConfig(**TINY, epochs=2), s.train_images, s.train_labels, s.val_images,  # noqa: E731
                           s.val_labels, torch.device("cpu"), progress=False)
    trainer = make()
    trainer.fit(on_epoch=lambda t, rec: setattr(t, "bad_epochs", 10**6))  # one epoch, then stop
    state = trainer.state_dict()
    new = ("cutmix_alpha", "mix_prob", "switch_prob", "erase_prob", "erase_area", "erase_aspect")
    old = {**state, "config": {k: v for k, v in state["config"].items() if k not in new}}
    save_checkpoint(old, str(tmp_path / "old.pt"))
    resumed = make()
    resumed.resume(str(tmp_path / "old.pt"), again="")
    assert resumed.epoch == 1
    save_checkpoint({**state, "config": {**state["config"], "newer_field": 1}}, str(tmp_path / "newer.pt"))
    with pytest.raises(DataError, match="older, incompatible version"):
        make().resume(str(tmp_path / "newer.pt"), again="")
    other = {**state, "config": {k: v for k, v in state["config"].items() if k != "erase_prob"} | {"lr": 0.5}}
    save_checkpoint(other, str(tmp_path / "other.pt"))
    with pytest.raises(DataError, match="another configuration"):
        make().resume(str(tmp_path / "other.pt"), again="")
