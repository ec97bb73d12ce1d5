import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from data import CIFAR10, CLASSES, Splits

# VIT_DATA_DIR where a machine keeps CIFAR-10 elsewhere; ../shared/data (beside the checkout) otherwise.
REAL_DATA = os.environ.get("VIT_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
HAVE_REAL_DATA = os.path.isdir(os.path.join(REAL_DATA, "cifar-10-batches-py"))
needs_real_data = pytest.mark.skipif(not HAVE_REAL_DATA, reason=f"real CIFAR-10 not found at {REAL_DATA}")


def write_fake_cifar(root, seed=0):
    """A full-size folder in the official python format, with random images and balanced labels."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.arange(10000) % 10).tolist()
        data = rng.integers(0, 256, size=(10000, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_vis": 3072}, f)
    return root


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory):
    return write_fake_cifar(str(tmp_path_factory.mktemp("fake_cifar")))


def synthetic_splits(n_train=512, n_val=200, num_classes=10, seed=0) -> Splits:
    """A small, learnable task: each class is a colour plus noise, so a tiny ViT beats chance fast."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(30, 226, (num_classes, 3, 1, 1), generator=g).float()

    def make(n):
        y = torch.arange(n) % num_classes
        x = colours[y] + 25 * torch.randn(n, 3, 32, 32, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = make(n_train)
    vx, vy = make(n_val)
    return Splits(tx, ty, vx, vy, CLASSES[:num_classes])


def synthetic_cifar(n_train=200, n_test=300, seed=0) -> CIFAR10:
    """CIFAR10-shaped synthetic data for stage 2: the fixed 5,000 validation images + n_train to train on,
    and n_test test images."""
    s = synthetic_splits(n_train=5000 + n_train, n_val=n_test, seed=seed)
    return CIFAR10(s.train_images, s.train_labels, s.val_images, s.val_labels, s.classes)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 16 MB file system of its own (tmpfs), to fill up or make read-only."""
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", str(path)], check=True)
