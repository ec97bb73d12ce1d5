"""Evaluate a checkpoint on the 10,000 CIFAR-10 test images: the only code that reads the test set.

    python evaluate.py results/stage2/trial_0012/best.pt --data-dir ../shared/data

Writes next to the checkpoint: test_metrics.json (accuracy with its 95 % Clopper-Pearson interval,
macro and per-class precision, recall, F1, support; fractions), test_predictions.json (per image,
for comparing models), classification_report.txt (scikit-learn's), confusion_matrix.png (counts and
row-normalised), confusion_matrix.csv, mistakes.png (the 36 most confident mistakes) and
per_class_accuracy.png (with intervals); none of these names is one that training writes, so a
run's own metrics.json and history survive. Checkpoints are loaded with weights_only=True, so a
file carrying pickled code is refused instead of run.
"""

import argparse
import csv
import io
import os
import pickle
import re
import sys
import warnings

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from data import VAL_PER_CLASS, DataError, DeviceLoader, final_test_set, load_cifar10
from report import code_version, plot_mistakes, plot_per_class_accuracy, write_json, write_text
from stats import accuracy_interval, difference_interval
from train import TrainConfig, evaluate, pick_device
from vit import ViT

EVAL_BATCH = 500  # the validation loader's size: inference memory is small, larger batches gain nothing
# Stage 1 writes metrics.json (with the whole training history) next to its last.pt: the test's own name.
METRICS_FILE = "test_metrics.json"
PREDICTIONS_FILE = "test_predictions.json"
TEST_OUTPUTS = (METRICS_FILE, PREDICTIONS_FILE, "classification_report.txt", "confusion_matrix.png",
                "confusion_matrix.csv", "mistakes.png", "per_class_accuracy.png")


def load_checkpoint(path: str, device="cpu") -> dict:
    """A checkpoint written by Trainer.state_dict(), loaded without executing any pickled code."""
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols before refusing them
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's safe loader stops at the first thing that is not tensors or plain data: a class or
        # function (how a pickle runs code) or an opcode it does not allow. Its own message suggests
        # weights_only=False, the one thing not to do with such a file, so it is not passed on.
        found = re.search(r"GLOBAL (\S+)|(Unsupported operand \d+)", str(e))
        what = f" (first offender: {found.group(1) or found.group(2)})" if found else ""
        raise DataError(f"refusing to load {path}: it holds more than tensors and plain data{what}, and loading "
                        f"it fully could run code; checkpoints of this project never do") from None
    except Exception as e:  # truncated zips, foreign files: all mean the same to the user
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                        f"it may be truncated") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise DataError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    return state


def resolve_device(name: str) -> torch.device:
    """pick_device, with a one-line error for a name torch does not know or a device this machine lacks."""
    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise DataError(f"cannot use device {name!r}: {_first_sentence(e)}; "
                        f"use auto, cpu, cuda, cuda:N or mps") from None
    # torch's own messages for these point at driver downloads, which are rarely the fix.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"cannot use device {name!r}: torch finds no CUDA GPU on this machine; "
                        f"pass --device cpu (or auto, which takes a GPU when there is one)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"cannot use device {name!r}: there is no Apple GPU (MPS) on this machine; pass --device cpu")
    try:
        torch.empty(0, device=device)  # fails now, not deep inside training
    except (RuntimeError, AssertionError) as e:
        raise DataError(f"cannot use device {name!r}: {_first_sentence(e)}") from None
    return device


def _first_sentence(e: Exception) -> str:
    return str(e).splitlines()[0].split(". ")[0]  # torch appends paragraphs of backend lists and advice


def model_from_checkpoint(state: dict, device) -> ViT:
    try:
        cfg = TrainConfig.from_dict(state["config"])
        model = ViT(cfg.vit_config())
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"the checkpoint's model does not match its configuration: {str(e).splitlines()[0]}") from None
    return model.to(device)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list) -> dict:
    """Accuracy, macro and per-class precision/recall/F1/support, all from scikit-learn."""
    ids = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=ids, average=None, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(labels, preds, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float((labels == preds).mean()),
        "macro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, name in enumerate(classes)},
    }


def write_confusion_csv(path: str, cm: np.ndarray, classes: list):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, cm):
        writer.writerow([name, *(int(v) for v in row)])
    write_text(path, buf.getvalue())


def plot_confusion(path: str, cm: np.ndarray, classes: list, title: str):
    import matplotlib.pyplot as plt  # report.py has already chosen the Agg backend

    # Rows of a class the test set lacks would divide by zero; they stay 0.
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5))
    panels = ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised (recall on the diagonal)", ".2f"))
    for ax, values, name, fmt in panels:
        im = ax.imshow(values, cmap="Blues", vmin=0)
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
               xlabel="predicted class", ylabel="true class", title=name)
        ax.tick_params(axis="x", labelrotation=45)
        high = values.max() / 2 if values.size else 0
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > high else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(path: str, ds, device="cpu", tta: bool = False) -> dict:
    """Evaluate the checkpoint at `path` on ds's test set; write the metrics and figures next to it.

    Accuracies are fractions in the JSON, with 95 % Clopper-Pearson intervals; tta adds the accuracy
    of averaging each image's and its mirror's logits as a separate figure (the plain one stays the headline).
    """
    device = torch.device(device)
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, device)
    images, labels = final_test_set(ds, device)
    # fp32 even on GPUs: the test numbers must not depend on a precision shortcut.
    loader = DeviceLoader(images, labels, EVAL_BATCH, train=False)
    result = evaluate(model, loader, amp=False, return_preds=True, tta=tta)
    y_true, y_pred = labels.cpu().numpy(), result["preds"].numpy()
    classes = list(ds.classes)
    metrics = classification_metrics(y_true, y_pred, classes)
    correct = int((y_true == y_pred).sum())
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    for i, name in enumerate(classes):  # a class's accuracy is its recall
        metrics["per_class"][name]["recall_ci95"] = list(accuracy_interval(int(cm[i, i]), max(1, int(cm[i].sum()))))
    es = state.get("early_stopping", {})
    val_acc = es.get("best_acc")  # the validation accuracy the checkpoint was kept for
    metrics = {
        "checkpoint": os.path.abspath(path),
        "epoch": state.get("epoch"),
        "val_acc": val_acc,
        "test_images": len(y_true),
        "loss": result["loss"],
        "accuracy_ci95": list(accuracy_interval(correct, len(y_true))),
        **metrics,
        "config": state["config"],
        "code_version": code_version(),
    }
    if val_acc is not None and val_acc >= 0:
        metrics["val_minus_test"] = val_acc - metrics["accuracy"]
        metrics["val_minus_test_ci95"] = list(difference_interval(val_acc, VAL_PER_CLASS * len(classes),
                                                                  metrics["accuracy"], len(y_true)))
    if tta:
        flipped = result["tta_acc"]
        metrics["tta"] = {"accuracy": flipped, "accuracy_ci95": list(accuracy_interval(round(flipped * len(y_true)),
                                                                                        len(y_true))),
                          "how": "mean of the logits of each image and its horizontal mirror"}
    out = os.path.dirname(os.path.abspath(path))
    write_json(os.path.join(out, METRICS_FILE), metrics)
    # Per-image predictions, so that models can be compared image by image (McNemar) without the checkpoints.
    write_json(os.path.join(out, PREDICTIONS_FILE), {"labels": y_true.tolist(), "preds": y_pred.tolist()})
    name = os.path.basename(out)
    plot_mistakes(images.cpu(), y_true, result["probs"], classes, os.path.join(out, "mistakes.png"),
                  f"{name}: the 36 most confident mistakes on the test set (true class, prediction, confidence)")
    plot_per_class_accuracy(classes, [int(cm[i, i]) for i in range(len(classes))], [int(r.sum()) for r in cm],
                            os.path.join(out, "per_class_accuracy.png"),
                            f"{name}: test accuracy per class, {100 * metrics['accuracy']:.2f} % overall")
    write_text(os.path.join(out, "classification_report.txt"),
               classification_report(y_true, y_pred, labels=list(range(len(classes))), target_names=classes,
                                     digits=4, zero_division=0))
    write_confusion_csv(os.path.join(out, "confusion_matrix.csv"), cm, classes)
    plot_confusion(os.path.join(out, "confusion_matrix.png"), cm, classes,
                   f"{os.path.basename(out)}: test accuracy {100 * metrics['accuracy']:.2f} % on {len(y_true)} images")
    return metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best.pt or last.pt written by stage2_final.py (or stage 1's last.pt)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: auto)")
    p.add_argument("--tta", action="store_true",
                   help="also report the accuracy of averaging each image's and its mirror's logits, as a separate "
                        "figure (default: off)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        load_checkpoint(args.checkpoint)  # refuse a bad file before the slower dataset load
        ds = load_cifar10(args.data_dir, download=not args.no_download)
        m = evaluate_checkpoint(args.checkpoint, ds, device, tta=args.tta)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the checkpoint's folder is not writable, or the disk is full
        sys.exit(f"error: cannot write {e.filename!r}: {e.strerror}; the checkpoint itself is untouched")
    low, high = m["accuracy_ci95"]
    tta = f"; with mirror TTA {100 * m['tta']['accuracy']:.2f} %" if "tta" in m else ""
    print(f"test accuracy {100 * m['accuracy']:.2f} % (95 % interval {100 * low:.2f}-{100 * high:.2f}){tta}, "
          f"macro precision {100 * m['macro']['precision']:.2f} %, recall {100 * m['macro']['recall']:.2f} %, "
          f"F1 {100 * m['macro']['f1']:.2f} % on {m['test_images']} images; written next to {args.checkpoint}")


if __name__ == "__main__":
    main()
