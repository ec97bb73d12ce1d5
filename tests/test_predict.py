import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import predict
from conftest import synthetic_cifar, synthetic_splits
from data import CLASSES, DataError, DeviceLoader
from evaluate import evaluate_checkpoint, export_model, load_checkpoint
from train import TrainConfig, Trainer
from train import evaluate as validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1, lr=3e-3)
LINE = re.compile(r"^(.+): (\w+) (\d+\.\d) %, (\w+) (\d+\.\d) %, (\w+) (\d+\.\d) %$")


def train_checkpoint(folder, epochs, augment=True):
    """best.pt of a tiny ViT trained on synthetic_splits(seed=0), whose colours synthetic_cifar(seed=0) shares."""
    s = synthetic_splits(n_train=512, n_val=200, seed=0)
    trainer = Trainer(TrainConfig(**TINY, epochs=epochs, augment=augment), s.train_images, s.train_labels,
                      s.val_images, s.val_labels, torch.device("cpu"), progress=False)
    trainer.fit()
    path = folder / "best.pt"
    torch.save(trainer.state_dict(), path)
    return path, trainer


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory):
    """Two epochs: right on most test images but not all, so that equal accuracies say something."""
    return train_checkpoint(tmp_path_factory.mktemp("half"), epochs=2)[0]


@pytest.fixture(scope="module")
def fluent(tmp_path_factory):
    """Ten epochs without augmentation: every one of the task's colours told apart (checked below)."""
    path, trainer = train_checkpoint(tmp_path_factory.mktemp("fluent"), epochs=10, augment=False)
    assert trainer.history[-1]["val_acc"] == 1.0  # a precondition of the label checks, not what they test
    return path


def test_an_exported_model_reproduces_the_checkpoints_test_results_exactly(tmp_path, half_trained):
    ds = synthetic_cifar(seed=0)
    out = tmp_path / "model.pt"
    written = export_model(str(half_trained), str(out))
    state = torch.load(out, weights_only=True)
    assert set(state) == {"format", "config", "model", "epoch", "early_stopping", "code_version"}
    assert state["format"] == "vit-cifar10 weights" and set(written) == set(state)
    full = torch.load(half_trained, weights_only=True)
    assert state["model"].keys() == full["model"].keys()
    for name, w in state["model"].items():
        assert w.dtype == torch.float32 and torch.equal(w, full["model"][name]), name
    # AdamW keeps two tensors per weight; RNG states and history add more
    assert os.path.getsize(out) < 0.5 * os.path.getsize(half_trained)

    from_ckpt = evaluate_checkpoint(str(half_trained), ds, "cpu")
    from_model = evaluate_checkpoint(str(out), ds, "cpu")
    assert 0.5 < from_model["accuracy"] < 1 and from_model["val_acc"] == full["early_stopping"]["best_acc"] > 0
    for m in (from_ckpt, from_model):
        del m["checkpoint"], m["code_version"]
    assert from_model == from_ckpt  # loss, accuracy, intervals, per-class figures, epoch, val_acc, config
    # both wrote into their own folders: the same answer for every test image
    preds = [json.loads((p.parent / "test_predictions.json").read_text()) for p in (half_trained, out)]
    assert preds[0] == preds[1]


def test_export_cli_and_run_folders(tmp_path, half_trained, capsys):
    out = tmp_path / "shipped" / "model.pt"
    evaluate.main(["--export", str(out), str(half_trained)])
    es = torch.load(half_trained, weights_only=True)["early_stopping"]
    assert capsys.readouterr().out == (f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB): the model of epoch 2, "
                                       f"validation accuracy {100 * es['best_acc']:.2f} %, without optimizer state\n")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--export", str(half_trained), str(half_trained)])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and re.match(r"error: --export .* would replace the checkpoint itself", err), err
    assert "optimizer" in torch.load(half_trained, weights_only=True)

    # A folder stands for its best.pt, and a shipped folder (model.pt alone) for its model file.
    assert evaluate.checkpoint_file(str(half_trained.parent)) == str(half_trained)
    assert load_checkpoint(str(out.parent))["format"] == "vit-cifar10 weights"
    m = evaluate_checkpoint(str(out.parent), synthetic_cifar(seed=0), "cpu")
    assert m["checkpoint"] == str(out) and (out.parent / "test_metrics.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty is a folder with neither best.pt nor model.pt"):
        load_checkpoint(str(tmp_path / "empty"))


def test_files_that_are_not_checkpoints_are_named_so_and_code_is_still_refused(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.8}))
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("metrics.json", "notes.txt"):
        with pytest.raises(DataError, match=rf"^{tmp_path}/{name} is not a checkpoint: PyTorch files begin as a zip"):
            load_checkpoint(str(tmp_path / name))
    with pytest.raises(DataError, match="empty.pt is not a checkpoint: it is empty"):
        load_checkpoint(str(tmp_path / "empty.pt"))

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"model": RunsCode(), "config": {}}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"refusing to load .*posix.system.* could run code"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "pwned").exists()


def write_image(path, colour, size, mode="RGB", seed=0):
    """A picture of one synthetic class: its colour plus noise, at a size other than CIFAR-10's."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.asarray(colour, float) + 25 * rng.standard_normal((h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def test_a_shipped_model_gets_the_labels_of_unseen_images_right(tmp_path, fluent):
    shipped = tmp_path / "model.pt"
    export_model(str(fluent), str(shipped))
    # each class's colour, from the first training image of each (labels run 0..9)
    colours = synthetic_splits(n_train=10, n_val=10, seed=0).train_images[:10].float().mean((2, 3))
    # Sizes, modes and formats predict must bring to 32x32 RGB: wide, tall, smaller, RGBA, JPEG, BMP.
    cases = [(1, (64, 48), "RGB", "png"), (4, (48, 64), "RGBA", "png"), (6, (20, 20), "RGB", "png"),
             (8, (100, 75), "RGB", "jpg"), (9, (64, 48), "RGB", "bmp")]
    paths = []
    for i, (label, size, mode, ext) in enumerate(cases):
        paths.append(str(tmp_path / f"{CLASSES[label]}_{i}.{ext}"))
        write_image(paths[-1], colours[label].tolist(), size, mode, seed=i)
    proc = subprocess.run([sys.executable, "predict.py", str(shipped), *paths, "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cases)
    for line, path, (label, *_) in zip(lines, paths, cases):
        name, *rest = LINE.match(line).groups()
        classes, percents = rest[0::2], [float(p) for p in rest[1::2]]
        assert name == path and classes[0] == CLASSES[label], line
        assert len(set(classes)) == 3 and set(classes) <= set(CLASSES)
        assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.2 and percents[0] > 50


def test_predict_normalises_exactly_as_evaluation_does(tmp_path, half_trained):
    ds = synthetic_cifar(seed=0)
    images, labels = ds.test_images[:12], ds.test_labels[:12]
    paths = []
    for i, x in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))  # 32x32 and lossless: nothing to resize, nothing lost
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(paths[-1])
    loaded = torch.stack([predict.load_image(p) for p in paths])
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, images)

    model = evaluate.model_from_checkpoint(load_checkpoint(str(half_trained)), "cpu")
    probs = predict.predict(model, loaded)
    expected = validate(model, DeviceLoader(images, labels, 500, train=False), return_preds=True)["probs"]
    assert torch.allclose(probs, expected, atol=1e-6, rtol=0) and torch.allclose(probs.sum(1), torch.ones(12))
    assert len(set(probs.argmax(1).tolist())) > 1  # a model that answers more than one class

    line = predict.format_top("x.png", probs[0])
    top = probs[0].topk(3)
    assert line == "x.png: " + ", ".join(f"{CLASSES[i]} {100 * p:.1f} %" for p, i in zip(top.values.tolist(),
                                                                                          top.indices.tolist()))


@pytest.mark.parametrize("case", ["missing image", "text as image", "json as model"])
def test_bad_input_stops_in_one_line(tmp_path, half_trained, case):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    (tmp_path / "model.json").write_text(json.dumps({"model": "vit", "config": {}}))
    write_image(tmp_path / "ok.png", (120, 60, 200), (40, 30))
    model, image, expected = {
        "missing image": (half_trained, tmp_path / "nowhere.png", f"error: no image at {tmp_path}/nowhere.png"),
        "text as image": (half_trained, tmp_path / "notes.txt", f"error: {tmp_path}/notes.txt is not an image"),
        "json as model": (tmp_path / "model.json", tmp_path / "ok.png",
                          f"error: {tmp_path}/model.json is not a checkpoint"),
    }[case]
    proc = subprocess.run([sys.executable, "predict.py", str(model), str(tmp_path / "ok.png"), str(image),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
