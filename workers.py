"""The machinery that lets many workers share the work of both stages, and survive each other's deaths.

Stage 1's workers share an Optuna storage: opening it (and redacting its password wherever it is
shown), the lock that serialises what two workers must not do at once (create the schema, fail a
dead worker's trial and queue it again, start the last trial of a total), telling a dead worker of
this machine from a live one, the exact total, and --jobs' worker processes. Stage 2's workers
share a results folder: each model is trained by the one worker holding its claim file, and a
finished one is marked by its done.json. Neither stage's own logic lives here.

Written here rather than taken from a library where the library falls short:
- process identity and liveness: psutil's create_time drifts with the wall clock, so a recycled
  pid could pass for the dead worker; /proc's start time in clock ticks since boot does not;
- the locked exact total: Optuna's MaxTrialsCallback overshoots by up to one trial per worker;
- the takeover of a dead local worker's trial: JournalStorage has no heartbeat;
- the file lock, a blocking flock: filelock.FileLock polls, which let a late worker jump the queue
  (file_lock says what was measured); it is used only where there is no flock (Windows).
"""

import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import tempfile
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import optuna
from filelock import FileLock
from optuna.trial import TrialState
from tqdm.auto import tqdm

from cli import StorageError, install_stop_handlers, stop_requested
from data import DataError
from train import with_defaults


# ----------------------------------------------------------------------------- storage and study


def redact_url(url: str) -> str:
    """The URL with its password shown as ***: postgresql://user:***@host/db. Use it wherever a URL is shown."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", str(url))


def storage_error(url: str, e: Exception) -> StorageError:
    return StorageError(f"cannot open Optuna storage {redact_url(url)!r}: {driver_line(url, e)}")


def driver_line(url: str, e: Exception) -> str:
    """A storage error's type and first line, with `url`'s password shown as *** wherever the driver quotes it."""
    first_line = (str(e).splitlines() or [""])[0]  # drivers add pages of SQL and links below it
    if "://" in url:  # drivers may quote the URL, password included
        first_line = first_line.replace(url, redact_url(url))
        password = re.match(r"[^:]+://[^/@:]*:([^/@]*)@", url)
        if password and password.group(1):
            first_line = first_line.replace(password.group(1), "***")
    return f"{type(e).__name__}: {first_line}"


def storage_file(url: str) -> str | None:
    """The file an SQLite URL or a journal path names; None for a server."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    return url if "://" not in url else None


def make_storage(url: str, heartbeat: int):
    """An RDB URL (sqlite:///, postgresql://, mysql://) or a path to a journal file.

    A trial whose worker died is failed and queued again (at most MAX_RETRIES times), and the retry
    continues from the dead trial's last checkpoint: `fail_dead_local_trials` finds dead processes
    of this machine on any storage; on RDB storages Optuna's heartbeat also catches workers of other
    machines that stopped beating for 3 intervals.
    Any failure (a bad URL, a missing driver, an unreachable server, a foreign file) is a StorageError.
    """
    try:
        return _make_storage(url, heartbeat)
    except Exception as e:
        raise storage_error(url, e) from None


# Raised by workers that create Optuna's schema at the same moment; the loser's retry finds it made.
SCHEMA_RACE = ("already exists", "duplicate", "unique constraint", "database is locked")


def _make_storage(url: str, heartbeat: int):
    path = storage_file(url)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if path is not None:  # SQLite
        # Several workers on one SQLite file: wait for a lock instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        # A server that restarts (maintenance, a fail-over) drops every pooled connection: SQLAlchemy's
        # pessimistic disconnect handling tests each one as it is taken and opens a new one for a dead one
        # (Optuna turns it on for MySQL only), and wait_for_the_server makes that opening wait for the server.
        engine_kwargs = {"pool_pre_ping": True}
    lock = StudyLock(url)
    for attempt in range(8):
        try:
            with lock.local():  # one local worker at a time creates the tables
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    storage = optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                        heartbeat_stale_trial_callback=RequeueStaleTrial(lock),
                    )
            if path is None:
                wait_for_the_server(storage.engine)
            return storage
        except Exception as e:  # workers on other machines cannot share a file lock: retry the race
            if attempt == 7 or not any(m in str(e).lower() for m in SCHEMA_RACE):
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))


RECONNECT_S = 60  # how long a worker waits for its database server to come back before it gives up


def wait_for_the_server(engine, patience_s: float = RECONNECT_S):
    """New connections of `engine` wait, retrying every second, for up to patience_s for a server that
    refuses them (restarting), instead of failing at once; the last failure then ends the run in one line
    (stage 1's run_main: StorageError), and the same command continues once the server is back."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def connect(dialect, conn_rec, cargs, cparams):
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def through_a_restart(storage, call, *args, attempts: int = 3, **kwargs):
    """call(*args, **kwargs), again (up to `attempts` in all) when it failed because the server dropped the
    connection under it (a restart mid-query). The storage's session, left broken by the dropped connection,
    is closed first; the next attempt opens a new connection, waiting for the server (wait_for_the_server).
    For the storage calls of a running trial, which are idempotent (a report written twice is written once)."""
    import sqlalchemy

    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            # Optuna wraps the error, and its rollback fails on the dropped connection in its turn: the cause,
            # an invalidated connection, is further down the chain.
            if attempt == attempts - 1 or not any(getattr(x, "connection_invalidated", False) for x in _chain(e)):
                raise
            if isinstance(storage, optuna.storages.RDBStorage):
                storage.scoped_session.remove()
            time.sleep(1.0)


def storage_lost_in_one_line(url: str, work, *args):
    """work(*args), with a database server that went away for longer than wait_for_the_server waits turned into
    a StorageError (one line, exit 1): the trial it cut is failed by the heartbeat or the next local start and
    queued again, so the same command continues once the server is back."""
    import sqlalchemy

    try:
        return work(*args)
    except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as e:
        cause = next((x for x in _chain(e) if isinstance(x, sqlalchemy.exc.OperationalError)), None)
        if cause is None:
            raise
        raise StorageError(f"lost the Optuna storage {redact_url(url)!r} for more than {RECONNECT_S} s "
                           f"({driver_line(url, cause.orig or cause)}); the trials told to it so far are kept: run "
                           f"the same command once it is back") from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


class StudyLock:
    """Serialises what two workers must not do at once: fail a dead worker's trial and queue it
    again (twice would run it twice), and with --total, decide that one more trial is due.

    All workers of an SQLite or journal file share one machine, so a file lock beside it does; on
    PostgreSQL an advisory lock spans machines. Other servers get no lock: there two workers may
    each start the last trial of a --total.
    """

    def __init__(self, url: str):
        path = storage_file(url)  # not .lock: Optuna's journal backend uses that name for its own lock
        self.path = None if path is None else os.path.abspath(path) + ".workers.lock"
        self.engine = None
        if url.startswith(("postgresql", "postgres://")):
            import sqlalchemy

            # A connection of its own per lock, closed after: the lock dies with a killed worker.
            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @contextlib.contextmanager
    def __call__(self):
        if self.engine is None:
            with self.local():
                yield
            return
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(hashtext('vit-stage1-workers'))"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext('vit-stage1-workers'))"))

    def local(self):
        """The file lock alone (a no-op for servers): enough to keep local workers apart."""
        return file_lock(self.path)


def file_lock(path):
    """An exclusive lock on `path` (created if missing, kept after), or no lock for None. A new lock per
    call, each with its own descriptor, so that two threads of one process exclude each other too.

    A blocking flock where there is one, filelock.FileLock (on Windows) where not: FileLock polls every
    50 ms, and a worker that arrives while others wait can take the lock between two polls. Measured on
    tests/test_stage1_workers.py's four workers started at once: with FileLock one of them found the
    total taken before it got its turn in 2 of 3 runs, with flock in none of 3.
    """
    if path is None:
        return contextlib.nullcontext()
    return FileLock(path) if fcntl is None else _flock(path)


@contextlib.contextmanager
def _flock(path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the kernel wakes a waiter the moment the holder lets go
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_study(storage, study_name: str, seed: int, worker: int = 0) -> optuna.Study:
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
        # Prune only against 5 finished trials, and not before epoch 5: warmup takes 2,
        # and slow starters (SGD, small lr) are often the ones that end best.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
    )
    with warnings.catch_warnings():  # experimental in Optuna 5; optuna-dashboard then says "val_acc", not "Objective 0"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_acc"])
    # 10 random trials (a quarter of the default 40) give TPE a spread to model before it exploits;
    # constant_liar keeps parallel workers from proposing the same configuration. The seed moves
    # with the study's length, so a resumed run does not replay the first run's proposals, and with
    # the worker's index, so that --jobs' workers, started together, do not propose the same ones.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials) + 100_003 * worker, n_startup_trials=10, multivariate=True, constant_liar=True
    )
    return study


def open_existing_study(url: str, study_name: str) -> optuna.Study:
    """Stage 2's view of stage 1's study: one that must exist already, with a line that says where it looked."""
    # make_storage would create a missing SQLite or journal file, and then report an empty study.
    path = storage_file(url)
    if path is not None and not os.path.isfile(path):
        raise StorageError(f"no stage-1 storage at {path}; run stage1_search.py first, point --storage (or --results) "
                           f"at its output, or pass --config")
    storage = make_storage(url, heartbeat=60)
    try:
        names = optuna.study.get_all_study_names(storage)
    except Exception as e:  # RDB storages may connect lazily
        raise storage_error(url, e) from None
    if study_name not in names:
        held = ", ".join(repr(n) for n in names) or "none"
        raise StorageError(f"no study {study_name!r} in {redact_url(url)} (it holds: {held}); pass --study-name")
    return optuna.load_study(study_name=study_name, storage=storage)


def open_worker_study(url: str, study_name: str, seed: int, heartbeat: int, worker: int = 0,
                      total: int | None = None) -> "WorkerStudy":
    """Stage 1's study for one worker, created if new, that stops asking once `total` trials are in hand."""
    storage = make_storage(url, heartbeat)
    try:
        study = make_study(storage, study_name, seed, worker=worker)
        return WorkerStudy(study, StudyLock(url), total, db=storage)
    except Exception as e:  # RDB storages may connect lazily: a server that went away fails here
        raise storage_error(url, e) from None


def run_processes(target, arg_tuples: list, name: str) -> tuple:
    """One spawned process per argument tuple, all waited for: (their exit codes, the signal that stopped them:
    None, or the first Ctrl-C or SIGTERM this process got).

    Processes rather than threads: threads of one process share a CUDA stream, one autograd engine
    thread and the GIL, and one crash would end them all. Spawned, not forked: a forked child of a
    process that has touched CUDA cannot use it. The workers ignore Ctrl-C (stop_workers_on_sigterm):
    this process passes each Ctrl-C or SIGTERM on to them as SIGTERM, so that a terminal's Ctrl-C, which
    reaches them too, and a scheduler's SIGTERM, which reaches this process alone, stop them alike.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=a, name=f"{name}-{k + 1}") for k, a in enumerate(arg_tuples)]
    passed_on = False
    for proc in procs:
        proc.start()
    while any(proc.is_alive() for proc in procs):
        try:
            for proc in procs:
                proc.join(timeout=0.2)
        except KeyboardInterrupt:  # a second signal: theirs too, so that they stop at once
            _pass_on(procs)
            continue
        if stop_requested() is not None and not passed_on:  # the first: they stop after their running step
            _pass_on(procs)
            passed_on = True
    return [proc.exitcode for proc in procs], stop_requested()


def _pass_on(procs):
    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)


def stop_workers_on_sigterm():
    """In a --jobs worker: Ctrl-C is ignored (the parent passes it on as SIGTERM, see run_processes)."""
    install_stop_handlers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- workers that die


MAX_RETRIES = 2  # a configuration that kills its worker every time (out of memory) is given up after this


def process_identity(pid: int | None = None) -> dict:
    """What a trial records about its worker, so that a later worker can tell whether it still runs:
    host, pid, and on Linux the pid's start time (a recycled pid has another) and pid namespace
    (two containers may share a host name but not their pids)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_stat(pid)[1], "pid_ns": _pid_namespace()}


def _proc_stat(pid: int) -> tuple:
    """(state, start time in clock ticks since boot) from /proc; (None, None) without /proc;
    ("gone", None) for no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], fields[19]  # fields 3 and 22 of proc(5)
    except FileNotFoundError:
        return ("gone", None) if os.path.isdir("/proc/self") else (None, None)
    except (OSError, IndexError):
        return None, None


def _pid_namespace():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def is_dead_local_worker(attrs: dict) -> bool:
    """True when the trial's worker ran on this machine and no longer does; trials of other
    machines (or other pid namespaces) are never judged here: the heartbeat covers those."""
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return False
    if "pid_ns" in attrs and attrs["pid_ns"] != _pid_namespace():
        return False
    state, start = _proc_stat(attrs["pid"])
    if state == "gone" or state == "Z":  # Z: killed, not yet reaped by its parent
        return True
    if state is not None:
        return attrs.get("pid_start") not in (None, start)  # the pid now names another process
    try:  # no /proc (macOS): existence is all we can see
        os.kill(attrs["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return False


def fail_dead_local_trials(study: optuna.Study) -> list:
    """Mark FAIL the RUNNING trials whose worker on this machine died, and queue each again.

    The caller holds the study's lock (StudyLock): Optuna's heartbeat may be failing the same trial
    in another worker, and `requeue` must see the other's retry to skip its own.
    """
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead_local_worker(t.user_attrs):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # the heartbeat of another worker was first
            continue
        failed.append(t.number)
        requeue(study, t)
    return failed


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, cut: str | None = None):
    """Queue the failed `trial`'s parameters again, unless a retry of it is queued already or its
    configuration has had MAX_RETRIES deaths (a cut, by --time-limit, Ctrl-C or SIGTERM, is not one;
    `cut` says which, in words). The caller holds the study's lock."""
    history = [*trial.user_attrs.get("retry_history", []), trial.number]  # every attempt, oldest first
    if any(t.user_attrs.get("retry_history", [None])[-1] == trial.number for t in study.get_trials(deepcopy=False)):
        return
    # Deaths of this configuration's attempts before this one (studies of older versions: all of them).
    deaths = trial.user_attrs.get("deaths", len(history) - 1)
    if cut:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": history[0], "retry_history": history,
                                                      "deaths": deaths})
        tqdm.write(f"trial {trial.number:4d} {cut} after epoch {trial.user_attrs.get('epochs_run', 0)}; queued "
                   f"again, to go on from there in the next run")
        return
    deaths += 1
    worker = f"its worker ({trial.user_attrs.get('host')} pid {trial.user_attrs.get('pid')}) died"
    if deaths > MAX_RETRIES:
        tqdm.write(f"trial {trial.number:4d} FAIL     {worker}, the configuration's attempt {len(history)} to die: given up")
        return
    # A worker that died before its first suggestion holds its queued parameters only as fixed_params.
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    study.enqueue_trial(params, user_attrs={"retry_of": history[0], "retry_history": history, "deaths": deaths})
    tqdm.write(f"trial {trial.number:4d} FAIL     {worker}; queued again, to go on from its last checkpoint")


class RequeueStaleTrial:
    """Optuna's heartbeat callback: a worker anywhere stopped beating and Optuna failed its trial."""

    def __init__(self, lock: StudyLock):
        self.lock = lock

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        with self.lock():
            requeue(study, trial)


class TotalReached(Exception):
    """--total: the finished trials, with those running or queued, make the asked total."""


def counts_toward_total(t: optuna.trial.FrozenTrial) -> bool:
    """Finished with a verdict on its configuration: completed, pruned, or failed on its own (diverged).
    A trial that failed because its worker died or was interrupted is retried or replaced instead."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "failure" in t.user_attrs


class WorkerStudy(optuna.Study):
    """The study as one of several workers sees it: before each trial it takes over the trials of
    dead workers on this machine, and with `total` it starts no trial beyond that many."""

    def __init__(self, study: optuna.Study, lock: StudyLock, total: int | None = None, db=None):
        super().__init__(study_name=study.study_name, storage=study._storage, sampler=study.sampler,
                         pruner=study.pruner)
        self.lock, self.total = lock, total
        self.db = db  # the storage as make_storage made it (through_a_restart resets its session)

    def ask(self, fixed_distributions=None):
        with self.lock():
            fail_dead_local_trials(self)
            if self.total is not None:
                trials = self.get_trials(deepcopy=False)
                queued = any(t.state == TrialState.WAITING for t in trials)  # a retry to take over
                due = sum(counts_toward_total(t) or t.state == TrialState.RUNNING for t in trials)
                if not queued and due >= self.total:
                    raise TotalReached
            return super().ask(fixed_distributions)


def completed_by_value(study: optuna.Study) -> list:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.value, reverse=True)


def finished_count(study: optuna.Study) -> int:
    """The trials that count toward the total so far, every worker's."""
    return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))


def best_so_far(study: optuna.Study) -> str:
    done = completed_by_value(study)
    return f", best val acc {100 * done[0].value:.2f} % (trial {done[0].number})" if done else ""


# ----------------------------------------------------------------------------- stage 2: one worker per model

CLAIM = "claim.json"  # in a model's folder: who is training it
DONE = "done.json"  # in a model's folder: its finished report row, written last


def read_json(path: str):
    """The file's JSON, or None if there is no such file (OSError or ValueError if it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_claim(path: str) -> dict | None:
    try:
        claim = read_json(path)
    except (OSError, ValueError):
        claim = "unreadable"
    if claim is None:
        return None
    if not isinstance(claim, dict) or not isinstance(claim.get("pid"), int) or "host" not in claim:
        raise DataError(f"{path} is not a claim written by stage2_final.py; delete it if no worker is training "
                        f"that model")
    return claim


def take_claim(run_dir: str) -> str | None:
    """Make this process the one worker that trains the model in run_dir: None if it now is, else who is.

    The claim is a file that appears atomically, already complete (a hard link to a written temporary
    file: the O_EXCL of a file with content), so that two workers, even on two machines sharing the
    folder, never both get it. A claim whose process is dead on this host is taken over, and the
    model resumes from its last.pt; a claim of another host is left alone, since only that host can
    tell whether its worker lives (delete the file if that machine is gone for good).
    """
    path = os.path.join(run_dir, CLAIM)
    me = {**process_identity(), "claimed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(run_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=CLAIM + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        with file_lock(path + ".lock"):  # one local worker at a time judges and removes a dead claim
            for _ in range(3):  # a claim may be released or removed between two steps: look again
                try:
                    os.link(tmp, path)
                    return None
                except FileExistsError:
                    holder = read_claim(path)
                if holder is None:
                    continue
                if not is_dead_local_worker(holder):  # alive, or on another host: only that host can tell
                    return (f"{holder['host']} pid {holder['pid']} (claimed {holder.get('claimed_at', '?')}; "
                            f"{path})")
                tqdm.write(f"{os.path.basename(run_dir)}: its worker, pid {holder['pid']} on this host, is dead; "
                           f"taking the model over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            return f"another worker ({path})"
    finally:
        os.remove(tmp)


def release_claim(run_dir: str):
    path = os.path.join(run_dir, CLAIM)
    holder = read_claim(path)
    me = process_identity()
    if holder is not None and (holder["host"], holder["pid"]) == (me["host"], me["pid"]):
        os.remove(path)


def finished_row(run_dir: str, config: dict, other_config, fresh_since: float | None = None) -> dict | None:
    """The model's report row if a worker has trained and tested it (its done.json), else None.

    other_config(path): the error for a row of another configuration than `config`. fresh_since
    (--fresh: when this worker started): a model finished before then is to be done again; one
    finished since is another worker's share of the same fresh start.
    """
    path = os.path.join(run_dir, DONE)
    try:
        row = read_json(path)
        if row is not None and not isinstance(row, dict):
            raise ValueError
    except (OSError, ValueError):
        raise DataError(f"{path} is unreadable; delete it to train and test {os.path.basename(run_dir)} "
                        f"again") from None
    if row is None:
        return None
    if fresh_since is not None and row.get("finished_at", 0) < fresh_since:
        return None
    if with_defaults(row.get("config") or {}) != config:
        raise other_config(path)
    return row
