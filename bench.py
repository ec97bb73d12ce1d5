"""Measure our training pipeline against the usual PyTorch one, on one device, in one run.

    python bench.py [--device auto|cpu|cuda|cuda:N|mps] [--json FILE] [--quick] [--amp auto|bf16|fp16|off]

1. augmentation alone: our batched per-sample pipeline vs torchvision's PIL transforms in a
   DataLoader with one worker per core;
2. the model step alone (forward, backward, optimizer step) in the precision training uses
   (train.resolve_amp: fp32 on CPU and MPS, bf16 on GPUs that run it natively, fp16 with loss
   scaling on older ones): images/s and MFU, the achieved FLOP/s over this device's dense matmul
   peak measured in that same precision, next to timm's VisionTransformer of the same shape when
   timm is installed (`pip install timm`; optional);
3. a real training epoch end to end: ours vs the PIL DataLoader feeding the same model in the same
   precision, with the same (fused or not) AdamW and gradient clipping, so that their ratio
   measures the data pipelines alone;
4. the peak memory of each (RSS on CPU, torch.cuda.max_memory_allocated on a CUDA GPU, the MPS
   driver's allocation on a Mac);
5. the operations a whole training step of the seed's configuration dispatches (configs/seed_recipe.json,
   augmentation's share included), counted by torch.profiler, eager and compiled (--ops; --ops-only
   counts and stops): on a CPU, counted in bf16, they stand in for the kernels a GPU launches, which a
   GPU counts too.
Our side and the usual side each run in their own fresh process, taking turns (never at once); each
peak memory and each operation count is measured in a fresh process of its own. --images and
--rounds make a run smaller still than --quick (check_gpu.py's CPU smoke test).

    python bench.py --grid --json grid.json

times instead every configuration of stage 1's search space as a stage runs it (check_gpu.py
projects the plan's time from them).
"""

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from augment import train_transform
from data import AUGMENT_CHUNK, DataError, load_cifar10, loss_fn
from train import (AMP_MODES, FUSED_DEVICES, TrainConfig, Trainer, evaluate, make_optimizer, pick_device,
                   resolve_amp)
from vit import ViT, count_flops

SEED_BEST = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4)
LARGEST = dict(patch_size=2, embed_dim=192, depth=6, num_heads=4)
BATCH = 128
PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def use_device(name: str) -> torch.device:
    """pick_device, and cuda:N made this process's current CUDA device: whatever torch places on
    "the current device" when no index is named (a DataLoader's pinning thread, any call left
    without a device argument) then lands on the GPU under test, not on GPU 0."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def sync(device):
    """Wait for the device's queued work, so that a wall clock times it (a CPU runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device) -> str:
    """The device in words: the GPU's name, the Mac's chip, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        chip = _sysctl("machdep.cpu.brand_string")
        return f"Apple GPU (MPS){f', {chip}' if chip else ''}"
    if device.type == "cpu":
        return cpu_model() or platform.processor() or platform.machine() or "cpu"
    return str(device)


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # not Linux
        return _sysctl("machdep.cpu.brand_string")


MEMORY_KIND = {"cpu": "RSS", "cuda": "max allocated", "mps": "MPS driver allocated"}


def peak_memory_mb(device) -> float:
    """This process's peak memory for the device's kind (MEMORY_KIND says which figure).

    MPS keeps no peak; the driver's allocation at the end stands in for it: the caching allocator
    keeps what it once held, so after a run that is close to the run's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return peak_rss_mb()


def median_time(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, quick: bool, dtype: torch.dtype | None = None) -> float:
    """Dense matmul FLOP/s, the best of a few sizes, in dtype (None: fp32): the precision the
    training step runs in, so that MFU compares the step with what the card does in that precision."""
    # On a CPU the three sizes peak within noise of each other (MEASURED.md); --quick leaves out 4096,
    # three quarters of the time.
    sizes = ((1024, 2048) if quick else (1024, 2048, 4096)) if device.type == "cpu" else (4096, 8192)
    dtype = dtype or torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        t = median_time(lambda: a @ b, device, warmup=2, reps=5 if quick else 20)
        best = max(best, 2 * n**3 / t)
    return best


def images(data_dir: str, n: int):
    """n training images and labels: real CIFAR-10 if present, else random (same cost)."""
    try:
        ds = load_cifar10(data_dir, download=False)
        return ds.train_images[:n].clone(), ds.train_labels[:n].clone(), "CIFAR-10"
    except DataError:
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (n,), generator=g), "random images")


# ----------------------------------------------------------------------------- the usual pipeline


class PILDataset(torch.utils.data.Dataset):
    """CIFAR-10 as torchvision tutorials feed it: one PIL image at a time through Compose."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from torchvision import transforms as T

        from augment import CIFAR10_MEAN, CIFAR10_STD

        self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y.numpy()  # HWC for PIL
        self.transform = T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandAugment(num_ops=2, magnitude=9),
            T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def pil_loader(x, y, device):
    workers = os.cpu_count() or 1
    return torch.utils.data.DataLoader(PILDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=True,
                                       pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- the measurements


def bench_aug(x, device, quick):
    x = x.to(device)
    batch = x[:AUGMENT_CHUNK]  # the chunk size DeviceLoader augments at once
    t = median_time(lambda: train_transform(batch), device, warmup=3, reps=10 if quick else 50)
    return len(batch) / t


def bench_baseline_aug(x, y, device, quick):
    loader = pil_loader(x, y, device)
    it = iter(loader)
    for _ in range(2 * loader.num_workers):  # workers start and fill their queues
        next(it)
    n = 10 if quick else 40
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * BATCH / (time.perf_counter() - t0)


def step_settings(device, amp: str = "auto") -> dict:
    """The training step's settings that the contenders share: the autocast dtype (None: fp32) as
    Trainer resolves it, and whether AdamW is fused, as Trainer chooses by default. Our bare model
    steps and both end-to-end sides take both (timm's step the precision only, its AdamW as a user
    sets it up), so that the end-to-end ratio measures the data pipelines alone and MFU the
    precision training really runs in."""
    return {"amp_dtype": resolve_amp(device, amp), "fused": device.type in FUSED_DEVICES}


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device, amp_dtype=None):
    """Forward, backward and optimizer step on one ready batch, under autocast to amp_dtype (None:
    fp32), fp16 with loss scaling as Trainer does it."""
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def step():
        with autocast(device, amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)  # a disabled scaler calls opt.step() and nothing else
        scaler.update()

    return step


def step_flops(shape: dict) -> int:
    """Training FLOPs per image: backward = 2x forward."""
    return 3 * count_flops(TrainConfig(**shape).vit_config())


def make_step(shape: dict, device, amp: str = "auto"):
    """Our model's step, set up as Trainer does (whole batches: no CPU micro-batching)."""
    cfg, settings = TrainConfig(**shape), step_settings(device, amp)
    torch.manual_seed(0)
    model = ViT(cfg.vit_config()).to(device).train()
    opt = make_optimizer(model, cfg, fused=settings["fused"])
    return train_step(model, opt, device, settings["amp_dtype"])


def make_timm_step(shape: dict, device, amp: str = "auto"):
    """The reference for the model step: timm's VisionTransformer of the same shape and stochastic
    depth, with torch's default AdamW, as a user would set it up. None when timm is not installed."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=shape["patch_size"], embed_dim=shape["embed_dim"],
                              depth=shape["depth"], num_heads=shape["num_heads"], num_classes=10,
                              drop_path_rate=TrainConfig().drop_path).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=(device.type == "cuda") or None)
    return train_step(model, opt, device, step_settings(device, amp)["amp_dtype"])


def step_rate(step, device, steps: int) -> float:
    """Images/s over a block of consecutive steps: like an epoch, it pays for the occasional slow step."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


def our_trainer(x, y, device, amp: str = "auto") -> Trainer:
    """Our side of the end-to-end comparison: the Trainer as the stages use it, on x."""
    cfg = TrainConfig(**SEED_BEST, batch_size=BATCH)
    return Trainer(cfg, x.to(device), y.to(device), x[:BATCH].to(device), y[:BATCH].to(device), device,
                   amp=amp, fused=step_settings(device, amp)["fused"], progress=False)


class Baseline:
    """The usual pipeline: the PIL DataLoader feeding the same model, eager, with our Trainer's
    training step (the same autocast dtype, loss scaling, fused or unfused AdamW and gradient
    clipping): what differs from ours is the data pipeline alone."""

    def __init__(self, x, y, device, amp: str = "auto"):
        self.cfg = TrainConfig(**SEED_BEST, batch_size=BATCH)
        settings = step_settings(device, amp)
        self.amp_dtype, self.fused = settings["amp_dtype"], settings["fused"]
        torch.manual_seed(0)
        self.model = ViT(self.cfg.vit_config()).to(device).train()
        self.opt = make_optimizer(self.model, self.cfg, fused=self.fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loader, self.device = pil_loader(x, y, device), device

    def epoch(self) -> float:
        sync(self.device)
        t0, seen = time.perf_counter(), 0
        for xb, yb in self.loader:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            with autocast(self.device, self.amp_dtype):
                logits = self.model(xb)
            loss = loss_fn(logits.float(), yb, self.cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            seen += len(yb)
        sync(self.device)
        return seen / (time.perf_counter() - t0)


def contender(side: str, conn, data_dir: str, n: int, device_arg: str, largest_steps: int, amp: str = "auto"):
    """One side of the end-to-end comparison, alone in a fresh process, running what the parent
    names and answering its images/s. "ours": our Trainer (which, on a CPU, tunes the process's
    allocator), our bare model step and (unless largest_steps is 0) the largest shape's; "usual":
    the PIL DataLoader baseline and timm's model step, in a process as Python starts it."""
    device = use_device(device_arg)
    x, y, _ = images(data_dir, n)
    x, y, steps = x[:n], y[:n], n // BATCH
    if side == "ours":
        trainer = our_trainer(x, y, device, amp)
        step = make_step(SEED_BEST, device, amp)
        runs = {"ours": lambda: trainer.train_epoch()["train_img_s"], "step": lambda: step_rate(step, device, steps)}
        if largest_steps:
            largest = make_step(LARGEST, device, amp)
            runs["step_largest"] = lambda: (largest(), step_rate(largest, device, largest_steps))[1]  # 1 warm-up
    else:
        runs = {"baseline": Baseline(x, y, device, amp).epoch}
        timm_step = make_timm_step(SEED_BEST, device, amp)
        if timm_step is not None:
            runs["timm_step"] = lambda: step_rate(timm_step, device, steps)
    conn.send(list(runs))
    while (name := conn.recv()) is not None:
        conn.send(runs[name]())


def bench_e2e(data_dir: str, n: int, device_arg: str, rounds: int, largest_steps: int, amp: str = "auto") -> dict:
    """Ours, the baseline and the bare model steps (timm's too, if installed), measured in turns, so
    that the drift of a shared machine (10-15 % here) hits all alike, in a new seeded order each round,
    so that none always runs after the same neighbour. Each side lives in its own process (see
    `contender`), so the baseline runs with none of our settings. Figures are medians over the rounds;
    ratios are medians of each round's ratio, both sides of which ran within seconds of each other."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited from this one
    owner, procs = {}, []
    for side in ("ours", "usual"):  # one after the other: setting up does not overlap
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=contender, args=(side, child_conn, data_dir, n, device_arg, largest_steps, amp))
        proc.start()
        procs.append((proc, conn))
        owner.update((name, conn) for name in conn.recv())

    def run(name):
        owner[name].send(name)
        return owner[name].recv()

    names = [k for k in owner if k != "step_largest"]
    rates = {k: [] for k in names}
    for i in range(1 + rounds):  # round 0 warms everything up and is not counted
        for k in random.Random(i).sample(names, len(names)):
            rate = run(k)
            rates[k] += [rate] if i else []
    result = {k: statistics.median(v) for k, v in rates.items()}
    result["rounds"] = rates
    if "step_largest" in owner:
        result["step_largest"] = run("step_largest")

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    result["ours/baseline"], result["ours/step"] = paired("ours", "baseline"), paired("ours", "step")
    if "timm_step" in rates:
        result["step/timm"] = paired("step", "timm_step")
    for proc, conn in procs:
        conn.send(None)
        proc.join()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS


def memory_child(kind: str, data_dir: str, device, n: int, amp: str = "auto") -> float:
    """Peak memory of a short training run, alone in this fresh process: all of CIFAR-10 loaded,
    as a stage-1 run has it, then one epoch of n images through our pipeline or the baseline."""
    x, y, _ = images(data_dir, 50000)
    x, y = x[:n], y[:n]
    if kind in ("ours", "largest"):
        shape = SEED_BEST if kind == "ours" else LARGEST
        val = min(1000, n)  # 1,000 but in a run smaller than that
        trainer = Trainer(TrainConfig(**shape, batch_size=BATCH), x.to(device), y.to(device), x[:val].to(device),
                          y[:val].to(device), device, amp=amp, fused=step_settings(device, amp)["fused"],
                          progress=False)
        trainer.train_epoch()
        evaluate(trainer.model, trainer.val_loader)
    else:
        Baseline(x, y, device, amp).epoch()
    return peak_memory_mb(device)


def peak_memory(kind: str, device_arg: str, data_dir: str, n: int, amp: str = "auto") -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--device", device_arg,
           "--data-dir", data_dir, "--n", str(n), "--amp", amp]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- operations per step

SEED_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "seed_recipe.json")

# aten ops that launch no kernel of their own on a GPU: views, metadata and allocations, and wrappers whose
# work, when there is any, is a child op and counted as theirs (a real cast by .to is its _to_copy's copy_;
# .to to the same dtype, dropout at p = 0 and a reshape that views are nothing).
NO_KERNEL = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "transpose", "t", "permute", "expand", "expand_as",
    "select", "slice", "narrow", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "unfold",
    "alias", "detach", "detach_", "view_as", "diagonal", "movedim", "unflatten", "lift_fresh", "empty", "empty_like",
    "empty_strided", "resize_", "as_strided_", "set_", "resolve_conj", "resolve_neg", "result_type", "to", "type_as",
    "contiguous", "reshape", "flatten", "dropout", "clone", "_to_copy"))
# CUDA runtime calls that start work on the GPU (their names' starts: versions add suffixes): kernels, and a
# whole CUDA graph as one.
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchCooperativeKernel")


def count_dispatched(events) -> dict:
    """A profile's operations: "ops", the outermost aten calls (from Python, the autograd engine or a compiled
    graph) that do work, themselves or through a child, plus each fused C++ kernel of a compiled graph (a
    profiler event of its own once inductor's cpp.enable_kernel_profile is set); and, where the profile has
    CUDA's runtime calls, "kernel_launches". On a CPU the ops stand in for the kernels a GPU would launch; on
    a GPU a compiled graph's Triton kernels are no event of their own, so there only the launches count them."""
    memo = {}

    def works(e) -> bool:
        if id(e) not in memo:
            # Other events (autograd's names, record_function's) are no work themselves; a kernel is.
            itself = e.name not in NO_KERNEL if e.name.startswith("aten::") else "cpp_fused" in e.name
            memo[id(e)] = itself or any(works(c) for c in e.cpu_children)
        return memo[id(e)]

    def inside_aten(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    ops = sum(1 for e in events if (e.name.startswith("aten::") and not inside_aten(e) and works(e))
              or "cpp_fused" in e.name)
    counts = {"ops": ops}
    launches = sum(1 for e in events if e.name.startswith(LAUNCHES))
    if launches:
        counts["kernel_launches"] = launches
    return counts


def seed_config(**changes) -> TrainConfig:
    """The seed's configuration (configs/seed_recipe.json): patch 4, width 128, depth 6, 4 heads, batch 128,
    drop-path 0.1, RandAugment(2, 9)."""
    with open(SEED_RECIPE) as f:
        return TrainConfig.from_dict({**json.load(f), **changes})


def ops_amp(device, amp: str) -> str:
    """The precision operations are counted in: the bench's, except that a CPU under auto counts in bf16,
    since its count stands in for a GPU's launches and a GPU trains in bf16 (autocast adds the casts)."""
    return "bf16" if amp == "auto" and device.type != "cuda" else amp


def step_ops(cfg: TrainConfig, device, amp: str = "auto", compile: str = "off") -> dict:
    """Operations dispatched per training step, as the Trainer runs it: augmentation's share, forward,
    backward, clipping, the optimizer's and the schedule's steps and the metrics. One epoch over as many
    images as DeviceLoader augments in one call (so that the augmentation's calls per step are the real
    ones) is profiled after one that warms up (the optimizer's state; compiling), and its total divided
    by its steps; the epoch's own few ops (the shuffle, the sums' start and end) ride along."""
    import torch._inductor.config  # patched below; imported here, where it is needed
    from torch.profiler import ProfilerActivity, profile

    n = max(1, AUGMENT_CHUNK // cfg.batch_size) * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = (torch.arange(n) % 10).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": compile != "off"}):
        trainer = Trainer(cfg, x, y, x[:cfg.batch_size], y[:cfg.batch_size], device, amp=amp, compile=compile,
                          fused=step_settings(device, amp)["fused"], progress=False)
        trainer.train_epoch()
        sync(device)
        with profile(activities=activities) as prof:
            trainer.train_epoch()
            sync(device)
    steps = len(trainer.train_loader)
    return {"steps": steps, **{k: v / steps for k, v in count_dispatched(prof.events()).items()}}


OPS_MODES = {"off": (), "eager": ("off",), "both": ("off", "default")}  # --ops: which steps are counted


def ops_figures(device, amp: str = "auto", which: str = "both", cfg: TrainConfig | None = None) -> dict:
    """step_ops of the seed's configuration (or cfg), eager and (with which="both") compiled by torch.compile's
    default mode, each in a fresh process, so that neither inherits the other's compiled code or the bench's
    warm caches."""
    cfg = cfg or seed_config()
    r = {"ops_precision": PRECISION[resolve_amp(device, ops_amp(device, amp))],
         "ops_shape": {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "batch_size",
                                                     "drop_path")}}
    for mode in OPS_MODES[which]:
        counts = _in_child("ops", device, ops_amp(device, amp), {"config": cfg.to_dict(), "compile": mode})
        name = "eager" if mode == "off" else "compiled"
        r[f"ops_per_step_{name}"] = counts["ops"]
        if "kernel_launches" in counts:
            r[f"launches_per_step_{name}"] = counts["kernel_launches"]
    return r


def _in_child(kind: str, device, amp: str, job: dict) -> dict:
    """Run job in a fresh process of this script (--child KIND --job JSON) and return the JSON it prints last."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--device", str(device), "--amp", amp,
           "--job", json.dumps(job)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench.py --child {kind} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the search space's step times

# Categorical choices of the search space that cost nothing per step (the schedule's shape), and those
# measured at their costliest (Mixup on: every batch mixed).
COST_FREE, AT_MOST = ("scheduler",), ("mixup_alpha",)


class _Proposer:
    """Stands in for an Optuna trial: proposes the given categorical values (else the first choice) and a
    range's low end, and notes the choices, so that stage 1's suggest_config, the search space's one
    definition, both lists the space and builds each of its configurations."""

    def __init__(self, values: dict | None = None):
        self.values, self.choices = values or {}, {}

    def suggest_categorical(self, name, choices):
        self.choices[name] = list(choices)
        return self.values.get(name, choices[0])

    def suggest_float(self, name, low, high, log=False):
        return low

    def suggest_int(self, name, low, high, step=1, log=False):
        return low


def costliest_recipe() -> TrainConfig:
    """Whatever either stage runs that costs time per step, all on: stage 2's long recipe (CutMix, random
    erasing, label smoothing) with every batch mixed, as stage 1's mix_prob 1 does. A step measured with it
    is at least as long as one of either stage's, up to a few small ops (CutMix or Mixup, one per batch)."""
    from train import LONG_RECIPE

    return TrainConfig(**{**LONG_RECIPE, "mix_prob": 1.0})


def search_grid() -> list:
    """Every configuration of the search space that differs in a step's cost: each combination of its
    categorical choices (shape, batch size, optimizer), those in AT_MOST at their largest, on the costliest
    recipe. lr and the schedule change no step's cost."""
    import itertools

    from stage1_search import suggest_config

    base = costliest_recipe()
    probe = _Proposer()
    suggest_config(probe, base)
    fixed = {name: max(probe.choices[name]) for name in AT_MOST if name in probe.choices}
    names = [n for n in probe.choices if n not in COST_FREE and n not in fixed]
    return [suggest_config(_Proposer({**fixed, **dict(zip(names, values))}), base)
            for values in itertools.product(*(probe.choices[n] for n in names))]


GRID_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "batch_size", "optimizer")


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def config_times(cfg: TrainConfig, device, amp: str, images: int, val_images: int, folder: str) -> dict:
    """One configuration's per-trial and per-epoch costs as a stage runs them, through the Trainer: setup_s
    (building it: the model, its weights, the optimizer), step_s (a whole training step, augmentation and
    mixing included: each of two epochs of `images` over its steps, after a first one), val_s (one
    validation of val_images), warmup_s (what the first epoch and validation took beyond the later ones),
    save_s (one checkpoint written, as each epoch writes last.pt)."""
    from checkpoint import save_checkpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images + val_images, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = (torch.arange(images + val_images) % 10).to(device)
    trainer = None

    def build():
        nonlocal trainer
        trainer = Trainer(cfg, x[:images], y[:images], x[images:], y[images:], device, amp=amp, progress=False)

    def validate():
        evaluate(trainer.model, trainer.val_loader)

    setup_s = _timed(build, device)
    first = _timed(trainer.train_epoch, device) + _timed(validate, device)
    epochs = [_timed(trainer.train_epoch, device) for _ in range(2)]
    val_s = min(_timed(validate, device) for _ in range(2))
    steps = len(trainer.train_loader)
    save_s = _timed(lambda: save_checkpoint(trainer.state_dict(), os.path.join(folder, "last.pt")), device)
    return {**{k: getattr(cfg, k) for k in GRID_KEYS}, "setup_s": setup_s, "steps": steps,
            "step_s": [t / steps for t in epochs], "val_s": val_s,
            "warmup_s": max(0.0, first - statistics.mean(epochs) - val_s), "save_s": save_s}


def grid_times(device, amp: str = "auto", tiny: bool = False) -> dict:
    """config_times of every configuration in search_grid: epochs of two augmentation calls' images, and a
    stage's 5,000 validation images (on a CPU 500, scaled up). tiny: a smoke test's run, which checks that
    everything runs and whose times mean nothing: the configurations of the cheapest shape alone, batches
    a 16th of the size, one step an epoch, 16 validation images."""
    import tempfile

    val_images = 16 if tiny else 500 if device.type == "cpu" else 5000
    grid = search_grid()
    if tiny:
        cheapest = (max(c.patch_size for c in grid), min(c.embed_dim for c in grid), min(c.depth for c in grid),
                    min(c.num_heads for c in grid))
        grid = [c for c in grid if (c.patch_size, c.embed_dim, c.depth, c.num_heads) == cheapest]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for cfg in grid:
            if tiny:
                cfg = TrainConfig.from_dict({**cfg.to_dict(), "batch_size": max(1, cfg.batch_size // 16)})
            n = cfg.batch_size if tiny else 2 * max(1, AUGMENT_CHUNK // cfg.batch_size) * cfg.batch_size
            row = config_times(cfg, device, amp, n, val_images, folder)
            row["val_s"] *= 5000 / val_images
            print(f"  {_grid_name(row)}: {1e3 * statistics.mean(row['step_s']):.1f} ms a step, validation "
                  f"{row['val_s']:.2f} s, setup {row['setup_s']:.2f} s, first epoch +{row['warmup_s']:.2f} s, "
                  f"checkpoint {row['save_s']:.2f} s", flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": device_name(device), "precision": PRECISION[resolve_amp(device, amp)],
            "recipe": "costliest (stage 2's long recipe with Mixup and CutMix on every batch)",
            "tiny": tiny, "val_images_timed": val_images, "configs": rows}


def _grid_name(row: dict) -> str:
    return (f"patch {row['patch_size']}, width {row['embed_dim']}, depth {row['depth']}, {row['num_heads']} heads, "
            f"batch {row['batch_size']}, {row['optimizer']}")


def measure(device, device_arg: str, data_dir: str, quick: bool, images_n: int | None = None,
            rounds: int | None = None, amp: str = "auto", largest: bool = True, ops: str | None = None) -> dict:
    """Every figure of the bench, as main's JSON holds them. device_arg: the --device text, for the
    child processes; images_n and rounds: per end-to-end turn and counted rounds (None: the
    defaults); largest: also the search space's largest shape (its step and its peak memory); ops:
    which training steps' operations are counted (OPS_MODES; None: eager with quick, else both)."""
    cpu = device.type == "cpu"
    e2e_n = images_n or ((1536 if quick else 4096) if cpu else 45000)
    rounds = rounds or (5 if quick else 9)
    amp_dtype = step_settings(device, amp)["amp_dtype"]
    precision = PRECISION[amp_dtype]
    x, y, source = images(data_dir, 50000)  # all: batches enough for any number of PIL workers
    name = device_name(device)
    threads = f", {torch.get_num_threads()} threads" if cpu else ""
    print(f"device {device} ({name}{threads}), torch {torch.__version__}, {source}, training precision {precision}",
          flush=True)
    r = {"device": "cpu" if cpu else name, "device_name": name, "device_type": device.type, "torch": torch.__version__,
         "data": source, "precision": precision, "fused_adamw": step_settings(device, amp)["fused"],
         "e2e_images": e2e_n}
    peak = matmul_peak(device, quick, amp_dtype)
    r["matmul_peak_tflops"], r["matmul_peak_dtype"] = peak / 1e12, precision
    r["aug_img_s"] = bench_aug(x, device, quick)
    r["baseline_aug_img_s"] = bench_baseline_aug(x, y, device, quick)
    e2e = bench_e2e(data_dir, e2e_n, device_arg, rounds=rounds,
                    largest_steps=min(2 if cpu and quick else 8, max(1, e2e_n // BATCH)) if largest else 0, amp=amp)
    flops, flops_largest = step_flops(SEED_BEST), step_flops(LARGEST)
    r["step_img_s"], r["step_mfu"] = e2e["step"], flops * e2e["step"] / peak
    if "timm_step" in e2e:  # same shape, same FLOPs
        r["step_img_s_timm"], r["step_mfu_timm"] = e2e["timm_step"], flops * e2e["timm_step"] / peak
        r["step_over_timm"] = e2e["step/timm"]
    if largest:
        r["step_img_s_largest"] = e2e["step_largest"]
        r["step_mfu_largest"] = flops_largest * e2e["step_largest"] / peak
    r["e2e_img_s"], r["baseline_e2e_img_s"] = e2e["ours"], e2e["baseline"]
    r["e2e_ratio"], r["e2e_over_step"] = e2e["ours/baseline"], e2e["ours/step"]
    r["rounds_img_s"] = e2e["rounds"]  # every counted round, for the spread behind the medians
    r["peak_mem_kind"] = MEMORY_KIND.get(device.type, "RSS")
    r["peak_mem_mb"] = peak_memory("ours", device_arg, data_dir, e2e_n, amp)
    r["baseline_peak_mem_mb"] = peak_memory("baseline", device_arg, data_dir, e2e_n, amp)
    if largest:  # a stage-1 trial of the search space's largest shape: the peak memory of a whole search
        largest_n = min(2 * BATCH, e2e_n) if cpu and quick else e2e_n
        r["peak_mem_mb_largest"] = peak_memory("largest", device_arg, data_dir, largest_n, amp)
    r.update(ops_figures(device, amp, ops or ("eager" if quick else "both")))
    return r


def ops_rows(r: dict) -> list:
    """The operation counts' rows of the table: those measured."""
    rows = []
    for name in ("eager", "compiled"):
        if f"ops_per_step_{name}" in r:
            launches = r.get(f"launches_per_step_{name}")
            rows.append((f"operations per step, {name}", f"{r[f'ops_per_step_{name}']:,.1f}",
                         f"{launches:,.1f} kernel launches" if launches is not None
                         else f"seed's shape, {r['ops_precision']}"))
    return rows


def table(r: dict) -> str:
    """The figures as a Markdown table."""
    mem, precision = r["peak_mem_kind"], r["precision"]
    optimizer = "fused AdamW" if r["fused_adamw"] else "AdamW"
    rows = [
        ("matmul peak", f"{r['matmul_peak_tflops'] * 1e3:,.0f} GFLOP/s", r["matmul_peak_dtype"]),
        ("augmentation, ours", f"{r['aug_img_s']:,.0f} img/s", f"{r['aug_img_s'] / r['baseline_aug_img_s']:.1f}x baseline"),
        ("augmentation, PIL DataLoader", f"{r['baseline_aug_img_s']:,.0f} img/s", f"{os.cpu_count()} workers"),
        ("model step, seed's best shape", f"{r['step_img_s']:,.0f} img/s", f"MFU {100 * r['step_mfu']:.1f} %, {precision}"),
        ("model step, timm reference", f"{r['step_img_s_timm']:,.0f} img/s" if "step_img_s_timm" in r else "-",
         f"MFU {100 * r['step_mfu_timm']:.1f} %, ours {r['step_over_timm']:.2f}x" if "step_img_s_timm" in r
         else "timm not installed"),
        ("model step, largest shape", f"{r['step_img_s_largest']:,.0f} img/s" if "step_img_s_largest" in r else "-",
         f"MFU {100 * r['step_mfu_largest']:.1f} %" if "step_img_s_largest" in r else "not measured"),
        ("end to end, ours", f"{r['e2e_img_s']:,.0f} img/s", f"{100 * r['e2e_over_step']:.1f} % of model step"),
        ("end to end, PIL DataLoader", f"{r['baseline_e2e_img_s']:,.0f} img/s", f"ours / baseline = {r['e2e_ratio']:.2f}x"),
        ("  (both: the same step)", "", f"{precision}, {optimizer}, clip"),
        (f"peak memory ({mem}), ours", f"{r['peak_mem_mb']:,.0f} MB", ""),
        (f"peak memory ({mem}), baseline", f"{r['baseline_peak_mem_mb']:,.0f} MB", ""),
        (f"peak memory ({mem}), largest shape",
         f"{r['peak_mem_mb_largest']:,.0f} MB" if "peak_mem_mb_largest" in r else "-", "training + validation"),
    ]
    rows += ops_rows(r)
    lines = [f"| {'measurement':<34} | {'figure':>16} | {'note':<28} |", f"|{'-' * 36}|{'-' * 18}:|{'-' * 30}|"]
    lines += [f"| {name:<34} | {fig:>16} | {note:<28} |" for name, fig, note in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and images (under 5 minutes on 2 CPU cores)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="precision of the model steps and of both end-to-end contenders, and so of the matmul "
                        "peak that MFU divides by, as training resolves it (default: auto, what training uses)")
    p.add_argument("--images", type=int, default=None, metavar="N",
                   help=f"images per end-to-end turn and memory run, at least {BATCH} (default: 45,000 on a GPU; "
                        "on a CPU 4,096, with --quick 1,536)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="counted end-to-end rounds, after one that warms up (default: 9, with --quick 5)")
    p.add_argument("--no-largest", action="store_true",
                   help="leave out the search space's largest shape (its step and peak memory): on a CPU the "
                        "slowest part of a small run (default: measured)")
    p.add_argument("--ops", choices=list(OPS_MODES), default=None,
                   help="count the operations a training step of the seed's configuration dispatches (torch.profiler; "
                        "on a CPU, in bf16, a stand-in for a GPU's kernel launches, which a GPU also counts): off, "
                        "eager, or both eager and compiled (one torch.compile, 30-60 s) (default: both; with --quick "
                        "eager)")
    p.add_argument("--ops-only", action="store_true",
                   help="only count the operations (--ops, default both), print them and stop")
    p.add_argument("--grid", action="store_true",
                   help="only time every configuration of stage 1's search space (shape, batch, optimizer) as a "
                        "stage runs it: setup, a training step, a validation of 5,000 images, the first epoch's "
                        "warm-up, a checkpoint; check_gpu.py projects the plan from them (--json keeps them)")
    p.add_argument("--grid-tiny", action="store_true", help=argparse.SUPPRESS)  # --grid's smoke test: tiny runs
    p.add_argument("--data-dir", default="data", help="CIFAR-10 folder; random images if absent (default: data)")
    p.add_argument("--child", choices=["ours", "baseline", "largest", "ops"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--job", default="{}", help=argparse.SUPPRESS)  # a child's work, as JSON
    args = p.parse_args(argv)
    if args.images is not None and args.images < BATCH:
        p.error(f"--images must be at least {BATCH} (one batch), got {args.images}")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.child == "ops":
        job = json.loads(args.job)
        print(json.dumps(step_ops(TrainConfig.from_dict(job["config"]), use_device(args.device), args.amp,
                                  job["compile"])))
        return
    if args.child:
        device = use_device(args.device)
        print(memory_child(args.child, args.data_dir, device, args.n, args.amp))
        return
    from cli import resolve_device  # its one-line errors; only here, children need not import it

    try:
        resolve_device(args.device)
    except DataError as e:
        sys.exit(f"error: {e}")
    device = use_device(args.device)
    if args.grid:
        r = grid_times(device, args.amp, tiny=args.grid_tiny)
    elif args.ops_only:
        r = ops_figures(device, args.amp, args.ops or "both")
        print("\n".join(f"{name}: {fig} ({note})" for name, fig, note in ops_rows(r)))
    else:
        r = measure(device, args.device, args.data_dir, args.quick, args.images, args.rounds, args.amp,
                    largest=not args.no_largest, ops=args.ops)
        print("\n" + table(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
