"""The shipped 120-epoch models give the figures committed beside them, and classify real test images.

results/reference/120ep_long_recipe/model.pt (the default recipe's, 82.09 %) and
results/reference/120ep_seed_recipe/model.pt (the seed recipe's reference, 80.90 %) are the best checkpoints
of full schedules, exported without optimizer state; each run tested its model once (stage2/config_0/
test_metrics.json and test_predictions.json, written by the run's own code). Evaluating a shipped file with
today's code must give the same answer on every one of the 10,000 test images, and the README must quote it.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import evaluate
from conftest import REAL_DATA, needs_real_data
from data import CLASSES, load_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("120ep_long_recipe", "120ep_seed_recipe")  # the default recipe's model first: predict's and timm's
RUN = os.path.join(ROOT, "results", "reference", RUNS[0])
SHIPPED = os.path.join(RUN, "model.pt")
RUN_TEST = os.path.join(RUN, "stage2", "config_0")  # what the run itself measured, once


@pytest.fixture(params=RUNS)
def shipped(request):
    """(model.pt, the run's stage2/config_0 folder) of each shipped model."""
    run = os.path.join(ROOT, "results", "reference", request.param)
    return os.path.join(run, "model.pt"), os.path.join(run, "stage2", "config_0")


def committed(name, run_test=RUN_TEST):
    with open(os.path.join(run_test, name)) as f:
        return json.load(f)


def test_the_shipped_file_is_the_model_alone_and_small(shipped):
    path, run_test = shipped
    state = torch.load(path, weights_only=True)
    assert state["format"] == evaluate.MODEL_FORMAT and "optimizer" not in state and "rng" not in state
    assert state["epoch"] == committed("test_metrics.json", run_test)["epoch"]
    assert os.path.getsize(path) < 6e6
    # the optimizer-state checkpoints are not in the tree once the model is shipped
    tracked = subprocess.run(["git", "ls-files", os.path.relpath(run_test, ROOT)], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert tracked and not any(f.endswith(".pt") for f in tracked)


@needs_real_data
def test_evaluating_the_shipped_model_reproduces_the_runs_test_exactly(tmp_path, capsys, shipped):
    path, run_test = shipped
    model = tmp_path / "model.pt"  # evaluate.py writes beside the model: leave the committed files alone
    shutil.copy(path, model)
    evaluate.main([str(model), "--data-dir", REAL_DATA, "--no-download", "--device", "cpu"])
    ours = json.loads((tmp_path / "test_metrics.json").read_text())
    theirs = committed("test_metrics.json", run_test)
    assert ours["test_images"] == 10_000 and ours["accuracy"] == theirs["accuracy"]
    # The seed run's code (944f7d2) took Clopper-Pearson bounds from beta.ppf, today's from scipy's binomtest: the
    # same bounds to the 16th digit. The counts behind them must be equal, and are (accuracy, predictions).
    assert ours["accuracy_ci95"] == pytest.approx(theirs["accuracy_ci95"], rel=1e-12, abs=0)
    for name, row in theirs["per_class"].items():
        for key, value in row.items():
            assert ours["per_class"][name][key] == pytest.approx(value, rel=1e-12, abs=0), (name, key)
    assert ours["val_acc"] == theirs["val_acc"] and ours["epoch"] == theirs["epoch"]
    # the same answer on every image, not only the same count
    assert json.loads((tmp_path / "test_predictions.json").read_text()) == committed("test_predictions.json", run_test)
    figure = f"{100 * theirs['accuracy']:.2f} %"
    assert capsys.readouterr().out.startswith(f"test accuracy {figure}")
    with open(os.path.join(ROOT, "README.md")) as f:
        head = "".join(f.readlines()[:12])
    epochs = f"{committed('done.json', run_test)['epochs_run']} epochs"
    assert figure in head and epochs in head, f"the README's first lines quote the shipped model's {figure}, {epochs}"


@needs_real_data
def test_predict_names_real_test_images_of_every_class_at_other_sizes(tmp_path):
    """Of each class, the test image (among the first 20 the run got right) the model is surest of, enlarged,
    in PNG and BMP: predict.py must bring each back to 32x32 and name its class first. The surest, because
    resampling moves a borderline image (a cat at 41.9 % against dog 41.9 % once) across the line."""
    from augment import eval_transform

    ds = load_cifar10(REAL_DATA, download=False)
    preds = committed("test_predictions.json")
    model = evaluate.model_from_checkpoint(torch.load(SHIPPED, weights_only=True), "cpu").eval()
    paths, labels = [], []
    for c in range(len(CLASSES)):
        right = [i for i, (y, p) in enumerate(zip(preds["labels"], preds["preds"])) if y == p == c][:20]
        with torch.inference_mode():
            sure = model(eval_transform(ds.test_images[right])).softmax(1)[:, c]
        i = right[int(sure.argmax())]
        assert int(ds.test_labels[i]) == c
        size = (32 * (2 + c % 3), 32 * (2 + c % 2))  # 64-128 wide, 64-96 tall: never CIFAR-10's own size
        image = Image.fromarray(ds.test_images[i].permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC)
        paths.append(str(tmp_path / f"test{i}.{'bmp' if c % 4 == 3 else 'png'}"))
        image.save(paths[-1])
        labels.append(CLASSES[c])
    proc = subprocess.run([sys.executable, "predict.py", SHIPPED, *paths, "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths)
    for line, path, label in zip(lines, paths, labels):
        assert line.startswith(f"{path}: {label} "), line


def test_the_shipped_weights_load_unchanged_into_timm_and_give_the_same_logits():
    """vit.py keeps timm's names and layout: README's three lines load the file into timm's VisionTransformer
    (LayerNorm eps 1e-5, torch's default; timm's is 1e-6) with strict=True, and both models answer alike."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    state = torch.load(SHIPPED, weights_only=True)
    cfg = state["config"]
    theirs = VisionTransformer(img_size=32, patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                               depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=10,
                               norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))
    theirs.load_state_dict(state["model"], strict=True)
    ours = evaluate.model_from_checkpoint(state, "cpu")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ours.eval()(x), theirs.eval()(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))
