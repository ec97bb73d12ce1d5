"""The one training loop both stages share: model, optimizer, schedule, epochs, early stopping.

Stage 1 adds pruning through `on_epoch`; stage 2 adds checkpoints, TensorBoard and reports the
same way. Everything a run needs to continue exactly lives in `Trainer.state_dict()`.
"""

import ctypes
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from augment import MAGNITUDE_BINS
from data import DeviceLoader, loss_fn, mixup
from vit import ViT, ViTConfig


@dataclass
class TrainConfig:
    # model (the search space's part of ViTConfig; the rest keeps ViTConfig's defaults)
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    drop_path: float = 0.0  # stochastic depth; off: 0.1 cost 1.9 points at the proxy budget (docs/recipe.md)
    pool: str = "cls"  # the head reads the paper's class token; "mean" (of the patch tokens) cost 1.3 points
    # optimisation
    optimizer: str = "adamw"  # "adamw" or "sgd" (with Nesterov momentum 0.9)
    lr: float = 5.8e-4  # peak learning rate, reached after warmup (SGD: times sgd_lr_scale)
    sgd_lr_scale: float = 100.0  # SGD's lr = lr x this: the searched 1e-5..1e-3 becomes 1e-3..0.1, SGD's range
    label_smoothing: float = 0.0  # train against (1 - eps) one-hot + eps / 10; off: no gain at the proxy budget (docs/recipe.md)
    weight_decay: float = 0.01  # AdamW's decoupled decay (torch's default; 0.05 gained nothing); SGD: / 10, coupled
    scheduler: str = "cosine"  # "cosine" to zero, or "step": x0.1 at 50 % and 75 % of the epochs
    warmup_epochs: int = 2  # linear warmup: +5.8 points at the proxy budget, the one change that paid
    grad_clip: float = 0.0  # max global gradient norm; off: clipping at 1 cost 1.4 points at the proxy budget
    augment: bool = True  # crop and flip (and RandAugment if randaug_ops > 0); off only for quick sanity runs
    randaug_ops: int = 0  # RandAugment ops per image; off: 2 (torchvision's default) cost 2.7 points at the proxy
    randaug_magnitude: int = 9  # RandAugment strength, of 31 bins (torchvision's default; 5 gained 0.6, in the spread)
    batch_size: int = 128
    mixup_alpha: float = 0.0  # 0 turns mixup off
    epochs: int = 20  # the schedule's length; early stopping may end sooner
    patience: int = 6  # epochs without a better validation accuracy before stopping
    # data
    subset_ratio: float = 1.0  # share of the 45,000 training images used (stage 1 proxies: 0.2)
    seed: int = 0  # seeds the split, the init, the shuffling and the augmentation

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "step"):
            raise ValueError(f"scheduler must be 'cosine' or 'step', got {self.scheduler!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.sgd_lr_scale > 0:
            raise ValueError(f"sgd_lr_scale must be positive, got {self.sgd_lr_scale}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0.0 <= self.drop_path < 1.0:
            raise ValueError("warmup_epochs, weight_decay and grad_clip must be >= 0 and drop_path in [0, 1), got "
                             f"{self.warmup_epochs}, {self.weight_decay}, {self.grad_clip}, {self.drop_path}")
        if self.randaug_ops < 0 or not 0 <= self.randaug_magnitude < MAGNITUDE_BINS:
            raise ValueError(f"randaug_ops must be >= 0 and randaug_magnitude in 0..{MAGNITUDE_BINS - 1}, got "
                             f"{self.randaug_ops}, {self.randaug_magnitude}")
        for name in ("batch_size", "epochs", "patience"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.vit_config()  # the model's own checks, raised now rather than mid-run

    def vit_config(self) -> ViTConfig:
        return ViTConfig(
            patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, drop_path=self.drop_path, pool=self.pool,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, ignoring keys that are not fields (e.g. a trial's extra attributes)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


# The recipe around the searched dimensions: one flag each, so that any choice can be switched off.
RECIPE_FLAGS = {
    "label_smoothing": (float, "label smoothing of the training targets; 0 turns it off"),
    "warmup_epochs": (int, "epochs of linear learning-rate warmup; 0 turns it off"),
    "weight_decay": (float, "AdamW's decoupled weight decay (SGD: a tenth of it, coupled); 0 turns it off"),
    "drop_path": (float, "stochastic depth rate of the last block; 0 turns it off"),
    "grad_clip": (float, "max global gradient norm; 0 turns clipping off"),
    "sgd_lr_scale": (float, "SGD's learning rate is the configured lr times this; 1 turns it off"),
    "pool": (str, "what the head classifies: cls (the class token) or mean (the average of the patch tokens)"),
    "randaug_ops": (int, "RandAugment ops per training image; 0 turns RandAugment off (crop and flip stay)"),
    "randaug_magnitude": (int, f"RandAugment magnitude, 0..{MAGNITUDE_BINS - 1} (torchvision's bins)"),
}


def add_recipe_flags(parser):
    """--label-smoothing, --warmup-epochs, ...: each overrides its TrainConfig field (default: the field's)."""
    group = parser.add_argument_group("recipe (defaults chosen by ablation; docs/recipe.md)")
    defaults = TrainConfig()
    for name, (kind, text) in RECIPE_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper(),
                           help=f"{text} (default: {getattr(defaults, name)})")


def recipe_overrides(args, parser=None) -> dict:
    """The recipe fields given on the command line, as TrainConfig keyword arguments.

    With a parser, impossible values (--label-smoothing 1.5) end as its one-line usage error.
    """
    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name, None) is not None}
    if parser is not None:
        try:
            TrainConfig(**overrides)
        except ValueError as e:
            parser.error(str(e))
    return overrides


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch >= 2.4 has a fused AdamW kernel


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    # Decay only weight matrices: shrinking biases, norms and embeddings towards 0 only hurts.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in ("cls_token", "pos_embed") else decay).append(p)
    if cfg.optimizer == "adamw":
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay / 10}, {"params": no_decay, "weight_decay": 0.0}]
    # The search draws one lr range for both optimizers; SGD needs about 100x AdamW's step size.
    return torch.optim.SGD(groups, lr=cfg.lr * cfg.sgd_lr_scale, momentum=0.9, nesterov=True)


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


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    A CPU training step frees and reallocates hundreds of MB of activations. By default glibc
    unmaps big blocks and trims its heap once more than 64 MB is free at the top, so the next step
    page-faults the same memory back in. Measured on 2 cores for the seed's best shape: 650-6,000
    page faults a step (5-10 ms of kernel time, about 2 %) down to almost none. The setting is
    process-wide, and memory once used stays with the process: the bench's stage-1 trial of the
    largest shape peaked at 1,932-2,001 MB with it, 1,769-1,894 MB before (under 2.5 GB either way).
    True if glibc took the settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MB is glibc's largest mmap threshold on 64-bit: blocks up to it come from the heap.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


CPU_ACTIVATION_BUDGET = 2**30  # bytes of saved activations per micro-batch on a CPU


def cpu_micro_batch(cfg: TrainConfig) -> int:
    """Samples per forward/backward on a CPU, so that a stage-1 run stays under 2.5 GB of RAM.

    Saved activations take about 128 bytes per token, channel and block (measured: 37 MB per
    sample for patch 2, width 192, depth 6, i.e. 4.7 GB for a batch of 128). The seed's best
    shape fits whole (5.5 MB per sample); the largest shapes run as a few micro-batches, which
    costs nothing in speed on a CPU and gives the same gradients.
    """
    vit = cfg.vit_config()
    per_sample = 128 * (vit.num_patches + 1) * vit.embed_dim * vit.depth
    return max(1, min(cfg.batch_size, CPU_ACTIVATION_BUDGET // per_sample))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, amp: bool = False, return_preds: bool = False,
             tta: bool = False):
    """Mean loss and accuracy over every sample of the loader (and predictions and class probabilities,
    if asked). tta adds "tta_acc": the accuracy of averaging each image's and its mirror's logits;
    everything else stays the plain figure, from the same pass."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    tta_correct = torch.zeros((), device=device, dtype=torch.long)
    outs = []  # class probabilities with return_preds, else only the predicted classes
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            if tta:
                mirrored = (logits + model(x.flip(3))) / 2  # flip(3): the width axis of (B, C, H, W)
                tta_correct += (mirrored.argmax(1) == y).sum()
        loss_sum += loss_fn(logits.float(), y) * len(y)
        # Probabilities only when asked: a validation epoch needs just the argmax.
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


class Trainer:
    """Holds a run's model, optimizer, schedule and early-stopping state; `fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, train_images, train_labels, val_images, val_labels,
                 device: torch.device, amp: bool | None = None, fused: bool | None = None, compile: bool = False,
                 micro_batch: int | None = None, progress: bool = True, log_every_s: float = 30.0):
        # progress: a bar on a terminal; off a terminal (a log, a pipe) a line every log_every_s
        # seconds instead, so that a log shows the run is alive long before the epoch ends.
        self.cfg, self.device, self.progress, self.log_every_s = cfg, device, progress, log_every_s
        # bf16 autocast pays on GPUs; on a CPU without bf16 units bf16 is emulated and 4x slower.
        # None: on for CUDA only. Fused AdamW: one kernel instead of ~10 per tensor (CPU: 1.1 ms
        # instead of 4-5 ms a step for the seed's best shape).
        self.amp = device.type == "cuda" if amp is None else amp
        fused = device.type in FUSED_ADAMW_DEVICES if fused is None else fused
        if device.type == "cpu":
            keep_freed_memory()
        seed_everything(cfg.seed)
        self.train_loader = DeviceLoader(train_images, train_labels, cfg.batch_size, train=True, augment=cfg.augment,
                                         randaug_ops=cfg.randaug_ops, randaug_magnitude=cfg.randaug_magnitude)
        self.model = ViT(cfg.vit_config()).to(device)
        self.step_model = torch.compile(self.model) if compile else self.model
        self.optimizer = make_optimizer(self.model, cfg, fused=fused and cfg.optimizer == "adamw")
        self.micro_batch = micro_batch or (cfg.batch_size if device.type != "cpu" else cpu_micro_batch(cfg))
        # Inference keeps no activations, so 4x the training micro-batch fits the same memory.
        self.val_loader = DeviceLoader(val_images, val_labels, min(500, 4 * self.micro_batch), train=False)
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg, steps))
        self.epoch = 0  # epochs completed
        self.history = []  # one dict per completed epoch
        self.best_acc, self.best_epoch, self.bad_epochs = -1.0, 0, 0

    # -- checkpoints: everything needed to continue exactly where a run stopped
    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "early_stopping": {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs},
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        es = state["early_stopping"]
        self.best_acc, self.best_epoch, self.bad_epochs = es["best_acc"], es["best_epoch"], es["bad_epochs"]
        _set_rng_state(state["rng"])

    @property
    def stopped_early(self) -> bool:
        return self.bad_epochs >= self.cfg.patience

    def train_epoch(self) -> dict:
        model, cfg = self.step_model, self.cfg
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if self.progress else True, unit="batch")
        log_lines, last_log = self.progress and bar.disable, t0
        for i, (x, y) in enumerate(bar):
            x, targets = mixup(x, y, cfg.mixup_alpha)
            self.optimizer.zero_grad(set_to_none=True)
            # Gradients of micro-batches, each weighted by its share, add up to the whole batch's.
            for xm, tm, ym in zip(x.split(self.micro_batch), targets.split(self.micro_batch), y.split(self.micro_batch)):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = model(xm)
                loss = loss_fn(logits.float(), tm, cfg.label_smoothing) * (len(ym) / len(y))
                loss.backward()
                # Accumulate on the device: a .item() per step would stall a GPU.
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == ym).sum()  # with mixup: against the unmixed label
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            seen += len(y)
            if i % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
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

    def fit(self, on_epoch=None) -> list:
        """Train until cfg.epochs or early stopping. on_epoch(trainer, record) runs after each epoch
        (stage 1 reports to Optuna and may raise TrialPruned; stage 2 saves checkpoints)."""
        while self.epoch < self.cfg.epochs and not self.stopped_early:
            lr = self.optimizer.param_groups[0]["lr"]
            record = self.train_epoch()
            val = evaluate(self.model, self.val_loader, amp=self.amp)
            self.epoch += 1
            record = {"epoch": self.epoch, **record, "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr}
            record["is_best"] = val["acc"] > self.best_acc
            if record["is_best"]:
                self.best_acc, self.best_epoch, self.bad_epochs = val["acc"], self.epoch, 0
            else:
                self.bad_epochs += 1
            self.history.append(record)
            if on_epoch is not None:
                on_epoch(self, record)
        return self.history
