"""The Trainer's training throughput, and the operations one of its steps dispatches.

    python tools/bench.py [--device auto] [--amp auto] [--quick] [--json FILE]
    python tools/bench.py --ops-only                # only the operations, eager and compiled
    python tools/bench.py --grid --json grid.json   # each configuration of stage 1's space that differs in cost

This module owns these measurements, taken through the Trainer as the stages run it, in training's precision, on
random images (a step costs the same whatever they show): the seed's configuration (configs/seed_recipe.json), then
the operations a step dispatches, eager and, but with --quick, compiled (a CPU counts in bf16, as a GPU trains).
--grid times its configurations on the costliest recipe either stage runs: tools/check_gpu.py projects from them.
"""

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import DEVICE_HELP, resolve_device  # noqa: E402
from data import AUGMENT_CHUNK, DataError  # noqa: E402
from train import (AMP_MODES, LONG_RECIPE, TrainConfig, Trainer, evaluate, pick_device, resolve_amp,  # noqa: E402
                   save_checkpoint)

PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
# Stage 1's choices that change a step's cost (stage1_search.suggest_config; a test keeps the two in step)
COST_CHOICES = dict(patch_size=(2, 4), embed_dim=(128, 192), depth=(4, 6), num_heads=(2, 4), batch_size=(64, 128),
                    optimizer=("adamw", "sgd"))
COSTLIEST = {**LONG_RECIPE, "mix_prob": 1.0, "mixup_alpha": 0.1}  # either stage's step costs at most this recipe's


def config_name(cfg: dict) -> str:
    return (f"patch {cfg['patch_size']}, width {cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
            f"batch {cfg['batch_size']}, {cfg['optimizer']}")


def seed_config(**changes) -> TrainConfig:
    with open(os.path.join(ROOT, "configs", "seed_recipe.json")) as f:
        return TrainConfig.from_dict({**json.load(f), **changes})


def open_device(name: str) -> torch.device:
    """--device made current (so that torch.cuda.synchronize() waits for it), or one line and exit 1."""
    try:
        device = resolve_device(name)
    except DataError as e:
        sys.exit(f"error: {e}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU's model: figures differ by model (../shared/MEASURED.md)
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, device) -> float:
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def random_images(n: int, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
            (torch.arange(n) % 10).to(device))


def config_times(cfg: TrainConfig, device, amp: str = "auto", smoke: bool = False) -> dict:
    """cfg's costs as a stage pays them: setup_s, step_s (in each of two epochs after a first, of two augmentation
    calls' images so that each step bears its share), val_s (5,000 images in the stages' precision) and test_s (10,000
    in float32), both scaled up from fewer images, warmup_s (the first epoch and validation beyond the later ones) and
    save_s (a checkpoint). smoke: a 16th of the batch, one step an epoch: its times mean nothing."""
    if smoke:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "batch_size": cfg.batch_size // 16})
    images = cfg.batch_size if smoke else 2 * max(1, AUGMENT_CHUNK // cfg.batch_size) * cfg.batch_size
    val_images = 16 if smoke else 500 if device.type == "cpu" else 5000
    x, y = random_images(images + val_images, device)
    built = []
    setup_s = timed(lambda: built.append(Trainer(cfg, x[:images], y[:images], x[images:], y[images:], device, amp=amp,
                                                 progress=False)), device)
    trainer = built[0]
    validate = functools.partial(evaluate, trainer.model, trainer.val_loader, amp_dtype=trainer.val_amp_dtype)
    first = timed(trainer.train_epoch, device) + timed(validate, device)
    epochs = [timed(trainer.train_epoch, device) for _ in range(2)]
    val_s, steps = min(timed(validate, device) for _ in range(2)), len(trainer.train_loader)
    test_s = timed(lambda: evaluate(trainer.model, trainer.val_loader), device)
    with tempfile.TemporaryDirectory() as folder:
        save_s = timed(lambda: save_checkpoint(trainer.state_dict(), os.path.join(folder, "last.pt")), device)
    row = {**{k: getattr(cfg, k) for k in COST_CHOICES}, "setup_s": setup_s, "steps": steps, "save_s": save_s,
           "step_s": [t / steps for t in epochs], "img_s": cfg.batch_size * steps / statistics.mean(epochs),
           "val_s": val_s * 5000 / val_images, "test_s": test_s * 10000 / val_images,
           "warmup_s": max(0.0, first - statistics.mean(epochs) - val_s)}
    print(f"  {config_name(row)}: {row['img_s']:,.0f} img/s training, a validation of 5,000 {row['val_s']:.2f} s, "
          f"setup {row['setup_s']:.2f} s, checkpoint {row['save_s']:.2f} s", flush=True)
    return row


# aten ops that launch no kernel of their own on a GPU: views, metadata, allocations, and wrappers whose work,
# if any, is a child op counted as theirs (a real cast by .to is its _to_copy's copy_).
NO_KERNEL = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "transpose", "t", "permute", "expand", "expand_as",
    "select", "slice", "narrow", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "unfold",
    "alias", "detach", "detach_", "view_as", "diagonal", "movedim", "unflatten", "lift_fresh", "empty", "empty_like",
    "empty_strided", "resize_", "as_strided_", "set_", "resolve_conj", "resolve_neg", "result_type", "to", "type_as",
    "contiguous", "reshape", "flatten", "dropout", "clone", "_to_copy"))
# CUDA runtime calls that start work on the GPU (versions add suffixes): kernels, and a CUDA graph as one.
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchCooperativeKernel")


def count_dispatched(events) -> dict:
    """A profile's "ops": the outermost aten calls (from Python, autograd or a compiled graph) that do work,
    themselves or through a child, plus each fused C++ kernel of a compiled graph; and "launches" (of kernels) where
    the profile has CUDA's runtime calls (a GPU's Triton kernels are no profiler event of their own)."""
    @functools.cache  # once an event: every ancestor asks of its children
    def works(e) -> bool:
        itself = e.name not in NO_KERNEL if e.name.startswith("aten::") else "cpp_fused" in e.name
        return itself or any(works(c) for c in e.cpu_children)

    @functools.cache
    def under_aten(e) -> bool:
        return e.cpu_parent is not None and (e.cpu_parent.name.startswith("aten::") or under_aten(e.cpu_parent))

    counts = {"ops": sum(1 for e in events if (e.name.startswith("aten::") and not under_aten(e) and works(e))
                         or "cpp_fused" in e.name)}
    launches = sum(1 for e in events if e.name.startswith(LAUNCHES))
    return {**counts, "launches": launches} if launches else counts


def step_ops(config: dict, device_arg: str, amp: str, compile: str) -> dict:
    """Operations per training step as the Trainer runs it: an epoch of one augmentation call's images, profiled
    after an epoch that warms up (the optimizer's state, compiling), over its steps."""
    import torch._inductor.config
    from torch.profiler import ProfilerActivity, profile

    device, cfg = open_device(device_arg), TrainConfig.from_dict(config)
    x, y = random_images(max(1, AUGMENT_CHUNK // cfg.batch_size) * cfg.batch_size, device)  # one augmentation call
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": compile != "off"}):  # cpp_fused events
        trainer = Trainer(cfg, x, y, x[:cfg.batch_size], y[:cfg.batch_size], device, amp=amp, compile=compile,
                          progress=False)
        timed(trainer.train_epoch, device)
        with profile(activities=activities) as prof:
            timed(trainer.train_epoch, device)
    return {k: v / len(trainer.train_loader) for k, v in count_dispatched(prof.events()).items()}


def ops_figures(device_arg: str, amp: str = "auto", modes=("off", "default"), cfg: TrainConfig | None = None) -> dict:
    """step_ops of the seed's configuration (or cfg), eager ("off") and compiled, each in a fresh interpreter, so
    that neither inherits the other's compiled code. A CPU counts in bf16 under auto, as a GPU trains."""
    cfg, device = cfg or seed_config(), pick_device(device_arg)
    amp = "bf16" if amp == "auto" and device.type != "cuda" else amp
    r = {"ops_precision": PRECISION[resolve_amp(device, amp)], "ops_drop_path": cfg.drop_path}
    for mode in modes:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            counts = fresh.submit(step_ops, cfg.to_dict(), device_arg, amp, mode).result()
        for kind, count in counts.items():  # "ops", and on a GPU "launches"
            r[f"{kind}_per_step_{'eager' if mode == 'off' else 'compiled'}"] = count
    return r


def search_grid() -> list:
    return [TrainConfig(**COSTLIEST, **dict(zip(COST_CHOICES, v))) for v in itertools.product(*COST_CHOICES.values())]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="the steps' precision (default: auto, training's)")
    p.add_argument("--quick", action="store_true", help="count the eager step's operations only")
    p.add_argument("--ops-only", action="store_true", help="only count a step's operations, eager and compiled")
    p.add_argument("--grid", action="store_true", help="time the search space's configurations, and count nothing")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # check_gpu.py --smoke: every part, tiny
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    device = open_device(args.device)
    r = {"device": device_name(device), "torch": torch.__version__,
         "precision": PRECISION[resolve_amp(device, args.amp)]}
    if args.grid:  # --smoke: its first configuration alone
        r["configs"] = [config_times(c, device, args.amp, args.smoke) for c in search_grid()[:1 if args.smoke else 64]]
    else:
        if not args.ops_only:
            r["seed"] = config_times(seed_config(), device, args.amp, args.smoke)
        modes = () if args.smoke else ("off",) if args.quick else ("off", "default")  # eager, compiled
        r.update(ops_figures(args.device, args.amp, modes))
        for key in (k for k in r if k.startswith(("ops_per", "launches_per"))):
            print(f"{key.replace('_', ' ')}: {r[key]:,.1f} ({r['ops_precision']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
