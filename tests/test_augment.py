import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import RandAugment, _apply_op

import augment

# Ops that only move pixels: no arithmetic, hence no rounding tolerance.
PIXEL_MOVES = {"Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These tensors are tiny: on a busy 2-core machine intra-op threads only spin and wait (10x slower tests).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(h: int = 32, w: int = 32) -> torch.Tensor:
    """Noise, smooth gradients (so AutoContrast/Equalize have real work), low-contrast and constant images."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (8, 3, h, w), dtype=torch.uint8, generator=gen)
    ys = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, 1, w)
    gradient = torch.cat([
        (ys * xs * torch.tensor([200.0, 120.0, 60.0]).view(1, 3, 1, 1) + 20).to(torch.uint8),
        (255 * (0.5 + 0.5 * torch.sin(6 * xs + 3 * ys + torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)))).to(torch.uint8),
    ])  # fmt: skip
    low_contrast = torch.randint(100, 110, (2, 3, h, w), dtype=torch.uint8, generator=gen)
    constant = torch.stack([torch.full((3, h, w), v, dtype=torch.uint8) for v in (0, 77, 255)])
    two_valued = torch.where(torch.rand(1, 3, h, w, generator=gen) < 0.9, 30, 200).to(torch.uint8)
    return torch.cat([noise, gradient, low_contrast, constant, two_valued])


def torchvision_op(img: torch.Tensor, op: int, negate: bool, magnitude: int = 9) -> torch.Tensor:
    """What torchvision's RandAugment does to one image when it draws `op` and the sign coin `negate`."""
    name = augment.OP_NAMES[op]
    magnitudes, signed = RandAugment()._augmentation_space(31, (img.shape[-2], img.shape[-1]))[name]
    m = float(magnitudes[magnitude].item()) if magnitudes.ndim > 0 else 0.0
    if signed and negate:
        m = -m
    return _apply_op(img, name, m, interpolation=InterpolationMode.NEAREST, fill=None)


def test_op_list_matches_torchvision():
    assert list(augment.OP_NAMES) == list(RandAugment()._augmentation_space(31, (32, 32)))


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("op", range(len(augment.OP_NAMES)), ids=augment.OP_NAMES)
def test_each_op_matches_torchvision(op, negate, size):
    x = make_batch(*size)
    n = len(x)
    ours = augment._apply_ops(x, torch.full((n,), op), torch.full((n,), negate))
    expected = torch.stack([torchvision_op(img, op, negate) for img in x])
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    diff = (ours.int() - expected.int()).abs().max().item()
    assert diff <= (0 if augment.OP_NAMES[op] in PIXEL_MOVES else 1)


@pytest.mark.parametrize("magnitude", [0, 17, 30])
def test_other_magnitudes_match_torchvision(magnitude):
    x = make_batch()[:12]
    ops = torch.arange(len(augment.OP_NAMES)).repeat_interleave(2)
    negate = torch.arange(len(ops)) % 2 == 1
    x = x.repeat(3, 1, 1, 1)[: len(ops)]
    ours = augment._apply_ops(x, ops, negate, magnitude=magnitude)
    expected = torch.stack([torchvision_op(img, int(o), bool(s), magnitude) for img, o, s in zip(x, ops, negate)])
    assert (ours.int() - expected.int()).abs().max().item() <= 1


def test_mixed_ops_go_back_to_their_own_samples():
    x = make_batch()
    gen = torch.Generator().manual_seed(1)
    ops = torch.randint(len(augment.OP_NAMES), (len(x),), generator=gen)
    negate = torch.randint(2, (len(x),), generator=gen).bool()
    ours = augment._apply_ops(x, ops, negate)
    expected = torch.stack([torchvision_op(img, int(o), bool(s)) for img, o, s in zip(x, ops, negate)])
    assert (ours.int() - expected.int()).abs().max().item() <= 1


def crop_flip_candidates(img: torch.Tensor, padding: int = 4):
    h, w = img.shape[-2:]
    padded = TF.pad(img, [padding], fill=0)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = TF.crop(padded, top, left, h, w)
            yield (top, left, False), crop
            yield (top, left, True), TF.hflip(crop)


def test_random_crop_flip_is_a_padded_crop_maybe_flipped():
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment.random_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    found = []
    for img, res in zip(x, out):
        matches = [params for params, cand in crop_flip_candidates(img) if torch.equal(cand, res)]
        assert len(matches) == 1
        found.append(matches[0])
    assert len(set(found)) > 10  # each sample drew its own crop and flip


def test_random_crop_flip_distribution():
    # Channel 0 holds column + 1 and channel 1 row + 1, so the centre pixel tells each sample's shift and flip.
    h = w = 32
    cols = torch.arange(1, w + 1, dtype=torch.uint8).expand(h, w)
    rows = torch.arange(1, h + 1, dtype=torch.uint8).view(h, 1).expand(h, w)
    img = torch.stack([cols, rows, torch.zeros(h, w, dtype=torch.uint8)])
    out = augment.random_crop_flip(img.expand(4096, 3, h, w), torch.Generator().manual_seed(2))
    flipped = out[:, 0, 16, 17] < out[:, 0, 16, 16]
    assert 0.45 < flipped.float().mean() < 0.55
    shift_y = out[:, 1, 16, 16].long() - 17
    shift_x = torch.where(flipped, out[:, 0, 16, 16].long() - 16, out[:, 0, 16, 16].long() - 17)
    for shift in (shift_x, shift_y):
        counts = torch.bincount(shift + 4, minlength=9)
        assert len(counts) == 9 and counts.min() > 4096 / 9 * 0.8


def test_rand_augment_is_reproducible_and_per_sample():
    x = make_batch()[8:9].expand(256, 3, 32, 32).contiguous()
    a = augment.rand_augment(x, torch.Generator().manual_seed(3))
    b = augment.rand_augment(x, torch.Generator().manual_seed(3))
    c = augment.rand_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert len(torch.unique(a.flatten(1), dim=0)) > 50  # one identical image, many different augmentations


def test_rand_augment_applies_drawn_ops_in_sequence():
    # _apply_ops is checked against torchvision above; here rand_augment must chain it with its own draws.
    x = make_batch()
    seed = 5
    out = augment.rand_augment(x, torch.Generator().manual_seed(seed), num_ops=3)
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(len(augment.OP_NAMES), (3, len(x)), generator=gen)
    negate = torch.randint(2, (3, len(x)), generator=gen)
    expected = x
    for k in range(3):
        expected = augment._apply_ops(expected, ops[k], negate[k])
    assert torch.equal(out, expected)


def test_global_rng_when_no_generator():
    x = make_batch()
    torch.manual_seed(6)
    a = augment.train_transform(x)
    torch.manual_seed(6)
    b = augment.train_transform(x)
    assert torch.equal(a, b)


def test_normalize_matches_torchvision():
    x = make_batch()
    expected = TF.normalize(x.float() / 255, list(augment.CIFAR10_MEAN), list(augment.CIFAR10_STD))
    torch.testing.assert_close(augment.normalize(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(augment.eval_transform(x), expected, rtol=0, atol=1e-5)


def test_train_transform_output():
    x = make_batch()
    out = augment.train_transform(x, torch.Generator().manual_seed(7), host_generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == x.shape
    mean = torch.tensor(augment.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.CIFAR10_STD).view(1, 3, 1, 1)
    assert (out >= -mean / std - 1e-5).all() and (out <= (1 - mean) / std + 1e-5).all()
    assert torch.equal(out, augment.train_transform(x, torch.Generator().manual_seed(7),
                                                    host_generator=torch.Generator().manual_seed(1)))


def test_memory_layout_does_not_matter():
    x = make_batch()
    channels_last = x.contiguous(memory_format=torch.channels_last)
    both = lambda fn, x: fn(x, torch.Generator().manual_seed(8), host_generator=torch.Generator().manual_seed(9))  # noqa: E731
    for fn in (augment.random_crop_flip, augment.rand_augment):
        assert torch.equal(fn(x, torch.Generator().manual_seed(8)), fn(channels_last, torch.Generator().manual_seed(8)))
    assert torch.equal(both(augment.train_transform, x), both(augment.train_transform, channels_last))


def test_rejects_non_uint8():
    with pytest.raises(ValueError):
        augment.rand_augment(torch.zeros(2, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_torchvision_on_cuda():
    x = make_batch().cuda()
    n = len(x)
    for op in range(len(augment.OP_NAMES)):
        for negate in (False, True):
            ours = augment._apply_ops(x, torch.full((n,), op, device="cuda"), torch.full((n,), negate, device="cuda"))
            expected = torch.stack([torchvision_op(img, op, negate) for img in x])
            assert ours.device == x.device
            assert (ours.int() - expected.int()).abs().max().item() <= 1, augment.OP_NAMES[op]
    def transform():
        gens = torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(1)
        return augment.train_transform(x, gens[0], host_generator=gens[1])

    out = transform()
    assert out.device == x.device and out.dtype == torch.float32
    assert torch.equal(out, transform())
    # the host draws the ops, the device the pixels: the same images as on the CPU, with the CPU's crops
    assert torch.equal(augment.rand_augment(x, torch.Generator().manual_seed(2)).cpu(),
                       augment.rand_augment(x.cpu(), torch.Generator().manual_seed(2)))
