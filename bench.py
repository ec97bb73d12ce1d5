"""Measure our training pipeline against the usual PyTorch one, on one device, in one run.

    python bench.py [--device auto|cpu|cuda] [--json FILE] [--quick]

1. augmentation alone: our batched per-sample pipeline vs torchvision's PIL transforms in a
   DataLoader with one worker per core;
2. the model step alone (forward, backward, optimizer step): images/s and MFU, the achieved
   FLOP/s over this device's measured dense matmul peak (fp32 on CPU, bf16 on GPU), next to timm's
   VisionTransformer of the same shape when timm is installed (`pip install timm`; optional);
3. a real training epoch end to end: ours vs the PIL DataLoader feeding the same eager fp32 model;
4. the peak memory of each (RSS on CPU, torch.cuda.max_memory_allocated on GPU).
Our side and the usual side each run in their own fresh process, taking turns (never at once); each
peak memory is measured in a fresh process of its own.
"""

import argparse
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from augment import train_transform
from data import AUGMENT_CHUNK, DataError, load_cifar10
from train import FUSED_ADAMW_DEVICES, TrainConfig, Trainer, evaluate, make_optimizer, pick_device
from vit import ViT, count_flops

SEED_BEST = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4)
LARGEST = dict(patch_size=2, embed_dim=192, depth=6, num_heads=4)
BATCH = 128


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def matmul_peak(device, quick: bool) -> float:
    """Dense matmul FLOP/s, the best of a few sizes: fp32 on CPU (bf16 is emulated there), bf16 on
    GPU (what training uses)."""
    sizes, dtype = ((1024, 2048, 4096), torch.float32) if device.type == "cpu" else ((4096, 8192), torch.bfloat16)
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


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device):
    """Forward, backward and optimizer step on one ready batch: bf16 autocast on GPU, fp32 on CPU."""
    amp = device.type == "cuda"
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_flops(shape: dict) -> int:
    """Training FLOPs per image: backward = 2x forward."""
    return 3 * count_flops(TrainConfig(**shape).vit_config())


def make_step(shape: dict, device):
    """Our model's step, set up as Trainer does (whole batches: no CPU micro-batching)."""
    cfg = TrainConfig(**shape)
    torch.manual_seed(0)
    model = ViT(cfg.vit_config()).to(device).train()
    opt = make_optimizer(model, cfg, fused=device.type in FUSED_ADAMW_DEVICES)
    return train_step(model, opt, device)


def make_timm_step(shape: dict, device):
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
    return train_step(model, opt, device)


def step_rate(step, device, steps: int) -> float:
    """Images/s over a block of consecutive steps: like an epoch, it pays for the occasional slow step."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


class Baseline:
    """The usual pipeline: the PIL DataLoader feeding the same model, eager, fp32, default AdamW."""

    def __init__(self, x, y, device):
        cfg = TrainConfig(**SEED_BEST, batch_size=BATCH)
        torch.manual_seed(0)
        self.model = ViT(cfg.vit_config()).to(device).train()
        self.opt = make_optimizer(self.model, cfg)
        self.loader, self.device = pil_loader(x, y, device), device

    def epoch(self) -> float:
        sync(self.device)
        t0, seen = time.perf_counter(), 0
        for xb, yb in self.loader:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(self.model(xb), yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            seen += len(yb)
        sync(self.device)
        return seen / (time.perf_counter() - t0)


def contender(side: str, conn, data_dir: str, n: int, device_name: str, largest_steps: int):
    """One side of the end-to-end comparison, alone in a fresh process, running what the parent
    names and answering its images/s. "ours": our Trainer (which, on a CPU, tunes the process's
    allocator), our bare model step and the largest shape's; "usual": the PIL DataLoader baseline
    and timm's model step, in a process as Python starts it."""
    device = pick_device(device_name)
    x, y, _ = images(data_dir, n)
    x, y, steps = x[:n], y[:n], n // BATCH
    if side == "ours":
        cfg = TrainConfig(**SEED_BEST, batch_size=BATCH)
        trainer = Trainer(cfg, x.to(device), y.to(device), x[:BATCH].to(device), y[:BATCH].to(device), device,
                          progress=False)
        step, largest = make_step(SEED_BEST, device), make_step(LARGEST, device)
        runs = {"ours": lambda: trainer.train_epoch()["train_img_s"], "step": lambda: step_rate(step, device, steps),
                "step_largest": lambda: (largest(), step_rate(largest, device, largest_steps))[1]}  # 1 warm-up
    else:
        runs = {"baseline": Baseline(x, y, device).epoch}
        timm_step = make_timm_step(SEED_BEST, device)
        if timm_step is not None:
            runs["timm_step"] = lambda: step_rate(timm_step, device, steps)
    conn.send(list(runs))
    while (name := conn.recv()) is not None:
        conn.send(runs[name]())


def bench_e2e(data_dir: str, n: int, device_name: str, rounds: int, largest_steps: int) -> dict:
    """Ours, the baseline and the bare model steps (timm's too, if installed), measured in turns, so
    that the drift of a shared machine (10-15 % here) hits all alike, in a new seeded order each round,
    so that none always runs after the same neighbour. Each side lives in its own process (see
    `contender`), so the baseline runs with none of our settings. Figures are medians over the rounds;
    ratios are medians of each round's ratio, both sides of which ran within seconds of each other."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited from this one
    owner, procs = {}, []
    for side in ("ours", "usual"):  # one after the other: setting up does not overlap
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=contender, args=(side, child_conn, data_dir, n, device_name, largest_steps))
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
    result["step_largest"], result["rounds"] = run("step_largest"), rates

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


def memory_child(kind: str, data_dir: str, device, n: int) -> float:
    """Peak memory of a short training run, alone in this fresh process: all of CIFAR-10 loaded,
    as a stage-1 run has it, then one epoch of n images through our pipeline or the baseline."""
    x, y, _ = images(data_dir, 50000)
    x, y = x[:n], y[:n]
    if kind in ("ours", "largest"):
        shape = SEED_BEST if kind == "ours" else LARGEST
        trainer = Trainer(TrainConfig(**shape, batch_size=BATCH), x.to(device), y.to(device), x[:1000].to(device),
                          y[:1000].to(device), device, progress=False)
        trainer.train_epoch()
        evaluate(trainer.model, trainer.val_loader)
    else:
        Baseline(x, y, device).epoch()
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()


def peak_memory(kind, args, n) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--device", args.device,
           "--data-dir", args.data_dir, "--n", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu or cuda (default: auto)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and images (under 5 minutes on 2 CPU cores)")
    p.add_argument("--data-dir", default="data", help="CIFAR-10 folder; random images if absent (default: data)")
    p.add_argument("--child", choices=["ours", "baseline", "largest"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.child:
        print(memory_child(args.child, args.data_dir, device, args.n))
        return

    cpu = device.type == "cpu"
    e2e_n = (1536 if args.quick else 4096) if cpu else 45000
    x, y, source = images(args.data_dir, 50000)  # all: batches enough for any number of PIL workers
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" torch {torch.__version__}, {source}", flush=True)
    r = {"device": str(device) if cpu else torch.cuda.get_device_name()}
    peak = matmul_peak(device, args.quick)
    r["matmul_peak_tflops"] = peak / 1e12
    r["aug_img_s"] = bench_aug(x, device, args.quick)
    r["baseline_aug_img_s"] = bench_baseline_aug(x, y, device, args.quick)
    e2e = bench_e2e(args.data_dir, e2e_n, args.device, rounds=5 if args.quick else 9,
                    largest_steps=2 if cpu and args.quick else 8)
    flops, flops_largest = step_flops(SEED_BEST), step_flops(LARGEST)
    r["step_img_s"], r["step_mfu"] = e2e["step"], flops * e2e["step"] / peak
    if "timm_step" in e2e:  # same shape, same FLOPs
        r["step_img_s_timm"], r["step_mfu_timm"] = e2e["timm_step"], flops * e2e["timm_step"] / peak
        r["step_over_timm"] = e2e["step/timm"]
    r["step_img_s_largest"], r["step_mfu_largest"] = e2e["step_largest"], flops_largest * e2e["step_largest"] / peak
    r["e2e_img_s"], r["baseline_e2e_img_s"] = e2e["ours"], e2e["baseline"]
    r["e2e_ratio"], r["e2e_over_step"] = e2e["ours/baseline"], e2e["ours/step"]
    r["rounds_img_s"] = e2e["rounds"]  # every counted round, for the spread behind the medians
    r["peak_mem_mb"], r["baseline_peak_mem_mb"] = peak_memory("ours", args, e2e_n), peak_memory("baseline", args, e2e_n)
    # a stage-1 trial of the search space's largest shape: the peak memory of a whole search
    r["peak_mem_mb_largest"] = peak_memory("largest", args, 2 * BATCH if cpu and args.quick else e2e_n)

    mem = "RSS" if cpu else "max allocated"
    rows = [
        ("matmul peak", f"{r['matmul_peak_tflops'] * 1e3:,.0f} GFLOP/s", "fp32" if cpu else "bf16"),
        ("augmentation, ours", f"{r['aug_img_s']:,.0f} img/s", f"{r['aug_img_s'] / r['baseline_aug_img_s']:.1f}x baseline"),
        ("augmentation, PIL DataLoader", f"{r['baseline_aug_img_s']:,.0f} img/s", f"{os.cpu_count()} workers"),
        ("model step, seed's best shape", f"{r['step_img_s']:,.0f} img/s", f"MFU {100 * r['step_mfu']:.1f} %"),
        ("model step, timm reference", f"{r['step_img_s_timm']:,.0f} img/s" if "step_img_s_timm" in r else "-",
         f"MFU {100 * r['step_mfu_timm']:.1f} %, ours {r['step_over_timm']:.2f}x" if "step_img_s_timm" in r
         else "timm not installed"),
        ("model step, largest shape", f"{r['step_img_s_largest']:,.0f} img/s", f"MFU {100 * r['step_mfu_largest']:.1f} %"),
        ("end to end, ours", f"{r['e2e_img_s']:,.0f} img/s", f"{100 * r['e2e_over_step']:.1f} % of model step"),
        ("end to end, PIL DataLoader", f"{r['baseline_e2e_img_s']:,.0f} img/s", f"ours / baseline = {r['e2e_ratio']:.2f}x"),
        (f"peak memory ({mem}), ours", f"{r['peak_mem_mb']:,.0f} MB", ""),
        (f"peak memory ({mem}), baseline", f"{r['baseline_peak_mem_mb']:,.0f} MB", ""),
        (f"peak memory ({mem}), largest shape", f"{r['peak_mem_mb_largest']:,.0f} MB", "training + validation"),
    ]
    print(f"\n| {'measurement':<34} | {'figure':>16} | {'note':<28} |\n|{'-' * 36}|{'-' * 18}:|{'-' * 30}|")
    for name, fig, note in rows:
        print(f"| {name:<34} | {fig:>16} | {note:<28} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
