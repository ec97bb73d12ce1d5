"""Check a GPU machine end to end: is it set up right, and how long will the whole plan take on it?

    python check_gpu.py --out check [--data-dir data] [--device auto] [--pack]
    python check_gpu.py --device cpu --smoke --out /tmp/check --data-dir ../shared/data   # CI, ~2 min

This module owns the check's plan (which of the project's scripts run, at what size), the
projection of the seed plan's wall time from the epochs the check measured, and OUT/check.json and
OUT/check.md. The runs themselves are the project's own scripts, each in a process of its own as a
user starts it, writing what they always write, under OUT/results/:

1. bench.py --quick: the model step (images/s, MFU against the card's dense matmul peak in the
   precision training uses: bf16 on an H100), our pipeline end to end against the PIL DataLoader
   feeding the same step, peak memory (OUT/results/bench.json);
2. stage1_search.py --trials 2 --epochs 3: a 2-trial search on the plan's 20 % proxy (OUT/results/stage1/);
3. stage2_final.py --config configs/seed_recipe.json --epochs 3: the seed's best configuration on all
   45,000 training images, then its test on the 10,000 test images (OUT/results/stage2/, report.md);
4. the projection of the seed plan: 40 stage-1 trials of 20 epochs on the 20 % proxy, then 3 models
   of at most 120 epochs on the 45,000 images, from the measured per-epoch wall times (the first
   epoch of a run left out: it pays for warming up). An upper bound: pruning and early stopping
   only shorten the plan.

About 4 minutes on one H100 (estimated from the parts' sizes, not yet timed on one; at most 8).
On a CPU without --smoke it is the same check at the same size: about half an hour on 2 cores.
--smoke shrinks every run to a few seconds' worth of images (stage 1: 1 % of the images, 1 epoch;
stage 2: 1 %, 1 epoch; the bench: 128 images a turn, 1 round, no largest shape): it checks that
everything runs, and its projection means little.

Writes at the top of OUT only check.json (every figure), check.md (the summary it also prints) and
results/ (the scripts' outputs, and logs/ with each script's output); --pack replaces results/ by
results.tar.gz, the same without the *.pt checkpoints. Exit code 0 when every step ran, 1 when one
failed (the others still run, and check.md says which), 2 for a bad flag or folder.

On a GPU machine lent through the project's device tool (no internet, no Optuna, at most 64 MiB
carried; see ../shared/README.md), bring the data and Optuna in an ignored folder:

    # here, once
    mkdir -p .devdata && echo /.devdata/ >> .git/info/exclude
    cp ../shared/data/cifar10-jpeg.npz ../shared/tools/cifar10_from_jpeg.py ../shared/device-wheels/*.whl .devdata/
    # the device command, with carry [".devdata"]
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/*.whl && export PYTHONPATH=/tmp/site \\
      && python3 .devdata/cifar10_from_jpeg.py --npz .devdata/cifar10-jpeg.npz --out /tmp/data \\
      && python3 check_gpu.py --data-dir /tmp/data --out "$OUT" --pack

$OUT then brings back check.json, check.md and results.tar.gz.
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

# The seed plan, as README.md runs it: stage 1's and stage 2's defaults.
PLAN = {"stage1_trials": 40, "stage1_epochs": 20, "stage1_train_images": 9000,  # 20 % of 45,000, stratified
        "stage2_models": 3, "stage2_epochs": 120, "stage2_train_images": 45000}

# What each step runs: the check's size, and --smoke's.
SIZES = {
    False: {"bench": ["--quick"], "stage1": {"epochs": 3, "subset": 0.2, "seed": 0},
            "stage2": {"epochs": 3, "subset": 1.0}},
    # Seed 39: the study's first two proposals both have patch 4 and width 128, so that no patch-2
    # trial (about 5x the FLOPs) pushes the CPU smoke test past CI's two minutes.
    True: {"bench": ["--quick", "--images", "128", "--rounds", "1", "--no-largest"],
           "stage1": {"epochs": 1, "subset": 0.01, "seed": 39}, "stage2": {"epochs": 1, "subset": 0.01}},
}
OUR_NAMES = ("check.json", "check.md", "results", "results.tar.gz")  # everything the check writes at OUT's top


class CheckError(Exception):
    """Bad input: the message is the whole story, shown as one line."""


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
    trials = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        metrics_path = os.path.join(out_dir, name, "metrics.json")
        if not (name.startswith("trial_") and os.path.isfile(metrics_path)):
            continue
        m, cfg = _load_json(metrics_path), _load_json(os.path.join(out_dir, name, "config.json"))["config"]
        t = {"trial": int(name.split("_")[1]), "shape": _shape(cfg), "config": cfg, "epochs_run": m["epochs_run"],
             "best_val_acc": m["best_val_acc"], "train_time_s": m["train_time_s"]}
        if m["history"]:
            t.update(epoch_figures(m["history"], PLAN["stage1_train_images"]))
            # checkpoint, TensorBoard and the pruner after each epoch: outside epoch_s, inside train_time_s
            t["after_epoch_s"] = max(0.0, m["train_time_s"] - sum(t["epoch_s"])) / len(m["history"])
        trials.append(t)
    done = [t for t in trials if t["best_val_acc"] >= 0]
    return {"trials": trials, "best_val_acc": max((t["best_val_acc"] for t in done), default=None),
            "summary": "results/stage1/summary.md"}


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
        m = {"model": name, "shape": _shape(state["config"]), "epochs_run": state["epoch"],
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


def project(stage1: dict, stage2: dict) -> dict:
    """The seed plan's wall time from the measured epochs; a stage's keys are missing where it gave
    no epoch.

    Stage 1: trials x (epochs x (an epoch at 9,000 images, plus what runs after each epoch) + the
    first epoch's warm-up), averaged over the measured trials' shapes, plus the stage's one-off cost
    (start, data, reports). Stage 2: models x (epochs x an epoch at 45,000 images + the first
    epoch's warm-up + the rest of a model's run: start, data, test, reports, checkpoints)."""
    plan = dict(PLAN)
    trials = [t for t in stage1.get("trials", []) if "plan_epoch_s" in t]
    if trials:
        per_epoch = statistics.mean(t["plan_epoch_s"] + t["after_epoch_s"] for t in trials)
        warmup = statistics.mean(t["warmup_s"] for t in trials)
        one_off = max(0.0, stage1["wall_s"] - sum(t["train_time_s"] for t in trials))
        plan.update(stage1_epoch_s=per_epoch, stage1_warmup_s=warmup, stage1_one_off_s=one_off,
                    stage1_s=PLAN["stage1_trials"] * (PLAN["stage1_epochs"] * per_epoch + warmup) + one_off,
                    stage1_shapes=[t["shape"] for t in trials])
    models = stage2.get("models", [])
    if models:
        m = models[0]
        # The stage ran this one model: all of its time outside the epochs is the model's.
        rest = max(0.0, stage2["wall_s"] - sum(m["epoch_s"]))
        plan.update(stage2_epoch_s=m["plan_epoch_s"], stage2_warmup_s=m["warmup_s"], stage2_model_rest_s=rest,
                    stage2_s=PLAN["stage2_models"] * (PLAN["stage2_epochs"] * m["plan_epoch_s"] + m["warmup_s"] + rest))
    if "stage1_s" in plan and "stage2_s" in plan:
        plan["total_s"] = plan["stage1_s"] + plan["stage2_s"]
    plan["upper_bound"] = True
    plan["note"] = ("an upper bound: every trial and model is counted at its full length, while stage 1's median "
                    "pruner and both stages' early stopping only shorten the plan; stage 1's epoch is the mean of "
                    "the measured trials' shapes (the search's 16 shapes differ up to 15x in FLOPs, and TPE "
                    "settles on the winners), stage 2's is the seed's best configuration, for all 3 models")
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
             "", "| step | result | figures |", "|---|---|---|"]
    b = check.get("bench", {})
    if b.get("figures"):
        f = b["figures"]
        figures = (f"model step {f['step_img_s']:,.0f} img/s, MFU {100 * f['step_mfu']:.1f} % of "
                   f"{_flops(f['matmul_peak_tflops'])} {f['matmul_peak_dtype']} (its matmul peak); end to end "
                   f"{f['e2e_img_s']:,.0f} img/s ({100 * f['e2e_over_step']:.0f} % of the step), PIL DataLoader "
                   f"{f['baseline_e2e_img_s']:,.0f} img/s (ours {f['e2e_ratio']:.2f}x); peak memory "
                   f"{f['peak_mem_mb']:,.0f} MB ({f['peak_mem_kind']})")
    else:
        figures = b.get("error", "")
    lines.append(f"| bench | {_result(b)} | {figures} |")
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
    p = check.get("plan", {})
    lines += ["", "## Projected time of the seed plan", ""]
    if "stage1_s" in p:
        lines.append(f"- stage 1: {p['stage1_trials']} trials x ({p['stage1_epochs']} epochs x "
                     f"{p['stage1_epoch_s']:.1f} s (an epoch at {p['stage1_train_images']:,} images) + "
                     f"{p['stage1_warmup_s']:.1f} s warm-up) + {clock(p['stage1_one_off_s'], precise=True)} start "
                     f"and reports = "
                     f"{clock(p['stage1_s'], precise=True)}")
    if "stage2_s" in p:
        lines.append(f"- stage 2: {p['stage2_models']} models x ({p['stage2_epochs']} epochs x "
                     f"{p['stage2_epoch_s']:.1f} s (an epoch at {p['stage2_train_images']:,} images) + "
                     f"{p['stage2_warmup_s']:.1f} s warm-up + {clock(p['stage2_model_rest_s'], precise=True)} start, "
                     f"test and "
                     f"reports) = {clock(p['stage2_s'], precise=True)}")
    if "total_s" in p:
        lines.append(f"- **whole plan: at most {clock(p['total_s'], precise=True)}**, {p['note']}"
                     + (". Smoke test: these figures come from tiny runs and mean little" if info["smoke"] else ""))
    else:
        lines.append("- no projection: a stage gave no epoch to measure")
    where = "results.tar.gz" if info.get("packed") else "results/"
    lines += ["", f"Every figure: check.json; the runs' outputs and logs: {where}"]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", required=True, help="folder for check.json, check.md and results/ (new, empty, or an "
                                                "earlier check's, which this one replaces)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding (or to receive) cifar-10-batches-py/ (default: data)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading CIFAR-10")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                                                    "(default: auto)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny runs of every step (stages at 1 %% of the images for 1 epoch, a 128-image bench): "
                        "a test that everything runs, about 2 minutes on 2 CPU cores")
    p.add_argument("--pack", action="store_true",
                   help="replace OUT/results/ by OUT/results.tar.gz, the same without *.pt, so that OUT holds "
                        "3 files (what a lent machine's $OUT can bring back)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    started = time.monotonic()
    try:
        check_out(out)  # before the data: a bad --out fails at once
        env = environment(args.device, args.data_dir, download=not args.no_download)
        prepare_out(out)  # after: a missing GPU or data leaves an earlier check as it was
    except (CheckError, OSError) as e:
        sys.exit(f"error: {e}")
    results, logs = os.path.join(out, "results"), os.path.join(out, "results", "logs")
    size = SIZES[args.smoke]
    if env["device_type"] == "cpu" and not args.smoke:
        print("no --smoke on a CPU: the check at its full size takes about half an hour on 2 cores", flush=True)
    check = {"check": {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "smoke": args.smoke, "argv": sys.argv[1:] if argv is None else list(argv)},
             "environment": env}
    common = ["--data-dir", os.path.abspath(args.data_dir), "--device", args.device]
    py = sys.executable

    def finish(ok: bool):
        check["check"].update(ok=ok, wall_s=time.monotonic() - started)
        write(out, check)

    try:
        bench_json = os.path.join(results, "bench.json")
        check["bench"] = run_step("bench", [py, os.path.join(HERE, "bench.py"), *size["bench"], "--json", bench_json,
                                            *common], os.path.join(logs, "bench.log"), out)
        if check["bench"]["ok"]:
            check["bench"]["figures"] = _load_json(bench_json)
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
    check["plan"] = project(check["stage1"], check["stage2"])
    ok = all(check[k]["ok"] for k in ("bench", "stage1", "stage2")) and "total_s" in check["plan"]
    if args.pack:
        check["check"]["packed"] = os.path.relpath(pack(out), out)
    finish(ok)
    print("\n" + summary(check), end="", flush=True)
    print(f"written: {os.path.join(out, 'check.json')}, check.md and {'results.tar.gz' if args.pack else 'results/'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
