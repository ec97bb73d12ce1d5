"""What the command-line scripts share: one-line usage errors, --time-limit and its exit code, the
results folder's writability check, the one --device resolver.

A run cut by --time-limit ends with EXIT_TIME_LIMIT (75, sysexits' EX_TEMPFAIL: "try again later"),
so that a job script can tell it from a finished run (0), a failed one (1), a usage error (2) and
Ctrl-C (130), and start the same command again:

    python stage2_final.py --time-limit 2h40m ...; [ $? -eq 75 ] && echo "not finished: run it again"
"""

import argparse
import os
import re
import shlex
import sys
import tempfile

import torch

from data import DataError
from train import pick_device

EXIT_TIME_LIMIT = 75

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line: the usage is in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def duration(text: str) -> float:
    """'2h40m', '90m', '45s', '1.5h' or plain seconds ('9600') as seconds; argparse's type for --time-limit."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 2h40m, 90m, 45s or plain seconds")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"a time limit must be more than 0, got {text!r}")
    return total


TIME_LIMIT_HELP = ("stop at the end of the last epoch that fits in this wall time (e.g. 2h40m, 90m or seconds), "
                   f"with everything a resume needs written; exit code {EXIT_TIME_LIMIT}, and the same command "
                   "continues (default: no limit)")


def add_time_limit(parser: argparse.ArgumentParser):
    parser.add_argument("--time-limit", type=duration, default=None, metavar="DURATION", help=TIME_LIMIT_HELP)


def continue_command(script: str, argv: list | None, redact=lambda arg: arg) -> str:
    """The command line that continues this run: the same one, each argument passed through
    `redact` so that no password reaches a log."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", script, *(redact(a) for a in args)])


def clock(seconds: float) -> str:
    """A duration for an ETA: '2 h 05 min', or '7 min' under an hour."""
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min" if seconds >= 3600 else f"{seconds / 60:.0f} min"


class StoppedForTime(Exception):
    """--time-limit was reached; the message says where the run stopped and how to continue it."""


class ResultsError(RuntimeError):
    """The results folder cannot be written; the message says which and why."""


def check_writable(folder: str):
    """Fail now, in one line, rather than after the first epoch of the first trial."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ResultsError(f"cannot write results to {folder!r}: {e.strerror or e}") from None


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device (auto: cuda, then mps, then cpu), with a one-line DataError for a name
    torch does not know or a device this machine lacks, before any data is loaded. Every script's one."""
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
        raise DataError(f"cannot use device {name!r}: {_first_sentence(e)}") from None
    return device


def _first_sentence(e: Exception) -> str:
    return str(e).splitlines()[0].split(". ")[0]  # torch appends paragraphs of backend lists and advice
