"""Evaluate a checkpoint on the 10,000 CIFAR-10 test images: the only code that reads the test set.

    python evaluate.py results/stage2/trial_0012/best.pt --data-dir ../shared/data
    python evaluate.py --export model.pt results/stage2/trial_0012/best.pt

A run folder stands for its best.pt (else its model.pt). --export writes the model alone (weights as trained,
configuration, epoch, validation accuracy; no optimizer state: a third of an AdamW checkpoint's size), which
this script and predict.py accept as they do a checkpoint.

Writes next to the checkpoint, under names training never uses (so a run's own metrics.json survives):
test_metrics.json (accuracy with its 95 % Clopper-Pearson interval, macro and per-class precision, recall, F1,
support; fractions), test_predictions.json (per image, for comparing models), classification_report.txt,
confusion_matrix.png (counts and row-normalised) and .csv, mistakes.png (the 36 most confident mistakes) and
per_class_accuracy.png (with intervals). Checkpoints are loaded with weights_only=True, so a file carrying
pickled code is refused instead of run.
"""

import argparse
import os
import sys

import torch

from cli import OneLineParser, add_common_flags, resolve_device, run_main
from data import VAL_PER_CLASS, DataError, DeviceLoader, final_test_set, load_cifar10
from reports import (accuracy_interval, code_version, difference_interval, plot_mistakes, plot_per_class_accuracy,
                     pyplot, save_figure, write_bytes, write_json)
from train import TrainConfig, checkpoint_file, eval_batch_size, evaluate, load_checkpoint, save_checkpoint
from vit import ViT

# Stage 1 writes metrics.json (with the whole training history) next to its last.pt: the test's own name.
METRICS_FILE = "test_metrics.json"
PREDICTIONS_FILE = "test_predictions.json"
TEST_OUTPUTS = (METRICS_FILE, PREDICTIONS_FILE, "classification_report.txt", "confusion_matrix.png",
                "confusion_matrix.csv", "mistakes.png", "per_class_accuracy.png")
MODEL_FORMAT = "vit-cifar10 weights"  # the "format" entry of an exported model file
# What evaluation reads; the optimizer, scheduler, RNG states and history only serve to resume training.
MODEL_KEYS = ("config", "model", "epoch", "early_stopping")


def export_model(checkpoint_path: str, out_path: str) -> dict:
    """Write the checkpoint's model alone to out_path (atomically) and return it. The weights stay as trained (fp32),
    so the file's test accuracy is the checkpoint's image for image; early_stopping keeps its validation accuracy."""
    path = checkpoint_file(checkpoint_path)
    state = load_checkpoint(path)
    if os.path.exists(out_path) and os.path.samefile(path, out_path):
        raise DataError(f"--export {out_path} would replace the checkpoint itself (and its optimizer state); "
                        f"write the model file under another name")
    model_from_checkpoint(state, "cpu")  # a model that does not fit its configuration is not worth shipping
    exported = {"format": MODEL_FORMAT, **{k: state[k] for k in MODEL_KEYS if k in state},
                # this code's version, which reads the file; the training code's is in the run's config.json
                "code_version": code_version()}
    save_checkpoint(exported, out_path)
    return exported


def model_from_checkpoint(state: dict, device) -> ViT:
    try:
        model = ViT(TrainConfig.from_dict(state["config"]).vit_config())
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"the checkpoint's model does not match its configuration: {str(e).splitlines()[0]}") from None
    return model.to(device)


def evaluate_checkpoint(path: str, ds, device="cpu", tta: bool = False) -> dict:
    """Test the checkpoint at `path` on ds's test set and write the metrics (fractions, 95 % Clopper-Pearson
    intervals) and figures next to it; tta adds the accuracy with mirror TTA, beside the plain headline."""
    # imported here, not at the top: half a second that every start of every importing script would pay
    from sklearn.metrics import (ConfusionMatrixDisplay, classification_report, confusion_matrix,
                                 precision_recall_fscore_support)

    device = torch.device(device)
    path = checkpoint_file(path)  # a folder's outputs go into the folder, next to its checkpoint
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, device)
    images, labels = final_test_set(ds, device)
    # float32 with TF32 off even on GPUs (evaluate's default): the test must not depend on a precision shortcut.
    loader = DeviceLoader(images, labels, eval_batch_size(device), train=False)
    result = evaluate(model, loader, return_preds=True, tta=tta)
    y_true, y_pred = labels.cpu().numpy(), result["preds"].numpy()
    classes = list(ds.classes)
    n, ids = len(y_true), list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=ids)
    correct = cm.diagonal().tolist()  # per class: a class's accuracy is its recall
    per_class = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i]),
                        "recall_ci95": list(accuracy_interval(correct[i], max(1, int(support[i]))))}
                 for i, name in enumerate(classes)}
    accuracy = sum(correct) / n
    val_acc = state.get("early_stopping", {}).get("best_acc")  # the validation accuracy the checkpoint was kept for
    # sklearn's macro precision, recall and F1 are the plain means of its per-class ones
    metrics = {"checkpoint": os.path.abspath(path), "epoch": state.get("epoch"), "val_acc": val_acc, "test_images": n,
               "loss": result["loss"], "accuracy": accuracy, "accuracy_ci95": list(accuracy_interval(sum(correct), n)),
               "macro": {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())},
               "per_class": per_class, "config": state["config"], "code_version": code_version()}
    if val_acc is not None and val_acc >= 0:
        metrics["val_minus_test"] = val_acc - accuracy
        metrics["val_minus_test_ci95"] = list(difference_interval(val_acc, VAL_PER_CLASS * len(classes), accuracy, n))
    if tta:
        flipped = result["tta_acc"]
        metrics["tta"] = {"accuracy": flipped, "accuracy_ci95": list(accuracy_interval(round(flipped * n), n)),
                          "how": "mean of the logits of each image and its horizontal mirror"}
    out = os.path.dirname(os.path.abspath(path))
    write_json(os.path.join(out, METRICS_FILE), metrics)
    # Per-image predictions, so that models can be compared image by image (McNemar) without the checkpoints.
    write_json(os.path.join(out, PREDICTIONS_FILE), {"labels": y_true.tolist(), "preds": y_pred.tolist()})
    name = os.path.basename(out)
    plot_mistakes(images.cpu(), y_true, result["probs"], classes, os.path.join(out, "mistakes.png"),
                  f"{name}: the 36 most confident mistakes on the test set (true class, prediction, confidence)")
    plot_per_class_accuracy(classes, correct, support.tolist(), os.path.join(out, "per_class_accuracy.png"),
                            f"{name}: test accuracy per class, {100 * accuracy:.2f} % overall")
    write_bytes(os.path.join(out, "classification_report.txt"),
                classification_report(y_true, y_pred, labels=ids, target_names=classes, digits=4, zero_division=0))
    # Class names hold no commas or quotes: joined plainly, the rows are CSV.
    rows = [["true \\ predicted", *classes], *([name, *map(str, row)] for name, row in zip(classes, cm))]
    write_bytes(os.path.join(out, "confusion_matrix.csv"), "".join(",".join(row) + "\n" for row in rows))
    fig, axes = pyplot().subplots(1, 2, figsize=(17, 7.5))
    # scikit-learn's row normalisation leaves the row of a class the test set lacks at 0
    for ax, normalize, title, fmt in ((axes[0], None, "counts", "d"),
                                      (axes[1], "true", "row-normalised (recall on the diagonal)", ".2f")):
        ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=ids, normalize=normalize, display_labels=classes,
                                                ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45)
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
    save_figure(fig, os.path.join(out, "confusion_matrix.png"),
                f"{name}: test accuracy {100 * accuracy:.2f} % on {n} images")
    return metrics


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best.pt or last.pt written by stage2_final.py (or stage 1's last.pt), a "
                                      "model file written by --export, or a run folder: its best.pt (else model.pt)")
    p.add_argument("--export", metavar="OUT.pt",
                   help="do not test: write the checkpoint's model alone (weights as trained, configuration, epoch, "
                        "validation accuracy; no optimizer state) to OUT.pt, for evaluate.py and predict.py")
    add_common_flags(p)
    p.add_argument("--tta", action="store_true",
                   help="also report the accuracy of averaging each image's and its mirror's logits, as a separate "
                        "figure (default: off)")
    args = p.parse_args(argv)
    code = run_main(lambda: export_main(args.checkpoint, args.export) if args.export else test_main(args),
                    kept="the checkpoint itself is untouched", interrupted="interrupted")
    if code:
        sys.exit(code)


def test_main(args):
    device = resolve_device(args.device)
    path = checkpoint_file(args.checkpoint)
    load_checkpoint(path)  # refuse a bad file before the slower dataset load
    ds = load_cifar10(args.data_dir, download=not args.no_download)
    m = evaluate_checkpoint(path, ds, device, tta=args.tta)
    low, high = m["accuracy_ci95"]
    tta = f"; with mirror TTA {100 * m['tta']['accuracy']:.2f} %" if "tta" in m else ""
    print(f"test accuracy {100 * m['accuracy']:.2f} % (95 % interval {100 * low:.2f}-{100 * high:.2f}){tta}, "
          f"macro precision {100 * m['macro']['precision']:.2f} %, recall {100 * m['macro']['recall']:.2f} %, "
          f"F1 {100 * m['macro']['f1']:.2f} % on {m['test_images']} images; written next to {path}")


def export_main(checkpoint: str, out: str):
    state = export_model(checkpoint, out)
    val = state.get("early_stopping", {}).get("best_acc")
    val = f", validation accuracy {100 * val:.2f} %" if val is not None and val >= 0 else ""
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB): the model of epoch {state.get('epoch')}{val}, "
          f"without optimizer state")


if __name__ == "__main__":
    main()
