"""The Optuna storage both stages keep their studies in, --jobs' worker processes, and how a worker trains a trial.

One storage URL is all that workers share: SQLite on one machine, PostgreSQL (or MySQL) across many,
or a journal file. Fault tolerance is Optuna's own: on the RDB storages a running trial beats every
`heartbeat` seconds; one silent for two beats (its worker killed, its machine gone) is failed by the
next worker to start a trial, and RetryHeartbeatStaleTrialCallback queues it again, with the numbers
of the attempts before it (retry_history), whose checkpoints the retry goes on from. Optuna gives a
journal file no heartbeat: there a killed worker's trial stays RUNNING and is not retried.
"""

import contextlib
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, replace

import optuna
import sqlalchemy
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from tqdm.auto import tqdm

from cli import EXIT_TIME_LIMIT, StorageError, StoppedForTime, epoch_line, install_stop_handlers, stop_requested
from reports import TensorBoardLogger
from train import save_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# Optuna marks its heartbeat, retry and metric-name features experimental; they are what this project relies on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

MAX_RETRIES = 2  # a configuration that kills its worker every time (out of memory) is given up after this
SCHEMA_RACE = ("already exists", "duplicate", "unique constraint", "database is locked")  # see open_storage


def redact_url(url: str) -> str:
    """The URL with its password shown as ***: postgresql://user:***@host/db. Use it wherever a URL is shown."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", str(url))


def driver_line(url: str, e: Exception) -> str:
    """A storage error's type and first line, with `url`'s password shown as *** wherever the driver quotes it."""
    first_line = (str(e).splitlines() or [""])[0]  # drivers add pages of SQL and links below it
    password = re.match(r"[^:]+://[^/@:]*:([^/@]*)@", url)
    if password and password.group(1):
        first_line = first_line.replace(password.group(1), "***")  # in the URL too
    return f"{type(e).__name__}: {first_line}"


def storage_error(url: str, e: Exception) -> StorageError:
    return StorageError(f"cannot open Optuna storage {redact_url(url)!r}: {driver_line(url, e)}")


def retry_dead_worker_s_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial):
    """The heartbeat's callback: Optuna's retry, and a line in the log that says so."""
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
    attempt = len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) + 1
    worker = f"its worker ({trial.user_attrs.get('host')} pid {trial.user_attrs.get('pid')}) stopped beating"
    what = "given up" if attempt > MAX_RETRIES else "queued again, to go on from its last checkpoint"
    who = trial.user_attrs.get("model") or f"trial {trial.number:4d}"  # stage 2's trials are its models
    tqdm.write(f"{who} FAIL     {worker}; attempt {attempt} of the configuration: {what}")


def open_storage(url: str, heartbeat: int = 60):
    """An RDB URL (sqlite:///, postgresql://, mysql://) or a journal file's path, as an Optuna storage.
    Any failure (a bad URL, a missing driver, an unreachable server, a foreign file) is a StorageError."""
    sqlite, path = url.startswith("sqlite:///"), url.removeprefix("sqlite:///")
    # Several workers on one SQLite file wait for its lock instead of failing with "database is locked". A server
    # that restarts drops every pooled connection: SQLAlchemy tests each as it is taken and opens a new one for a
    # dead one (Optuna turns this on for MySQL only); wait_for_the_server makes that wait.
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(8):
        try:
            if sqlite or "://" not in url:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if "://" not in url:
                return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
            # Optuna's known race: workers creating the schema of one new database at once. A lock beside a new
            # SQLite file settles it (its workers share a machine; the lock stays, for those still on their way,
            # and a file made elsewhere, perhaps read-only, gets none); workers of a server retry instead.
            fresh = sqlite and (not os.path.isfile(path) or os.path.isfile(path + ".lock"))
            with open(path + ".lock", "a") if fresh else contextlib.nullcontext() as held:
                if held and fcntl:
                    fcntl.flock(held, fcntl.LOCK_EX)  # let go as the file closes
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                                     heartbeat_stale_trial_callback=retry_dead_worker_s_trial)
            if not sqlite:
                wait_for_the_server(storage.engine)
            # Optuna's heartbeat thread ends at its first error, and the trial would then look dead while it
            # trains: a beat cut by a server restart is beaten again once the server is back.
            beat = storage.record_heartbeat
            storage.record_heartbeat = lambda trial_id: through_a_restart(storage, beat, trial_id)
            return storage
        except Exception as e:  # the loser of the schema race retries, and finds the schema made
            if attempt == 7 or not any(m in str(e).lower() for m in SCHEMA_RACE):
                raise storage_error(url, e) from None
            time.sleep((attempt + 1) * 0.3)


# ----------------------------------------------------------------------------- a database server that restarts

RECONNECT_S = 60  # how long a worker waits for its database server to come back before it gives up


def wait_for_the_server(engine, patience_s: float = RECONNECT_S):
    """New connections of `engine` wait, retrying every second, for up to patience_s for a server that
    refuses them (restarting), instead of failing at once."""
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


def through_a_restart(storage, call, *args):
    """call(*args), again (up to 3 times in all) when the server dropped the connection under it (a
    restart mid-query), after closing the storage's session that the dropped connection left broken. For a
    running trial's storage calls, which may be made twice (a report written twice is written once)."""
    for attempt in range(3):
        try:
            return call(*args)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            # Optuna wraps the error, and its rollback fails in its turn: the invalidated connection is further down.
            if attempt == 2 or not any(getattr(x, "connection_invalidated", False) for x in _chain(e)):
                raise
            if isinstance(storage, optuna.storages.RDBStorage):
                storage.scoped_session.remove()
            time.sleep(1.0)


def storage_lost_in_one_line(url: str, work):
    """work(), with a storage that failed under it (a server gone for longer than wait_for_the_server waits, a
    full disk under an SQLite file) turned into a StorageError: one line, exit 1. The trial it cut is failed by
    the heartbeat and queued again, so the same command continues once the storage is back."""
    try:
        return work()
    except Exception as e:  # Optuna may wrap it, or fail in its turn while it fails the trial
        cause = next((x for x in _chain(e) if isinstance(x, sqlalchemy.exc.OperationalError)), None)
        if cause is None:
            raise
        server = "" if url.startswith("sqlite") else f" for more than {RECONNECT_S} s"
        raise StorageError(f"lost the Optuna storage {redact_url(url)!r}{server} "
                           f"({driver_line(url, cause.orig or cause)}); the trials told to it so far are kept: run the "
                           f"same command once it is back") from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # "from None" ends it


# ----------------------------------------------------------------------------- --jobs


@dataclass
class Worker:
    """Which of --jobs' worker processes this is (0: the only process), how many run, and --time-limit's end
    (time.monotonic(): one clock for every process of a machine, so workers inherit their parent's); then what
    it carries from trial to trial."""
    index: int = 0
    jobs: int = 1
    deadline: float | None = None
    last_epoch_s: float | None = None  # the latest epoch's wall time: the next trial's first epoch is judged by it
    epochs_trained: int = 0  # by this process, over all its trials
    current: int | None = None  # the number of the trial this process runs, or ran last
    stopped: StoppedForTime | None = None  # what --time-limit cut, in words

    def device(self, name: str) -> str:
        """--device for this process: as named, but "auto" or "cuda" in --jobs' worker i on a machine with n GPUs is
        GPU (i - 1) mod n. device_count() does not initialise CUDA, which the parent process must not: it would hold
        a context on every GPU for nothing."""
        n = torch.cuda.device_count() if self.index and name in ("auto", "cuda") else 0
        return f"cuda:{(self.index - 1) % n}" if n else name


def run_workers(run_one, args, data, parent: Worker, name: str) -> str | None:
    """--jobs: args.jobs worker processes, each run_one(args, data, worker=...), waited for (run_processes)."""
    return run_processes(_worker_main, [(run_one, args, data, replace(parent, index=k + 1, jobs=args.jobs))
                                        for k in range(args.jobs)], name)


def _worker_main(run_one, args, data, worker: Worker):
    """One --jobs worker: Ctrl-C ignored (the parent passes it on as SIGTERM, see run_processes), torch's share of
    the cores (N workers with every core each would oversubscribe the CPU N times), its exit code run_one's."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // worker.jobs))
    install_stop_handlers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(run_one(args, data, worker=worker))


def run_processes(target, arg_tuples: list, name: str) -> str | None:
    """One spawned process per argument tuple, all waited for; how they ended: None (all done), "interrupted"
    (a Ctrl-C or SIGTERM), "time" (--time-limit) or "failed".

    Processes, not threads: threads share a CUDA stream, one autograd engine thread and the GIL, and one
    crash would end them all. Spawned, not forked: a forked child of a process that touched CUDA cannot use
    it. The workers ignore Ctrl-C (_worker_main); this process passes each Ctrl-C or SIGTERM on to
    them as SIGTERM, so that a terminal's Ctrl-C and a scheduler's SIGTERM stop them alike."""
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
            for proc in procs:
                proc.terminate()
            continue
        if stop_requested() is not None and not passed_on:  # the first: they stop after their running step
            for proc in procs:
                proc.terminate()  # SIGTERM on POSIX; nothing for one that has ended
            passed_on = True
    codes = {proc.exitcode for proc in procs}
    if stop_requested() is not None or {130, 143} & codes:
        return "interrupted"
    return "time" if EXIT_TIME_LIMIT in codes else "failed" if codes - {0} else None


# ----------------------------------------------------------------------------- a worker's trials


def optimize(study: optuna.Study, objective, worker: Worker, callbacks=(), catch=(), keep=()) -> str | None:
    """study.optimize until it ends (None), stops for --time-limit ("time": the objective raised StoppedForTime)
    or for a Ctrl-C or SIGTERM ("interrupted"). A trial cut short (worker.current) is queued again (queue_again,
    with the user attributes named in `keep`), to go on from its last checkpoint."""
    try:
        study.optimize(objective, callbacks=list(callbacks), catch=catch, gc_after_trial=False)
    except (StoppedForTime, KeyboardInterrupt) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C must not cut the queueing short
        cut = study.get_trials(deepcopy=False)[worker.current]
        if cut.state == optuna.trial.TrialState.FAIL:
            queue_again(study, cut, keep)
            how = ("stopped for the time limit" if isinstance(e, StoppedForTime)
                   else f"stopped by {cut.user_attrs.get('interrupted', 'a signal')}")
            who = cut.user_attrs.get("model") or f"trial {cut.number:4d}"
            tqdm.write(f"{who} {how}; queued again, to go on from its last finished epoch in the next run")
        return "time" if isinstance(e, StoppedForTime) else "interrupted"
    return "interrupted" if stop_requested() is not None else None  # a stop between two trials


def queue_again(study: optuna.Study, trial: optuna.trial.FrozenTrial, keep=()):
    """Queue a trial cut short (--time-limit, Ctrl-C, SIGTERM) again, as Optuna's callback queues a dead worker's:
    its parameters and retry_history, so that the retry goes on from its checkpoint, and of its user attributes
    those named in `keep`. Not through the callback itself: its max_retry counts deaths, and a cut is not one."""
    history = [*RetryHeartbeatStaleTrialCallback.retry_history(trial), trial.number]
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: trial.user_attrs[k] for k in keep if k in trial.user_attrs},
        system_attrs={"failed_trial": history[0], "retry_history": history}))


def train_trial(trial: optuna.Trial, trainer, worker: Worker, storage, run_dir: str, name: str,
                best: str | None = None, then=None):
    """Fit `trainer` as `trial`, within the worker's deadline. Optuna gets the curve so far (a resumed run's) and
    each epoch's val_acc (the pruner's input, optuna-dashboard's curve); after each epoch come last.pt (and
    best.pt at `best` on a better epoch), TensorBoard's curves, the history in the trial's user attributes (the
    stage-1 report's curves), the report, a log line, then `then(trainer, record)`."""
    trial.set_user_attr("host", socket.gethostname())  # who runs it, for the log line of its retry
    trial.set_user_attr("pid", os.getpid())
    for record in trainer.history:
        trial.report(record["val_acc"], record["epoch"])
    tensorboard = TensorBoardLogger(run_dir)

    def on_epoch(t, record: dict):
        worker.epochs_trained += 1
        # One state, serialised once; best.pt before last.pt: a kill between the two replays this epoch.
        paths = [best] if best and record["is_best"] else []
        save_checkpoint(t.state_dict(), *paths, os.path.join(run_dir, "last.pt"))
        tensorboard(t, record)
        through_a_restart(storage, trial.set_user_attr, "history", t.history)
        through_a_restart(storage, trial.report, record["val_acc"], record["epoch"])
        tqdm.write(epoch_line(name, record, t.history, t.cfg.epochs))  # after the study has the epoch
        if then is not None:
            then(t, record)

    try:
        trainer.fit(on_epoch, deadline=worker.deadline, epoch_estimate_s=worker.last_epoch_s)
    finally:
        tensorboard.close()
        worker.last_epoch_s = trainer.history[-1].get("epoch_s") if trainer.history else worker.last_epoch_s
