"""What both stages write about a run: JSON files, TensorBoard scalars, curve plots, code version."""

import contextlib
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display on servers and CI). Imported when a plot is
    drawn, not when this module is: every start of every script would pay for it, and most (a bad flag,
    --help, a stage-1 worker between trials) draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def code_version() -> str:
    """The git commit of this code ('+dirty' with uncommitted changes), so a result can be rebuilt."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: str, obj):
    """Write atomically, so that a reader (or a second worker) never sees half a file."""
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_text(path: str, text: str):
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes):
    """Replace `path` with `data` all at once: a kill or a full disk leaves the old file whole.

    OSError (a full disk, a folder that is not writable) names `path`; no temporary file is left behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        # A unique name per writer: two workers may write the same report at once.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename, or a power cut could leave an empty file
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from None
    _fsync_dir(folder)  # the rename itself must survive a power cut too


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames need no such step
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic there
        pass
    finally:
        os.close(fd)


class TensorBoardLogger:
    """An on_epoch callback that writes the epoch's curves for `tensorboard --logdir results`."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # slow import; only runs that log pay it

        self.writer = SummaryWriter(log_dir)

    def __call__(self, trainer, record: dict):
        step = record["epoch"]
        for split in ("train", "val"):
            self.writer.add_scalar(f"loss/{split}", record[f"{split}_loss"], step)
            self.writer.add_scalar(f"accuracy/{split}", record[f"{split}_acc"], step)
        self.writer.add_scalar("lr", record["lr"], step)
        self.writer.add_scalar("throughput/train_img_s", record["train_img_s"], step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def log_hparams(log_dir: str, hparams_dict: dict, metrics: dict):
    """One run's parameters and final figures for TensorBoard's HParams dashboard (table, parallel coordinates).

    Values must be numbers, strings or booleans; None becomes the string "none", a range "MIN MAX". Metrics are
    written as scalars "hparams/<name>" in the same folder as the run's curves.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    clean = {k: ("none" if v is None else " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
             for k, v in hparams_dict.items()}
    tags = {f"hparams/{k}": v for k, v in metrics.items()}
    # SummaryWriter.add_hparams would open a second writer in a time-stamped subfolder; one file beside
    # the run's curves keeps each run a single row of the dashboard.
    with SummaryWriter(log_dir) as writer:
        for summary in hparams(clean, tags):
            writer.file_writer.add_summary(summary)
        for tag, value in tags.items():
            writer.add_scalar(tag, value)


def plot_curves(history: list, path: str, title: str):
    """Training and validation loss and accuracy per epoch, side by side, in one PNG."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, marker=".", label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        if len(epochs) == 1:  # matplotlib would zoom into 0.95-1.05 around a single point
            ax.set_xlim(0.5, 1.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def most_confident_mistakes(probs, labels, k: int = 36) -> list:
    """Indices of up to k misclassified images, the most confident (highest predicted probability) first."""
    import torch

    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    return wrong[conf[wrong].argsort(descending=True)][:k].tolist()


def plot_mistakes(images, labels, probs, classes: list, path: str, title: str, k: int = 36) -> list:
    """A grid of the k most confident mistakes: each image upscaled, with true class, prediction and confidence.

    images: uint8 (N, 3, 32, 32); probs: (N, classes) softmax outputs. Returns the indices shown.
    """
    import torch

    plt = pyplot()
    picked = most_confident_mistakes(probs, labels, k)
    cols = 6
    rows = max(1, -(-len(picked) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False)
    probs = torch.as_tensor(probs)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picked):
        # nearest-neighbour upscaling shows the 32x32 pixels as they are, not a blur of them
        ax.imshow(torch.as_tensor(images[i]).permute(1, 2, 0).numpy(), interpolation="nearest")
        conf, pred = probs[i].max(0)
        ax.set_title(f"true: {classes[int(labels[i])]}\npred: {classes[int(pred)]} ({100 * conf:.0f} %)", fontsize=8)
    if not picked:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return picked


def plot_per_class_accuracy(classes: list, correct: list, totals: list, path: str, title: str):
    """Per-class test accuracy (%) as bars with their 95 % Clopper-Pearson intervals."""
    from stats import accuracy_interval

    acc = [100 * c / n for c, n in zip(correct, totals)]
    intervals = [accuracy_interval(c, n) for c, n in zip(correct, totals)]
    err = [[a - 100 * lo for a, (lo, _) in zip(acc, intervals)], [100 * hi - a for a, (_, hi) in zip(acc, intervals)]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(classes, acc, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    ax.set(ylabel="test accuracy (%), 95 % interval", ylim=(0, 105), title=title)
    ax.grid(axis="y", alpha=0.3)
    for x, (a, (_, hi)) in enumerate(zip(acc, intervals)):
        ax.text(x, 100 * hi + 1.5, f"{a:.1f}", ha="center", fontsize=8)  # above the interval, readable at any height
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
