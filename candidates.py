"""The configurations stage 2 retrains, each a Candidate with stage 2's schedule: the top completed
trials of stage 1's study, trials chosen by number, or the entries of a --config JSON file (one
configuration, a list, or top3.json itself). A file is checked key by key, so a typo or a key that
belongs to a flag (epochs, patience, subset_ratio) is refused in one line instead of ignored.
"""

import json
from dataclasses import dataclass, fields

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from cli import StorageError, closest
from data import DataError
from train import LONG_RECIPE, TrainConfig, recipe_overrides
from workers import completed_by_value, open_existing_study, redact_url

CONFIG_KEYS = [f.name for f in fields(TrainConfig)]
SCHEDULE_FLAGS = {"epochs": "--epochs", "patience": "--patience", "subset_ratio": "--subset"}  # stage 2's, not a file's


@dataclass
class Candidate:
    name: str  # its folder under results/stage2/, e.g. trial_0012 or config_0
    config: TrainConfig  # the stage-2 configuration: stage 1's with stage 2's epochs, patience and all the data
    source: str  # where the configuration came from, in words, for config.json and the report
    stage1_val_acc: float | None = None


def stage2_config(d: dict, args, from_study: bool = False) -> TrainConfig:
    """d with stage 2's schedule and recipe. Recipe flags given on the command line win over everything; then,
    for a stage-1 trial (from the study or top3.json), stage 2's recipe (LONG_RECIPE) over the 20-epoch proxy's,
    which was chosen for ranking, not for 120 epochs; for a configuration of a --config file, its own keys over
    stage 2's recipe: it says what to train."""
    recipe = {**d, **LONG_RECIPE} if from_study else {**LONG_RECIPE, **d}
    return TrainConfig.from_dict({**recipe, **recipe_overrides(args), "epochs": args.epochs, "patience": args.patience,
                                  "subset_ratio": args.subset})


def candidates_from_study(args) -> list:
    return candidates_from_trials(open_existing_study(args.storage, args.study_name), args)


def candidates_from_trials(study: optuna.Study, args) -> list:
    """The chosen trials of the study, as stage-2 candidates; args.storage only names where they come from."""
    # Into config.json, the report and the log: never the storage's password.
    where = f"study {args.study_name!r} in {redact_url(args.storage)}"
    if args.trials:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        missing = [n for n in args.trials if n not in by_number]
        if missing:
            raise StorageError(f"{where} has no trial {', '.join(map(str, missing))} "
                               f"(its trials are numbered 0 to {len(by_number) - 1})")
        chosen = [by_number[n] for n in dict.fromkeys(args.trials)]  # a number given twice trains once
        for t in chosen:
            if not t.params:
                raise StorageError(f"trial {t.number} of {where} is {t.state.name} and has no configuration yet")
            if t.state != TrialState.COMPLETE:
                tqdm.write(f"note: trial {t.number} is {t.state.name}, not COMPLETE; retraining it as asked")
    else:
        completed = completed_by_value(study)
        if not completed:
            raise StorageError(f"{where} has no completed trial yet ({len(study.trials)} trials in all); "
                               f"let stage1_search.py finish one, or pass --config")
        chosen = completed[:args.top_k]
        if len(chosen) < args.top_k:
            tqdm.write(f"note: {where} has only {len(chosen)} completed trial(s); retraining those instead of "
                       f"the top {args.top_k}")
    # params win over the stored config: they are what Optuna proposed, and every key is a TrainConfig field.
    return [Candidate(f"trial_{t.number:04d}", stage2_config({**t.user_attrs.get("config", {}), **t.params}, args, from_study=True),
                      f"stage-1 trial {t.number} of {where}", t.value)
            for t in chosen]


def candidates_from_file(path: str, args) -> list:
    """One configuration or a list: TrainConfig keys (top3.json's params), or whole top3.json entries."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--config {path} is not valid JSON: {e}") from None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"--config {path} must hold a configuration (a JSON object) or a non-empty list of them")
    candidates, names = [], set()
    for i, entry in enumerate(entries):
        number, val_acc = entry.get("number"), entry.get("val_acc")
        if "params" in entry:  # a top3.json entry: its full config (stage 1's schedule), Optuna's params on top
            d = {**(entry.get("config") or {}), **entry["params"]}
        else:
            d, number, val_acc = entry, None, None
            # Stage 2's schedule comes from its flags; a file's value would be silently overridden.
            scheduled = [k for k in SCHEDULE_FLAGS if k in d]
            if scheduled:
                raise DataError(f"--config {path}, configuration {i}: {', '.join(scheduled)} is set by "
                                f"{', '.join(SCHEDULE_FLAGS[k] for k in scheduled)} for every model, not by the file; "
                                f"remove it from the file")
        unknown = sorted(set(d) - set(CONFIG_KEYS))
        if unknown:
            keys = [k for k in CONFIG_KEYS if k not in SCHEDULE_FLAGS]
            hints = "".join(f" (did you mean {c[0]}?)" for k in unknown for c in [closest(k, keys)] if c)
            raise DataError(f"--config {path}, configuration {i}: unknown key(s) {', '.join(unknown)}{hints}; "
                            f"known keys: {', '.join(keys)}")
        try:
            cfg = stage2_config(d, args, from_study="params" in entry)  # a top3.json entry is a stage-1 trial
        except (TypeError, ValueError) as e:
            raise DataError(f"--config {path}, configuration {i}: {e}") from None
        name = f"trial_{number:04d}" if isinstance(number, int) else f"config_{i}"
        name = name if name not in names else f"config_{i}"
        names.add(name)
        origin = f" (stage-1 trial {number})" if isinstance(number, int) else ""
        candidates.append(Candidate(name, cfg, f"configuration {i} of {path}{origin}", val_acc))
    return candidates
