"""Recipe ablation: the seed's best shape on stage 1's proxy, one recipe change at a time.

    python ablation.py --data-dir ../shared/data            # every variant, seeds 0 and 1 where listed
    python ablation.py --data-dir ../shared/data --variants plain plus_label_smoothing --seeds 0
    python ablation.py --table                               # the markdown table of what has run

Every run trains the same shape (patch 4, width 128, depth 6, 4 heads, AdamW 5.836e-4, cosine,
batch 128) on stage 1's proxy: the stratified 20 % of the 45,000 training images, judged on the
fixed 5,000-image validation split, with the same seed and epoch budget for every variant. Each
run writes one JSON (config, per-epoch history, best validation accuracy, wall time) under --out;
a run whose JSON exists is skipped, so an interrupted ablation continues where it stopped.
"""

import argparse
import json
import os
import statistics
import sys
import time

from data import DataError, load_cifar10, train_val_splits
from report import write_json
from train import TrainConfig, Trainer, pick_device, with_defaults

SEED_BEST = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, optimizer="adamw", lr=5.836e-4,
                 scheduler="cosine", batch_size=128, mixup_alpha=0.0)
# The plain recipe: AdamW with torch's default weight decay and nothing else.
PLAIN = dict(SEED_BEST, warmup_epochs=0, label_smoothing=0.0, drop_path=0.0, grad_clip=0.0, weight_decay=0.01,
             randaug_ops=2, randaug_magnitude=9, pool="cls")
CHANGES = {  # each single change on top of the plain recipe
    "plus_label_smoothing": dict(label_smoothing=0.1),
    "plus_warmup": dict(warmup_epochs=2),
    "plus_weight_decay": dict(weight_decay=0.05),
    "plus_drop_path": dict(drop_path=0.1),
    "plus_grad_clip": dict(grad_clip=1.0),
}
# Chosen: the seed's own recipe (warmup, drop-path 0.1, clipping at 1, RandAugment(2, 9)), TrainConfig's
# defaults. At this 10-epoch proxy drop-path, clipping and RandAugment each cost points (docs/recipe.md's
# table: warmup + RandAugment off was best, 45.83 % over two seeds), but the proxy is not stage 2: the one
# run at stage 2's 120 epochs used the seed's recipe, and a short budget favours whatever regularises least.
CHOSEN = dict(PLAIN, warmup_epochs=2, drop_path=0.1, grad_clip=1.0)
VARIANTS = {
    "plain": PLAIN,
    **{name: dict(PLAIN, **change) for name, change in CHANGES.items()},
    "chosen": CHOSEN,
    # SGD at the seed's learning rate, as the search would draw it: without and with the scale.
    "sgd_unscaled": dict(PLAIN, optimizer="sgd", sgd_lr_scale=1.0),
    "sgd_scaled": dict(PLAIN, optimizer="sgd", sgd_lr_scale=100.0),
    # Milder augmentation on top of warmup: the 30-epoch reference run still under-fit (augmented
    # training accuracy below validation accuracy in every epoch), so RandAugment's strength is next.
    "warmup_randaug_m5": dict(PLAIN, warmup_epochs=2, randaug_magnitude=5),
    # The proxy's best (45.06 / 46.60 %), the defaults until the seed's recipe replaced them.
    "warmup_randaug_off": dict(PLAIN, warmup_epochs=2, randaug_ops=0),
    # Third round, on top of that, after its 30-epoch run stopped at 75.4 % test: the head's input,
    # the mean of the patch tokens instead of the class token (43.76 %, 1.3 below: not taken).
    "warmup_randaug_off_mean_pool": dict(PLAIN, warmup_epochs=2, randaug_ops=0, pool="mean"),
}
TWO_SEEDS = ("plain", "plus_warmup", "warmup_randaug_off", "chosen")  # the seed-to-seed spread is measured on these


def variant_config(name: str, seed: int = 0, epochs: int = 10, subset: float = 0.2) -> TrainConfig:
    """What a variant's run trains: its recipe, one full schedule without early stopping."""
    return TrainConfig.from_dict({**VARIANTS[name], "epochs": epochs, "patience": epochs, "subset_ratio": subset,
                                  "seed": seed})


def run_one(name: str, seed: int, splits, device, epochs: int, subset: float, out: str) -> dict:
    path = os.path.join(out, f"{name}_seed{seed}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    cfg = variant_config(name, seed, epochs, subset)
    # A finished run with exactly this configuration (seed, epochs and subset included), not itself a reuse.
    twin = next((r for r in _runs(out) if with_defaults(r["config"]) == cfg.to_dict() and "same_run_as" not in r), None)
    if twin is not None:  # "chosen" seed 0 may be a single change's run: the same run, not trained twice
        result = {**twin, "variant": name, "same_run_as": f"{twin['variant']}_seed{seed}.json"}
        write_json(path, result)
        print(f"{name} seed {seed}: the same configuration and seed as {result['same_run_as']}; its result is "
              f"reused", flush=True)
        return result
    s = splits
    trainer = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, device)
    t0 = time.perf_counter()
    trainer.fit()
    result = {"variant": name, "seed": seed, "config": cfg.to_dict(), "best_val_acc": trainer.best_acc,
              "best_epoch": trainer.best_epoch, "final_val_acc": trainer.history[-1]["val_acc"],
              "wall_s": time.perf_counter() - t0, "train_images": len(s.train_images),
              "val_images": len(s.val_images), "device": str(device), "history": trainer.history}
    write_json(path, result)
    print(f"{name} seed {seed}: best val acc {100 * trainer.best_acc:.2f} % (epoch {trainer.best_epoch}), "
          f"{result['wall_s']:.0f} s", flush=True)
    return result


def _runs(out: str) -> list:
    """Every finished run's JSON in `out`, in file-name order."""
    runs = []
    for fn in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if fn.endswith(".json"):
            with open(os.path.join(out, fn)) as f:
                runs.append(json.load(f))
    return runs


def table(out: str) -> str:
    """Markdown: one row per variant, in VARIANTS order, with every seed's figure."""
    runs = {}
    for r in _runs(out):
        runs.setdefault(r["variant"], []).append(r)
    lines = ["| variant | change from plain | seeds | best val acc per seed (%) | mean (%) | final val acc (%) "
             "| train acc, last epoch (%) | wall time per run (min) | fastest epoch (s) |",
             "|---|---|---|---|--:|--:|--:|--:|--:|"]
    for name in VARIANTS:
        rs = sorted(runs.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        diff = {k: v for k, v in VARIANTS[name].items() if PLAIN.get(k) != v}
        accs = [100 * r["best_val_acc"] for r in rs]
        # a reused run is named: its figures are that run's, counted once per variant it stands for
        seeds = ", ".join(f"{r['seed']} (run {r['same_run_as'][:-5]})" if "same_run_as" in r else str(r["seed"])
                          for r in rs)
        cells = [name, ", ".join(f"{k}={v}" for k, v in diff.items()) or "-", seeds,
                 ", ".join(f"{a:.2f}" for a in accs), f"{statistics.mean(accs):.2f}",
                 ", ".join(f"{100 * r['final_val_acc']:.2f}" for r in rs),
                 ", ".join(f"{100 * r['history'][-1]['train_acc']:.1f}" for r in rs),
                 ", ".join(f"{r['wall_s'] / 60:.1f}" for r in rs),
                 # the wall time depends on what else ran on the machine; the fastest epoch much less
                 ", ".join(f"{min(h['epoch_time'] for h in r['history']):.0f}" for r in rs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"variants to run, in order (default: all: {', '.join(VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds to run (default: 0 and 1 for {' and '.join(TWO_SEEDS)}, 0 for the others)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run, a full cosine schedule (default: 10)")
    p.add_argument("--subset", type=float, default=0.2, help="share of the 45,000 training images (default: 0.2)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--out", default="docs/recipe_runs", help="folder of the per-run JSON (default: docs/recipe_runs)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto)")
    p.add_argument("--table", action="store_true", help="print the table of the runs in --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    if args.epochs <= 0 or not 0.0 < args.subset <= 1.0:
        p.error("--epochs must be positive and --subset in (0, 1]")
    device = pick_device(args.device)
    try:
        ds = load_cifar10(args.data_dir, download=False)
    except DataError as e:
        sys.exit(f"error: {e}")
    splits = train_val_splits(ds, subset_ratio=args.subset, device=device)
    for name in args.variants:
        for seed in args.seeds or ((0, 1) if name in TWO_SEEDS else (0,)):
            run_one(name, seed, splits, device, args.epochs, args.subset, args.out)
    print(table(args.out))


if __name__ == "__main__":
    main()
