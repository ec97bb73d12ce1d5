"""Recipe ablation: the seed's best shape on stage 1's proxy, one recipe change at a time (docs/recipe.md).

    python tools/ablation.py --data-dir ../shared/data            # every variant; finished runs are skipped
    python tools/ablation.py --data-dir ../shared/data --variants plain plus_warmup --seeds 0
    python tools/ablation.py --table                               # the markdown table of what has run

This module owns the variants and their table. Every run trains the same shape and optimiser (SEED_BEST) for 10
epochs on stage 1's 20 % proxy, judged on the fixed 5,000-image validation split, and writes its JSON under --out.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, load_cifar10, train_val_splits  # noqa: E402
from reports import write_json  # noqa: E402
from train import TrainConfig, Trainer, pick_device  # noqa: E402

SEED_BEST = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, optimizer="adamw", lr=5.836e-4,
                 scheduler="cosine", batch_size=128, mixup_alpha=0.0)
PLAIN = dict(SEED_BEST, warmup_epochs=0, label_smoothing=0.0, drop_path=0.0, grad_clip=0.0, weight_decay=0.01,
             randaug_ops=2, randaug_magnitude=9, pool="cls")  # AdamW at torch's weight decay, RandAugment(2, 9)
# The seed's recipe, TrainConfig's defaults: drop-path, clipping and RandAugment cost points on this 10-epoch proxy,
# but a short budget favours whatever regularises least; the 120-epoch run used this recipe.
CHOSEN = dict(PLAIN, warmup_epochs=2, drop_path=0.1, grad_clip=1.0)
VARIANTS = {
    "plain": PLAIN,
    "plus_label_smoothing": dict(PLAIN, label_smoothing=0.1),
    "plus_warmup": dict(PLAIN, warmup_epochs=2),
    "plus_weight_decay": dict(PLAIN, weight_decay=0.05),
    "plus_drop_path": dict(PLAIN, drop_path=0.1),
    "plus_grad_clip": dict(PLAIN, grad_clip=1.0),
    "chosen": CHOSEN,
    # SGD at the seed's learning rate, as the search draws it: without and with the scale.
    "sgd_unscaled": dict(PLAIN, optimizer="sgd", sgd_lr_scale=1.0),
    "sgd_scaled": dict(PLAIN, optimizer="sgd", sgd_lr_scale=100.0),
    # Second round: the 30-epoch run still under-fit, so RandAugment's strength; third: the head's input.
    "warmup_randaug_m5": dict(PLAIN, warmup_epochs=2, randaug_magnitude=5),
    "warmup_randaug_off": dict(PLAIN, warmup_epochs=2, randaug_ops=0),
    "warmup_randaug_off_mean_pool": dict(PLAIN, warmup_epochs=2, randaug_ops=0, pool="mean"),
}
TWO_SEEDS = ("plain", "plus_warmup", "warmup_randaug_off", "chosen")  # the seed-to-seed spread is measured on these


def variant_config(name: str, seed: int = 0, epochs: int = 10, subset: float = 0.2) -> TrainConfig:
    """A variant's run: its recipe, one full schedule without early stopping."""
    return TrainConfig.from_dict(dict(VARIANTS[name], epochs=epochs, patience=epochs, subset_ratio=subset, seed=seed))


def run_one(name: str, seed: int, splits, device, epochs: int, subset: float, out: str) -> dict:
    """A variant's run, or the JSON of the one that finished before."""
    if (path := Path(out, f"{name}_seed{seed}.json")).is_file():
        return json.loads(path.read_text())
    cfg = variant_config(name, seed, epochs, subset)
    trainer = Trainer(cfg, splits.train_images, splits.train_labels, splits.val_images, splits.val_labels, device)
    t0 = time.perf_counter()
    trainer.fit()
    result = {"variant": name, "seed": seed, "config": cfg.to_dict(), "best_val_acc": trainer.best_acc,
              "best_epoch": trainer.best_epoch, "final_val_acc": trainer.history[-1]["val_acc"],
              "wall_s": time.perf_counter() - t0, "train_images": len(splits.train_images),
              "val_images": len(splits.val_images), "device": str(device), "history": trainer.history}
    write_json(str(path), result)
    print(f"{name} seed {seed}: best val acc {trainer.best_acc:.2%} (epoch {trainer.best_epoch}), "
          f"{result['wall_s']:.0f} s", flush=True)
    return result


def table(out: str) -> str:
    """Markdown: a row per variant that has run, in VARIANTS order, with every seed's figures."""
    runs = [json.loads(path.read_text()) for path in Path(out).glob("*.json")]
    lines = ["| variant | change from plain | seeds | best val acc per seed (%) | mean (%) | final val acc (%) "
             "| train acc, last epoch (%) | wall time per run (min) | fastest epoch (s) |",
             "|---|---|---|---|--:|--:|--:|--:|--:|"]
    for name in VARIANTS:
        rs = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        if rs:
            accs = [100 * r["best_val_acc"] for r in rs]
            cells = [name, ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items() if PLAIN.get(k) != v) or "-",
                     ", ".join(str(r["seed"]) for r in rs), ", ".join(f"{a:.2f}" for a in accs),
                     f"{statistics.mean(accs):.2f}", ", ".join(f"{100 * r['final_val_acc']:.2f}" for r in rs),
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
    p.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default: 0, and 1 for {', '.join(TWO_SEEDS)})")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--out", default="docs/recipe_runs", help="folder of the runs' JSON (default: docs/recipe_runs)")
    p.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    args = p.parse_args(argv)
    if not args.table:
        device = pick_device()
        try:
            splits = train_val_splits(load_cifar10(args.data_dir, download=False), subset_ratio=0.2, device=device)
        except DataError as e:
            sys.exit(f"error: {e}")
        for name in args.variants:
            for seed in args.seeds or ((0, 1) if name in TWO_SEEDS else (0,)):
                run_one(name, seed, splits, device, 10, 0.2, args.out)
    print(table(args.out))


if __name__ == "__main__":
    main()
