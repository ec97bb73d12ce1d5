"""The one training loop both stages share: model, optimizer, schedule, precision, epochs, early stopping, and
its checkpoints on disk. Both stages add TensorBoard and Optuna's reports through `on_epoch` (storage.train_trial).

Everything a run needs to continue exactly lives in `Trainer.state_dict()`, its random generators included: each
Trainer draws from its own, never from torch's global RNG, so that runs side by side cannot move each other's.
A checkpoint is that state, or an exported model file (evaluate.py --export: the model and its configuration
alone), written whole and loaded without running pickled code: a file that is not a checkpoint, is truncated or
carries code is refused in one line (DataError).
"""

import ctypes
import io
import math
import os
import pickle
import random
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from augment import MAGNITUDE_BINS
from data import DataError, DeviceLoader, loss_fn, mix_batch
from reports import write_bytes
from vit import ViT, ViTConfig


# TrainConfig's checks: (fields, rule, the rule in words). The model's (drop_path, pool, ...) are ViTConfig's.
_CHECKS = (
    ("optimizer", lambda v: v in ("adamw", "sgd"), "must be 'adamw' or 'sgd'"),
    ("scheduler", lambda v: v in ("cosine", "step"), "must be 'cosine' or 'step'"),
    ("lr sgd_lr_scale batch_size epochs patience", lambda v: v > 0, "must be positive"),
    ("warmup_epochs weight_decay grad_clip randaug_ops mixup_alpha cutmix_alpha", lambda v: v >= 0, "must be >= 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("randaug_magnitude", lambda v: 0 <= v < MAGNITUDE_BINS, f"must be in 0..{MAGNITUDE_BINS - 1}"),
    ("mix_prob switch_prob erase_prob", lambda v: 0 <= v <= 1, "is a probability, in [0, 1]"),
    ("erase_area", lambda v: 0 < v[0] <= v[1] <= 1, "must be two shares MIN MAX with 0 < MIN <= MAX <= 1"),
    ("erase_aspect", lambda v: 0 < v[0] <= v[1], "must be two ratios MIN MAX with 0 < MIN <= MAX"),
)


@dataclass
class TrainConfig:
    # model (the search space's part of ViTConfig; the rest keeps ViTConfig's defaults)
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    # The recipe's defaults are the seed's (docs/recipe.md): the one run at stage 2's length used them, and the
    # shorter ablations that preferred otherwise measured 10- and 30-epoch budgets only.
    drop_path: float = 0.1  # stochastic depth of the last block (the seed's; 0 was better at 10 epochs only)
    pool: str = "cls"  # the head reads the paper's class token; "mean" (of the patch tokens) cost 1.3 points
    optimizer: str = "adamw"  # "adamw" or "sgd" (with Nesterov momentum 0.9)
    lr: float = 5.8e-4  # peak learning rate, reached after warmup (SGD: times sgd_lr_scale)
    sgd_lr_scale: float = 100.0  # SGD's lr = lr x this: the searched 1e-5..1e-3 becomes 1e-3..0.1, SGD's range
    label_smoothing: float = 0.0  # train against (1 - eps) one-hot + eps / 10; off: no gain at the proxy budget
    weight_decay: float = 0.01  # AdamW's decoupled decay (torch's default; 0.05 gained nothing); SGD: / 10, coupled
    scheduler: str = "cosine"  # "cosine" to zero, or "step": x0.1 at 50 % and 75 % of the epochs
    warmup_epochs: int = 2  # linear warmup: +5.8 points at the proxy budget, the one change that paid
    grad_clip: float = 1.0  # max global gradient norm (the seed's; 0 was better at 10 epochs only)
    augment: bool = True  # crop and flip (and RandAugment if randaug_ops > 0); off only for quick sanity runs
    randaug_ops: int = 2  # RandAugment ops per image (the seed's, torchvision's default); 0: off
    randaug_magnitude: int = 9  # RandAugment strength, of 31 bins (the seed's, torchvision's default)
    batch_size: int = 128
    mixup_alpha: float = 0.0  # 0 turns mixup off
    # Regularisers for long schedules (docs/recipe.md): off by default, since at 10-30 epochs none of them paid.
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha) for the pasted box's share; 0 turns CutMix off
    mix_prob: float = 1.0  # share of the batches mixed (by Mixup or CutMix, whichever is on)
    switch_prob: float = 0.5  # with both Mixup and CutMix on: the share of the mixed batches that use CutMix
    erase_prob: float = 0.0  # random erasing: the share of training images that get a box of noise; 0: off
    erase_area: tuple[float, float] = (0.02, 1 / 3)  # the erased box's area, as shares of the image (timm's)
    erase_aspect: tuple[float, float] = (0.3, 3.3)  # its height / width, drawn log-uniformly (timm's)
    epochs: int = 20  # the schedule's length; early stopping may end sooner
    patience: int = 6  # epochs without a better validation accuracy before stopping
    subset_ratio: float = 1.0  # share of the 45,000 training images used (stage 1 proxies: 0.2)
    seed: int = 0  # seeds the split, the init, the shuffling and the augmentation

    def __post_init__(self):
        for name in ("erase_area", "erase_aspect"):  # a tuple, or the list a JSON file or checkpoint holds
            try:
                lo, hi = map(float, getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be two numbers MIN MAX, got {getattr(self, name)!r}") from None
            setattr(self, name, (lo, hi))
        for names, ok, rule in _CHECKS:
            for name in names.split():
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        self.vit_config()  # the model's own checks, raised now rather than mid-run

    def vit_config(self) -> ViTConfig:
        return ViTConfig(patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                         num_heads=self.num_heads, drop_path=self.drop_path, pool=self.pool)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, ignoring keys that are not fields (e.g. a trial's extra attributes)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        # Ranges as lists: what JSON gives back, so that a config.json or a trial's attributes compare equal to it.
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# Fields added after runs had been stored, whose defaults (off) are what the code before them did.
ADDED_OFF_FIELDS = ("cutmix_alpha", "mix_prob", "switch_prob", "erase_prob", "erase_area", "erase_aspect")


def with_defaults(config: dict) -> dict:
    """A configuration stored before ADDED_OFF_FIELDS existed (a checkpoint's, a study's) as to_dict() gives
    it today, so that such a run continues and counts as the same configuration. Other missing keys stay
    missing: an older field's default may differ from what its absence meant (sgd_lr_scale's 100 was 1)."""
    defaults = TrainConfig().to_dict()
    return {**{k: defaults[k] for k in ADDED_OFF_FIELDS}, **config}


# The recipe around the searched dimensions: one flag each, so that any choice can be switched off.
RECIPE_FLAGS = {  # each flag's type is its field's
    "label_smoothing": "label smoothing of the training targets; 0 turns it off",
    "warmup_epochs": "epochs of linear learning-rate warmup; 0 turns it off",
    "weight_decay": "AdamW's decoupled weight decay (SGD: a tenth of it, coupled); 0 turns it off",
    "drop_path": "stochastic depth rate of the last block; 0 turns it off",
    "grad_clip": "max global gradient norm; 0 turns clipping off",
    "sgd_lr_scale": "SGD's learning rate is the configured lr times this; 1 turns it off",
    "pool": "what the head classifies: cls (the class token) or mean (the average of the patch tokens)",
    "randaug_ops": "RandAugment ops per training image; 0 turns RandAugment off (crop and flip stay)",
    "randaug_magnitude": f"RandAugment magnitude, 0..{MAGNITUDE_BINS - 1} (torchvision's bins)",
    "cutmix_alpha": "CutMix's Beta(alpha, alpha), drawing the share of an image kept outside the pasted box; 0: off",
    "mix_prob": "share of the batches that Mixup or CutMix mixes, when either is on",
    "switch_prob": "with both mixup (the search's mixup_alpha) and CutMix on: the share of mixed batches using CutMix",
    "erase_prob": "random erasing (timm's, pixel mode): share of training images given a box of noise; 0 turns it off",
    "erase_area": "random erasing's box area, two shares of the image MIN MAX",
    "erase_aspect": "random erasing's box height/width, two ratios MIN MAX (drawn log-uniformly)",
}


# Stage 2's recipe, over TrainConfig's defaults (the seed's, which stage 1's 20-epoch proxy keeps: docs/recipe.md).
# Measured at the full 120 epochs, it beat the seed's recipe on the test set: 82.09 against 80.90 %, exact McNemar
# p = 0.00076 (results/reference/120ep_long_recipe/).
LONG_RECIPE = {"cutmix_alpha": 1.0, "mix_prob": 0.5, "label_smoothing": 0.1, "erase_prob": 0.25,
               "weight_decay": 0.05, "warmup_epochs": 5}


def add_recipe_flags(parser, defaults: dict | None = None, title: str = "the seed's recipe"):
    """--label-smoothing, --warmup-epochs, ...: each overrides its TrainConfig field. defaults: the values the
    stage uses where no flag is given, over TrainConfig's (for --help)."""
    group = parser.add_argument_group(f"recipe (defaults: {title}; docs/recipe.md)")
    defaults = {**TrainConfig().to_dict(), **(defaults or {})}
    for name, text in RECIPE_FLAGS.items():
        default = defaults[name]
        pair = isinstance(default, (tuple, list))
        kind = float if pair else type(getattr(TrainConfig, name))
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, nargs=2 if pair else None,
                           metavar=("MIN", "MAX") if pair else kind.__name__.upper(),
                           help=f"{text} (default: {' '.join(f'{v:.3g}' for v in default) if pair else default})")


def recipe_overrides(flags: dict, error=None) -> dict:
    """The recipe flags given in vars(args), as TrainConfig keyword arguments. With error (parser.error), an impossible
    value (--label-smoothing 1.5) ends as its one-line usage error naming the flag (each field's checks are its own)."""
    overrides = {name: flags[name] for name in RECIPE_FLAGS if flags.get(name) is not None}
    if error is not None:
        for name, value in overrides.items():
            try:
                TrainConfig(**{name: value})
            except ValueError as e:
                error(f"--{name.replace('_', '-')}: {e}")
    return overrides


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


AMP_MODES = ("auto", "bf16", "fp16", "off")
AMP_HELP = ("mixed precision of the training steps: auto (bf16 on a GPU that runs it natively, Ampere and "
            "newer; fp16 with loss scaling on older ones such as a T4 or V100; off on the CPU and MPS, where "
            "bf16 is emulated and slower), bf16, fp16 or off. Each epoch's validation on a CUDA GPU runs in the "
            "same precision (elsewhere in float32); the test always runs in float32, TF32 off (default: auto)")


def resolve_amp(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the training steps, or None for float32."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto" and device.type == "cuda":  # is_bf16_supported() alone says yes on a T4 or V100 too (emulated)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)  # None (float32): off, or auto off CUDA


def validation_amp(device: torch.device, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of each epoch's validation: the training's on a CUDA GPU, where a float32 validation of a
    patch-2 shape costs about a bf16 training epoch just to rank epochs (the test stays float32: docs/speed.md);
    else None (float32): elsewhere amp is off unless asked for, and a CPU's bf16 is emulated."""
    return amp_dtype if device.type == "cuda" else None


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
COMPILE_HELP = ("torch.compile the model: --compile alone is torch's default mode; reduce-overhead adds CUDA "
                "graphs, which cut the launch overhead that bounds small models on big GPUs. Stage 2's "
                "shape is fixed for its whole run, so the one compile (tens of seconds) can repay itself "
                "on a GPU; on a CPU it measured no gain (default: off, on every device)")


class RunRandom:
    """A run's own random streams, so that nothing else in the process can move them. device: on the training
    device (shuffling, crops, flips, random erasing, drop-path, the mixing partners); host: on the CPU
    (RandAugment's op choices, so a GPU never syncs for them; seeded apart, as on a CPU run both are CPU
    generators); python: the mixing's per-batch draws. The model's init has a generator of its own."""

    def __init__(self, seed: int, device: torch.device):
        self.device = torch.Generator(device=device).manual_seed(seed)
        self.host = torch.Generator().manual_seed(seed + 1)
        self.python = random.Random(seed)

    def state_dict(self) -> dict:
        return {"device_type": self.device.device.type, "device": self.device.get_state(),
                "host": self.host.get_state(), "python": self.python.getstate()}

    def load_state_dict(self, state: dict) -> bool:
        """Restore the streams; False (the device stream left as seeded) when the checkpoint was written on
        another kind of device, whose generator state does not fit this one."""
        self.host.set_state(state["host"])
        version, internal, gauss = state["python"]  # setstate wants getstate's tuple; a checkpoint may hold a list
        self.python.setstate((version, tuple(internal), gauss))
        if state["device_type"] != self.device.device.type:
            return False
        self.device.set_state(state["device"])
        return True


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    # Decay only weight matrices: shrinking biases, norms and embeddings towards 0 only hurts.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in ("cls_token", "pos_embed") else decay).append(p)
    weight_decay = cfg.weight_decay if cfg.optimizer == "adamw" else cfg.weight_decay / 10
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr * cfg.sgd_lr_scale, momentum=0.9, nesterov=True, fused=fused)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The schedule as a multiple of cfg.lr at a given optimizer step (warmup included)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 5)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))


def warmup_note(cfg: TrainConfig) -> str | None:
    """A line for the log when lr_factor shortens the warmup: it never takes more than a fifth of the schedule."""
    if cfg.warmup_epochs * 5 > cfg.epochs:
        return (f"note: a {cfg.warmup_epochs}-epoch warmup is more than a fifth of {cfg.epochs} epoch(s), so it is "
                f"cut to the first fifth of the schedule's steps; nothing is wrong, and --warmup-epochs "
                f"{f'{cfg.epochs // 5} (or 0)' if cfg.epochs >= 5 else 0} says so and silences this")


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS (Linux only); True if it took
    the settings. A CPU step frees and reallocates hundreds of MB of activations, which glibc by default unmaps
    or trims, so that the next step page-faults them back in: 650-6,000 faults a step (about 2 % of the time; 2
    cores, the seed's best shape) down to almost none. Process-wide, and memory once used stays: the bench's
    largest stage-1 trial peaked at 1,932-2,001 MB with it, 1,769-1,894 MB before."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: musl, macOS, Windows
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MB is glibc's largest mmap threshold on 64-bit: blocks up to it come from the heap.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def eval_batch_size(device: torch.device, micro_batch: int | None = None) -> int:
    """Images per inference batch: 128 on a CPU, where a batch's activations then stay in the caches (the
    seed's best shape: 1,230 img/s against 770 at 500, on 2 Xeon cores), 500 elsewhere (fewer launches).
    Inference keeps no activations, so 4x the training micro-batch fits in the memory training uses."""
    size = 128 if device.type == "cpu" else 500
    return size if micro_batch is None else min(size, 4 * micro_batch)


def cpu_micro_batch(cfg: TrainConfig) -> int:
    """Samples per forward/backward on a CPU, so that a stage-1 run stays under 2.5 GB of RAM. Saved activations
    take about 128 bytes per token, channel and block (measured: 37 MB a sample for patch 2, width 192, depth 6).
    The seed's best shape fits whole; the largest run as a few micro-batches: the same gradients, no slower."""
    per_sample = 128 * (cfg.vit_config().num_patches + 1) * cfg.embed_dim * cfg.depth
    return max(1, min(cfg.batch_size, 2**30 // per_sample))  # 1 GiB of saved activations a micro-batch


_FLOAT32_LOCK = threading.RLock()  # the flags are the process's: threads that evaluate at once take turns


@contextmanager
def strict_float32():
    """float32 matmuls and convolutions on CUDA, TF32 off for both (by default cuDNN's convolutions use TF32,
    cuBLAS's matmuls do not); the settings before come back after. Through torch's fp32_precision settings, which
    replace the allow_tf32 flags (torch 2.9 on; mixing the two can raise), where torch has them."""
    if hasattr(torch.backends.cudnn, "conv"):  # the matmuls' and convolutions' settings, their strict value
        places, name, strict = (torch.backends.cuda.matmul, torch.backends.cudnn.conv), "fp32_precision", "ieee"
    else:  # torch < 2.9
        places, name, strict = (torch.backends.cuda.matmul, torch.backends.cudnn), "allow_tf32", False
    with _FLOAT32_LOCK:
        before = [getattr(where, name) for where in places]
        for where in places:
            setattr(where, name, strict)
        try:
            yield
        finally:
            for where, value in zip(places, before):
                setattr(where, name, value)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, return_preds: bool = False, tta: bool = False,
             amp_dtype: torch.dtype | None = None):
    """Mean loss and accuracy over the loader (and predictions and class probabilities, if asked); tta adds "tta_acc",
    from each image's and its mirror's logits averaged. amp_dtype None (the test's): float32, TF32 off, so that the
    test depends on no precision shortcut; else an autocast dtype (a GPU's per-epoch validation: validation_amp)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    tta_correct = torch.zeros((), device=device, dtype=torch.long)
    outs = []  # class probabilities with return_preds, else the predicted classes (all a validation epoch needs)
    with strict_float32() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype):
        for x, y in loader:
            logits = model(x)
            if tta:
                mirrored = (logits + model(x.flip(3))) / 2  # flip(3): the width axis of (B, C, H, W)
                tta_correct += (mirrored.argmax(1) == y).sum()
            loss_sum += loss_fn(logits.float(), y) * len(y)
            outs.append(logits.float().softmax(1) if return_preds else logits.argmax(1))
    outs = torch.cat(outs)
    preds = outs.argmax(1) if return_preds else outs
    n = len(loader.labels)
    result = {"loss": loss_sum.item() / n, "acc": (preds == loader.labels).float().mean().item()}
    if tta:
        result["tta_acc"] = tta_correct.item() / n
    if return_preds:
        result["preds"], result["probs"] = preds.cpu(), outs.cpu()
    return result


# ----------------------------------------------------------------------------- checkpoints

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


class _LateValue:
    """A device scalar divided by n, copied to the host without waiting, ready() once copied: the progress bar
    shows the loss of a few steps ago rather than making a GPU drain its queue for it."""

    def __init__(self, total: torch.Tensor, n: int):
        self.n = n
        self.host = total.to("cpu", non_blocking=True, copy=True)  # copy: on a CPU, .to would alias the running sum
        self.event = None
        if total.device.type == "cuda":
            # On the training device's stream: record() alone takes the current device's, which with
            # --device cuda:1 is GPU 0, so the event would not follow the copy.
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(total.device))

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    @property
    def value(self) -> float:
        return float(self.host) / self.n


class Trainer:
    """Holds a run's model, optimizer, schedule and early-stopping state; `fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, train_images, train_labels, val_images, val_labels, device: torch.device,
                 amp: str = "auto", fused: bool | None = None, compile: str | bool = "off", progress: bool = True,
                 log_every_s: float = 30.0, stop_check=None):
        # progress: a bar on a terminal; off one (a log, a pipe) a line every log_every_s seconds, so that a log shows
        # the run alive long before the epoch ends. stop_check(): after every step, raises to stop (cli.check_stop).
        self.cfg, self.device, self.progress, self.log_every_s = cfg, device, progress, log_every_s
        self.stop_check = stop_check or (lambda: None)
        self.amp_dtype = resolve_amp(device, amp)
        self.val_amp_dtype = validation_amp(device, self.amp_dtype)
        # fp16's narrow range underflows small gradients: scale the loss up, and the gradients back
        # before clipping and the step. A disabled scaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        # Fused AdamW: one kernel instead of ~10 per tensor (CPU: 1.1 ms instead of 4-5 ms a step for
        # the seed's best shape). Fused SGD likewise, and under fp16 it takes GradScaler's inf check as a
        # tensor: an unfused step reads it on the host, a GPU sync every step.
        fused = device.type in ("cuda", "cpu") if fused is None else fused  # where torch >= 2.4 has the kernels
        if device.type == "cpu":
            keep_freed_memory()
        self.random = RunRandom(cfg.seed, device)
        self.train_loader = DeviceLoader(
            train_images, train_labels, cfg.batch_size, train=True, augment=cfg.augment, generator=self.random.device,
            host_generator=self.random.host, num_ops=cfg.randaug_ops, magnitude=cfg.randaug_magnitude,
            erase_prob=cfg.erase_prob, erase_area=cfg.erase_area, erase_aspect=cfg.erase_aspect)
        model = ViT(cfg.vit_config())
        # A generator of the init's own, on the CPU (then moved): the same init on every device, and one that
        # no other draw depends on, so that e.g. the model's size never shifts the augmentation's stream.
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
        self.model = model.to(device)
        compile = {True: "default", False: "off"}.get(compile, compile)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if compile != "off":
            # A new shape (each stage-1 trial) recompiles; past torch's recompile limit it would silently
            # run eager. Each Trainer starts from a clean cache instead: it then compiles exactly once.
            torch.compiler.reset()
        self.step_model = self.model if compile == "off" else torch.compile(self.model, mode=compile)
        self.optimizer = make_optimizer(self.model, cfg, fused=fused)
        self.micro_batch = cfg.batch_size if device.type != "cpu" else cpu_micro_batch(cfg)
        self.val_loader = DeviceLoader(val_images, val_labels, eval_batch_size(device, self.micro_batch), train=False)
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg, steps))
        self.replays_exactly = True  # False once resumed from a checkpoint of another kind of device
        self.stopped_for_time = False
        self.epoch = 0  # epochs completed
        self.history = []  # one dict per completed epoch
        self.best_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0

    def state_dict(self) -> dict:
        es = {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "history": self.history, "early_stopping": es,
                "rng": self.random.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        es = state["early_stopping"]
        self.best_acc, self.best_epoch, self.bad_epochs = es["best_acc"], es["best_epoch"], es["bad_epochs"]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.replays_exactly = self.random.load_state_dict(state["rng"])

    def resume(self, path: str, again: str):
        """Load the checkpoint at `path` into this Trainer to continue its run, or raise a DataError that says why
        it cannot be continued and what to do (`again`)."""
        state = load_checkpoint(path)  # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        older = f"{path} comes from an older, incompatible version of this code"
        missing = sorted(RESUME_KEYS - state.keys())
        if missing:
            raise DataError(f"{older} (no {', '.join(missing)}); {again}")
        expected = self.cfg.to_dict()
        if not isinstance(state["config"], dict) or with_defaults(state["config"]).keys() != expected.keys():
            raise DataError(f"{older} (its configuration has other keys); {again}")
        if with_defaults(state["config"]) != expected:
            raise DataError(f"{path} was trained with another configuration; {again}")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{path} does not fit this code's model or optimizer ({str(e).splitlines()[0]}); "
                            f"{again}") from None

    @property
    def stopped_early(self) -> bool:
        return self.bad_epochs >= self.cfg.patience

    def train_epoch(self) -> dict:
        model, cfg = self.step_model, self.cfg
        model.train()
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if self.progress else True, unit="batch")
        log_lines, last_log = self.progress and bar.disable, t0
        shown = None  # the bar's loss: copied off the device without waiting, and shown at the next update
        for i, (x, y) in enumerate(bar):
            x, targets = mix_batch(x, y, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.switch_prob,
                                   generator=self.random.device, rng=self.random.python)
            self.optimizer.zero_grad(set_to_none=True)
            # Gradients of micro-batches, each weighted by its share, add up to the whole batch's.
            for xm, tm, ym in zip(*(t.split(self.micro_batch) for t in (x, targets, y))):
                # Drop-path's draws from the run's own generator, outside the (possibly compiled) forward.
                keep = self.model.drop_path_keep(len(xm), self.random.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    logits = model(xm, keep)
                loss = loss_fn(logits.float(), tm, cfg.label_smoothing) * (len(ym) / len(y))
                self.scaler.scale(loss).backward()
                # Accumulate on the device: a .item() per step would stall a GPU.
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == ym).sum()  # with mixup: against the unmixed label
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) if fp16 overflowed
            self.scaler.update()
            self.scheduler.step()
            self.stop_check()  # a safe point: the step is whole; the last epoch's checkpoint is what goes on
            seen += len(y)
            if i % 20 == 0 and not bar.disable:
                if shown is not None and shown.ready():
                    bar.set_postfix(loss=f"{shown.value:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                shown = _LateValue(loss_sum, seen)
            if log_lines and time.perf_counter() - last_log >= self.log_every_s:
                last_log = time.perf_counter()
                n, rate = len(self.train_loader), seen / (last_log - t0)
                left = (n - i - 1) * len(y) / rate
                print(f"  epoch {self.epoch + 1}/{cfg.epochs}  batch {i + 1}/{n}  loss {loss_sum.item() / seen:.3f}  "
                      f"{rate:.0f} img/s  epoch ends in {left // 60:.0f}:{left % 60:02.0f}", flush=True)
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss became {train_loss} in epoch {self.epoch + 1}")
        return {"train_loss": train_loss, "train_acc": correct.item() / seen,
                "epoch_time": time.perf_counter() - t0, "train_img_s": seen / (time.perf_counter() - t0)}

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs or self.stopped_early

    def fit(self, on_epoch=None, deadline: float | None = None, epoch_estimate_s: float | None = None) -> list:
        """Train until cfg.epochs or early stopping; on_epoch(trainer, record) runs after each epoch. deadline
        (time.monotonic()): start no epoch that would end after it, judged by the last epoch's wall time with on_epoch,
        before the first by epoch_estimate_s or the history's last epoch (with neither, one epoch runs)."""
        self.stopped_for_time = False
        last_epoch_s = epoch_estimate_s
        if last_epoch_s is None and self.history:
            last_epoch_s = self.history[-1].get("epoch_s", self.history[-1]["epoch_time"])
        while not self.finished:
            if deadline is not None and last_epoch_s is not None and time.monotonic() + last_epoch_s > deadline:
                self.stopped_for_time = True
                break
            started = time.monotonic()  # epoch_s: training and validation
            lr = self.optimizer.param_groups[0]["lr"]
            record = self.train_epoch()
            val = evaluate(self.model, self.val_loader, amp_dtype=self.val_amp_dtype)
            self.epoch += 1
            record = {"epoch": self.epoch, **record, "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
                      "epoch_s": time.monotonic() - started, "is_best": val["acc"] > self.best_acc}
            if record["is_best"]:
                self.best_acc, self.best_epoch = val["acc"], self.epoch
            self.bad_epochs = 0 if record["is_best"] else self.bad_epochs + 1
            self.history.append(record)
            if on_epoch is not None:
                on_epoch(self, record)
            last_epoch_s = time.monotonic() - started
        return self.history
