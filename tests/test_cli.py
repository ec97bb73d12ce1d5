"""cli.py: the one main() wrapper's exit codes and lines, the shared flags, the epoch line and the clock."""

import errno
import os

import pytest

import cli
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outcome(capsys, work, **kw):
    code = cli.run_main(work, kept="the last epoch is kept", **kw)
    return code, capsys.readouterr().err


def raises(e):
    def work():
        raise e
    return work


def test_each_kind_of_end_is_one_line_and_its_exit_code(capsys):
    assert outcome(capsys, lambda: None) == (0, "")
    assert outcome(capsys, raises(DataError("no CIFAR-10 at x"))) == (1, "error: no CIFAR-10 at x\n")
    assert outcome(capsys, raises(cli.StorageError("cannot open it"))) == (1, "error: cannot open it\n")
    full = OSError(errno.ENOSPC, "No space left on device", "/r/last.pt")
    assert outcome(capsys, raises(full)) == (
        1, "error: cannot write '/r/last.pt': No space left on device; the last epoch is kept\n")
    # an OSError that names no file names the folder it was given
    assert outcome(capsys, raises(OSError(errno.EROFS, "Read-only file system")), unnamed="results") == (
        1, "error: cannot write 'results': Read-only file system; the last epoch is kept\n")
    assert outcome(capsys, raises(KeyboardInterrupt()), interrupted="interrupted: run it again") == (
        130, "interrupted: run it again\n")
    with pytest.raises(ZeroDivisionError):  # a bug is not the user's error: its traceback stays
        cli.run_main(lambda: 1 / 0, kept="")


def test_a_run_stopped_for_time_says_how_to_continue_without_the_password(capsys):
    argv = ["--storage", "postgresql://vit:s3cret@db/vit", "--time-limit", "2h"]
    code, err = outcome(capsys, raises(cli.StoppedForTime("stopped after epoch 3 of 120")), script="stage2_final.py",
                        argv=argv, redact=lambda a: a.replace("s3cret", "***"))
    assert code == cli.EXIT_TIME_LIMIT == 75
    assert err == ("stopped after epoch 3 of 120; continue with: python stage2_final.py --storage "
                   "'postgresql://vit:***@db/vit' --time-limit 2h\n")  # quoted as a shell needs it
    # a --jobs worker: the reason only (its parent prints the command, once)
    assert outcome(capsys, raises(cli.StoppedForTime("worker 2: stopped"))) == (75, "worker 2: stopped\n")


def test_the_shared_flags_and_their_checks(capsys):
    p = cli.OneLineParser()
    cli.add_common_flags(p, results_help="out", storage_help="storage")
    args = p.parse_args(["--results", "r", "--no-download"])
    assert (args.data_dir, args.no_download, args.results, args.storage, args.device) == ("data", True, "r", None, "auto")
    bare = cli.OneLineParser()
    cli.add_common_flags(bare)  # evaluate.py's: no results folder, no storage
    assert not hasattr(bare.parse_args([]), "results")
    p.add_argument("--top-k", type=cli.positive(int))
    p.add_argument("--subset", type=cli.positive(float, at_most=1.0))
    assert p.parse_args(["--top-k", "3", "--subset", "1"]).top_k == 3
    for flags, said in ((["--top-k", "0"], "argument --top-k: must be positive, got 0"),
                        (["--subset", "1.5"], "argument --subset: must be in (0, 1], got 1.5"),
                        (["--top-k", "x"], "argument --top-k: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as stop:
            p.parse_args(flags)
        assert stop.value.code == 2 and said in capsys.readouterr().err


def test_the_epoch_line_and_its_eta():
    history = [{"epoch": e, "epoch_time": 100.0, "epoch_s": 120.0, "train_img_s": 450.4} for e in (1, 2)]
    record = {**history[-1], "train_loss": 1.23456, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.61234,
              "is_best": True, "lr": 5e-4}
    assert cli.epoch_line("config_0", record, history, 32) == (
        "config_0 epoch   2/32: train loss 1.2346 acc 50.00 %, val loss 1.0000 acc 61.23 % (best), lr 5.00e-04, "
        "100s, 450 img/s, 4 min 00 s so far, at most 1 h 00 min left")  # 2 x 120 s so far, 30 x 120 s left
    assert cli.epoch_line("m", {**record, "epoch": 31}, history, 32).endswith("at most 2 min 00 s left")
    assert not cli.epoch_line("m", {**record, "epoch": 32}, history, 32).endswith("left")


def test_the_clock():
    assert (cli.clock(7 * 60), cli.clock(2 * 3600 + 5 * 60)) == ("7 min", "2 h 05 min")
    assert (cli.clock(45, precise=True), cli.clock(425, precise=True)) == ("45 s", "7 min 05 s")
    assert cli.duration("2h40m") == 9600 and cli.duration("90") == 90


def test_a_script_starts_without_the_libraries_only_its_work_needs():
    """torchvision (which pulls in torch._dynamo and sympy), scipy.stats, scikit-learn and matplotlib cost
    over 2 s of each start together; a bad flag, --help or a worker that has not trained yet needs none."""
    import subprocess
    import sys

    heavy = ("torchvision", "scipy", "sklearn", "matplotlib")
    probe = ("import sys; sys.path.append('tools'); import stage1_search, stage2_final, evaluate, predict, check_gpu, "
             "bench, ablation; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_misspelt_flag_is_answered_with_the_closest_one(capsys):
    import stage1_search
    import stage2_final

    for parse, flags, hint in ((stage1_search.parse_args, ["--trails", "5"], "did you mean --trials?"),
                               (stage2_final.parse_args, ["--top-kk", "2"], "did you mean --top-k?"),
                               (stage2_final.parse_args, ["--cutmix-alhpa", "1"], "did you mean --cutmix-alpha?")):
        with pytest.raises(SystemExit) as exit:
            parse(flags)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}; {hint}" in err, err
        assert err.count("\n") == 1
    with pytest.raises(SystemExit):
        stage1_search.parse_args(["--zzzzzz"])  # nothing close: no guess
    assert "did you mean" not in capsys.readouterr().err


def test_the_readme_s_table_of_stops_gives_the_exit_codes_the_scripts_use():
    import signal

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| ") and "exit code" in line}
    assert f"exit code {cli.EXIT_CODES[signal.SIGINT]}" in rows["Ctrl-C (once)"]
    assert f"exit code {cli.EXIT_CODES[signal.SIGINT]}" in rows["Ctrl-C twice"]
    assert f"exit code {cli.EXIT_CODES[signal.SIGTERM]}" in rows["SIGTERM (`kill`, a batch scheduler)"]
    assert f"exit code {cli.EXIT_TIME_LIMIT}" in rows["`--time-limit 2h40m`"]
    # each kind of stop is exercised by a test of that name (the table says so)
    tests = open(os.path.join(os.path.dirname(__file__), "test_stage1_workers.py")).read()
    for name in ("test_ctrl_c_or_sigterm_mid_trial_goes_on_from_its_last_epoch_to_the_uninterrupted_value",
                 "test_a_second_ctrl_c_stops_at_once_and_the_next_start_still_goes_on_from_the_checkpoint",
                 "test_a_killed_worker_s_trial_is_retried_from_its_checkpoint_once_its_heartbeat_is_stale",
                 "test_a_postgresql_restart_mid_trial_does_not_end_the_worker",
                 "test_a_full_disk_stops_the_run_in_one_line_and_leaves_the_study_whole"):
        assert f"def {name}(" in tests, name
