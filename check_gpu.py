"""Check a GPU machine end to end: is it set up right, and how long will the whole plan take on it?

    python check_gpu.py --out check [--data-dir data] [--device auto] [--pack]
    python check_gpu.py --device cpu --smoke --out /tmp/check --data-dir ../shared/data   # CI, ~2 min
    python check_gpu.py --make-data ../shared/data/cifar10-jpeg.npz SUBSET.npz           # what travels

This module owns the check's plan (which of the project's scripts run, at what size), the image
subset that travels to a lent machine (--make-data, --data-npz), the projection of the plan's wall
time, and OUT/check.json and OUT/check.md. The runs themselves are the project's own scripts, each
in a process of its own as a user starts it, writing what they always write, under OUT/results/:

1. bench.py --quick --images 9000: the model step (images/s, MFU against the card's dense matmul peak
   in the precision training uses: bf16 on an H100), our pipeline end to end against the PIL
   DataLoader feeding the same step, peak memory, the operations a training step dispatches
   (OUT/results/bench.json);
2. bench.py --grid: every configuration of stage 1's search space that differs in cost (16 shapes,
   batch 64 or 128, AdamW or SGD: 64) timed as a stage runs it, through the Trainer: its setup, one
   training step (augmentation included), one validation of the 5,000, the first epoch's warm-up,
   one checkpoint (OUT/results/grid.json);
3. stage1_search.py --trials 2 --epochs 3: a 2-trial search on the plan's 20 % proxy: Optuna, and
   what a trial and an epoch cost around the training (OUT/results/stage1/);
4. stage2_final.py --config configs/seed_recipe.json --epochs 3: the seed's configuration on the
   45,000 training images, then its test on the 10,000 test images (OUT/results/stage2/, report.md);
5. the projection of the plan (40 stage-1 trials of 20 epochs on the 9,000-image proxy, then 3
   models of at most 120 epochs on the 45,000): for each configuration its steps times its step
   time, plus its validations, checkpoints, warm-up and setup, per epoch and per trial or model, and
   the stages' own costs from 3 and 4 (`project`). Two figures: an upper bound at the speeds
   measured (every trial and model at full length and of the costliest configuration) and an
   estimate (full length too; stage 1's trials spread evenly over the search space, stage 2's
   models of the seed's configuration). Pruning and early stopping only shorten the plan.

About 4-5 minutes on one H100 or H200 (estimated from the parts' sizes, not yet timed on one).
On a CPU without --smoke it is the same check at the same size: hours on 2 cores (the grid alone
times 64 configurations). --smoke shrinks every run to a few seconds' worth of images (the bench:
128 images a turn, 1 round, no largest shape, no operation count; the grid: the cheapest shape's
4 configurations at a 16th of the batch; each stage: 1 % of the images, 1 epoch): it checks that
everything runs, and its projection means nothing.

Writes at the top of OUT only check.json (every figure), check.md (the summary it also prints) and
results/ (the scripts' outputs, and logs/ with each script's output); --pack replaces results/ by
results.tar.gz, the same without the *.pt checkpoints. Exit code 0 when every step ran, 1 when one
failed (the others still run, and check.md says which), 2 for a bad flag or folder.

On a GPU machine lent through the project's device tool (no internet, no Optuna, at most 64 MiB
carried, tree included; see ../shared/README.md), bring Optuna's wheels and the check's subset of
the images in an ignored folder (.devdata/ is in .gitignore):

    # here, once
    mkdir -p .devdata/check && cp ../shared/device-wheels/*.whl .devdata/check/
    python check_gpu.py --make-data ../shared/data/cifar10-jpeg.npz .devdata/check/cifar10-check.npz
    # the device command, with carry [".devdata/check"]
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/check/*.whl && export PYTHONPATH=/tmp/site \\
      && python3 check_gpu.py --data-npz .devdata/check/cifar10-check.npz --data-dir /tmp/data --out "$OUT" --pack

$OUT then brings back check.json, check.md and results.tar.gz. The subset is 24,000 of the 60,000
JPEGs (about 22 of 55 MiB): the 9,000 training images of stage 1's proxy, the 5,000 validation
images (both as data.split_indices draws them, the split both stages use) and the 10,000 test
images. --data-npz rebuilds CIFAR-10's folder from it with all 50,000 training slots, each slot
outside the proxy and validation holding one of the proxy's images of its own class, in turn: every
label, the split and stage 1's images are CIFAR-10's own, so stage 1's accuracies are those the
real data gives, while stage 2 trains on 45,000 images of which 9,000 differ (each 5 times), and
its test accuracy (on the real 10,000 test images) shows that training learns on that machine, not
what the recipe reaches. Times do not depend on which images a slot holds.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from cli import OneLineParser, clock

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_RECIPE = os.path.join(HERE, "configs", "seed_recipe.json")

# The plan, as README.md runs it: stage 1's and stage 2's defaults.
PLAN = {"stage1_trials": 40, "stage1_epochs": 20, "stage1_subset": 0.2,
        "stage1_train_images": 9000,  # 20 % of the 45,000, stratified
        "stage2_models": 3, "stage2_epochs": 120, "stage2_train_images": 45000,
        "val_images": 5000, "test_images": 10000}

# What each step runs: the check's size, and --smoke's.
SIZES = {
    False: {"bench": ["--quick", "--images", "9000"], "grid": ["--grid"],
            "stage1": {"epochs": 3, "subset": 0.2, "seed": 0}, "stage2": {"epochs": 3, "subset": 1.0}},
    # Seed 39: the study's first two proposals both have patch 4 and width 128, so that no patch-2
    # trial (about 5x the FLOPs) pushes the CPU smoke test past CI's two minutes.
    True: {"bench": ["--quick", "--images", "128", "--rounds", "1", "--no-largest", "--ops", "off"],
           "grid": ["--grid", "--grid-tiny"],
           "stage1": {"epochs": 1, "subset": 0.01, "seed": 39}, "stage2": {"epochs": 1, "subset": 0.01}},
}
OUR_NAMES = ("check.json", "check.md", "results", "results.tar.gz")  # everything the check writes at OUT's top
SUBSET_NOTE = "check_subset.json"  # beside cifar-10-batches-py/ in a folder that --data-npz rebuilt: what it holds


class CheckError(Exception):
    """Bad input: the message is the whole story, shown as one line."""


# ----------------------------------------------------------------------------- the images that travel


def make_check_data(src: str, dest: str) -> dict:
    """Write the check's subset (see the module's docstring) of a JPEG npz with the keys of
    ../shared/data/cifar10-jpeg.npz (train_jpeg, train_offsets, train_labels, train_filenames, and test_*
    alike): the same keys for the images kept, and train_slots, the kept image that each of the 50,000
    training slots holds. Returns what it holds, in numbers."""
    import numpy as np
    import torch

    from data import split_indices

    if not dest.endswith(".npz"):
        raise CheckError(f"--make-data writes an .npz file, got {dest}")
    try:
        with np.load(src) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckError(f"cannot read {src} ({type(e).__name__}: {e})") from None
    missing = [f"{split}_{k}" for split in ("train", "test") for k in ("jpeg", "offsets", "labels", "filenames")
               if f"{split}_{k}" not in arrays]
    if missing:
        raise CheckError(f"{src} lacks {', '.join(missing)}: give the JPEG copy, ../shared/data/cifar10-jpeg.npz")
    labels = arrays["train_labels"].astype(np.int64)
    # The very split both stages draw (seed 0), so that stage 1's images are the real ones.
    proxy, val = (i.numpy() for i in split_indices(torch.from_numpy(labels), subset_ratio=PLAN["stage1_subset"]))
    keep = np.sort(np.concatenate([proxy, val]))
    slots = np.full(len(labels), -1, dtype=np.int64)
    slots[keep] = np.arange(len(keep))
    for c in np.unique(labels):  # the other slots: the proxy's images of their class, in turn
        donors = slots[proxy[labels[proxy] == c]]
        empty = np.flatnonzero((slots < 0) & (labels == c))
        slots[empty] = donors[np.arange(len(empty)) % len(donors)]
    raw, off = arrays["train_jpeg"], arrays["train_offsets"]
    blobs = [raw[off[i]:off[i + 1]] for i in keep]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(off.dtype)
    out = {"train_jpeg": np.concatenate(blobs), "train_offsets": offsets, "train_labels": arrays["train_labels"][keep],
           "train_filenames": arrays["train_filenames"][keep], "train_slots": slots.astype(np.int32),
           **{k: v for k, v in arrays.items() if k.startswith("test_")}}
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    np.savez(dest, **out)
    return {"npz": dest, "bytes": os.path.getsize(dest), "train_slots": len(slots), "train_kept": len(keep),
            "proxy": len(proxy), "val": len(val), "test": len(arrays["test_labels"])}


def subset_figures(slots, labels) -> dict:
    """How many different images each part of the split sees, where training slot i holds stored image
    slots[i] of label labels[i]: the split and the proxy as both stages draw them."""
    import numpy as np
    import torch

    from data import split_indices

    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    train, val = split_indices(y)
    proxy, _ = split_indices(y, subset_ratio=PLAN["stage1_subset"])
    distinct = lambda idx: int(len(np.unique(np.asarray(slots)[idx.numpy()])))  # noqa: E731
    return {"stage1_proxy": len(proxy), "stage1_proxy_distinct": distinct(proxy), "stage2_train": len(train),
            "stage2_train_distinct": distinct(train), "val": len(val), "val_distinct": distinct(val),
            "val_shared_with_training": int(len(np.intersect1d(np.asarray(slots)[val.numpy()],
                                                               np.asarray(slots)[train.numpy()])))}


def _decode(raw, off):
    """Each JPEG as CIFAR-10's 3,072 bytes (the R, then G, then B plane), as ../shared/tools/cifar10_from_jpeg.py
    decodes it."""
    import io

    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())).convert("RGB"),
                                dtype=np.uint8).transpose(2, 0, 1).reshape(-1) for i in range(len(off) - 1)])


def rebuild_check_data(npz: str, data_dir: str) -> dict:
    """CIFAR-10's folder (data_batch_1..5, test_batch, batches.meta) from make_check_data's npz, in data_dir,
    with SUBSET_NOTE beside it, which the check's summary quotes. A folder that already holds CIFAR-10 is
    refused unless an earlier rebuild wrote it."""
    import pickle

    import numpy as np

    from data import CLASSES, FOLDER, TEST_FILE, TRAIN_FILES

    folder, note_path = os.path.join(data_dir, FOLDER), os.path.join(data_dir, SUBSET_NOTE)
    if os.path.isdir(folder) and not os.path.isfile(note_path):
        raise CheckError(f"--data-dir {data_dir} already holds {FOLDER}/, which --data-npz did not write; give "
                         f"--data-npz a new folder")
    try:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckError(f"cannot read --data-npz {npz} ({type(e).__name__}: {e})") from None
    if "train_slots" not in arrays:
        raise CheckError(f"--data-npz {npz} has no train_slots: make it with --make-data")
    slots = arrays["train_slots"]
    labels = arrays["train_labels"][slots]
    note = {"made_by": "check_gpu.py --data-npz", "npz": os.path.basename(npz), "train_slots": len(slots),
            "test": len(arrays["test_labels"]), **subset_figures(slots, labels)}
    os.makedirs(folder, exist_ok=True)
    with open(note_path, "w") as f:  # first: a rebuild cut short is still ours to redo
        json.dump(note, f, indent=2)

    def write(name, data, labels, filenames):
        batch = {"batch_label": f"{name} (the check's subset, rebuilt from JPEG)", "labels": [int(v) for v in labels],
                 "data": np.ascontiguousarray(data), "filenames": [bytes(f).decode() for f in filenames]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=4)

    train = _decode(arrays["train_jpeg"], arrays["train_offsets"])[slots]
    names = arrays["train_filenames"][slots]
    per_file = len(slots) // len(TRAIN_FILES)
    for k, name in enumerate(TRAIN_FILES):
        part = slice(k * per_file, (k + 1) * per_file)
        write(name, train[part], labels[part], names[part])
    write(TEST_FILE, _decode(arrays["test_jpeg"], arrays["test_offsets"]), arrays["test_labels"],
          arrays["test_filenames"])
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_file, "num_vis": 3072}, f, protocol=4)
    return note


# ----------------------------------------------------------------------------- before the runs


def check_out(out: str):
    """OUT must be new, empty, or an earlier check's: anything else in it is someone's."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckError(f"--out {out} is a file, not a folder")
    others = sorted(set(os.listdir(out)) - set(OUR_NAMES)) if os.path.isdir(out) else []
    if others:
        raise CheckError(f"--out {out} holds files the check did not write ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); give it a new or empty folder")


def prepare_out(out: str):
    """An earlier check's files go: stage 1 would resume its finished study and run nothing."""
    for name in OUR_NAMES:
        path = os.path.join(out, name)
        if os.path.lexists(path):
            _remove(path)
    os.makedirs(os.path.join(out, "results", "logs"))


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def environment(device_arg: str, data_dir: str, download: bool) -> dict:
    """The machine and its software, after checking that the device, Optuna and the data are there."""
    if importlib.util.find_spec("optuna") is None:
        raise CheckError("Optuna is not installed (stage 1 needs it): pip install -r requirements.txt; on a lent "
                         "GPU machine install ../shared/device-wheels as this script's docstring shows")
    import optuna
    import torch

    from bench import PRECISION, cpu_model, device_name, use_device
    from data import DataError, load_cifar10
    from cli import resolve_device
    from train import resolve_amp

    try:
        resolve_device(device_arg)
        ds = load_cifar10(data_dir, download=download)
    except DataError as e:
        raise CheckError(str(e)) from None
    device = use_device(device_arg)
    env = {"device": str(device), "device_type": device.type, "device_name": device_name(device),
           "precision": PRECISION[resolve_amp(device, "auto")], "torch": torch.__version__,
           "optuna": optuna.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu_model() or platform.processor(), "cpu_count": os.cpu_count(),
           "data_dir": os.path.abspath(data_dir), "train_images": len(ds.train_labels),
           "test_images": len(ds.test_labels)}
    note = os.path.join(data_dir, SUBSET_NOTE)
    if os.path.isfile(note):
        env["data_subset"] = _load_json(note)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", driver=_nvidia_driver())
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


# ----------------------------------------------------------------------------- the runs


def run_step(name: str, cmd: list, log_path: str, out: str) -> dict:
    """Run one of the project's scripts, its output echoed and kept in log_path."""
    print(f"\n== {name}: {_shown(cmd)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines as they come, not at its end
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE)
        try:
            for line in proc.stdout:
                log.write(line)
                print("   " + line, end="", flush=True)
            code = proc.wait()
        except KeyboardInterrupt:  # it got the same Ctrl-C: let it save what it has and stop
            proc.wait()
            raise
    wall = time.monotonic() - t0
    done = "done" if code == 0 else f"FAILED (exit code {code})"
    print(f"== {name}: {done} in {clock(wall, precise=True)}", flush=True)
    result = {"ok": code == 0, "exit_code": code, "wall_s": wall, "command": _shown(cmd),
              "log": os.path.relpath(log_path, out)}
    if code:
        with open(log_path) as f:
            lines = [line.rstrip() for line in f if line.strip()]
        result["error"] = lines[-1] if lines else f"exit code {code}, no output"
    return result


def _shown(cmd: list) -> str:
    """The command as a user would type it in the project's folder."""
    inside = HERE + os.sep
    return " ".join(["python", *(c[len(inside):] if c.startswith(inside) else c for c in cmd[1:])])


def steady(history: list) -> list:
    """The epochs that show the steady pace: all but the first (cuDNN and cuBLAS autotuning, the
    allocator's growth, lazy initialisation), unless there is only one."""
    return history[1:] if len(history) > 1 else history


def epoch_figures(history: list, plan_images: int) -> dict:
    """A run's measured epochs, and one epoch's wall time at the plan's number of training images:
    training scales with the images, validation (a fixed 5,000) does not. At the plan's size the two
    are the same figure. warmup_s: what the first epoch took beyond the steady pace, which every run
    pays once."""
    recs = steady(history)
    steady_epoch_s = statistics.median(r["epoch_s"] for r in recs)
    return {
        "epoch_s": [r["epoch_s"] for r in history],
        "train_s": [r["epoch_time"] for r in history],
        "train_img_s": [r["train_img_s"] for r in history],
        "train_images": round(history[-1]["train_img_s"] * history[-1]["epoch_time"]),
        "steady_epoch_s": steady_epoch_s,
        "plan_epoch_s": statistics.median(plan_images / r["train_img_s"] for r in recs)
                        + statistics.median(r["epoch_s"] - r["epoch_time"] for r in recs),
        "warmup_s": max(0.0, history[0]["epoch_s"] - steady_epoch_s) if len(history) > 1 else 0.0,
    }


def _load_json(path: str):
    with open(path) as f:
        return json.load(f)


def stage1_figures(out: str) -> dict:
    """Each trial's shape, accuracy and epochs, from the per-trial folders stage 1 wrote."""
    out_dir = os.path.join(out, "results", "stage1")
    spans = trial_spans(os.path.join(out, "results", "stage1.db"))
    trials = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        metrics_path = os.path.join(out_dir, name, "metrics.json")
        if not (name.startswith("trial_") and os.path.isfile(metrics_path)):
            continue
        m, cfg = _load_json(metrics_path), _load_json(os.path.join(out_dir, name, "config.json"))["config"]
        t = {"trial": int(name.split("_")[1]), "shape": _shape(cfg), "config": cfg, "epochs_run": m["epochs_run"],
             "best_val_acc": m["best_val_acc"], "train_time_s": m["train_time_s"]}
        t.update(spans.get(t["trial"], {}))
        if m["history"]:
            t.update(epoch_figures(m["history"], PLAN["stage1_train_images"]))
            # checkpoint, TensorBoard and the pruner after each epoch: outside epoch_s, inside train_time_s
            t["after_epoch_s"] = max(0.0, m["train_time_s"] - sum(t["epoch_s"])) / len(m["history"])
        trials.append(t)
    done = [t for t in trials if t["best_val_acc"] >= 0]
    return {"trials": trials, "best_val_acc": max((t["best_val_acc"] for t in done), default=None),
            "summary": "results/stage1/summary.md"}


def trial_spans(db: str) -> dict:
    """Each trial's start and end in the study's storage (stage 1's default, RESULTS/stage1.db), in seconds
    from the first trial's start: what a trial costs outside its epochs."""
    if not os.path.isfile(db):
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = f"sqlite:///{db}"
        trials = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage).trials
    except Exception:  # a study the stage left unreadable: the projection then does without the spans
        return {}
    timed = [t for t in trials if t.datetime_start and t.datetime_complete]
    if not timed:
        return {}
    zero = min(t.datetime_start for t in timed)
    return {t.number: {"started_s": (t.datetime_start - zero).total_seconds(),
                       "ended_s": (t.datetime_complete - zero).total_seconds()} for t in timed}


def stage2_figures(out: str) -> dict:
    """Each model's epochs (the history in its last.pt) and test figures (test_metrics.json)."""
    import torch

    out_dir = os.path.join(out, "results", "stage2")
    models = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        last = os.path.join(out_dir, name, "last.pt")
        if not os.path.isfile(last):
            continue
        state = torch.load(last, map_location="cpu", weights_only=True)
        m = {"model": name, "shape": _shape(state["config"]), "config": state["config"], "epochs_run": state["epoch"],
             "best_epochs": sum(1 for r in state["history"] if r.get("is_best")),
             **epoch_figures(state["history"], PLAN["stage2_train_images"])}
        metrics = os.path.join(out_dir, name, "test_metrics.json")
        if os.path.isfile(metrics):
            t = _load_json(metrics)
            m.update(test_acc=t["accuracy"], test_acc_ci95=t.get("accuracy_ci95"), best_val_acc=t.get("val_acc"),
                     best_epoch=t.get("epoch"), test_images=t.get("test_images"))
        models.append(m)
    return {"models": models, "report": "results/stage2/report.md"}


def _shape(cfg: dict) -> str:
    return (f"patch {cfg['patch_size']}, width {cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
            f"batch {cfg['batch_size']}")


GRID_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "batch_size", "optimizer")  # bench.GRID_KEYS


def _key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in GRID_KEYS)


def config_name(cfg: dict) -> str:
    return (f"patch {cfg['patch_size']}, width {cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
            f"batch {cfg['batch_size']}, {cfg['optimizer']}")


def seed_key() -> tuple:
    return _key(_load_json(SEED_RECIPE))


def step_ratios(grid: dict, stage1: dict, stage2: dict) -> list:
    """The stages' own steady training steps over the grid's step of the same configuration (the grid's
    recipe is the costliest, so about 1 or below), for each measured trial and model the grid holds."""
    rows = {_key(r): r for r in grid.get("configs", [])}
    ratios = []
    for run in [*stage1.get("trials", []), *stage2.get("models", [])]:
        row = rows.get(_key(run["config"])) if "config" in run else None
        if row is None or len(run.get("train_s", [])) < 2:
            continue
        steps = run["train_images"] // run["config"]["batch_size"]
        ratios.append(statistics.median(steady(run["train_s"])) / steps / statistics.mean(row["step_s"]))
    return ratios


def stage_costs(grid: dict, stage1: dict, stage2: dict, agg) -> dict:
    """What the plan costs outside the grid's figures, from the two stages' runs, shape aside (agg: max for
    the bound, mean for the estimate, over the measured trials):
    epoch_extra_s, a stage-1 epoch's work besides training, validation and its checkpoint (the pruner, the
    storage, TensorBoard), which bounds stage 2's (TensorBoard) too; trial_overhead_s, a trial's besides its
    Trainer's setup and its epochs (Optuna, its files, the reports after it); stage1_one_off_s, the stage's
    start, data and study, last reports, and the first trial's warm-up beyond the grid's (the process's
    first kernels); model_fixed_s, a stage-2 model's besides its setup, epochs, checkpoints and test (the
    process's start, the data, the report), counted for each model."""
    rows = {_key(r): r for r in grid.get("configs", [])}
    zero = {"setup_s": 0.0, "save_s": 0.0, "val_s": 0.0, "warmup_s": 0.0}
    trials = sorted((t for t in stage1.get("trials", []) if t.get("epoch_s")), key=lambda t: t["trial"])
    costs = {"epoch_extra_s": 0.0, "trial_overhead_s": 0.0, "stage1_one_off_s": 0.0, "model_fixed_s": 0.0}
    if trials:
        row = [rows.get(_key(t["config"]), zero) for t in trials]
        costs["epoch_extra_s"] = agg([max(0.0, t["after_epoch_s"] - r["save_s"]) for t, r in zip(trials, row)])
        inside = sum(t["train_time_s"] + r["setup_s"] for t, r in zip(trials, row))
        if all("started_s" in t for t in trials):
            spans = [b["started_s"] - a["started_s"] for a, b in zip(trials, trials[1:])]
            spans.append(trials[-1]["ended_s"] - trials[-1]["started_s"])
            costs["trial_overhead_s"] = agg([max(0.0, span - t["train_time_s"] - r["setup_s"])
                                             for span, t, r in zip(spans, trials, row)])
            one_off = stage1["wall_s"] - (trials[-1]["ended_s"] - trials[0]["started_s"])
        else:  # no storage to read: all of the stage's time outside the epochs, once for each trial and once more
            costs["trial_overhead_s"] = max(0.0, stage1["wall_s"] - inside) / len(trials)
            one_off = stage1["wall_s"] - inside
        costs["stage1_one_off_s"] = max(0.0, one_off) + max(0.0, trials[0]["warmup_s"] - row[0]["warmup_s"])
    models = [m for m in stage2.get("models", []) if m.get("epoch_s")]
    if models:
        m = models[0]  # the stage ran this one model: all of its time outside the epochs is the model's
        r = rows.get(_key(m["config"]), zero) if "config" in m else zero
        saves = m["epochs_run"] + m.get("best_epochs", m["epochs_run"])
        rest = (stage2["wall_s"] - sum(m["epoch_s"]) - saves * r["save_s"] - len(m["epoch_s"]) * costs["epoch_extra_s"]
                - r["setup_s"] - r["val_s"] * PLAN["test_images"] / PLAN["val_images"])
        costs["model_fixed_s"] = max(0.0, rest) + max(0.0, m["warmup_s"] - r["warmup_s"])
    return costs


def trial_s(row: dict, step_s: float, costs: dict) -> float:
    """One stage-1 trial of this configuration at full length: setup, warm-up, and 20 epochs of training
    (9,000 images, the last partial batch dropped), validation, a checkpoint and the rest."""
    epoch = (PLAN["stage1_train_images"] // row["batch_size"] * step_s + row["val_s"] + row["save_s"]
             + costs["epoch_extra_s"])
    return costs["trial_overhead_s"] + row["setup_s"] + row["warmup_s"] + PLAN["stage1_epochs"] * epoch


def model_s(row: dict, step_s: float, costs: dict) -> float:
    """One stage-2 model of this configuration at full length: 120 epochs on 45,000 images, each with its
    validation and two checkpoints (best.pt and last.pt), then the test of 10,000 images."""
    epoch = (PLAN["stage2_train_images"] // row["batch_size"] * step_s + row["val_s"] + 2 * row["save_s"]
             + costs["epoch_extra_s"])
    test = row["val_s"] * PLAN["test_images"] / PLAN["val_images"]
    return costs["model_fixed_s"] + row["setup_s"] + row["warmup_s"] + PLAN["stage2_epochs"] * epoch + test


def project(grid: dict, stage1: dict, stage2: dict) -> dict:
    """The plan's wall time, counted step by step for each configuration of the search space from the grid's
    figures (`trial_s`, `model_s`) and the stages' own costs (`stage_costs`); "bound" and "estimate" are
    missing where the grid gave no figure.

    bound: every stage-1 trial and stage-2 model at full length and of the costliest configuration (the
    models' is not known before stage 1 ends), each step the slower of the grid's two epochs, scaled up
    where the stages' own steps ran slower than the grid's; an upper bound at the speeds measured here.
    estimate: full length too, stage 1's trials spread evenly over the search space, stage 2's three
    models of the seed's configuration, each step the grid's mean scaled by the stages' median ratio."""
    plan = dict(PLAN)
    rows = grid.get("configs", [])
    if not rows:
        plan["note"] = "no projection: the grid of step times did not run"
        return plan
    ratios = step_ratios(grid, stage1, stage2)
    plan["step_ratios"] = ratios
    scale = {"bound": max([1.0, *ratios]), "estimate": statistics.median(ratios) if ratios else 1.0}
    seed = {_key(r): r for r in rows}.get(seed_key())
    for kind, agg in (("bound", max), ("estimate", statistics.mean)):
        costs = stage_costs(grid, stage1, stage2, agg)
        pick = (lambda r: max(r["step_s"])) if kind == "bound" else (lambda r: statistics.mean(r["step_s"]))
        trials = [(trial_s(r, scale[kind] * pick(r), costs), r) for r in rows]
        models = [(model_s(r, scale[kind] * pick(r), costs), r) for r in rows]
        if kind == "bound":
            t1, r1 = max(trials, key=lambda x: x[0])
            t2, r2 = max(models, key=lambda x: x[0])
            one_trial, which1 = t1, f"all of {config_name(r1)}"
            one_model, which2 = t2, f"all of {config_name(r2)}"
        else:
            one_trial, which1 = statistics.mean(t for t, _ in trials), f"the mean of the {len(rows)} configurations"
            if seed is not None:
                one_model, which2 = model_s(seed, scale[kind] * pick(seed), costs), f"the seed's, {config_name(seed)}"
            else:  # a smoke test's grid holds no batch of the seed's size
                one_model, which2 = statistics.mean(t for t, _ in models), f"the mean of the {len(rows)} configurations"
        stage1_s = costs["stage1_one_off_s"] + PLAN["stage1_trials"] * one_trial
        stage2_s = PLAN["stage2_models"] * one_model
        plan[kind] = {"stage1_s": stage1_s, "stage2_s": stage2_s, "total_s": stage1_s + stage2_s,
                      "trial_s": one_trial, "model_s": one_model, "stage1_configs": which1, "stage2_configs": which2,
                      "step_scale": scale[kind], **costs}
    plan["upper_bound"] = "bound"  # the one figure called an upper bound
    plan["note"] = ("counted step by step: each configuration's steps times its step time measured by bench.py "
                    "--grid; every trial and model at full length (stage 1's pruner and both stages' early "
                    "stopping only shorten the plan); the bound takes the costliest configuration for all of them "
                    "(and a trial's bookkeeping as the check's 2 trials measured it), the estimate stage 1's "
                    "configurations evenly and the seed's for stage 2")
    return plan


# ----------------------------------------------------------------------------- the summary


def _flops(tflops: float) -> str:
    return f"{tflops:,.0f} TFLOP/s" if tflops >= 10 else f"{tflops * 1e3:,.0f} GFLOP/s"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def summary(check: dict) -> str:
    env, info = check["environment"], check["check"]
    lines = [f"# Check of {env['device_name']} ({env['device']})", "",
             f"{info['started']}, {'smoke test (tiny runs), ' if info['smoke'] else ''}"
             f"took {clock(info['wall_s'], precise=True)}; "
             f"{'all steps ran' if info['ok'] else 'SOME STEPS FAILED'}.", "",
             f"- torch {env['torch']}"
             + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, driver {env['driver'] or 'unknown'}"
                if env["device_type"] == "cuda" else "")
             + f", Optuna {env['optuna']}, Python {env['python']}",
             f"- training precision {env['precision']}" + (f"; {env['gpu_count']} GPU(s), {env['gpu_memory_gb']} GB, "
                                                           f"compute capability {env['compute_capability']}"
                                                           if env["device_type"] == "cuda" else ""),
             f"- CPU {env['cpu']}, {env['cpu_count']} cores; data {env['data_dir']}",
             *data_lines(env),
             "", "| step | result | figures |", "|---|---|---|"]
    b = check.get("bench", {})
    if b.get("figures"):
        f = b["figures"]
        figures = (f"model step {f['step_img_s']:,.0f} img/s, MFU {100 * f['step_mfu']:.1f} % of "
                   f"{_flops(f['matmul_peak_tflops'])} {f['matmul_peak_dtype']} (its matmul peak); end to end "
                   f"{f['e2e_img_s']:,.0f} img/s ({100 * f['e2e_over_step']:.0f} % of the step), PIL DataLoader "
                   f"{f['baseline_e2e_img_s']:,.0f} img/s (ours {f['e2e_ratio']:.2f}x); peak memory "
                   f"{f['peak_mem_mb']:,.0f} MB ({f['peak_mem_kind']})")
        if "ops_per_step_eager" in f:
            launches = f.get("launches_per_step_eager")
            figures += (f"; a training step of the seed's configuration dispatches {f['ops_per_step_eager']:,.0f} "
                        f"operations" + (f" ({launches:,.0f} kernel launches)" if launches else "")
                        + f" in {f['ops_precision']}")
    else:
        figures = b.get("error", "")
    lines.append(f"| bench | {_result(b)} | {figures} |")
    g = check.get("grid", {})
    if g.get("figures", {}).get("configs"):
        rows = g["figures"]["configs"]
        fast, slow = (f(rows, key=lambda r: statistics.mean(r["step_s"]) / r["batch_size"]) for f in (min, max))
        figures = (f"{len(rows)} configurations; per image, the fastest step {_per_image(fast)} ({config_name(fast)}), "
                   f"the slowest {_per_image(slow)} ({config_name(slow)})")
    else:
        figures = g.get("error", "")
    lines.append(f"| grid | {_result(g)} | {figures} |")
    s1 = check.get("stage1", {})
    trials = "; ".join(f"trial {t['trial']} ({t['shape']}): {_pct(t['best_val_acc'])} val after {t['epochs_run']} "
                       f"epoch(s), {t['steady_epoch_s']:.1f} s an epoch" for t in s1.get("trials", [])
                       if "steady_epoch_s" in t)
    lines.append(f"| stage 1 | {_result(s1)} | {trials or s1.get('error', '')} |")
    s2 = check.get("stage2", {})
    models = "; ".join(f"{m['model']}: test accuracy {_pct(m.get('test_acc'))} (val {_pct(m.get('best_val_acc'))}) "
                       f"after {m['epochs_run']} epoch(s), {m['steady_epoch_s']:.1f} s an epoch of "
                       f"{m['train_images']:,} training images" for m in s2.get("models", []))
    lines.append(f"| stage 2 | {_result(s2)} | {models or s2.get('error', '')} |")
    lines += ["", "## Projected time of the plan", "", *plan_lines(check.get("plan", {}), info["smoke"]), ""]
    where = "results.tar.gz" if info.get("packed") else "results/"
    lines += ["", f"Every figure: check.json; the runs' outputs and logs: {where}"]
    return "\n".join(lines) + "\n"


def _per_image(row: dict) -> str:
    return f"{1e6 * statistics.mean(row['step_s']) / row['batch_size']:,.1f} us"


def data_lines(env: dict) -> list:
    """What the data is, where the check rebuilt its subset: what its accuracies then mean."""
    d = env.get("data_subset")
    if not d:
        return []
    return [f"- data: the check's subset ({d['npz']}): stage 1's {d['stage1_proxy']:,} proxy images and the "
            f"{d['val']:,} validation images are CIFAR-10's own ({d['val_shared_with_training']} validation images "
            f"also train), so stage 1's accuracies are the real data's; stage 2 trains on {d['stage2_train']:,} "
            f"slots holding {d['stage2_train_distinct']:,} different images, and is tested on the {d['test']:,} "
            f"real test images: its test accuracy says that training learns on this machine (chance: 10 %), not "
            f"what the recipe reaches"]


def plan_lines(p: dict, smoke: bool) -> list:
    if "bound" not in p:
        return [f"- {p.get('note', 'no projection')}"]
    b, e = p["bound"], p["estimate"]
    lines = [f"- stage 1, {p['stage1_trials']} trials of {p['stage1_epochs']} epochs on "
             f"{p['stage1_train_images']:,} images: estimate {clock(e['stage1_s'], precise=True)} "
             f"({clock(e['trial_s'], precise=True)} a trial, {e['stage1_configs']}), at most "
             f"{clock(b['stage1_s'], precise=True)} ({clock(b['trial_s'], precise=True)} a trial, {b['stage1_configs']}); "
             f"both with {clock(e['stage1_one_off_s'], precise=True)} of start, data and reports",
             f"- stage 2, {p['stage2_models']} models of up to {p['stage2_epochs']} epochs on "
             f"{p['stage2_train_images']:,} images, then the test: estimate {clock(e['stage2_s'], precise=True)} "
             f"({clock(e['model_s'], precise=True)} a model, {e['stage2_configs']}), at most "
             f"{clock(b['stage2_s'], precise=True)} ({clock(b['model_s'], precise=True)} a model, {b['stage2_configs']})",
             f"- **whole plan: estimate {clock(e['total_s'], precise=True)}; upper bound {clock(b['total_s'], precise=True)}** "
             f"at the speeds measured here; {p['note']}"]
    if p.get("step_ratios"):
        lines.append(f"- the stages' own training steps ran at {', '.join(f'{r:.2f}' for r in p['step_ratios'])} x "
                     f"the grid's step of the same configuration (whose recipe is the costliest); the bound scales "
                     f"the grid's steps by {b['step_scale']:.2f}, the estimate by {e['step_scale']:.2f}")
    if smoke:
        lines.append("- smoke test: these figures come from tiny runs and mean nothing")
    return lines


def _result(step: dict) -> str:
    if not step:
        return "not run"
    return f"ok, {clock(step['wall_s'], precise=True)}" if step["ok"] else f"FAILED (exit code {step['exit_code']})"


def write(out: str, check: dict):
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(check, f, indent=2)
    with open(os.path.join(out, "check.md"), "w") as f:
        f.write(summary(check))


def pack(out: str) -> str:
    """results/ as results.tar.gz, without the checkpoints (*.pt), in place of the folder."""
    results, archive = os.path.join(out, "results"), os.path.join(out, "results.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(results, arcname="results", filter=lambda m: None if m.name.endswith(".pt") else m)
    shutil.rmtree(results)
    return archive


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for check.json, check.md and results/ (new, empty, or an earlier check's, "
                                 "which this one replaces); needed but with --make-data")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--data-npz", metavar="NPZ",
                   help="first rebuild --data-dir's CIFAR-10 from this subset (written by --make-data), as a lent "
                        "GPU machine does; a --data-dir holding CIFAR-10 of another origin is refused")
    p.add_argument("--make-data", nargs=2, metavar=("JPEG_NPZ", "SUBSET_NPZ"),
                   help="only write the subset of the images that travels to a lent machine, from the JPEG copy "
                        "(../shared/data/cifar10-jpeg.npz) to SUBSET_NPZ (about 22 MiB; see above), and stop")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                                                    "(default: auto)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny runs of every step (stages at 1 %% of the images for 1 epoch, a 128-image bench, the "
                        "grid's cheapest shape at a 16th of the batch): a test that everything runs, about 2 "
                        "minutes on 2 CPU cores")
    p.add_argument("--pack", action="store_true",
                   help="replace OUT/results/ by OUT/results.tar.gz, the same without *.pt, so that OUT holds "
                        "3 files (what a lent machine's $OUT can bring back)")
    args = p.parse_args(argv)
    if args.make_data:
        try:
            made = make_check_data(*args.make_data)
        except (CheckError, OSError) as e:
            sys.exit(f"error: {e}")
        print(f"wrote {made['npz']}: {made['bytes'] / 2**20:.1f} MiB, {made['train_kept']:,} training images "
              f"({made['proxy']:,} of stage 1's proxy, {made['val']:,} validation) for {made['train_slots']:,} "
              f"slots, and {made['test']:,} test images")
        return
    if not args.out:
        p.error("--out is required (but with --make-data)")
    out = os.path.abspath(args.out)
    started = time.monotonic()
    try:
        check_out(out)  # before the data: a bad --out fails at once
        rebuilt = None
        if args.data_npz:
            t0 = time.monotonic()
            rebuild_check_data(args.data_npz, args.data_dir)
            rebuilt = {"npz": os.path.abspath(args.data_npz), "wall_s": time.monotonic() - t0}
            print(f"rebuilt CIFAR-10's folder from {args.data_npz} in {args.data_dir} in "
                  f"{clock(rebuilt['wall_s'], precise=True)}", flush=True)
        env = environment(args.device, args.data_dir, download=not args.no_download and not args.data_npz)
        prepare_out(out)  # after: a missing GPU or data leaves an earlier check as it was
    except (CheckError, OSError) as e:
        sys.exit(f"error: {e}")
    results, logs = os.path.join(out, "results"), os.path.join(out, "results", "logs")
    size = SIZES[args.smoke]
    if env["device_type"] == "cpu" and not args.smoke:
        print("no --smoke on a CPU: the check at its full size takes hours on 2 cores", flush=True)
    check = {"check": {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "smoke": args.smoke, "argv": sys.argv[1:] if argv is None else list(argv)},
             "environment": env}
    if rebuilt:
        check["data_rebuild"] = rebuilt
    common = ["--data-dir", os.path.abspath(args.data_dir), "--device", args.device]
    py = sys.executable

    def finish(ok: bool):
        check["check"].update(ok=ok, wall_s=time.monotonic() - started)
        write(out, check)

    try:
        for name, script, json_name in (("bench", "bench", "bench.json"), ("grid", "grid", "grid.json")):
            path = os.path.join(results, json_name)
            check[name] = run_step(name, [py, os.path.join(HERE, "bench.py"), *size[script], "--json", path, *common],
                                   os.path.join(logs, f"{name}.log"), out)
            if check[name]["ok"]:
                check[name]["figures"] = _load_json(path)
            finish(False)  # after each step: a check cut short keeps what it measured

        s1 = size["stage1"]
        check["stage1"] = run_step("stage 1", [py, os.path.join(HERE, "stage1_search.py"), "--trials", "2",
                                               "--epochs", str(s1["epochs"]), "--subset", str(s1["subset"]),
                                               "--seed", str(s1["seed"]), "--no-download", "--results", results,
                                               *common], os.path.join(logs, "stage1.log"), out)
        check["stage1"].update(stage1_figures(out))
        finish(False)

        s2 = size["stage2"]
        check["stage2"] = run_step("stage 2", [py, os.path.join(HERE, "stage2_final.py"), "--config", SEED_RECIPE,
                                               "--epochs", str(s2["epochs"]), "--subset", str(s2["subset"]),
                                               "--no-download", "--results", results, *common],
                                   os.path.join(logs, "stage2.log"), out)
        check["stage2"].update(stage2_figures(out))
    except KeyboardInterrupt:
        finish(False)
        print(f"\ninterrupted: what was measured so far is in {os.path.join(out, 'check.json')}", file=sys.stderr)
        sys.exit(130)
    check["plan"] = project(check["grid"].get("figures", {}), check["stage1"], check["stage2"])
    ok = all(check[k]["ok"] for k in ("bench", "grid", "stage1", "stage2")) and "bound" in check["plan"]
    if args.pack:
        check["check"]["packed"] = os.path.relpath(pack(out), out)
    finish(ok)
    print("\n" + summary(check), end="", flush=True)
    print(f"written: {os.path.join(out, 'check.json')}, check.md and {'results.tar.gz' if args.pack else 'results/'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
