import os
import pickle
import signal
import subprocess
import uuid

import numpy as np
import pytest
import torch

from data import CIFAR10, CLASSES, Splits

# VIT_DATA_DIR where a machine keeps CIFAR-10 elsewhere; ../shared/data (beside the checkout) otherwise.
REAL_DATA = os.environ.get("VIT_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
HAVE_REAL_DATA = os.path.isdir(os.path.join(REAL_DATA, "cifar-10-batches-py"))
# Skipped, with the reason in pytest's summary (-ra), where the data is missing; on CI (CI set) a missing
# folder fails these tests instead, so that a broken checkout cannot pass by skipping them.
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA and not os.environ.get("CI"),
    reason=f"real CIFAR-10 not found at {os.path.normpath(REAL_DATA)}/cifar-10-batches-py: set VIT_DATA_DIR to the "
           f"folder that holds cifar-10-batches-py/ (default: ../shared/data beside the checkout)")


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


def touches_the_edge(png_path) -> list:
    """The edges (top, bottom, left, right) of a saved figure that something is drawn on: a title or label
    cut by the figure's border runs into it; a figure saved whole keeps a white margin all round."""
    from PIL import Image

    ink = np.asarray(Image.open(png_path).convert("L")) < 245
    edges = {"top": ink[0], "bottom": ink[-1], "left": ink[:, 0], "right": ink[:, -1]}
    return [name for name, line in edges.items() if line.any()]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_as_a_terminal_would(args, cwd=ROOT):
    """A command in a process group of its own, its signals at their defaults (not ignored, as a shell's
    background job would have SIGINT), its output unbuffered so that the test can follow it line by line."""
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def signal_after(proc, line_start: str, sig) -> str:
    """Send `sig` to the whole process group (a terminal's Ctrl-C) once a line starting so is printed."""
    seen = []
    for line in proc.stdout:
        seen.append(line.decode())
        if seen[-1].startswith(line_start):
            os.killpg(proc.pid, sig)
            break
    rest = proc.communicate(timeout=300)[0].decode()
    return "".join(seen) + rest


@pytest.fixture
def new_postgres_database():
    """Makes fresh databases on the server of VIT_TEST_POSTGRES_URL (a user allowed to create them),
    so that no two tests or rounds share one; all are dropped afterwards."""
    url = os.environ.get("VIT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("VIT_TEST_POSTGRES_URL is not set: on CI, .ci/run must start the PostgreSQL server")
        pytest.skip("VIT_TEST_POSTGRES_URL is not set (`. .ci/postgres.sh && start_test_postgres` starts a server)")
    import sqlalchemy

    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    made = []

    def make():
        made.append(f"vit_test_{uuid.uuid4().hex[:12]}")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {made[-1]}"))
        return sqlalchemy.engine.make_url(url).set(database=made[-1]).render_as_string(hide_password=False)
    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture
def postgres_url(new_postgres_database):
    return new_postgres_database()
