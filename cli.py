"""What the command-line scripts share: one-line usage errors, the common flags, --time-limit, Ctrl-C and SIGTERM,
the results folder's writability check, the --device resolver, and `run_main`, which turns the project's errors
into one line and an exit code.

A run cut by --time-limit ends with EXIT_TIME_LIMIT (75, sysexits' EX_TEMPFAIL: "try again later"), so that a
job script tells it from a finished run (0), a failed one (1), a usage error (2), Ctrl-C (130) and SIGTERM (143):

    python stage2_final.py --time-limit 2h40m ...; [ $? -eq 75 ] && echo "not finished: run it again"
"""

import argparse
import contextlib
import difflib
import os
import re
import shlex
import signal
import sys
import tempfile

import torch

from data import DataError
from train import pick_device

EXIT_TIME_LIMIT = 75

class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line: the usage is in --help; a misspelt flag gets the closest one's name."""

    def error(self, message):
        if unknown := re.fullmatch(r"unrecognized arguments: (.*)", message):
            known = set(re.findall(r"--[a-z][a-z0-9-]*", self.format_help()))
            hints = [f"did you mean {close[0]}?" for arg in unknown.group(1).split() if arg.startswith("--")
                     for close in [closest(arg.split("=")[0], known)] if close]
            message = "; ".join([message, *hints])
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def closest(name: str, names) -> list:
    """The known name nearest a misspelt one (difflib's ratio at least 0.6), as a list of one, or []."""
    return difflib.get_close_matches(name, list(names), n=1)


def duration(text: str) -> float:
    """'2h40m', '90m', '45s', '1.5h' or plain seconds ('9600') as seconds; argparse's type for --time-limit."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip().lower())
    if match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 2h40m, 90m, 45s or plain seconds")
    total = sum(float(g or 0) * unit for g, unit in zip(match.groups(), (3600, 60, 1)))
    if total <= 0:
        raise argparse.ArgumentTypeError(f"a time limit must be more than 0, got {text!r}")
    return total


def add_worker_flags(parser: argparse.ArgumentParser, what: str):
    """--jobs, --heartbeat and --time-limit: how a stage's workers run its study's trials (`what` each trains)."""
    parser.add_argument("--jobs", type=positive(int), default=1,
                        help=f"worker processes on this machine, each training one {what} at a time and sharing the "
                             f"study's storage as workers on several machines do; with several GPUs, worker i takes "
                             f"GPU i mod their number; on a CPU each gets cores/N threads (default: 1)")
    parser.add_argument("--heartbeat", type=positive(int), default=60,
                        help=f"seconds between a running {what}'s heartbeats in an RDB storage; one silent for 2 "
                             f"intervals (its worker killed, its machine gone) is failed by the next worker to start "
                             f"one and retried from its last checkpoint (default: 60)")
    parser.add_argument("--time-limit", type=duration, default=None, metavar="DURATION",
                        help=f"stop at the end of the last epoch that fits in this wall time (e.g. 2h40m, 90m or "
                             f"seconds), with everything a resume needs written; exit code {EXIT_TIME_LIMIT}, and the "
                             f"same command continues (default: no limit)")


def clock(seconds: float, precise: bool = False) -> str:
    """A duration for an ETA: '2 h 05 min', or '7 min' under an hour; precise (a measured step's wall
    time): '7 min 05 s' under an hour and '45 s' under a minute."""
    minutes, secs = divmod(round(seconds) if precise else seconds, 60)
    if minutes >= 60:
        return f"{minutes // 60:.0f} h {minutes % 60:02.0f} min"
    if not precise:
        return f"{seconds / 60:.0f} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)"


def add_common_flags(parser: argparse.ArgumentParser, results_help: str | None = None, storage_help: str | None = None):
    """--data-dir, --no-download and --device; --results and --storage for the scripts that have them."""
    parser.add_argument("--data-dir", default="data",
                        help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    if results_help:
        parser.add_argument("--results", default="results", help=results_help)
    if storage_help:
        parser.add_argument("--storage", default=None, help=storage_help)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def storage_url(storage: str | None, results: str) -> str:
    """--storage, or by default the SQLite file both stages share in the results folder."""
    return storage or f"sqlite:///{os.path.join(results, 'stage1.db')}"


def positive(kind, at_most: float | None = None):
    """argparse's type for a number above 0 (and at most `at_most`): the usage error names the flag and the value."""
    def parse(text: str):
        value = kind(text)  # a ValueError is argparse's own "invalid int value" line
        if value <= 0 or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"must be in (0, {at_most:g}], got {value}" if at_most is not None
                                             else f"must be positive, got {value}")
        return value
    parse.__name__ = kind.__name__
    return parse


def epoch_line(name: str, record: dict, history: list, epochs: int) -> str:
    """One finished epoch in words, for a log file as much as a terminal: its figures, the speed, the run's time so
    far (earlier pieces' epochs too) and the time the rest takes at most (from the last 5 epochs)."""
    took = [r.get("epoch_s", r["epoch_time"]) for r in history]
    left = (epochs - record["epoch"]) * sum(took[-5:]) / len(took[-5:])
    eta = f", at most {clock(left, precise=left < 600)} left" if left > 0 else ""  # early stopping may end it sooner
    speed = f", {record['train_img_s']:.0f} img/s" if "train_img_s" in record else ""
    return (f"{name} epoch {record['epoch']:3d}/{epochs}: train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f} %, val loss {record['val_loss']:.4f} "
            f"acc {100 * record['val_acc']:.2f} %{' (best)' if record['is_best'] else ''}, lr {record['lr']:.2e}, "
            f"{record['epoch_time']:.0f}s{speed}, {clock(sum(took), precise=sum(took) < 600)} so far{eta}")


class StoppedForTime(Exception):
    """--time-limit was reached; the message says where the run stopped and how to continue it."""


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it
_stop = {"signum": None}  # the first Ctrl-C or SIGTERM of this process, until the run stops for it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: raised at the end of a training step after the first, at once after the second.
    A KeyboardInterrupt, so that Optuna fails the running trial and re-raises it, as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = EXIT_CODES.get(signum, 130)


@contextlib.contextmanager
def stop_handlers():
    """While in it, the first Ctrl-C or SIGTERM stops the run at the end of the running training step (check_stop),
    a second at once. Set explicitly, since a shell starts background jobs with SIGINT ignored and Python keeps
    it so; the previous handlers come back after (a test calls main() in-process)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers()
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        _stop["signum"] = None


def install_stop_handlers():
    def handler(signum, frame):
        if _stop["signum"] is not None:
            raise Interrupted(signum)
        _stop["signum"] = signum
        print("stopping at the end of the running step (press Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    _stop["signum"] = None
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_requested() -> int | None:
    return _stop["signum"]


def check_stop():
    """Raise Interrupted if a Ctrl-C or SIGTERM has come: the Trainer calls it after every step."""
    if _stop["signum"] is not None:
        raise Interrupted(_stop["signum"])


def nothing_fits(who: str, last_epoch_s: float | None) -> StoppedForTime:
    """A limit shorter than one epoch would never get anywhere: say so instead of stopping again and again."""
    took = f" (the last took {last_epoch_s:.0f} s)" if last_epoch_s else ""
    return StoppedForTime(f"{who}not one epoch fits in the time limit{took}, so nothing was trained; give a longer "
                          f"--time-limit")


class ResultsError(RuntimeError):
    """The results folder cannot be written, or a worker failed; the message says which and why."""


def raise_for(stop: str | None, time_limit: StoppedForTime, kept: str):
    """Raise how a stage's workers ended (storage.optimize's or run_workers' answer): Interrupted for a Ctrl-C or
    SIGTERM, `time_limit` for --time-limit, a ResultsError for a worker's error (`kept`: what survives it)."""
    if stop == "interrupted":
        raise Interrupted(stop_requested() or signal.SIGINT)
    if stop == "time":
        raise time_limit
    if stop == "failed":
        raise ResultsError(f"a worker stopped with an error (its line is above); {kept}: run the same command to "
                           f"continue")


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message says which and why."""


def run_main(work, kept: str, script: str | None = None, argv=None, redact=lambda arg: arg,
             interrupted: str | None = None, unnamed: str | None = None) -> int:
    """work(), with the project's errors as one line on stderr; returns the exit code. kept: what survives a failed
    write; script: the one whose command continues a run stopped by --time-limit (None: only the reason, e.g. in a
    --jobs worker); interrupted: the line for Ctrl-C; unnamed: the path to name when an OSError names none."""
    try:
        work()
    except StoppedForTime as e:
        # The same command continues the run; `redact` keeps its password out of the log.
        args = sys.argv[1:] if argv is None else argv
        more = f"; continue with: {shlex.join(['python', script, *map(redact, args)])}" if script else ""
        print(f"{e}{more}", file=sys.stderr)
        return EXIT_TIME_LIMIT
    except (DataError, StorageError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, or a folder that stopped being writable mid-run
        where = e.filename or unnamed
        print(f"error: cannot write{f' {where!r}' if where else ''}: {e.strerror or e}; {kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


def check_writable(folder: str):
    """Fail now, in one line, rather than after the first epoch of the first trial."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ResultsError(f"cannot write results to {folder!r}: {e.strerror or e}") from None


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device (auto: cuda, then mps, then cpu); a one-line DataError, before any data is loaded,
    for a name torch does not know or a device this machine lacks."""
    try:
        device = pick_device(name)
    except RuntimeError:  # torch's own message lists twenty device types this code was never run on
        raise DataError(f"cannot use device {name!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    # torch's own messages for these point at driver downloads, which are rarely the fix.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"cannot use device {name!r}: torch finds no CUDA GPU on this machine; "
                        f"pass --device cpu (or auto, which takes a GPU when there is one)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"cannot use device {name!r}: there is no Apple GPU (MPS) on this machine; pass --device cpu")
    try:
        torch.empty(0, device=device)  # fails now, not deep inside training
    except (RuntimeError, AssertionError) as e:
        first_sentence = str(e).splitlines()[0].split(". ")[0]  # torch appends paragraphs of backend lists and advice
        raise DataError(f"cannot use device {name!r}: {first_sentence}") from None
    return device
