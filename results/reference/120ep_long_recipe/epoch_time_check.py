"""Per-epoch training time of the long recipe against the seed's, on one host, in one process, alternating.

    PYTHONPATH=. python results/reference/120ep_long_recipe/epoch_time_check.py [--data-dir ../shared/data]

Both configurations (configs/seed_recipe.json, configs/long_recipe.json) train one epoch at a time on the
same 10 % of the 45,000 training images, three times each, alternating so that a change in the host's speed
hits both; the figure is the ratio of the medians (the issue's target: at most 1.10).
"""
import argparse
import json
import statistics
import time

import torch

from data import load_cifar10, train_val_splits
from train import TrainConfig, Trainer

p = argparse.ArgumentParser()
p.add_argument("--data-dir", default="../shared/data")
p.add_argument("--device", default="cpu")
p.add_argument("--rounds", type=int, default=3)
args = p.parse_args()
device = torch.device(args.device)
ds = load_cifar10(args.data_dir, download=False, test=False)
s = train_val_splits(ds, subset_ratio=0.1, device=device)
trainers = {}
for name in ("seed_recipe", "long_recipe"):
    with open(f"configs/{name}.json") as f:
        cfg = TrainConfig.from_dict({**json.load(f), "epochs": 120})
    trainers[name] = Trainer(cfg, s.train_images, s.train_labels, s.val_images, s.val_labels, device, progress=False)
    trainers[name].train_epoch()  # warm-up: first-epoch allocations and caches
times = {name: [] for name in trainers}
for _ in range(args.rounds):
    for name, t in trainers.items():
        started = time.perf_counter()
        t.train_epoch()
        times[name].append(time.perf_counter() - started)
med = {name: statistics.median(v) for name, v in times.items()}
print(json.dumps({"images_per_epoch": len(s.train_images), "seconds": times, "median_s": med,
                  "long_over_seed": med["long_recipe"] / med["seed_recipe"]}, indent=1))
