"""The GPU path's optimisations, checked on the CPU for correctness: each gives the same losses."""

import pytest
import torch

from conftest import synthetic_splits
from train import TrainConfig, Trainer

# depth 2 with drop-path on: the second block's rate is above 0, so the compiled forward meets drop-path.
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, batch_size=64, epochs=2, warmup_epochs=1,
            lr=1e-3, mixup_alpha=0.1, drop_path=0.2)


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


def test_the_seed_shape_s_training_forward_compiles_to_one_graph_with_drop_path_on():
    """Drop-path's draws happen outside the forward (ViT.drop_path_keep, from the run's generator), so Dynamo
    sees no generator argument to break on: one graph, no break (8 graphs and 7 breaks before)."""
    from vit import ViT

    cfg = TrainConfig(drop_path=0.1)  # the seed's shape and rate
    model = ViT(cfg.vit_config()).train()
    keep = model.drop_path_keep(8, torch.Generator().manual_seed(0))
    assert keep is not None and keep.shape == (cfg.depth, 2, 8)
    explained = torch._dynamo.explain(model)(torch.randn(8, 3, 32, 32), keep)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    # the draws are the model's rates: block 0 is never dropped, the last block's share is about 0.1
    many = model.drop_path_keep(20000, torch.Generator().manual_seed(1))
    assert torch.all(many[0] == 1.0) and abs((many[-1] == 0).float().mean().item() - 0.1) < 0.01
    assert torch.allclose(many[-1][many[-1] > 0], torch.tensor(1 / 0.9))
