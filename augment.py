"""Batched CIFAR-10 augmentation on uint8 tensors, on whatever device the batch lives (CPU or CUDA).

Reproduces torchvision's RandomCrop(padding=4) + RandomHorizontalFlip and RandAugment (tensor backend, NEAREST
interpolation, zero fill) pixel for pixel (the tests compare op by op), but each image draws its own parameters
and the batch goes through a few vectorised ops: no PIL, no Python loop over samples, so that augmentation does
not starve training on a few CPU cores. Seeded generators reproduce a batch exactly: `generator` (on the batch's
device; None: torch's global RNG) for crops, flips and anything per pixel, `host_generator` (CPU) for
RandAugment's ops and signs, which split the batch into per-op chunks: drawn on the host, a GPU never syncs.
"""

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ERASE_ATTEMPTS = 10  # timm's RandomErasing tries this many boxes per image and erases the first that fits
ERASE_AREA, ERASE_ASPECT = (0.02, 1 / 3), (0.3, 3.3)  # timm's default box area (shares of the image) and h / w

# RandAugment's ops in torchvision's order; an op's position is its id. Ids 1..5 are the geometric ops, so a batch
# sorted by op id holds them in one contiguous chunk that a single gather resamples.
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
_GEOMETRIC = range(1, 6)
MAGNITUDE_BINS = 31  # torchvision's RandAugment default: magnitudes 0..30
_BLEND_OPS = range(6, 10)  # Brightness, Color, Contrast, Sharpness: blends with factor 1 + signed magnitude


def _check_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch of shape (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Per sample: RandomCrop((H, W), padding, zero fill) then RandomHorizontalFlip(p=0.5); uint8 in and out."""
    _check_batch(x)
    (b, c, h, w), dev = x.shape, x.device
    # Top-left corner of each crop window in the padded image, as torchvision's RandomCrop draws it.
    corner = torch.randint(2 * padding + 1, (2, b, 1, 1), generator=generator, device=dev)
    flip = torch.randint(2, (b,), generator=generator, device=dev)
    padded = F.pad(x.contiguous(), (padding,) * 4)  # contiguous: the row arithmetic below assumes NCHW layout
    ph, pw = h + 2 * padding, w + 2 * padding
    # Each output row is w consecutive bytes of the padded batch, so one index_select of rows from the view of all
    # length-w windows does every crop: far cheaper than a per-pixel gather, whose int64 index outweighs the batch.
    rows = torch.arange(b * c, device=dev).view(b, c, 1) * ph + corner[0] + torch.arange(h, device=dev)
    crops = padded.view(-1).unfold(0, w, 1).index_select(0, (rows * pw + corner[1]).view(-1)).view(b, c, h, w)
    # Pick each sample's crop or its mirror; torch.where (several times) and index_copy_ are slower on CPU.
    return torch.cat([crops, crops.flip(-1)]).index_select(0, torch.arange(b, device=dev) + b * flip)


@lru_cache(maxsize=None)
def _magnitudes(magnitude: int, height: int, width: int) -> tuple[float, ...]:
    """Each op's unsigned magnitude, read off torchvision's own float32 tables as RandAugment reads them (float()),
    so that e.g. 0.27 or 4.35 round the same. Identity, AutoContrast, Equalize: 0. torchvision is imported here, once
    per run: importing it also imports torch._dynamo and sympy, about a second of every start of every script."""
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(MAGNITUDE_BINS, (height, width))
    return tuple(float(table[magnitude]) if table.ndim else 0.0 for table, _ in space.values())


@lru_cache(maxsize=None)
def _geometric_maps(height: int, width: int, device: torch.device, magnitude: int) -> torch.Tensor:
    """long (5 geometric ops x 2 signs [+, -], H*W): for each output pixel, 1 + the flat index of its source pixel,
    or 0 where the source lies outside the image (zero fill). With fixed magnitudes each op and sign is one fixed
    nearest-neighbour map: torchvision itself, run on an image whose pixels hold 1 + their flat index (0 is what its
    zero padding reads), yields it with torchvision's exact grid and rounding, on this device."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op  # what RandAugment calls: the same arguments, exactly

    mags = _magnitudes(magnitude, height, width)
    ids = torch.arange(1, height * width + 1, dtype=torch.float32, device=device).view(1, 1, height, width)
    maps = [_apply_op(ids, OP_NAMES[op], sign * mags[op], InterpolationMode.NEAREST, fill=None)
            for op in _GEOMETRIC for sign in (1.0, -1.0)]
    return torch.cat(maps).long().view(2 * len(_GEOMETRIC), height * width)


@lru_cache(maxsize=None)
def _blend_factors(mags: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float32 (4 blend ops, 2 signs [+, -], 2, 1, 1, 1): torchvision's blend ratio 1.0 + m and its complement
    1.0 - ratio, formed in float64 as there and only then rounded to float32, so that the blends round identically."""
    factors = [[[r, 1.0 - r] for r in (1.0 + mags[op], 1.0 + -mags[op])] for op in _BLEND_OPS]
    return torch.tensor(factors, dtype=torch.float32, device=device).view(len(_BLEND_OPS), 2, 2, 1, 1, 1)


def _to_uint8(f: torch.Tensor) -> torch.Tensor:
    # torchvision clamps and casts with .to(uint8), truncating. Going through int32 truncates the same way and is
    # 2-3x faster on CPU, where the direct float -> uint8 cast is not vectorised.
    return f.clamp_(0, 255).to(torch.int32).to(torch.uint8)


def _blend(img: torch.Tensor, other: torch.Tensor | None, ratio: torch.Tensor,
           complement: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend term by term, so that float32 rounding agrees. other=None stands for its all-zero image
    # (Brightness), whose term is +-0 and changes nothing.
    out = ratio * img
    if other is not None:
        out += complement * other
    return _to_uint8(out)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    # torchvision's rgb_to_grayscale truncates to uint8, which Color and Contrast then blend with; trunc() gives
    # those integers without leaving float.
    r, g, b = img.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).trunc_().unsqueeze(1)


def _sharpness(img: torch.Tensor, ratio: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    if img.shape[-1] <= 2 or img.shape[-2] <= 2:
        return img
    f = img.float()
    # torchvision rounds a conv with the kernel [[1,1,1],[1,5,1],[1,1,1]]/13. Summing with the integer kernel is
    # exact and S/13 is never a tie (13 is odd) nor near one, so rounding S/13 gives the same integers.
    # Separable slice sums: several times faster than avg_pool2d/conv2d on CPU for these tiny images.
    rows = f[:, :, :-2] + f[:, :, 1:-1]
    rows += f[:, :, 2:]
    s = rows[..., :-2] + rows[..., 1:-1]
    s += rows[..., 2:]
    s.add_(f[:, :, 1:-1, 1:-1], alpha=4).div_(13).round_()
    blurred = f.clone()  # the one-pixel border is left unblurred, as in torchvision
    blurred[:, :, 1:-1, 1:-1] = s
    return _blend(f, blurred, ratio, complement)


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    lo, hi = img.amin(dim=(2, 3), keepdim=True).float(), img.amax(dim=(2, 3), keepdim=True).float()
    flat = hi == lo  # constant channel: torchvision's infinite scale falls back to the identity
    scale = (255.0 / (hi - lo)).masked_fill(flat, 1.0)
    return _to_uint8((img - lo.masked_fill(flat, 0.0)).mul_(scale))


def _equalize(img: torch.Tensor) -> torch.Tensor:
    """torchvision's per-channel _scale_channel, for all images and channels at once. Counts are integers below
    H*W, exact in float32 (for H*W < 2**24), as are the floors of their quotients; int64 division is not
    vectorised on CPU."""
    n, c, h, w = img.shape
    pixels = img.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=img.device)
    hist.scatter_add_(1, pixels, torch.ones(1, device=img.device).expand(n * c, h * w))
    # torchvision's step sums every non-empty bin but the last, i.e. all pixels but those of the brightest value.
    brightest = hist.gather(1, img.reshape(n * c, h * w).amax(dim=1, keepdim=True).long())
    step = (h * w - brightest).div_(255).floor_()
    # lut[v] = (number of pixels below v + step // 2) // step: torchvision's cumsum shifted right by one bin.
    lut = (hist.cumsum(1) - hist + (step / 2).floor_()).div_(step).floor_()
    # step == 0 (fewer than 255 pixels off the brightest value) leaves the channel unchanged in torchvision.
    lut = torch.where(step > 0, lut, torch.arange(256, dtype=torch.float32, device=img.device))
    return _to_uint8(lut).gather(1, pixels).view(n, c, h, w)


def _colour_op(img: torch.Tensor, op: int, neg: torch.Tensor, mags: tuple[float, ...]) -> torch.Tensor:
    """Op `op` (not geometric, not Identity) on a chunk of images; neg: long (n,), 1 where the magnitude is negated."""
    name = OP_NAMES[op]
    if op in _BLEND_OPS:
        ratio, complement = _blend_factors(mags, img.device)[op - _BLEND_OPS.start].index_select(0, neg).unbind(1)
        if name == "Sharpness":
            return _sharpness(img, ratio, complement)
        other = None if name == "Brightness" else _grayscale(img)
        if name == "Contrast":
            other = other.mean(dim=(1, 2, 3), keepdim=True)
        return _blend(img, other, ratio, complement)
    if name == "Posterize":
        return img & -int(2 ** (8 - int(mags[op])))  # keeps the top `bits` bits
    if name == "Solarize":
        # 255 - v == v ^ 255 on uint8; xor with a 0/255 mask is several times faster on CPU than torch.where.
        return img ^ (img >= mags[op]).to(torch.uint8).mul_(255)
    if name == "AutoContrast":
        return _autocontrast(img)
    return _equalize(img)


def _apply_ops(x: torch.Tensor, op_idx: torch.Tensor, negate: torch.Tensor, magnitude: int = 9) -> torch.Tensor:
    """Apply op OP_NAMES[op_idx[i]] to image i, with its magnitude negated where negate[i] (signed ops only).
    x: uint8 (B, 3, H, W); op_idx: long (B,); negate: bool or 0/1 (B,). Same result as torchvision's
    autoaugment._apply_op(x[i], name, +-magnitude, NEAREST, fill=None) for each i."""
    _, c, h, w = x.shape
    mags = _magnitudes(magnitude, h, w)
    # Sorting by op id (stably: the same order on every device) makes each op's samples one contiguous chunk. Sort
    # and bounds are worked out where op_idx lives: on the host (how rand_augment draws it) they cost no device sync.
    order = torch.sort(op_idx, stable=True).indices
    bounds = [0, *torch.bincount(op_idx, minlength=len(OP_NAMES)).cumsum(0).tolist()]
    ops, neg, order = (t.to(x.device, non_blocking=True) for t in (op_idx[order], negate[order].long(), order))
    xs = x.index_select(0, order)  # index_select and not x[order]: it is ~10x faster on CPU
    start, end = bounds[_GEOMETRIC.start], bounds[_GEOMETRIC.stop]
    if end > start:  # nearest-neighbour resampling of each image by its op's and sign's map: one gather
        which = (ops[start:end] - _GEOMETRIC.start) * 2 + neg[start:end]
        maps = _geometric_maps(h, w, x.device, magnitude).index_select(0, which).unsqueeze(1).expand(-1, c, h * w)
        padded = F.pad(xs[start:end].reshape(end - start, c, h * w), (1, 0))  # index 0: a zero, for outside pixels
        xs[start:end] = padded.gather(2, maps).view(end - start, c, h, w)
    for op in range(_GEOMETRIC.stop, len(OP_NAMES)):
        start, end = bounds[op], bounds[op + 1]
        if end > start:
            xs[start:end] = _colour_op(xs[start:end], op, neg[start:end], mags)
    return xs.index_select(0, torch.argsort(order))  # undo the sort


def rand_augment(x: torch.Tensor, host_generator: torch.Generator | None = None, num_ops: int = 2,
                 magnitude: int = 9) -> torch.Tensor:
    """torchvision's RandAugment(num_ops, magnitude, MAGNITUDE_BINS) with NEAREST interpolation and zero fill,
    except that each image draws its own ops (uniform over the 14, with replacement) and signs, from
    host_generator (a CPU generator) whatever the batch's device."""
    _check_batch(x)
    op_idx = torch.randint(len(OP_NAMES), (num_ops, len(x)), generator=host_generator)
    negate = torch.randint(2, (num_ops, len(x)), generator=host_generator)
    for ops, signs in zip(op_idx, negate):
        x = _apply_ops(x, ops, signs, magnitude)
    return x


@lru_cache(maxsize=None)
def _normalize_coefficients(device: torch.device) -> torch.Tensor:
    mean, std = torch.tensor([CIFAR10_MEAN, CIFAR10_STD], dtype=torch.float32, device=device).view(2, -1, 1, 1)
    return torch.stack([1.0 / (255.0 * std), -mean / std])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std per channel, CIFAR-10's mean and std."""
    scale, shift = _normalize_coefficients(x.device)
    # One in-place multiply-add instead of three passes over the batch (differs from the formula by float rounding).
    return x.float().mul_(scale).add_(shift)


def random_erasing(x: torch.Tensor, probability: float, area: tuple[float, float] = ERASE_AREA,
                   aspect: tuple[float, float] = ERASE_ASPECT,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """timm's RandomErasing(probability, min_area, max_area, min_aspect, max_aspect, mode="pixel") on a normalised
    float batch (B, C, H, W). Per image, with the given probability: up to ERASE_ATTEMPTS boxes of area uniform in
    `area` (shares of the image) and aspect h / w log-uniform in `aspect`, sides rounded; the first that fits is
    filled with N(0, 1) noise (the normalised image's scale) at a uniform position; none fits: left alone, as in
    timm. timm loops over images drawing from Python's global RNG; this draws the whole batch's attempts at once
    from `generator` (on x's device) and erases by one masked select: a GPU neither syncs nor launches per image."""
    (b, _, h, w), dev = x.shape, x.device
    u = torch.rand(5, b, ERASE_ATTEMPTS, device=dev, generator=generator)
    target = (area[0] + (area[1] - area[0]) * u[0]) * (h * w)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    eh, ew = (target * ratio).sqrt().round(), (target / ratio).sqrt().round()  # round: half to even, as Python's
    fits = (eh < h) & (ew < w)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    eh, ew = eh.gather(1, first), ew.gather(1, first)  # (B, 1)
    # randint(0, h - eh) inclusive, as Python's random.randint draws the corner.
    top = (u[2].gather(1, first) * (h - eh + 1)).floor()
    left = (u[3].gather(1, first) * (w - ew + 1)).floor()
    erase = (u[4, :, :1] < probability) & fits.any(dim=1, keepdim=True)  # (B, 1)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top) & (rows < top + eh) & erase  # (B, H)
    in_cols = (cols >= left) & (cols < left + ew)  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, H, W), broadcast over channels
    return torch.where(mask, torch.randn(x.shape, device=dev, dtype=x.dtype, generator=generator), x)


def train_transform(x_uint8: torch.Tensor, generator: torch.Generator | None = None, num_ops: int = 2,
                    magnitude: int = 9, host_generator: torch.Generator | None = None, erase_prob: float = 0.0,
                    erase_area: tuple[float, float] = ERASE_AREA,
                    erase_aspect: tuple[float, float] = ERASE_ASPECT) -> torch.Tensor:
    """Crop + flip, RandAugment(num_ops, magnitude), normalize, random erasing: uint8 (B, 3, H, W) -> float32.
    num_ops 0 leaves crop and flip alone; erase_prob 0 erases nothing (and draws nothing)."""
    x = random_crop_flip(x_uint8, generator)
    if num_ops > 0:
        x = rand_augment(x, host_generator, num_ops=num_ops, magnitude=magnitude)
    x = normalize(x)
    if erase_prob > 0:
        x = random_erasing(x, erase_prob, erase_area, erase_aspect, generator)
    return x


eval_transform = normalize  # evaluation's transform: normalisation only
