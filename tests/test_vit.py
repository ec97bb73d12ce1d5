import itertools
import math

import pytest
import torch

from vit import ViT, ViTConfig

SEARCH_SHAPES = list(itertools.product([2, 4], [128, 192], [4, 6], [2, 4]))


@pytest.mark.parametrize("patch_size,embed_dim,depth,num_heads", SEARCH_SHAPES)
def test_every_search_shape_maps_images_to_logits(patch_size, embed_dim, depth, num_heads):
    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_every_parameter_gets_a_gradient(pool):
    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=4, embed_dim=64, depth=2, num_heads=2, pool=pool))
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_equals_softmax_qk_v_by_hand():
    torch.manual_seed(0)
    cfg = ViTConfig(patch_size=8, embed_dim=32, depth=1, num_heads=4)
    attn = ViT(cfg).blocks[0].attn.eval()
    x = torch.randn(3, 17, 32)
    B, N, D, H = 3, 17, 32, 4
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
    heads = lambda t: t.view(B, N, H, D // H).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // H), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(B, N, D) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(embed_dim=130, num_heads=4), "not divisible by num_heads"),
        (dict(patch_size=5), "not divisible by patch_size"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(embed_dim=-8), "embed_dim must be a positive integer"),
        (dict(drop_path=1.0), "drop_path must be in"),
        (dict(pool="max"), "pool must be"),
    ],
)
def test_invalid_config_raises_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_dropout_and_drop_path_are_off_in_eval_mode():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dropout=0.3, attn_dropout=0.3, drop_path=0.5, depth=2))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x)), "dropout should make training forwards differ"
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_init_is_normal_std_002_truncated_at_two_std():
    torch.manual_seed(0)
    w = ViT(ViTConfig()).blocks[0].mlp.fc1.weight
    # a N(0, 0.02) cut at +-2 std has std 0.88 * 0.02
    assert abs(w.std().item() - 0.0176) < 0.001 and w.abs().max() <= 0.04

