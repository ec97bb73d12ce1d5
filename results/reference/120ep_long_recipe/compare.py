"""This run against the seed recipe's 120-epoch run (../120ep_seed_recipe/): evidence, not part of the pipeline.

    PYTHONPATH=. python results/reference/120ep_long_recipe/compare.py [--write] [--data-dir ../shared/data]

1. history.json: this run's per-epoch history (--write takes it from stage2/config_0/last.pt while that is in
   the tree; afterwards the committed file is read).
2. The validation curves epoch by epoch, side by side (compare_curves.png, and compare.md's table every 5 epochs).
3. McNemar on the same 10,000 test images, from both runs' test_predictions.json (written by each run's test).
4. The clean-training-accuracy check fit_check.py made for the seed run: the shipped model on its own 45,000
   training images, unaugmented, and on the 5,000 validation images (no test image).
Writes compare.md and compare.json beside this file.
"""
import argparse
import json
import os

import numpy as np
import torch

from checkpoint import load_checkpoint
from data import DeviceLoader, load_cifar10, train_val_splits
from evaluate import model_from_checkpoint
from report import pyplot
from stats import mcnemar, verdict
from train import eval_batch_size, evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_RUN = os.path.join(HERE, "..", "120ep_seed_recipe")
RUN = os.path.join(HERE, "stage2", "config_0")

p = argparse.ArgumentParser()
p.add_argument("--write", action="store_true", help="write history.json from stage2/config_0/last.pt")
p.add_argument("--data-dir", default="../shared/data")
p.add_argument("--model", default=os.path.join(HERE, "model.pt"), help="this run's model.pt (or its best.pt)")
args = p.parse_args()


def load(path):
    with open(path) as f:
        return json.load(f)


if args.write:
    history = load_checkpoint(os.path.join(RUN, "last.pt"))["history"]
    with open(os.path.join(HERE, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
history = load(os.path.join(HERE, "history.json"))
seed_history = load(os.path.join(SEED_RUN, "history.json"))

# McNemar on the same images: both runs' own test predictions, in the test set's order.
ours, theirs = load(os.path.join(RUN, "test_predictions.json")), load(
    os.path.join(SEED_RUN, "stage2", "config_0", "test_predictions.json"))
assert ours["labels"] == theirs["labels"] and len(ours["labels"]) == 10_000
y = np.array(ours["labels"])
right_long, right_seed = np.array(ours["preds"]) == y, np.array(theirs["preds"]) == y
test = mcnemar(right_long, right_seed)
acc_long, acc_seed = right_long.mean(), right_seed.mean()

# The fit: clean training images against validation, for the checkpoint the test used.
device = torch.device("cpu")
s = train_val_splits(load_cifar10(args.data_dir, download=False, test=False), seed=0)
model = model_from_checkpoint(load_checkpoint(args.model), device)
fit = {name: evaluate(model, DeviceLoader(x, t, eval_batch_size(device), train=False))["acc"]
       for name, x, t in (("train_clean", s.train_images, s.train_labels), ("val", s.val_images, s.val_labels))}

summary = {
    "test_acc": {"long_recipe": acc_long, "seed_recipe": acc_seed, "difference_points": 100 * (acc_long - acc_seed)},
    "mcnemar": test,
    "fit_check": fit,
    "best_val": {"long_recipe": max(h["val_acc"] for h in history), "seed_recipe": max(h["val_acc"] for h in seed_history)},
    "epochs": {"long_recipe": len(history), "seed_recipe": len(seed_history)},
}
with open(os.path.join(HERE, "compare.json"), "w") as f:
    json.dump(summary, f, indent=1)

fig, ax = pyplot().subplots(1, 2, figsize=(12, 4.5), layout="constrained")
for h, name in ((seed_history, "seed recipe (2 CPU cores, fp32)"), (history, "long recipe (H200, bf16)")):
    e = [r["epoch"] for r in h]
    ax[0].plot(e, [100 * r["val_acc"] for r in h], label=name)
    ax[1].plot(e, [100 * r["train_acc"] for r in h], label=name)
ax[0].set(title="validation accuracy (5,000 held-out images)", xlabel="epoch", ylabel="%", ylim=(40, 90))
ax[1].set(title="training accuracy on the batches trained (augmented, mixed)", xlabel="epoch", ylabel="%")
for a in ax:
    a.grid(alpha=0.3)
    a.legend()
fig.savefig(os.path.join(HERE, "compare_curves.png"), dpi=100)

by_epoch = {r["epoch"]: r for r in seed_history}
rows = ["| epoch | seed recipe val acc (%) | long recipe val acc (%) | difference (points) |", "|--:|--:|--:|--:|"]
for r in history:
    e = r["epoch"]
    if e % 5 == 0 or e == 1:
        other = by_epoch.get(e)
        seed_val = f"{100 * other['val_acc']:.2f}" if other else "(stopped)"
        diff = f"{100 * (r['val_acc'] - other['val_acc']):+.2f}" if other else ""
        rows.append(f"| {e} | {seed_val} | {100 * r['val_acc']:.2f} | {diff} |")
sentence = (verdict("the long recipe", "the seed recipe", test) if acc_long >= acc_seed
            else verdict("the seed recipe", "the long recipe", {**test, "a_only": test["b_only"], "b_only": test["a_only"]}))
sentence = sentence[0].upper() + sentence[1:]
text = f"""# The long recipe against the seed's, at 120 epochs

Test accuracy on the same 10,000 test images: long recipe {100 * acc_long:.2f} %, seed recipe {100 * acc_seed:.2f} %
({100 * (acc_long - acc_seed):+.2f} points). {sentence}

Fit (the checkpoint tested, float32 on the CPU, no augmentation): {100 * fit["train_clean"]:.2f} % on its 45,000
training images against {100 * fit["val"]:.2f} % on the 5,000 validation images (the seed run: 93.30 % against 82.42 %).

Best validation accuracy: long {100 * summary["best_val"]["long_recipe"]:.2f} % in {len(history)} epochs, seed
{100 * summary["best_val"]["seed_recipe"]:.2f} % in {len(seed_history)} epochs.

![validation and training curves of both runs](compare_curves.png)

{chr(10).join(rows)}
"""
with open(os.path.join(HERE, "compare.md"), "w") as f:
    f.write(text)
print(text)
