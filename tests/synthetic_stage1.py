"""stage1_search.py's command line on tiny synthetic data, as a process of its own that tests can kill.

    python tests/synthetic_stage1.py [stage1_search.py flags...]

Everything but the data, the model's shape and the threads is the real stage 1: its main(), its storage,
its workers, its error handling and exit codes. The data is conftest's synthetic set (128 training,
64 validation images), every trial takes the cheapest shape of the search space, and torch uses one
thread (four workers share two cores in the tests; two threads each would spin waiting for a core,
a third of such a test's time): these runs are about workers, not models. Two test-only switches,
both off unless their variable is set:
- START_BARRIER=PATH: wait at a shared lock on PATH (the test holds it exclusively) after importing
  torch, so that every worker reaches a new storage within milliseconds of the others;
- HANG_IN_TRIAL=N (with HANG_MARKER=PATH): park inside trial N right after its first epoch is saved
  and reported, touching HANG_MARKER, so that a SIGKILL lands mid-trial at a known point.
"""

import dataclasses
import faulthandler
import fcntl
import os
import signal
import sys
import time

faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that times out asks for every stack
# A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: under
# `.ci/run &` Ctrl-C would never reach the worker. Ctrl-C is what the tests send, so take it back.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optuna  # noqa: E402
import torch  # noqa: E402

import stage1_search  # noqa: E402
from conftest import synthetic_splits  # noqa: E402


def cheapest_shape(real_suggest):
    return lambda trial, base: dataclasses.replace(real_suggest(trial, base), patch_size=4, embed_dim=128, depth=4)


def wait_at_barrier(path: str):
    """The test's release of its exclusive lock wakes every waiting worker at once."""
    open(f"{path}.{os.getpid()}", "w").close()  # tells the test this worker has got here
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)


def hang_in_trial(number: int, marker: str):
    real_report = optuna.trial.Trial.report

    def report_then_hang(trial, value, step):
        real_report(trial, value, step)
        if trial.number == number:
            open(marker, "w").close()
            time.sleep(3600)

    optuna.trial.Trial.report = report_then_hang


if __name__ == "__main__":
    torch.set_num_threads(1)
    real_run = stage1_search.run
    stage1_search.suggest_config = cheapest_shape(stage1_search.suggest_config)
    stage1_search.run = lambda args, splits=None, worker=None: real_run(args, synthetic_splits(n_train=128, n_val=64),
                                                                        worker)
    if os.environ.get("START_BARRIER"):
        wait_at_barrier(os.environ["START_BARRIER"])
    if os.environ.get("HANG_IN_TRIAL"):
        hang_in_trial(int(os.environ["HANG_IN_TRIAL"]), os.environ["HANG_MARKER"])
    stage1_search.main(sys.argv[1:])
