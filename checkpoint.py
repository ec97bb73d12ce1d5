"""Checkpoints, for every script alike: written whole, loaded safely, checked before a run resumes.

A checkpoint is Trainer.state_dict() (model, optimizer, scheduler, epoch, history, early stopping, random
generators, loss scaler) or an exported model file (evaluate.py --export: the model and its configuration alone).
Loading never runs pickled code (weights_only=True); a file that is not a checkpoint, is truncated or carries code
is refused in one line (DataError).
"""

import io
import os
import pickle
import re
import warnings

import torch

from data import DataError
from reports import write_bytes
from train import with_defaults

# What a last.pt must hold to be resumed; one written by an older version of this code may lack some.
RESUME_KEYS = {"config", "model", "optimizer", "scheduler", "epoch", "history", "early_stopping", "rng"}


def save_checkpoint(state: dict, *paths: str):
    # Serialised once, in memory, then written whole to each path in turn through a temporary file
    # (write_bytes): a kill or a full disk mid-write keeps the checkpoint a resume needs, and a full disk
    # raises a plain OSError, which torch's own file writer turns into an opaque RuntimeError.
    buf = io.BytesIO()
    torch.save(state, buf)
    for path in paths:
        write_bytes(path, buf.getbuffer())


def checkpoint_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    for name in ("best.pt", "model.pt"):  # training's own checkpoint, else an exported model file
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise DataError(f"{path} is a folder with neither best.pt nor model.pt in it; pass the checkpoint file itself "
                    f"(a stage-1 trial keeps last.pt)")


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path` (a run folder: its best.pt, else model.pt), loaded on the CPU, no pickled code run."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols before refusing them
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused, foreign or truncated: each said in one line
        # torch's safe loader stops at the first thing that is not tensors or plain data: a class or
        # function (how a pickle runs code) or an opcode it does not allow. Its own message suggests
        # weights_only=False, the one thing not to do with such a file, so it is not passed on.
        refused = isinstance(e, pickle.UnpicklingError)
        found = re.search(r"GLOBAL (\S+)|(Unsupported operand \d+)", str(e)) if refused else None
        # A JSON or text file fails too, as an unknown opcode that reads like a refused pickle; torch.save's files
        # begin as a zip archive or (legacy) a pickle of protocol 2+. A pickle naming a global is refused whatever.
        if not head.startswith((b"PK\x03\x04", b"\x80")) and not (found and found.group(1)):
            raise DataError(f"{path} is not a checkpoint: " + ("it is empty" if not head else
                            f"PyTorch files begin as a zip archive or a pickle, this one with {head!r}")) from None
        if refused:
            what = f" (first offender: {found.group(1) or found.group(2)})" if found else ""
            raise DataError(f"refusing to load {path}: it holds more than tensors and plain data{what}, and loading "
                            f"it fully could run code; checkpoints of this project never do") from None
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                        f"it may be truncated") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise DataError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    return state


def load_into(trainer, path: str, again: str):
    """Load the checkpoint at `path` into `trainer` to continue its run, or raise a DataError that says why
    it cannot be continued and what to do (`again`)."""
    state = load_checkpoint(path)  # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    older = f"{path} comes from an older, incompatible version of this code"
    missing = sorted(RESUME_KEYS - state.keys())
    if missing:
        raise DataError(f"{older} (no {', '.join(missing)}); {again}")
    expected = trainer.cfg.to_dict()
    if not isinstance(state["config"], dict) or with_defaults(state["config"]).keys() != expected.keys():
        raise DataError(f"{older} (its configuration has other keys); {again}")
    if with_defaults(state["config"]) != expected:
        raise DataError(f"{path} was trained with another configuration; {again}")
    try:
        trainer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{path} does not fit this code's model or optimizer ({str(e).splitlines()[0]}); "
                        f"{again}") from None
