"""Stage-1 workers for real: several processes at once on one storage, workers killed with SIGKILL,
a worker of another machine that went silent, bad command lines, a full or read-only disk.

PostgreSQL tests need VIT_TEST_POSTGRES_URL (a user allowed to create databases): .ci/run starts a
throwaway server (.ci/postgres.sh). Without it they are skipped, except on CI (CI=1), where they fail.
"""

import contextlib
import fcntl
import glob
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

import stage1_search
from conftest import signal_after, start_as_a_terminal_would
from storage import open_storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The real command line (main) on tiny synthetic data, its test-only switches described in the module.
WORKER = os.path.join(ROOT, "tests", "synthetic_stage1.py")


@pytest.fixture
def worker(tmp_path):
    started = []

    def start(*args, env=None, prefix=()):
        started.append(subprocess.Popen([*prefix, sys.executable, WORKER, "--results", str(tmp_path), *args],
                                        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT))
        return started[-1]
    yield start
    for proc in started:  # a failed test must not leave a parked worker behind for an hour
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path}/stage1.db" if request.param == "sqlite" else str(tmp_path / "stage1.journal")


def trials_of(url):
    """The study's trials as they are now; no connection is left open (a test may unmount the file's disk)."""
    storage = open_storage(url, heartbeat=5)
    try:
        return optuna.load_study(study_name="vit-cifar10", storage=storage).trials
    finally:
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()


def finish(proc, timeout=300):
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0 and "Traceback" not in out, out
    return out


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def kill_parked_worker(proc, marker):
    """SIGKILL once the worker sits inside its trial after epoch 1; reap it, as its shell would."""
    wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_four_workers_started_at_once_on_a_new_storage(tmp_path, worker, storage_url):
    """Before the schema lock, 4 workers on a fresh SQLite file crashed with 'table alembic_version already exists'.
    --trials 1: each worker checks the total after its trial, so 4 workers started together finish 1 + 3."""
    barrier = str(tmp_path / "go")
    with open(barrier, "w") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)
        procs = [worker("--storage", storage_url, "--trials", "1", "--epochs", "1", "--seed", str(seed),
                        env={"START_BARRIER": barrier}) for seed in range(4)]
        deadline = time.time() + 120
        while len(glob.glob(barrier + ".*")) < 4:  # all four have imported torch and wait at the gate
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.2)  # from its marker to the lock call a worker takes microseconds
        fcntl.flock(gate, fcntl.LOCK_UN)
    for p in procs:
        finish(p)
    trials = trials_of(storage_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # the documented bound, reached
    assert {t.user_attrs["pid"] for t in trials} == {p.pid for p in procs}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_four_workers_creating_a_new_storage_at_the_same_moment_never_crash(tmp_path, request, kind):
    """Optuna's schema race, 6 rounds of 4 workers: the first 4-worker test alone caught the
    race of the old code in 2 runs of 3."""
    rounds = 6
    if kind == "postgresql":
        urls = [request.getfixturevalue("new_postgres_database")() for _ in range(rounds)]
    else:
        urls = [f"sqlite:///{tmp_path}/round{i}.db" for i in range(rounds)]
    script, gate = os.path.join(ROOT, "tests", "storage_racer.py"), str(tmp_path / "gate")
    gates = [open(f"{gate}.{i}", "w") for i in range(rounds)]
    for g in gates:
        fcntl.flock(g, fcntl.LOCK_EX)
    procs = [subprocess.Popen([sys.executable, script, gate, *urls], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(4)]
    for i, g in enumerate(gates):
        deadline = time.time() + 120
        while len(glob.glob(f"{gate}.{i}.*")) < 4:
            crashed = [p.communicate()[0].decode() for p in procs if p.poll() is not None]
            assert time.time() < deadline and not crashed, crashed
            time.sleep(0.02)
        time.sleep(0.1)
        fcntl.flock(g, fcntl.LOCK_UN)
        g.close()
    for p in procs:
        finish(p)
    for url in urls:
        assert trials_of(url) == []


def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint_once_its_heartbeat_is_stale(tmp_path, worker):
    url = f"sqlite:///{tmp_path}/stage1.db"
    command = ["--storage", url, "--total", "2", "--epochs", "2", "--patience", "2", "--heartbeat", "1"]
    marker = str(tmp_path / "parked")
    kill_parked_worker(worker(*command, env={"HANG_IN_TRIAL": "1", "HANG_MARKER": marker}), marker)
    before = trials_of(url)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]  # nobody has noticed the death yet
    killed = before[1]
    assert os.path.isfile(tmp_path / "stage1" / "trial_0001" / "last.pt")
    time.sleep(2 * 1 + 1)  # silent for longer than 2 heartbeats: stale from now on

    out = finish(worker(*command))  # the same command: Optuna fails the stale trial and queues it again
    assert (f"trial    1 FAIL     its worker ({socket.gethostname()} pid {killed.user_attrs['pid']}) stopped beating; "
            f"attempt 1 of the configuration: queued again") in out, out
    assert "trial    2 COMPLETE" in out and "(went on from trial 1's epoch 1)" in out
    trials = trials_of(url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]  # 2 completed
    first, retry = trials[0], trials[2]
    assert (first.value, first.params, first.user_attrs["history"], first.datetime_complete) == (
        before[0].value, before[0].params, before[0].user_attrs["history"], before[0].datetime_complete)
    assert retry.params == killed.params and retry.system_attrs["retry_history"] == [1]
    assert retry.user_attrs["resumed_from"] == {"trial": 1, "epoch": 1}
    assert retry.user_attrs["history"][0] == killed.user_attrs["history"][0]  # epoch 1 is the killed trial's own
    assert len(retry.user_attrs["history"]) == 2


def test_a_journal_file_has_no_heartbeat_so_a_killed_worker_s_trial_is_not_retried(tmp_path, worker):
    """As Optuna gives it, and as --help says: the study still reaches its total, with a new trial."""
    url = str(tmp_path / "stage1.journal")
    command = ["--storage", url, "--total", "1", "--epochs", "1", "--heartbeat", "1"]
    marker = str(tmp_path / "parked")
    kill_parked_worker(worker(*command, env={"HANG_IN_TRIAL": "0", "HANG_MARKER": marker}), marker)
    finish(worker(*command))  # (an RDB storage would now fail the silent trial and retry it)
    assert [t.state for t in trials_of(url)] == [TrialState.RUNNING, TrialState.COMPLETE]
    said = subprocess.run([sys.executable, os.path.join(ROOT, "stage1_search.py"), "--help"], capture_output=True,
                          text=True).stdout
    assert "gives no heartbeat: a killed worker's trial is not retried there" in " ".join(said.split())


def test_a_silent_worker_of_another_machine_is_taken_over_through_the_heartbeat(tmp_path, worker, postgres_url):
    """The dead worker ran under another host name (a UTS namespace), so no local check applies:
    only Optuna's heartbeat can tell that it died."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --uts needs root (it gives the first worker another host name)")
    command = ["--storage", postgres_url, "--trials", "1", "--epochs", "2", "--patience", "2", "--heartbeat", "2"]
    marker = str(tmp_path / "parked")
    elsewhere = ["unshare", "--uts", "sh", "-c", 'hostname machine-b && exec "$@"', "sh"]
    kill_parked_worker(worker(*command, env={"HANG_IN_TRIAL": "0", "HANG_MARKER": marker}, prefix=elsewhere), marker)
    time.sleep(2 * 2 + 1)  # silent for longer than 2 heartbeats: stale from now on, whatever the machine's speed

    out = finish(worker(*command))
    assert "trial    0 FAIL     its worker (machine-b pid" in out and "queued again" in out, out
    trials = trials_of(postgres_url)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # --trials 1 ran the retry
    assert trials[0].user_attrs["host"] == "machine-b" and trials[1].user_attrs["host"] == socket.gethostname()
    assert trials[1].params == trials[0].params and trials[1].user_attrs["resumed_from"] == {"trial": 0, "epoch": 1}


def test_bad_input_ends_in_one_line_without_a_traceback(tmp_path, capsys, fake_cifar_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {  # flags: what stderr must say
        ("--subset", "0"): "argument --subset: must be in (0, 1], got 0.0",
        ("--subset", "1.5"): "argument --subset: must be in (0, 1], got 1.5",
        ("--trials", "-1"): "argument --trials: must be positive, got -1",
        ("--epochs", "0"): "argument --epochs: must be positive, got 0",
        ("--total", "0"): "argument --total: must be positive, got 0",
        ("--trials", "3", "--total", "3"): "argument --total: not allowed with argument --trials",
        ("--device", "tpu9"): "cannot use device 'tpu9': not a device name; use auto, cpu, cuda, cuda:N or mps",
        ("--storage", "postgresql://u:secret@127.0.0.1:1/db"): "cannot open Optuna storage 'postgresql://u:***@127.0.0.1:1/db'",
        ("--storage", "postgresql://u:secret@127.0.0.1:notaport/db"): "cannot open Optuna storage 'postgresql://u:***@",
        ("--storage", "nosuchdriver://u:secret@host/db"): "cannot open Optuna storage 'nosuchdriver://u:***@host/db'",
        ("--results", str(a_file / "results")): f"cannot write results to '{a_file}/results/stage1': Not a directory",
    }
    import torch

    if not torch.cuda.is_available():
        cases[("--device", "cuda")] = "cannot use device 'cuda': torch finds no CUDA GPU on this machine"
    # Data that is there (it is looked for before the storage is opened), never read: every case stops first.
    common = ["--no-download", "--data-dir", fake_cifar_dir, "--results", str(tmp_path / "r")]
    # Three as real command lines, one of each kind of check; the rest through main() in this process.
    in_subprocesses = [("--subset", "0"), ("--storage", "postgresql://u:secret@127.0.0.1:1/db"),
                       ("--results", str(a_file / "results"))]
    procs = {flags: subprocess.Popen([sys.executable, os.path.join(ROOT, "stage1_search.py"), *common, *flags],
                                     cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flags in in_subprocesses}
    said = {}
    for flags in cases:
        if flags in procs:
            out, err = procs[flags].communicate(timeout=120)
            said[flags] = (procs[flags].returncode, out, err)
            continue
        with pytest.raises(SystemExit) as stop:
            stage1_search.main([*common, *flags])
        out, err = capsys.readouterr()
        code = stop.value.code  # main's sys.exit("error: ...") prints its message on the way out
        said[flags] = (1 if isinstance(code, str) else code, out, err + (code + "\n" if isinstance(code, str) else ""))
    for flags, (code, out, err) in said.items():
        assert code in (1, 2) and cases[flags] in err, (flags, code, err)
        assert err.count("\n") == 1 and "Traceback" not in err and "secret" not in out + err, (flags, err)
    assert not os.path.exists(tmp_path / "r" / "stage1.db")  # nothing was created for a run that never started


def test_a_full_disk_stops_the_run_in_one_line_and_leaves_the_study_whole(worker, tmpfs):
    filler = tmpfs / "other_files"  # a disk all but full: the tiny model's checkpoint (7-10 MB) does not fit
    filler.write_bytes(bytes(13 * 2**20))
    url = f"sqlite:///{tmpfs}/stage1.db"
    command = ["--results", str(tmpfs), "--storage", url, "--total", "1", "--epochs", "1"]
    full = worker(*command)
    out = full.communicate(timeout=300)[0].decode()
    assert full.returncode == 1 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == (f"error: cannot write '{tmpfs}/stage1/trial_0000/last.pt': "
                                            "No space left on device; the trials told to the study so far are kept")
    assert not glob.glob(f"{tmpfs}/**/*.tmp", recursive=True)  # the half-written checkpoint gave its space back
    with contextlib.closing(sqlite3.connect(tmpfs / "stage1.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert [t.state for t in trials_of(url)] == [TrialState.FAIL]

    filler.unlink()  # space freed: the same command goes on
    finish(worker(*command))
    assert [t.state for t in trials_of(url)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_read_only_results_folder_is_refused_before_the_study_is_touched(tmp_path, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "stage1_search.py"), "--results", str(tmpfs),
                           "--storage", f"sqlite:///{tmp_path}/stage1.db"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: cannot write results to '{tmpfs}/stage1': Read-only file system\n"), proc.stderr
    assert not os.path.exists(tmp_path / "stage1.db")


def test_a_second_ctrl_c_stops_at_once_and_the_next_start_still_goes_on_from_the_checkpoint(tmp_path, worker):
    """The first Ctrl-C waits for the running step to end; a worker parked inside trial 1 (after its epoch 1
    was saved) never ends it, so only the second stops it, at once. The trial is still queued to go on."""
    marker = str(tmp_path / "parked")
    proc = worker("--trials", "3", "--epochs", "2", env={"HANG_IN_TRIAL": "1", "HANG_MARKER": marker})
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None  # still parked: the first Ctrl-C waits for the end of the step
    proc.send_signal(signal.SIGINT)
    try:
        out = proc.communicate(timeout=120)[0].decode()
    except subprocess.TimeoutExpired:  # seen once on CI: show where the worker hangs instead of only that it does
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        pytest.fail("the worker did not stop within 120 s of the second SIGINT; its output and threads:\n"
                    + proc.communicate()[0].decode(errors="replace"))
    assert proc.returncode == 130 and "stopping at the end of the running step" in out and "Traceback" not in out, out
    trials = trials_of(f"sqlite:///{tmp_path}/stage1.db")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["interrupted"] == "Ctrl-C" and trials[2].system_attrs["retry_history"] == [1]
    summary = (tmp_path / "stage1" / "summary.md").read_text()
    assert summary.count("| FAIL |") == 1 and "stopped by Ctrl-C after epoch 1; its retry goes on from there" in summary
    out = finish(worker("--trials", "3", "--epochs", "2"))
    trials = trials_of(f"sqlite:///{tmp_path}/stage1.db")
    assert trials[2].state == TrialState.COMPLETE and trials[2].user_attrs["resumed_from"] == {"trial": 1, "epoch": 1}
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


def test_a_log_without_a_terminal_has_a_line_for_every_epoch_of_every_trial(worker):
    """nohup, a batch job, CI: stdout is a pipe, so no progress bar, but each epoch still ends in one line with
    the trial, epoch/total, train loss, validation accuracy, learning rate, speed, time so far and ETA."""
    out = finish(worker("--trials", "2", "--epochs", "2"))
    lines = re.findall(r"^trial +(\d+) epoch +(\d+)/2: train loss [\d.]+ acc [\d.]+ %, val loss [\d.]+ acc [\d.]+ %"
                       r"(?: \(best\))?, lr [\d.e+-]+, \d+s, \d+ img/s, [\d a-z]+ so far(?:, at most [\d a-z]+ left)?$",
                       out, flags=re.M)
    assert sorted((int(t), int(e)) for t, e in lines) == [(0, 1), (0, 2), (1, 1), (1, 2)], out
    assert "\r" not in out  # no progress bar off a terminal


CUT_AT = [sys.executable, WORKER, "--trials", "1", "--epochs", "4", "--patience", "4"]  # cut after epoch 2 of 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that the cut ones must end as, made once for both signals."""
    results = tmp_path_factory.mktemp("whole")
    assert "interrupted" not in finish(start_as_a_terminal_would([*CUT_AT, "--results", str(results)]))
    (alone,) = trials_of(f"sqlite:///{results}/stage1.db")
    return alone


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_trial_goes_on_from_its_last_epoch_to_the_uninterrupted_value(tmp_path, sig, code,
                                                                                            uninterrupted):
    """Stopped after epoch 2 of 4, the same command continues trial 0's configuration from that epoch's
    checkpoint, and it ends with the very value an uninterrupted run gets."""
    cut = start_as_a_terminal_would([*CUT_AT, "--results", str(tmp_path)])
    out = signal_after(cut, "trial    0 epoch   2/4", sig)
    assert cut.returncode == code and "Traceback" not in out, out
    assert out.rstrip().splitlines()[-1].startswith("interrupted: finished trials are kept, and a trial cut short "
                                                    "goes on from its last finished epoch; run the same command")
    go_on = finish(start_as_a_terminal_would([*CUT_AT, "--results", str(tmp_path)]))
    assert "trial    1 epoch   3/4" in go_on and "trial    1 epoch   1/4" not in go_on, go_on
    first, retry = trials_of(f"sqlite:///{tmp_path}/stage1.db")
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] == ("Ctrl-C" if code == 130 else "SIGTERM")
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"] == {"trial": 0, "epoch": 2}
    assert retry.params == uninterrupted.params and retry.value == uninterrupted.value
    keys = ("train_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in retry.user_attrs["history"]] == [[r[k] for k in keys]
                                                                           for r in uninterrupted.user_attrs["history"]]


def test_ctrl_c_stops_every_jobs_worker_and_each_cut_trial_goes_on_from_its_checkpoint(tmp_path):
    command = [sys.executable, WORKER, "--trials", "2", "--epochs", "2", "--jobs", "2", "--results", str(tmp_path)]
    cut = start_as_a_terminal_would(command)
    out = signal_after(cut, "trial    ", signal.SIGINT)  # the first epoch line of either worker
    assert cut.returncode == 130 and "Traceback" not in out, out
    cut_short = [t for t in trials_of(f"sqlite:///{tmp_path}/stage1.db") if "interrupted" in t.user_attrs]
    assert cut_short and all(t.state == TrialState.FAIL for t in cut_short)
    finish(start_as_a_terminal_would(command))
    trials = trials_of(f"sqlite:///{tmp_path}/stage1.db")
    assert 2 <= sum(t.state == TrialState.COMPLETE for t in trials) <= 2 + 1  # the other worker's one more at most
    went_on = [t.user_attrs["resumed_from"]["trial"] for t in trials if "resumed_from" in t.user_attrs]
    assert sorted(went_on) == sorted(t.number for t in cut_short if t.user_attrs.get("epochs_run"))


def restart_test_postgres():
    """What a managed database does in maintenance or a fail-over: the server goes, every connection with it,
    and it is back a few seconds later (.ci/postgres.sh's server, restarted in fast mode)."""
    data, bin = os.environ.get("PG_TEST_DIR"), os.environ.get("PG_TEST_BIN")
    if not data or not bin:
        if os.environ.get("CI"):
            pytest.fail("PG_TEST_DIR and PG_TEST_BIN are not set: on CI, .ci/postgres.sh exports them")
        pytest.skip("PG_TEST_DIR / PG_TEST_BIN not set (`. .ci/postgres.sh && start_test_postgres` sets them)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    subprocess.run([*as_postgres, f"{bin}/pg_ctl", "-D", f"{data}/data", "-m", "fast", "-w", "restart",
                    "-l", f"{data}/server.log"], check=True, capture_output=True, timeout=120)


def test_a_postgresql_restart_mid_trial_does_not_end_the_worker(tmp_path, postgres_url):
    proc = start_as_a_terminal_would([sys.executable, WORKER, "--results", str(tmp_path), "--storage", postgres_url,
                                      "--trials", "2", "--epochs", "6", "--heartbeat", "2"])
    seen = []
    for line in proc.stdout:
        seen.append(line.decode())
        if seen[-1].startswith("trial    0 epoch   2/6"):
            restart_test_postgres()
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0 and "Traceback" not in out, out
    trials = trials_of(postgres_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, out


def test_a_database_down_past_the_wait_ends_the_worker_in_one_line_that_says_how_to_go_on(monkeypatch, capsys):
    import sqlalchemy

    secret = "postgresql://vit:s3cret@127.0.0.1:9/vit"

    def server_gone(*args):
        try:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, OSError(f"connection to {secret} refused"))
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e

    monkeypatch.setattr(stage1_search, "run", server_gone)
    args = stage1_search.parse_args(["--storage", secret])
    assert stage1_search._run_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: lost the Optuna storage 'postgresql://vit:***@127.0.0.1:9/vit' for more than 60 s")
    assert err.rstrip().endswith("run the same command once it is back") and err.count("\n") == 1
    assert "s3cret" not in err and "Traceback" not in err
