"""CIFAR-10 as uint8 tensors on the device: loading, splits, augmentation, mixing (Mixup, CutMix) and a loader.

The whole dataset is 180 MB as uint8, so it lives on the training device and every batch is augmented there,
per sample, with tensor ops. No DataLoader workers, no PIL, no CPU bottleneck.
"""

import math
import os
import pickle
import random
import shutil
import tarfile
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from augment import eval_transform, train_transform

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VAL_PER_CLASS = 500  # 5,000 validation images, 500 of each class
AUGMENT_CHUNK = 1024  # training images augmented per call (see DeviceLoader.__iter__)


class DataError(RuntimeError):
    """The data is missing, corrupt or unreachable; the message says what to do."""


# What a CIFAR-10 batch file may name: numpy's array rebuilders (numpy 1's and numpy 2's module), nothing else.
# A pickle can name any function to call while it loads; one that names another is refused before anything runs.
ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype")}


@dataclass
class CIFAR10:
    train_images: torch.Tensor  # (50000, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (50000,) int64
    test_images: torch.Tensor | None  # (10000, 3, 32, 32) uint8; None: not read yet (final_test_set reads it)
    test_labels: torch.Tensor | None  # (10000,) int64
    classes: list
    folder: str | None = None  # where the test batch is read from when it is needed


def _read_batch(path: str):
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file {path} is missing; delete the folder to download it again, or fix --data-dir")

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in ARRAY_GLOBALS:
                raise DataError(f"refusing to load CIFAR-10 file {path}: it names {module}.{name}, which loading it "
                                f"would call; CIFAR-10 holds only arrays and lists: download it again")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            entry = ArraysOnly(f, encoding="latin1").load()
        images = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # truncated or foreign files fail in many ways; all mean the same to the user
        raise DataError(f"CIFAR-10 file {path} is corrupt or truncated ({type(e).__name__}); "
                        f"download it again") from None
    if images.shape != (10000, 3 * 32 * 32) or labels.shape != (10000,) or not ((labels >= 0) & (labels < 10)).all():
        raise DataError(f"CIFAR-10 file {path} holds {images.shape[0]} images of shape {images.shape[1:]} and "
                        f"{labels.shape[0]} labels; expected 10000 images of 3072 bytes with labels 0-9")
    return torch.from_numpy(images).view(-1, 3, 32, 32), torch.from_numpy(labels)


def find_cifar10(data_dir: str = "data", download: bool = True) -> str:
    """data_dir/cifar-10-batches-py, downloaded first if it is missing and download is on. A failed
    download leaves nothing behind: a mistyped --data-dir must not turn into an empty folder."""
    folder = os.path.join(data_dir, FOLDER)
    if os.path.isdir(folder):
        return folder
    if not download:
        raise DataError(f"no CIFAR-10 at {folder}; pass --data-dir pointing at the folder that holds {FOLDER}/")
    # torchvision's utilities verify the md5 and extract; imported here so that plain loading needs no torchvision.
    from torchvision.datasets.utils import download_and_extract_archive

    existed = os.path.isdir(data_dir)
    try:
        download_and_extract_archive(URL, download_root=data_dir, filename="cifar-10-python.tar.gz", md5=ARCHIVE_MD5)
    except (OSError, RuntimeError, tarfile.TarError) as e:
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise DataError(f"no CIFAR-10 at {folder}, and downloading it from {URL} failed ({type(e).__name__}: {e}); "
                        f"check --data-dir (the folder that holds {FOLDER}/) or the network") from None
    return folder


def load_cifar10(data_dir: str = "data", download: bool = True, test: bool = True) -> CIFAR10:
    """Read data_dir/cifar-10-batches-py (the official python format), downloading it if asked. test False leaves
    the test batch unread until final_test_set asks for it: the stages train without it, so that a machine that
    trains (a rented GPU, say) need never hold the test images at all."""
    folder = find_cifar10(data_dir, download)
    images, labels = zip(*(_read_batch(os.path.join(folder, name)) for name in TRAIN_FILES))
    test_images, test_labels = _read_batch(os.path.join(folder, TEST_FILE)) if test else (None, None)
    # batches.meta names the classes too, always these: CLASSES serves, and the file is never read.
    return CIFAR10(torch.cat(images), torch.cat(labels), test_images, test_labels, CLASSES, folder)


def _stratified_pick(labels: torch.Tensor, per_class: list, generator: torch.Generator) -> torch.Tensor:
    """Indices of per_class[c] randomly chosen samples of each class c, sorted."""
    by_class = [(labels == c).nonzero().squeeze(1) for c in range(len(per_class))]
    picked = [idx[torch.randperm(len(idx), generator=generator)[:k]] for idx, k in zip(by_class, per_class)]
    return torch.cat(picked).sort().values


def split_indices(labels: torch.Tensor, seed: int = 0, subset_ratio: float = 1.0):
    """Stratified (train, val) index split of the training set; the same seed gives the same split. The validation
    set is always VAL_PER_CLASS of each class; subset_ratio shrinks only the training part (stage 1's proxy runs),
    keeping class balance."""
    if not 0.0 < subset_ratio <= 1.0:
        raise ValueError(f"subset_ratio must be in (0, 1], got {subset_ratio}")
    num_classes = int(labels.max()) + 1
    val = _stratified_pick(labels, [VAL_PER_CLASS] * num_classes, torch.Generator().manual_seed(seed))
    train = torch.isin(torch.arange(len(labels)), val, invert=True).nonzero().squeeze(1)
    if subset_ratio < 1.0:
        keep = [max(1, round(int(n) * subset_ratio)) for n in torch.bincount(labels[train], minlength=num_classes)]
        # A separate generator, so that changing the ratio never moves the validation set.
        train = train[_stratified_pick(labels[train], keep, torch.Generator().manual_seed(seed + 1))]
    return train, val


@dataclass
class Splits:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list

    def to(self, device) -> "Splits":
        tensors = (self.train_images, self.train_labels, self.val_images, self.val_labels)
        return Splits(*(t.to(device) for t in tensors), self.classes)


def train_val_splits(ds: CIFAR10, seed: int = 0, subset_ratio: float = 1.0, device="cpu") -> Splits:
    """The training and validation data both stages use, on the device. Never the test set."""
    train, val = split_indices(ds.train_labels, seed=seed, subset_ratio=subset_ratio)
    images, labels = ds.train_images, ds.train_labels
    return Splits(images[train], labels[train], images[val], labels[val], ds.classes).to(device)


def final_test_set(ds: CIFAR10, device="cpu"):
    """The 10,000 test images; only evaluate.py calls this, once training is over."""
    if ds.test_images is None:
        path = os.path.join(ds.folder, TEST_FILE)
        if not os.path.isfile(path):
            raise DataError(f"CIFAR-10's test batch {path} is missing (training never reads it): put it there or fix "
                            f"--data-dir, then run the same command; everything trained so far is kept")
        ds.test_images, ds.test_labels = _read_batch(path)
    return ds.test_images.to(device), ds.test_labels.to(device)


def cutmix_box(lam: float, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al., 2019) as timm's rand_bbox draws it: sides sqrt(1 - lam) of the image's,
    centred uniformly, clipped to the image. Returns (top, bottom, left, right), bottom and right exclusive."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    cy, cx = rng.randrange(height), rng.randrange(width)
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              mix_prob: float = 1.0, switch_prob: float = 0.5, generator: torch.Generator | None = None,
              rng: random.Random | None = None):
    """Mixup (Zhang et al., 2018) or CutMix of a batch with a permutation of itself, as timm's Mixup in batch mode:
    a share mix_prob of the batches is mixed, by CutMix with probability switch_prob if both alphas are on; one
    lambda ~ Beta(alpha, alpha) per batch. Returns the batch and its targets (soft when mixed, else the hard labels);
    CutMix weighs them by the area actually pasted (the box is clipped at the borders).

    The batch-level draws (whether, which, lambda, the box) come from rng (None: Python's global one), the partners
    from generator (on x's device; None: torch's global RNG): torchvision's v2.MixUp and v2.CutMix draw from torch's
    global RNG, which a run cannot own; drawn on the host, the box is plain integers: slicing never syncs a GPU."""
    rng = rng or random
    # No draw at mix_prob 1: mixup alone replays its old stream.
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or (mix_prob < 1 and rng.random() >= mix_prob):
        return x, y
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    # Python's Beta sampler: torch's takes no generator, and one lambda per batch is host work anyway.
    lam = rng.betavariate(*(2 * [cutmix_alpha if cutmix else mixup_alpha]))
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    targets = F.one_hot(y, len(CLASSES)).to(x.dtype)
    if cutmix:
        top, bottom, left, right = cutmix_box(lam, x.shape[2], x.shape[3], rng)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against hard labels (int64) or soft targets (float rows summing to 1), label smoothing for both."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class DeviceLoader:
    """Batches from device-resident uint8 tensors: shuffled and augmented per sample for training (settings:
    train_transform's; without augment only normalised, for sanity runs), only normalised for evaluation. Training
    drops the last partial batch; evaluation keeps all. generator (on the images' device) shuffles, crops and flips,
    host_generator (CPU) draws RandAugment's ops; None: torch's global RNGs. A run's own pair keeps its batches its
    own, whatever runs beside it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, augment: bool = True,
                 generator: torch.Generator | None = None, host_generator: torch.Generator | None = None, **settings):
        if batch_size <= 0:  # else the evaluation loader's len() would divide by zero
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if train and len(images) < batch_size:
            raise ValueError(f"{len(images)} training images are fewer than one batch of {batch_size}")
        self.images, self.labels, self.batch_size, self.train = images, labels, batch_size, train
        self.generator = generator
        augmented = partial(train_transform, generator=generator, host_generator=host_generator, **settings)
        self.transform = augmented if train and augment else eval_transform

    def __len__(self):
        return len(self.images) // self.batch_size if self.train else -(-len(self.images) // self.batch_size)

    def __iter__(self):
        n, bs = len(self.images), self.batch_size
        if not self.train:
            yield from zip(map(eval_transform, self.images.split(bs)), self.labels.split(bs))
            return
        # Shuffle with the run's generator, so that a checkpoint's saved generator state replays the same order.
        order = torch.randperm(n, device=self.images.device, generator=self.generator)[: len(self) * bs]
        # Augment several batches per call: each call costs ~300 small kernel launches whatever its
        # size, so chunks of >= 1024 images double the throughput of batch-sized calls on a CPU.
        per_chunk = bs * max(1, AUGMENT_CHUNK // bs)
        for idx in order.split(per_chunk):
            yield from zip(self.transform(self.images[idx]).split(bs), self.labels[idx].split(bs))
