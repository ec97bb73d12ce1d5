"""What both stages write about a run: JSON files, TensorBoard scalars, curve plots, code version."""

import contextlib
import json
import os
import subprocess
import tempfile

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


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
    # A unique name per writer: two workers may write the same report at once.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename, or a power cut could leave an empty file
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
        os.replace(tmp, path)
    except OSError as e:
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


def log_hparams(log_dir: str, hparams: dict, metrics: dict):
    """One run's parameters and final figures for TensorBoard's HParams dashboard (table, parallel coordinates).

    Values must be numbers, strings or booleans; None becomes the string "none". Metrics are
    written as scalars "hparams/<name>" in the same folder as the run's curves.
    """
    from torch.utils.tensorboard import SummaryWriter

    clean = {k: ("none" if v is None else v) for k, v in hparams.items()}
    with SummaryWriter(log_dir) as writer:
        # run_name "." keeps the session in the run's own folder, beside its curves, instead of a new
        # time-stamped subfolder per call.
        writer.add_hparams(clean, {f"hparams/{k}": v for k, v in metrics.items()}, run_name=".")


def plot_curves(history: list, path: str, title: str):
    """Training and validation loss and accuracy per epoch, side by side, in one PNG."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, marker=".", label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs are whole
        if len(epochs) == 1:  # matplotlib would zoom into 0.95-1.05 around a single point
            ax.set_xlim(0.5, 1.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
