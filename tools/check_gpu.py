"""Check a GPU machine end to end: is it set up right, and how long will the whole plan take on it?

    python tools/check_gpu.py --out check [--data-dir data] [--device auto] [--pack]
    python tools/check_gpu.py --device cpu --smoke --out /tmp/check   # every run tiny: a test that all runs

This module owns the check: its runs (RUNS, each in a process of its own, writing under OUT/results/), the subset
of the images that travels to a lent machine, the projection (`project`), OUT/check.json and check.md (docs/speed.md
explains them). About 5 minutes on one H100 or H200: an estimate, not yet timed on one.

On a GPU machine lent through the project's device tool (no internet, no Optuna, at most 64 MiB carried, tree
included), bring Optuna's wheels and the check's subset of the images in .devdata/ (which git ignores):

    # here, once
    mkdir -p .devdata/check && cp ../shared/device-wheels/*.whl .devdata/check/
    python tools/check_gpu.py --make-data ../shared/data/cifar10-jpeg.npz .devdata/check/cifar10-check.npz
    # the device command, with carry [".devdata/check"]
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/check/*.whl && export PYTHONPATH=/tmp/site \\
      && python3 tools/check_gpu.py --data-npz .devdata/check/cifar10-check.npz --data-dir /tmp/data --out "$OUT" --pack

$OUT then brings back check.json, check.md and results.tar.gz (results/ without checkpoints).
"""

import argparse
import datetime
import glob
import importlib.util
import io
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli import DEVICE_HELP, OneLineParser, clock  # noqa: E402
from data import FOLDER, TEST_FILE, TRAIN_FILES, DataError, load_cifar10, split_indices  # noqa: E402
from tools.bench import PRECISION, config_name, device_name, open_device, seed_config  # noqa: E402
from train import resolve_amp  # noqa: E402

PLAN = {"stage1_trials": 40, "stage1_epochs": 20, "stage1_images": 9000, "stage2_models": 3, "stage2_epochs": 120,
        "stage2_images": 45000}
STAGE2 = ["--config", "configs/seed_recipe.json", "--epochs"]
RUNS = {  # each run's script and flags: the check's, then --smoke's (1 % of the images, 1 epoch, tiny benches)
    "bench": ("tools/bench.py", ["--quick"], ["--smoke"]),
    "grid": ("tools/bench.py", ["--grid"], ["--grid", "--smoke"]),
    # Seed 39: the study's first two trials have patch 4 and width 128, and no patch-2 trial slows the smoke test.
    "stage1": ("stage1_search.py", ["--trials", "2", "--epochs", "3", "--subset", "0.2"],
               ["--trials", "2", "--epochs", "1", "--subset", "0.01", "--seed", "39"]),
    "stage2": ("stage2_final.py", [*STAGE2, "3", "--subset", "0.2"], [*STAGE2, "1", "--subset", "0.01"]),
}
OURS = ("check.json", "check.md", "results", "results.tar.gz")  # all that the check writes in OUT


def fail(message: str):
    sys.exit(f"error: {message}")  # one line, exit code 1


def _load(path: str) -> dict:
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} ({type(e).__name__}: {e})")


def make_check_data(src: str, dest: str) -> dict:
    """The check's copy of ../shared/data/cifar10-jpeg.npz, in its format: the JPEGs of stage 1's proxy, of the
    validation split (both as the stages draw them) and of the test set, and a black image in every other training
    slot, which no run of the check reads; compressed, the black ones cost next to nothing."""
    from PIL import Image

    arrays = _load(src)
    if not {"train_jpeg", "train_offsets", "train_labels", "test_jpeg"} <= set(arrays):
        fail(f"{src} is no JPEG copy of CIFAR-10 like ../shared/data/cifar10-jpeg.npz")
    proxy, val = split_indices(torch.from_numpy(arrays["train_labels"].astype(np.int64)), subset_ratio=0.2)
    keep, black = set(torch.cat([proxy, val]).tolist()), io.BytesIO()
    Image.new("RGB", (32, 32)).save(black, "JPEG")
    raw, off = arrays["train_jpeg"], arrays["train_offsets"]
    blobs = [raw[off[i]:off[i + 1]] if i in keep else np.frombuffer(black.getvalue(), np.uint8)
             for i in range(len(off) - 1)]
    np.savez_compressed(dest, **{**arrays, "train_jpeg": np.concatenate(blobs),
                                 "train_offsets": np.cumsum([0] + [len(b) for b in blobs]).astype(off.dtype)})
    return {"bytes": os.path.getsize(dest), "proxy": len(proxy), "val": len(val)}


def rebuild_check_data(npz: str, data_dir: str):
    """CIFAR-10's folder in data_dir (a new one) from make_check_data's npz. Not ../shared/tools/cifar10_from_jpeg.py:
    its pickles' protocol 2 stores bytes through a call that data.py's loader refuses to make."""
    from PIL import Image

    if os.path.exists(folder := os.path.join(data_dir, FOLDER)):  # someone's CIFAR-10, or an earlier rebuild's
        fail(f"--data-dir {data_dir} already holds {FOLDER}/: give --data-npz a new folder")
    arrays = _load(npz)
    os.makedirs(folder)
    for split, names in (("train", TRAIN_FILES), ("test", [TEST_FILE])):
        raw, off, labels = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"], arrays[f"{split}_labels"]
        images = np.stack([np.asarray(Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                           .transpose(2, 0, 1).reshape(-1) for i in range(len(labels))])  # the R, G, then B plane
        for k, name in enumerate(names):
            part = slice(k * 10000, (k + 1) * 10000)
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({"data": images[part], "labels": labels[part].tolist()}, f, protocol=4)


def run_figures(history: list, batch_size: int) -> dict:
    """A run's epochs' sum, a step's seconds at the steady pace (without the first epoch and its autotuning, unless it
    is the only one), and what the first took beyond it."""
    steady = history[1:] or history
    steps = round(history[-1]["train_img_s"] * history[-1]["epoch_time"]) // batch_size
    return {"epochs_run": len(history), "epochs_s": sum(r["epoch_s"] for r in history),
            "step_s": statistics.median(r["epoch_time"] for r in steady) / steps,
            "warmup_s": history[0]["epoch_s"] - statistics.median(r["epoch_s"] for r in steady)}


def stage1_figures(results: str) -> dict:
    """Each finished trial's configuration and epochs, and its span: from its start to the next trial's, or for the
    last to its end. All from the study in RESULTS/stage1.db (the first: stage 2's own comes after it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = f"sqlite:///{os.path.join(results, 'stage1.db')}"
    try:
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    except Exception:  # no study, or none readable: the projection goes without stage 1's costs
        return {"trials": []}
    done = [t for t in study.trials if t.datetime_complete]
    ends = [t.datetime_start for t in done[1:]] + [t.datetime_complete for t in done[-1:]]
    return {"trials": [{"config": t.user_attrs["config"], "train_time_s": t.user_attrs["train_time_s"],
                        "span_s": (end - t.datetime_start).total_seconds(),
                        **run_figures(t.user_attrs["history"], t.user_attrs["config"]["batch_size"])}
                       for t, end in zip(done, ends) if t.user_attrs.get("history")]}


def stage2_figures(results: str) -> dict:
    """Each model's epochs (the history in its last.pt) and test accuracy (test_metrics.json)."""
    models = []
    for path in sorted(glob.glob(os.path.join(results, "stage2", "*", "last.pt"))):
        state, tested = torch.load(path, weights_only=True), os.path.join(os.path.dirname(path), "test_metrics.json")
        models.append({"model": os.path.basename(os.path.dirname(path)), "config": state["config"],
                       **run_figures(state["history"], state["config"]["batch_size"]),
                       "test_acc": _load(tested)["accuracy"] if os.path.isfile(tested) else None})
    return {"models": models}


def run_s(row: dict, step_s: float, costs: dict, stage: int) -> float:
    """A stage-1 trial or a stage-2 model (with its float32 test) of row's configuration at full length."""
    images, epochs, saves = ((PLAN["stage1_images"], PLAN["stage1_epochs"], 1) if stage == 1 else
                             (PLAN["stage2_images"], PLAN["stage2_epochs"], 2))  # stage 2: last.pt and best.pt
    epoch = images // row["batch_size"] * step_s + row["val_s"] + saves * row["save_s"] + costs["epoch_extra_s"]
    once = costs["trial_overhead_s"] if stage == 1 else costs["model_fixed_s"] + row["test_s"]
    return once + row["setup_s"] + row["warmup_s"] + epochs * epoch


def project(grid: dict, stage1: dict, stage2: dict) -> dict:
    """The plan's wall time: "bound", an upper bound at the speeds measured (every trial and model at full length of
    the costliest configuration, each step the slower of the grid's two epochs', scaled up where the stages' own ran
    slower), and "estimate" (stage 1 evenly over the configurations, stage 2 the seed's, the grid's mean steps scaled
    by the stages' median ratio). Their costs besides the grid's, from the stages' runs (the max, or the mean):
    epoch_extra_s (pruner, TensorBoard), trial_overhead_s (with the warm-up beyond the grid's), stage1_one_off_s (the
    stage's start, data and reports) and model_fixed_s (all of stage 2's run but its epochs, setup and test)."""
    rows = {config_name(r): r for r in grid.get("configs", [])}
    if not rows:
        return {**PLAN, "note": "no projection: the grid of step times did not run"}
    trials, models = stage1.get("trials", []), stage2.get("models", [])
    ratios = [run["step_s"] / statistics.mean(rows[config_name(run["config"])]["step_s"])  # the stages' over the grid's
              for run in trials + models if config_name(run["config"]) in rows and run["epochs_run"] > 1]
    zero = dict.fromkeys(("setup_s", "save_s", "test_s", "warmup_s"), 0.0)
    ran = [(t, rows.get(config_name(t["config"]), zero)) for t in trials]
    extra = [max(0.0, (t["train_time_s"] - t["epochs_s"]) / t["epochs_run"] - r["save_s"]) for t, r in ran]
    overhead = [max(0.0, t["span_s"] - t["train_time_s"] - r["setup_s"]) + max(0.0, t["warmup_s"] - r["warmup_s"])
                for t, r in ran]
    plan = {**PLAN, "step_ratios": ratios, "upper_bound": "bound"}  # the one figure called an upper bound
    seed = config_name(seed_config().to_dict())
    for kind, agg, scale in (("bound", max, max([1.0, *ratios])),
                             ("estimate", statistics.mean, statistics.median(ratios or [1.0]))):
        costs = {"epoch_extra_s": agg(extra or [0.0]), "trial_overhead_s": agg(overhead or [0.0]),
                 "stage1_one_off_s": max(0.0, stage1["wall_s"] - sum(t["span_s"] for t in trials)) if trials else 0.0,
                 "model_fixed_s": 0.0}
        if models:  # the stage ran this one model: all its time besides the epochs is the model's
            m, r = models[0], rows.get(config_name(models[0]["config"]), zero)
            rest = (stage2["wall_s"] - m["epochs_s"] - m["epochs_run"] * (2 * r["save_s"] + costs["epoch_extra_s"])
                    - r["setup_s"] - r["test_s"])
            costs["model_fixed_s"] = max(0.0, rest) + max(0.0, m["warmup_s"] - r["warmup_s"])
        trial_times, model_times = ({name: run_s(r, scale * agg(r["step_s"]), costs, stage) for name, r in rows.items()}
                                    for stage in (1, 2))
        which1 = which2 = f"the mean of the {len(rows)} configurations"
        if kind == "bound":
            which1, which2 = (f"all of {max(times, key=times.get)}" for times in (trial_times, model_times))
        elif seed in model_times:  # a smoke test's grid has no configuration of the seed's batch
            model_times, which2 = {seed: model_times[seed]}, f"the seed's, {seed}"
        trial_s, model_s = agg(trial_times.values()), agg(model_times.values())
        stage1_s = costs["stage1_one_off_s"] + PLAN["stage1_trials"] * trial_s
        stage2_s = PLAN["stage2_models"] * model_s
        plan[kind] = {"stage1_s": stage1_s, "stage2_s": stage2_s, "total_s": stage1_s + stage2_s, "step_scale": scale,
                      "trial_s": trial_s, "model_s": model_s, "stage1_configs": which1, "stage2_configs": which2,
                      **costs}
    return plan


def summary(check: dict) -> str:
    """check.md: what ran, and the projection."""
    plan = check.get("plan", {})
    lines = [f"# Check of {check['device_name']} ({check['device']}, {check['precision']}), {check['started']}", ""]
    for name, r in ((name, check[name]) for name in RUNS if name in check):
        lines.append(f"- {name}: {'ok' if r['ok'] else 'FAILED: ' + r['error']}, {clock(r['wall_s'], precise=True)}")
    for m in check.get("stage2", {}).get("models", []):
        lines.append(f"- stage 2's {m['model']}: test accuracy {m['test_acc'] or 0:.2%} after {m['epochs_run']} "
                     f"epoch(s) on stage 1's proxy (chance: 10 %)")
    for kind, label in (("estimate", "estimate"), ("bound", "upper bound at the speeds measured here")):
        if k := plan.get(kind):
            lines.append(f"- the whole plan, {label}: **{clock(k['total_s'], precise=True)}**; stage 1 "
                         f"{clock(k['stage1_s'])} ({k['stage1_configs']}), stage 2 {clock(k['stage2_s'])} "
                         f"({k['stage2_configs']})")
    lines.append(f"- {plan.get('note', 'every trial and model at full length')}")
    if check["smoke"]:
        lines.append("- a smoke test: its figures mean nothing")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="folder for check.json, check.md and results/: new, empty or an earlier check's")
    what.add_argument("--make-data", nargs=2, metavar=("JPEG_NPZ", "SUBSET_NPZ"),
                      help="only write the images' copy that travels to a lent machine (about 8 MiB)")
    p.add_argument("--data-dir", default="data", help="the folder holding cifar-10-batches-py/ (default: data)")
    p.add_argument("--data-npz", metavar="NPZ", help="first rebuild CIFAR-10 in --data-dir from this --make-data file")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--smoke", action="store_true", help="tiny runs: a test that all runs, minutes on 2 CPU cores")
    p.add_argument("--pack", action="store_true", help="OUT/results/ as results.tar.gz, without the checkpoints")
    args = p.parse_args(argv)
    if args.make_data:
        made = make_check_data(*args.make_data)
        print(f"wrote {args.make_data[1]}: {made['bytes'] / 2**20:.1f} MiB, the JPEGs of {made['proxy']:,} proxy, "
              f"{made['val']:,} validation and the test images")
        return
    out, started = os.path.abspath(args.out), time.monotonic()
    others = sorted(set(os.listdir(out)) - set(OURS)) if os.path.isdir(out) else []
    if others or os.path.isfile(out):  # anything else in it is someone's
        fail(f"--out {args.out} holds files the check did not write ({', '.join(others[:3])}); give it a new or "
             f"empty folder" if others else f"--out {args.out} is a file, not a folder")
    if args.data_npz:
        rebuild_check_data(args.data_npz, args.data_dir)
    if importlib.util.find_spec("optuna") is None:
        fail("Optuna is not installed (stage 1 needs it): pip install -r requirements.txt, or on a lent GPU machine "
             "as tools/check_gpu.py's docstring shows")
    try:
        load_cifar10(args.data_dir, download=False, test=False)
    except DataError as e:
        fail(str(e))
    device = open_device(args.device)
    check = {"device": str(device), "device_name": device_name(device), "precision": PRECISION[resolve_amp(device)],
             "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "smoke": args.smoke, "ok": False}
    for name in OURS:  # an earlier check's: stage 1 would resume its finished study and run nothing
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    results = os.path.join(out, "results")
    os.makedirs(os.path.join(results, "logs"))
    for name, (script, flags, smoke_flags) in RUNS.items():
        own = (["--json", os.path.join(results, f"{name}.json")] if script.startswith("tools/") else
               ["--data-dir", os.path.abspath(args.data_dir), "--no-download", "--results", results])
        cmd = [script, *(smoke_flags if args.smoke else flags), "--device", args.device, *own]
        print(f"== {name}: python {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        with open(os.path.join(results, "logs", f"{name}.log"), "w+") as log:  # its output; the last line is shown
            ok = subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0
            log.seek(0)
            last = ([line.strip() for line in log if line.strip()] or ["no output"])[-1]
        print(f"   {'done' if ok else 'FAILED'} in {clock(time.monotonic() - t0, precise=True)}: {last}", flush=True)
        check[name] = {"ok": ok, "wall_s": time.monotonic() - t0, **({} if ok else {"error": last})}
        if script.startswith("tools/") and ok:
            check[name]["figures"] = _load(os.path.join(results, f"{name}.json"))
        check[name].update({"stage1": stage1_figures, "stage2": stage2_figures}.get(name, lambda _: {})(results))
        check["wall_s"] = time.monotonic() - started
        with open(os.path.join(out, "check.json"), "w") as f:  # after each run: a check cut short keeps it
            json.dump(check, f, indent=2)
    check["plan"] = project(check["grid"].get("figures", {}), check["stage1"], check["stage2"])
    check.update(ok=all(check[n]["ok"] for n in RUNS) and "bound" in check["plan"], wall_s=time.monotonic() - started)
    if args.pack:
        check["packed"] = pack(out)
    for name, text in (("check.json", json.dumps(check, indent=2)), ("check.md", summary(check))):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    print("\n" + summary(check), end="")
    sys.exit(0 if check["ok"] else 1)


def pack(out: str) -> str:
    """results/ as results.tar.gz without the checkpoints (*.pt), in place of the folder."""
    with tarfile.open(os.path.join(out, "results.tar.gz"), "w:gz") as tar:
        tar.add(os.path.join(out, "results"), arcname="results", filter=lambda m: None if m.name.endswith(".pt") else m)
    shutil.rmtree(os.path.join(out, "results"))
    return "results.tar.gz"


if __name__ == "__main__":
    main()
