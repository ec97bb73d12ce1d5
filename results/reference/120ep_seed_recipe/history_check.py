"""Compare this run's per-epoch history with the lost run's, field by field (evidence, not part of the pipeline).

    python results/reference/120ep_seed_recipe/history_check.py            # from the repository's root
    python results/reference/120ep_seed_recipe/history_check.py --write    # also write history.json from last.pt

The run's history lives in stage2/config_0/last.pt while the run is open; once it has ended, --write saves it
as history.json beside this script, so that the check still runs after the optimizer-state checkpoints have
left the tree. The lost run (../120ep_seed_recipe_stopped_at_97/history.json) used the same seed, data and
code (944f7d2), so each of its 97 epochs says what this run's should give.
"""

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
LOST = os.path.join(HERE, "..", "120ep_seed_recipe_stopped_at_97", "history.json")
RESULTS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "is_best")  # epoch_time, train_img_s: the host's
TRAIN_IMAGES = 44_928  # 351 batches of 128: the last, partial batch of 45,000 is dropped


def this_runs_history(write: bool) -> list:
    path = os.path.join(HERE, "history.json")
    if os.path.isfile(path) and not write:
        with open(path) as f:
            return json.load(f)
    import torch  # only while the run's last.pt is in the tree

    history = torch.load(os.path.join(HERE, "stage2", "config_0", "last.pt"), weights_only=True)["history"]
    if write:
        with open(path, "w") as f:
            json.dump(history, f, indent=1)
        print(f"wrote {path} ({len(history)} epochs)")
    return history


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="write history.json from stage2/config_0/last.pt first")
    args = p.parse_args()
    ours = this_runs_history(args.write)
    with open(LOST) as f:
        lost = json.load(f)
    first_diff, worst_rel, acc_flips = None, 0.0, []
    for a, b in zip(ours, lost):
        assert a["epoch"] == b["epoch"]
        diff = [k for k in RESULTS if a[k] != b[k]]
        if diff and first_diff is None:
            first_diff = a["epoch"]
        for k in ("train_loss", "val_loss", "lr"):
            worst_rel = max(worst_rel, abs(a[k] - b[k]) / abs(b[k]) if b[k] else abs(a[k]))
        for k, n in (("train_acc", TRAIN_IMAGES), ("val_acc", 5000)):
            if round(a[k] * n) != round(b[k] * n):
                acc_flips.append(f"epoch {a['epoch']} {k}: {round(a[k] * n) - round(b[k] * n):+d} image(s)")
        if a["is_best"] != b["is_best"]:
            acc_flips.append(f"epoch {a['epoch']}: best flag {a['is_best']} vs {b['is_best']}")
    n = min(len(ours), len(lost))
    print(f"{n} epochs compared (this run {len(ours)}, the lost run {len(lost)})")
    print("bit for bit in every field" if first_diff is None else
          f"bit for bit up to epoch {first_diff - 1}; from epoch {first_diff} on, losses and lr within "
          f"{worst_rel:.1e} relative")
    print("accuracies and best flags: " + ("equal in every epoch" if not acc_flips else "; ".join(acc_flips)))
    best = max(ours, key=lambda r: r["val_acc"])
    print(f"this run: best val acc {100 * best['val_acc']:.2f} % at epoch {best['epoch']}, "
          f"last epoch {ours[-1]['epoch']} at {100 * ours[-1]['val_acc']:.2f} %")


if __name__ == "__main__":
    main()
