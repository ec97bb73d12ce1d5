"""The same fixed-seed run of both stages (the README's tour) before and after the engine rewrite: the same
trials and the same figures? Usage: python compare.py BEFORE_RESULTS AFTER_RESULTS (writes compare.json)."""
import json
import os
import sys

import optuna


def stage1(results):
    study = optuna.load_study(study_name="vit-cifar10", storage=f"sqlite:///{results}/stage1.db")
    return [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "val_acc_by_epoch": [r["val_acc"] for r in t.user_attrs["history"]]} for t in study.trials]


def stage2(results):
    out = {}
    for model in sorted(os.listdir(f"{results}/stage2")):
        path = f"{results}/stage2/{model}/test_metrics.json"
        if os.path.isfile(path):
            m = json.load(open(path))
            out[model] = {k: m[k] for k in ("accuracy", "accuracy_ci95", "macro", "per_class", "epoch", "val_acc",
                                            "test_images")}
    return out


if __name__ == "__main__":
    before, after = sys.argv[1], sys.argv[2]
    result = {"stage1_same": stage1(before) == stage1(after), "stage2_same": stage2(before) == stage2(after),
              "stage1": stage1(after), "stage2_test_accuracy": {k: v["accuracy"] for k, v in stage2(after).items()},
              "stage2_models_before": sorted(stage2(before)), "stage2_models_after": sorted(stage2(after))}
    json.dump(result, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare.json"), "w"), indent=2)
    print(f"stage 1 trials identical: {result['stage1_same']}; stage 2 test metrics identical: {result['stage2_same']}")
