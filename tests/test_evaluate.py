import csv
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

import evaluate
from augment import eval_transform
from conftest import synthetic_splits
from data import CIFAR10, DataError
from cli import resolve_device
from evaluate import evaluate_checkpoint, load_checkpoint
from train import TrainConfig, Trainer
from vit import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1, lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained checkpoint and a dataset whose 300 test images it has never seen."""
    s = synthetic_splits(n_train=256, n_val=300, seed=1)
    trainer = Trainer(TrainConfig(**TINY, epochs=2), s.train_images, s.train_labels, s.val_images[:100],
                      s.val_labels[:100], torch.device("cpu"), progress=False)
    trainer.fit()
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save(trainer.state_dict(), path)
    return str(path), CIFAR10(s.train_images, s.train_labels, s.val_images, s.val_labels, s.classes)


def direct_predictions(path, ds):
    """The model's test predictions computed by hand: no DeviceLoader, no train.evaluate."""
    state = torch.load(path, weights_only=True)
    model = ViT(TrainConfig.from_dict(state["config"]).vit_config())
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        return model(eval_transform(ds.test_images)).argmax(1).numpy()


def test_metrics_equal_a_direct_computation_and_sklearn(trained):
    path, ds = trained
    m = evaluate_checkpoint(path, ds, "cpu")
    y, p = ds.test_labels.numpy(), direct_predictions(path, ds)
    assert len(np.unique(p)) > 1  # a meaningful check needs a model that is neither constant...
    assert m["accuracy"] == float((p == y).mean()) and m["test_images"] == 300

    prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=range(10), average=None, zero_division=0)
    for i, name in enumerate(ds.classes):
        c = dict(m["per_class"][name])
        low, high = c.pop("recall_ci95")
        assert c == {"precision": prec[i], "recall": rec[i], "f1": f1[i], "support": support[i]}
        assert low <= rec[i] <= high
    macro = precision_recall_fscore_support(y, p, labels=range(10), average="macro", zero_division=0)
    assert (m["macro"]["precision"], m["macro"]["recall"], m["macro"]["f1"]) == macro[:3]

    out = os.path.dirname(path)
    assert json.load(open(os.path.join(out, "test_metrics.json")))["accuracy"] == m["accuracy"]
    with open(os.path.join(out, "confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ds.classes and [r[0] for r in rows[1:]] == ds.classes
    assert np.array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), confusion_matrix(y, p, labels=range(10)))
    report = open(os.path.join(out, "classification_report.txt")).read()
    assert report == classification_report(y, p, labels=range(10), target_names=ds.classes, digits=4, zero_division=0)
    assert os.path.getsize(os.path.join(out, "confusion_matrix.png")) > 10_000


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no fp32_precision settings")
def test_the_test_runs_in_float32_with_tf32_off_and_leaves_the_settings_as_they_were(trained, tmp_path, monkeypatch):
    path, ds = trained
    copy = tmp_path / "best.pt"
    copy.write_bytes(open(path, "rb").read())

    def settings():
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.is_autocast_enabled("cpu"))

    seen, real = [], evaluate.model_from_checkpoint

    def watched(*args):
        model = real(*args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(settings()))
        return model

    monkeypatch.setattr(evaluate, "model_from_checkpoint", watched)
    before = settings()
    evaluate_checkpoint(str(copy), ds, "cpu")
    assert seen and set(seen) == {("ieee", "ieee", False)}  # TF32 off for both, no autocast
    assert settings() == before


class RunsCode:
    """A pickle payload that, if unpickled, runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, marker, writer="torch"):
    payload = {"model": RunsCode(str(marker)), "config": TrainConfig(**TINY).to_dict()}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_checkpoint_carrying_code_is_refused_and_its_code_never_runs(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "best.pt"
    write_malicious(path, marker, writer)
    with pytest.raises(DataError, match=r"refusing to load .*(posix|Unsupported operand).* could run code"):
        load_checkpoint(str(path))
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if writer == "torch" else pickle.load(f)
    assert marker.exists()


def test_cli_refuses_a_malicious_checkpoint_with_one_line(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "best.pt"
    write_malicious(path, marker)
    proc = subprocess.run([sys.executable, "evaluate.py", str(path), "--data-dir", str(tmp_path), "--no-download"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: refusing to load") and proc.stderr.strip().count("\n") == 0
    assert not marker.exists()


def test_unreadable_checkpoints_give_clear_errors(tmp_path, trained):
    with pytest.raises(DataError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pt"):  # refused or unreadable, depending on its first byte
        load_checkpoint(str(tmp_path / "garbage.pt"))
    data = open(trained[0], "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "truncated.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "foreign.pt"))
    with pytest.raises(DataError, match="cannot use device 'bogus'"):
        resolve_device("bogus")


def test_cli_evaluates_a_checkpoint_on_the_10000_test_images(tmp_path, trained, fake_cifar_dir, capsys):
    path = tmp_path / "best.pt"
    path.write_bytes(open(trained[0], "rb").read())
    evaluate.main([str(path), "--data-dir", fake_cifar_dir, "--no-download", "--device", "cpu", "--tta"])
    m = json.load(open(tmp_path / "test_metrics.json"))
    assert m["test_images"] == 10000 and sum(c["support"] for c in m["per_class"].values()) == 10000
    assert m["epoch"] == 2 and m["config"]["patch_size"] == 8
    low, high = m["accuracy_ci95"]
    assert low < m["accuracy"] < high and high - low < 0.03  # 10,000 images: about +-1 point
    out = capsys.readouterr().out
    assert f"test accuracy {100 * m['accuracy']:.2f} % (95 % interval {100 * low:.2f}-{100 * high:.2f})" in out
    assert f"with mirror TTA {100 * m['tta']['accuracy']:.2f} %" in out
    for name in evaluate.TEST_OUTPUTS:
        assert (tmp_path / name).exists()


def test_tta_is_a_separate_figure_equal_to_averaging_mirror_logits_by_hand(trained):
    path, ds = trained
    m = evaluate_checkpoint(path, ds, "cpu", tta=True)
    state = torch.load(path, weights_only=True)
    model = ViT(TrainConfig.from_dict(state["config"]).vit_config())
    model.load_state_dict(state["model"])
    model.eval()
    x = eval_transform(ds.test_images)
    with torch.no_grad():
        by_hand = ((model(x) + model(x.flip(3))) / 2).argmax(1)
    assert m["tta"]["accuracy"] == pytest.approx((by_hand == ds.test_labels).float().mean().item())
    assert m["accuracy"] == float((direct_predictions(path, ds) == ds.test_labels.numpy()).mean())  # headline: plain
    preds = json.load(open(os.path.join(os.path.dirname(path), "test_predictions.json")))
    assert preds["preds"] == direct_predictions(path, ds).tolist() and preds["labels"] == ds.test_labels.tolist()
    for name, c in m["per_class"].items():
        assert c["recall_ci95"][0] <= c["recall"] <= c["recall_ci95"][1]


def test_evaluating_a_stage1_trial_keeps_its_training_metrics_byte_for_byte(tmp_path, trained):
    from reports import write_json

    path, ds = trained
    trial = tmp_path / "stage1" / "trial_0000"
    trial.mkdir(parents=True)
    (trial / "last.pt").write_bytes(open(path, "rb").read())
    state = torch.load(path, weights_only=True)
    # what stage 1 leaves in a trial's folder, written the way it writes it
    write_json(str(trial / "metrics.json"), {"best_val_acc": state["early_stopping"]["best_acc"], "epochs_run": 2,
                                             "history": state["history"]})
    write_json(str(trial / "config.json"), {"trial": 0, "config": state["config"]})
    before = {name: (trial / name).read_bytes() for name in ("metrics.json", "config.json", "last.pt")}
    m = evaluate_checkpoint(str(trial / "last.pt"), ds, "cpu")
    assert {name: (trial / name).read_bytes() for name in before} == before
    assert json.loads((trial / "test_metrics.json").read_text())["accuracy"] == m["accuracy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_asked_for_a_gpu_this_machine_lacks_says_so_in_one_line(tmp_path, trained):
    path = tmp_path / "best.pt"
    path.write_bytes(open(trained[0], "rb").read())
    proc = subprocess.run([sys.executable, "evaluate.py", str(path), "--device", "cuda", "--no-download"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == ("error: cannot use device 'cuda': torch finds no CUDA GPU on this machine; "
                           "pass --device cpu (or auto, which takes a GPU when there is one)\n")
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]  # nothing written


def test_cli_on_a_read_only_folder_stops_in_one_line_and_keeps_the_checkpoint(tmpfs, trained, fake_cifar_dir):
    path = tmpfs / "best.pt"
    path.write_bytes(open(trained[0], "rb").read())
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = subprocess.run([sys.executable, "evaluate.py", str(path), "--data-dir", fake_cifar_dir, "--no-download",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == (f"error: cannot write '{tmpfs}/test_metrics.json': Read-only file "
                                                    "system; the checkpoint itself is untouched\n"), proc.stderr
    assert os.listdir(tmpfs) == ["best.pt"] and path.read_bytes() == open(trained[0], "rb").read()
