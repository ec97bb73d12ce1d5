"""The GPU path's optimisations, checked on the CPU for correctness: each gives the same losses."""

import pytest
import torch

from conftest import synthetic_splits
from train import TrainConfig, Trainer

TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, epochs=2, warmup_epochs=1,
            lr=1e-3, mixup_alpha=0.1)


def losses(**options):
    s = synthetic_splits(n_train=256, n_val=64)
    trainer = Trainer(TrainConfig(**TINY), s.train_images, s.train_labels, s.val_images, s.val_labels,
                      torch.device("cpu"), progress=False, **options)
    return [loss for r in trainer.fit() for loss in (r["train_loss"], r["val_loss"])]


@pytest.fixture(scope="module")
def reference():
    return losses(amp="off", fused=False, compile="off")


def test_fused_adamw_gives_the_same_losses(reference):
    assert losses(fused=True) == pytest.approx(reference, rel=1e-5)


def test_bf16_autocast_gives_close_losses(reference):
    assert losses(amp="bf16") == pytest.approx(reference, rel=3e-2)


def test_fp16_autocast_with_loss_scaling_gives_close_losses(reference):
    assert losses(amp="fp16") == pytest.approx(reference, rel=3e-2)


def test_torch_compile_gives_the_same_losses(reference):
    assert losses(compile=True) == pytest.approx(reference, rel=1e-4)
