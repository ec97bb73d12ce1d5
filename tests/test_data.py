import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import data
from conftest import REAL_DATA, needs_real_data
from data import DataError, DeviceLoader, load_cifar10, loss_fn, mix_batch, split_indices, final_test_set, train_val_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_reads_the_official_format(fake_cifar_dir):
    ds = load_cifar10(fake_cifar_dir, download=False)
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (10000, 3, 32, 32) and ds.test_labels.dtype == torch.int64
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10


@needs_real_data
def test_real_cifar10_has_5000_and_1000_images_per_class():
    ds = load_cifar10(REAL_DATA, download=False)
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    assert ds.train_images.float().mean().item() > 50  # real pictures, not zeros


def test_missing_folder_without_download_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_cifar10(str(tmp_path), download=False)


def test_failed_download_says_so_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(DataError, match="no CIFAR-10 at .*, and downloading it from .* failed .* check --data-dir"):
        load_cifar10(str(tmp_path), download=True)
    typo = tmp_path / "dta"  # a mistyped --data-dir: the failed download must not leave it behind
    with pytest.raises(DataError, match=f"no CIFAR-10 at {typo}/cifar-10-batches-py, and downloading"):
        load_cifar10(str(typo), download=True)
    assert not typo.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_damaged_files_give_a_clear_error_not_a_smaller_dataset(fake_cifar_dir, tmp_path, damage):
    root = str(tmp_path)
    shutil.copytree(os.path.join(fake_cifar_dir, "cifar-10-batches-py"), os.path.join(root, "cifar-10-batches-py"))
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "delete":
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(root, download=False)


def _balanced_labels():
    return torch.arange(50000) % 10


def test_stage_split_sizes_disjoint_stratified_and_seeded():
    labels = _balanced_labels()
    train, val = split_indices(labels, seed=0)
    assert len(train) == 45000 and len(val) == 5000
    assert len(set(train.tolist()) | set(val.tolist())) == 50000
    assert torch.bincount(labels[val]).tolist() == [500] * 10
    train2, val2 = split_indices(labels, seed=0)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    _, val3 = split_indices(labels, seed=1)
    assert not torch.equal(val, val3)


def test_subset_keeps_classes_balanced_and_the_validation_set_fixed():
    labels = _balanced_labels()
    full_train, val = split_indices(labels, seed=0)
    train, val_sub = split_indices(labels, seed=0, subset_ratio=0.2)
    assert len(train) == 9000 and torch.bincount(labels[train]).tolist() == [900] * 10
    assert torch.equal(val, val_sub)
    assert set(train.tolist()) <= set(full_train.tolist())
    with pytest.raises(ValueError, match="subset_ratio"):
        split_indices(labels, subset_ratio=0.0)


def test_train_val_splits_never_hand_out_test_images(fake_cifar_dir):
    ds = load_cifar10(fake_cifar_dir, download=False)
    splits = train_val_splits(ds, seed=0)
    assert len(splits.train_images) == 45000 and len(splits.val_images) == 5000
    test_x, test_y = final_test_set(ds)
    assert len(test_x) == 10000
    # The fake test batch is drawn independently, so no training image should equal the first test image.
    assert not (splits.train_images == test_x[0]).flatten(1).all(1).any()


class FixedLambda:
    """A lambda of 0.3, not a draw: Beta(0.1, 0.1) puts about a tenth of its mass within 1e-7 of 1, where
    a float32 mix equals its first input; drawn from Python's unseeded global generator, it made this
    test fail in about one run of ten."""

    def betavariate(self, alpha, beta):
        return 0.3


def test_mixup_makes_soft_targets_whose_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    xm, t = mix_batch(x, y, mixup_alpha=0.1, generator=torch.Generator().manual_seed(1), rng=FixedLambda())
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))  # the partners mixup drew
    hard = torch.nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(xm, 0.3 * x + 0.7 * x[perm])
    torch.testing.assert_close(t, 0.3 * hard + 0.7 * hard[perm])
    torch.testing.assert_close(t.sum(1), torch.ones(16))
    assert (t > 0).sum(1).max() == 2  # two classes mixed in some row
    x0, y0 = mix_batch(x, y, mixup_alpha=0.0)
    assert torch.equal(x0, x) and torch.equal(y0, y)


def test_loss_accepts_hard_and_soft_targets_and_they_agree_on_one_hot():
    logits = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    soft = torch.nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(loss_fn(logits, y), loss_fn(logits, soft))


def test_loader_drops_partial_train_batch_keeps_all_eval_and_reshuffles():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 32, 32).contiguous()
    labels = torch.arange(100)
    train = DeviceLoader(images, labels, batch_size=32, train=True)
    torch.manual_seed(0)
    epoch1 = torch.cat([y for _, y in train])
    epoch2 = torch.cat([y for _, y in train])
    assert len(train) == 3 and len(epoch1) == 96 and len(set(epoch1.tolist())) == 96
    assert not torch.equal(epoch1, epoch2)
    evaluation = DeviceLoader(images, labels, batch_size=32, train=False)
    batches = list(evaluation)
    assert len(batches) == 4 and torch.equal(torch.cat([y for _, y in batches]), labels)
    assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (32, 3, 32, 32)
    for train in (True, False):
        with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
            DeviceLoader(images, labels, batch_size=0, train=train)


def _flip(path, position):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0xFF]))


def _last_label_byte(path) -> int:
    """Where the last label's value sits in the batch's pickle (the argument of its last BININT1)."""
    import io
    import pickletools

    with open(path, "rb") as f:
        return [pos + 1 for op, _, pos in pickletools.genops(io.BytesIO(f.read())) if op.name == "BININT1"][-1]


def _damage(path, damage, marker):
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "first byte flipped":
        _flip(path, 0)
    elif damage == "last byte flipped":
        _flip(path, os.path.getsize(path) - 1)
    elif damage == "a label's byte flipped":  # label 0-9 becomes 246-255
        _flip(path, _last_label_byte(path))
    elif damage == "9,999 images":
        entry = pickle.load(open(path, "rb"), encoding="latin1")
        pickle.dump({**entry, "data": entry["data"][:9999], "labels": entry["labels"][:9999]}, open(path, "wb"))
    elif damage == "pickled code":
        from test_evaluate import RunsCode

        pickle.dump({"data": RunsCode(marker), "labels": [0] * 10000}, open(path, "wb"), protocol=2)


DAMAGES = {
    "truncated": "data_batch_3 is corrupt or truncated (UnpicklingError); download it again",
    "first byte flipped": "data_batch_3 is corrupt or truncated (UnpicklingError); download it again",
    "last byte flipped": "data_batch_3 is corrupt or truncated (UnpicklingError); download it again",
    "a label's byte flipped": "data_batch_3 holds 10000 images of shape (3072,) and 10000 labels; expected 10000 "
                              "images of 3072 bytes with labels 0-9",
    "9,999 images": "data_batch_3 holds 9999 images of shape (3072,) and 9999 labels",
    "pickled code": "refusing to load CIFAR-10 file",
    "missing folder": "no CIFAR-10 at",
}


def test_stage2_on_damaged_data_stops_in_one_line_and_writes_nothing(fake_cifar_dir, tmp_path, capsys):
    """Each damage in a copy of the fake CIFAR-10 folder (the other files linked), each through stage 2's
    main(); the pickled code also through a process of its own, to see what a shell sees."""
    import stage2_final

    config = tmp_path / "c.json"
    config.write_text('{"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}')
    said = {}
    for i, damage in enumerate(DAMAGES):
        root = tmp_path / f"data_{i}"
        folder = root / "cifar-10-batches-py"
        if damage != "missing folder":
            folder.mkdir(parents=True)
            for name in os.listdir(os.path.join(fake_cifar_dir, "cifar-10-batches-py")):
                if name != "data_batch_3":
                    os.symlink(os.path.join(fake_cifar_dir, "cifar-10-batches-py", name), folder / name)
            shutil.copy(os.path.join(fake_cifar_dir, "cifar-10-batches-py", "data_batch_3"), folder)
            _damage(folder / "data_batch_3", damage, tmp_path / f"pwned_{i}")
        argv = ["--config", str(config), "--data-dir", str(root), "--no-download", "--device", "cpu", "--results",
                str(tmp_path / f"results_{i}")]
        with pytest.raises(SystemExit) as stop:
            stage2_final.main(argv)
        said[damage] = (stop.value.code, capsys.readouterr().err)
        if damage == "pickled code":
            proc = subprocess.run([sys.executable, "stage2_final.py", *argv], cwd=ROOT, capture_output=True, text=True)
            assert (proc.returncode, proc.stderr) == said[damage]
    for i, (damage, (code, err)) in enumerate(said.items()):
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (damage, err)
        assert DAMAGES[damage] in err and "Traceback" not in err, (damage, err)
        assert [p for p in (tmp_path / f"results_{i}").rglob("*") if p.is_file()] == []  # nothing written
    assert not list(tmp_path.glob("pwned_*"))  # the pickled code never ran
