"""Stage 2 under real faults and real concurrency: workers killed with SIGKILL, several workers on one
results folder. Each worker is a process of its own (tests/synthetic_stage2.py: the real command line
on small synthetic data)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import optuna
import pytest
import torch
from optuna.trial import TrialState

from stage2_final import parse_args, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "synthetic_stage2.py")
TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, batch_size=64, warmup_epochs=1, lr=3e-3)
TIMINGS = ("epoch_time", "train_img_s", "epoch_s")  # the only parts of an epoch's record that may differ between runs
EPOCH_LINE = re.compile(r"^(\S+) epoch +(\d+)/\d+:", re.M)


def config_file(path, *configs):
    path.write_text(json.dumps(list(configs)))
    return str(path)


def start_worker(results, *flags, n_train=200):
    """A stage-2 worker; its stdout comes line by line (unbuffered), its stderr goes to a file."""
    err = tempfile.TemporaryFile("w+")
    command = [sys.executable, WORKER, str(n_train), "--results", str(results), "--device", "cpu", *flags]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.err_file = err
    return proc


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    proc.err_file.seek(0)
    return proc.returncode, out, proc.err_file.read()


def wait_for_line(proc, pattern) -> str:
    """Read the worker's stdout until a line matches; what was read before comes back with it."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"the worker ended (rc {proc.wait()}) before printing {pattern!r}:\n{''.join(seen)}")


def epochs_in(out) -> list:
    return [(model, int(epoch)) for model, epoch in EPOCH_LINE.findall(out)]


def rows_in_study(results, url=None) -> dict:
    """Each model's report row, as its completed trial in the stage-2 study holds it."""
    study = optuna.load_study(study_name="vit-cifar10-stage2", storage=url or f"sqlite:///{results}/stage1.db")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len({t.user_attrs["model"] for t in done}) == len(done)  # each model tested once
    return {t.user_attrs["model"]: t.user_attrs["row"] for t in done}


def without_timings(history):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in history]


# ----------------------------------------------------------------------------- checkpoints


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from train import save_checkpoint
for step in range(10**6):  # a 32 MB checkpoint, again and again: most of the time one is being written
    save_checkpoint({{"step": step, "weights": torch.full((8 * 2**20,), float(step))}}, sys.argv[1])
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.pt"

    def partial_writes() -> list:
        """Temporary files of last.pt holding part of a checkpoint (but not all of it)."""
        if not path.exists():
            return []
        whole, found = path.stat().st_size, []
        for name in os.listdir(tmp_path):
            with contextlib.suppress(FileNotFoundError):  # renamed into last.pt meanwhile
                if name.startswith("last.pt.") and 0 < os.path.getsize(tmp_path / name) < 0.9 * whole:
                    found.append(name)
        return found

    for attempt in range(5):
        saver = subprocess.Popen([sys.executable, "-c", SAVER.format(root=ROOT), str(path)], cwd=ROOT)
        deadline = time.monotonic() + 30
        try:
            # A whole checkpoint, then the next one half written (a writer without a temporary file never is).
            while saver.poll() is None and not partial_writes() and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(saver.pid, signal.SIGKILL)
        finally:
            saver.kill()
            saver.wait()
        assert saver.returncode == -signal.SIGKILL
        if partial_writes():  # the kill landed while bytes were being written
            break
    else:
        pytest.fail("5 kills, none of them during a checkpoint write through a temporary file")
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["weights"], torch.full((8 * 2**20,), float(state["step"])))  # whole, not torn


# ----------------------------------------------------------------------------- workers killed and shared


def test_a_worker_killed_mid_epoch_is_resumed_after_its_last_epoch_and_ends_as_an_uninterrupted_run(tmp_path):
    cfg = config_file(tmp_path / "c.json", {**TINY, "mixup_alpha": 0.1})  # mixup: the RNG state must carry over
    flags = ("--config", cfg, "--epochs", "2", "--patience", "2", "--heartbeat", "1")
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    rc, full_out, err = finish(start_worker(tmp_path / "full", *flags, n_train=1000))
    assert rc == 0, err

    worker = start_worker(tmp_path / "cut", *flags, n_train=1000)
    try:
        wait_for_line(worker, r"^config_0 epoch +1/2:")  # printed after epoch 1's last.pt: epoch 2 is running
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    run_dir = tmp_path / "cut" / "stage2" / "config_0"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1  # killed before epoch 2's checkpoint
    assert not (run_dir / "test_metrics.json").exists()

    # What is on disk meanwhile, as a report.
    (row,) = run(parse_args(["--results", str(tmp_path / "cut"), "--report-only", *flags]))
    assert row["unfinished"] == "not finished yet (1 of 2 epochs so far)"
    assert "| config_0 | not tested |" in (tmp_path / "cut" / "stage2" / "report.md").read_text()

    time.sleep(2 * 1 + 1)  # silent for longer than 2 heartbeats: Optuna's next look fails it and queues it again
    rc, out, err = finish(start_worker(tmp_path / "cut", *flags, n_train=1000))
    assert rc == 0, err
    assert f"config_0 FAIL     its worker ({socket.gethostname()} pid {worker.pid}) stopped beating" in out, out
    assert "config_0: resuming after epoch 1 of 2" in out and epochs_in(out) == [("config_0", 2)]

    a = torch.load(tmp_path / "full" / "stage2" / "config_0" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    assert without_timings(a["history"]) == without_timings(b["history"]) and len(b["history"]) == 2
    assert a["early_stopping"] == b["early_stopping"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    done = [rows_in_study(d)["config_0"] for d in (tmp_path / "full", tmp_path / "cut")]
    tested = ("test_acc", "precision", "recall", "f1", "best_val_acc", "best_epoch", "test_images",
              "classification_report", "epochs_run", "stopped_early")
    assert {k: done[0][k] for k in tested} == {k: done[1][k] for k in tested}
    a, b = (json.load(open(tmp_path / d / "stage2" / "config_0" / "test_metrics.json")) for d in ("full", "cut"))
    assert {k: a[k] for k in ("accuracy", "macro", "per_class", "loss", "epoch")} == \
           {k: b[k] for k in ("accuracy", "macro", "per_class", "loss", "epoch")}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_share_three_models_each_trained_once_and_the_last_one_reports_all(tmp_path, request, kind):
    url = request.getfixturevalue("postgres_url") if kind == "postgresql" else f"sqlite:///{tmp_path}/stage1.db"
    cfg = config_file(tmp_path / "c.json", *[{**TINY, "lr": lr} for lr in (1e-3, 2e-3, 3e-3)])
    flags = ("--config", cfg, "--epochs", "2", "--patience", "2", "--storage", url)
    workers = [start_worker(tmp_path, *flags) for _ in range(2)]
    results = [finish(w) for w in workers]
    assert [rc for rc, _, _ in results] == [0, 0], [err for _, _, err in results]
    outs = [out for _, out, _ in results]

    # Every epoch of every model trained once, by one worker or the other, never by both.
    epochs = Counter(e for out in outs for e in epochs_in(out))
    assert epochs == {(f"config_{i}", e): 1 for i in range(3) for e in (1, 2)}
    assert sum(out.count("training from scratch") for out in outs) == 3
    out_dir = tmp_path / "stage2"
    assert sorted(rows_in_study(tmp_path, url)) == ["config_0", "config_1", "config_2"]

    report = (out_dir / "report.md").read_text()
    summary = json.load(open(out_dir / "summary.json"))["models"]
    assert [r["model"] for r in summary] == ["config_0", "config_1", "config_2"]
    for r in summary:
        assert f"## {r['model']}" in report and f"| {r['model']} | {100 * r['test_acc']:.2f} % |" in report
    assert sum("done: report in" in out for out in outs) >= 1

    # --report-only rebuilds the same report from the folders alone.
    os.remove(out_dir / "report.md")
    run(parse_args(["--results", str(tmp_path), "--report-only", *flags]))
    assert (out_dir / "report.md").read_text() == report


def test_jobs_2_trains_two_models_side_by_side_each_once_and_reports_both(tmp_path):
    cfg = config_file(tmp_path / "c.json", *[{**TINY, "lr": lr} for lr in (1e-3, 3e-3)])
    rc, out, err = finish(start_worker(tmp_path, "--config", cfg, "--epochs", "1", "--jobs", "2"))
    assert rc == 0 and "Traceback" not in err, err
    assert Counter(epochs_in(out)) == {(f"config_{i}", 1): 1 for i in range(2)}
    assert sorted(rows_in_study(tmp_path)) == ["config_0", "config_1"] and "done: report in" in out


# ----------------------------------------------------------------------------- disks


def snapshot(root) -> dict:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_full_disk_stops_stage2_in_one_line_keeps_its_checkpoints_and_it_resumes_once_freed(tmp_path, tmpfs):
    # The study on another disk: a full disk under an SQLite file is one line too (storage_lost_in_one_line), but
    # the trial it cut stays RUNNING until its heartbeat is stale.
    flags = ("--config", config_file(tmp_path / "c.json", TINY), "--epochs", "2", "--patience", "2",
             "--storage", f"sqlite:///{tmp_path}/stage1.db")
    run_dir = tmpfs / "stage2" / "config_0"
    worker = start_worker(tmpfs, *flags, n_train=1000)
    try:
        wait_for_line(worker, r"^config_0 epoch +1/2:")
        os.kill(worker.pid, signal.SIGSTOP)  # in epoch 2 (last.pt below says so), halted while the disk fills up
        kept = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt")}
        fd = os.open(tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, bytes(65536))
        os.close(fd)
        os.kill(worker.pid, signal.SIGCONT)
        rc, out, err = finish(worker)
    finally:
        worker.kill()
        worker.wait()
    assert rc == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: cannot write '{run_dir}/(best|last)\.pt': No space left on device; each model's "
                        r"last\.pt and best\.pt keep its last finished epoch: free some space \(or fix --results\) "
                        r"and run the same command again\n", err), err
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # epoch 1's, whole
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(tmpfs.rglob("*.tmp"))  # no debris

    os.remove(tmpfs / "filler")
    rc, out, err = finish(start_worker(tmpfs, *flags, n_train=1000))
    assert rc == 0, err
    assert "config_0: resuming after epoch 1 of 2" in out and epochs_in(out) == [("config_0", 2)]
    assert rows_in_study(tmp_path)["config_0"]["epochs_run"] == 2


def test_a_read_only_results_folder_is_refused_at_once_and_left_as_it_was(tmp_path, tmpfs):
    cfg = config_file(tmp_path / "c.json", TINY)
    rc, out, err = finish(start_worker(tmpfs, "--config", cfg, "--epochs", "1"))  # its own process: it holds no file
    assert rc == 0, err
    before = snapshot(tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = subprocess.run([sys.executable, "stage2_final.py", "--results", str(tmpfs), "--config", cfg, "--epochs", "1",
                           "--fresh", "--device", "cpu", "--data-dir", str(tmp_path / "none"), "--no-download"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: cannot write results to '{tmpfs}/stage2': Read-only file system\n"), proc.stderr
    assert snapshot(tmpfs) == before  # --fresh deleted nothing


@pytest.fixture(scope="module")
def cut_at(tmp_path_factory):
    """The command the cut runs repeat (it stops after epoch 2 of 4), and the results of the run they must end
    as, made once for both signals."""
    from conftest import start_as_a_terminal_would

    shared = tmp_path_factory.mktemp("whole")
    path = config_file(shared / "c.json", TINY)
    command = lambda results: [sys.executable, WORKER, "200", "--results", str(results), "--device", "cpu",  # noqa
                               "--config", path, "--epochs", "4", "--patience", "4"]
    assert start_as_a_terminal_would(command(shared)).wait(timeout=300) == 0
    return command, shared


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_after_epoch_2_of_4_goes_on_from_there_to_the_uninterrupted_result(tmp_path, sig, code,
                                                                                             cut_at):
    """Signalled as a terminal's Ctrl-C (the whole process group) or as a scheduler's SIGTERM after epoch 2 of 4:
    one line says how to go on, and the same command trains epochs 3-4 to the very model and test result of a
    run that was never stopped."""
    from conftest import signal_after, start_as_a_terminal_would

    command, whole = cut_at
    cut = start_as_a_terminal_would(command(tmp_path))
    out = signal_after(cut, "config_0 epoch   2/4", sig)
    assert cut.returncode == code and "Traceback" not in out, out
    assert out.rstrip().splitlines()[-1] == ("interrupted: each model's last.pt holds its last finished epoch; run "
                                             "the same command to continue from there")
    run_dir = tmp_path / "stage2" / "config_0"
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2
    assert not (run_dir / "test_metrics.json").exists()
    go_on = start_as_a_terminal_would(command(tmp_path))
    rest = go_on.communicate(timeout=300)[0].decode()
    assert go_on.returncode == 0 and epochs_in(rest) == [("config_0", 3), ("config_0", 4)], rest
    a = torch.load(whole / "stage2" / "config_0" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    assert without_timings(a["history"]) == without_timings(b["history"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    done = [rows_in_study(r)["config_0"] for r in (whole, tmp_path)]
    assert done[0]["test_acc"] == done[1]["test_acc"] and done[0]["f1"] == done[1]["f1"]
