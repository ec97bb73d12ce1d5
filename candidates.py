"""Stage 2's models: which configurations it retrains (the top completed stage-1 trials, trials chosen by
number, or a --config file's) with the long recipe and what its flags set for every model (`flags`: TrainConfig
values, its schedule and any recipe flag), their trials in the stage-2 study, and each one's report row.
"""

import json
from dataclasses import fields

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from cli import StorageError, closest
from data import DataError
from reports import completed_by_value, epochs_phrase
from storage import redact_url
from train import LONG_RECIPE, TrainConfig

CONFIG_KEYS = [f.name for f in fields(TrainConfig)]
SCHEDULE_FLAGS = {"epochs": "--epochs", "patience": "--patience", "subset_ratio": "--subset"}  # stage 2's, not a file's
MODEL_ATTRS = ("model", "config", "source", "stage1_val_acc")  # a stage-2 trial's user attributes: what it trains
LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)  # a model's trial that has it in hand, or done


def stage2_config(d: dict, flags: dict, from_study: bool = False) -> TrainConfig:
    """d with stage 2's schedule and recipe: recipe flags win over everything; then, for a stage-1 trial,
    LONG_RECIPE over the 20-epoch proxy's (chosen for ranking, not for 120 epochs); for a --config file's
    configuration, its own keys over LONG_RECIPE: it says what to train."""
    recipe = {**d, **LONG_RECIPE} if from_study else {**LONG_RECIPE, **d}
    return TrainConfig.from_dict({**recipe, **flags})


def model(name: str, config: TrainConfig, source: str, stage1_val_acc: float | None = None) -> dict:
    """A model to train as its stage-2 trial holds it (user attributes MODEL_ATTRS): its folder under
    results/stage2/ (trial_0012, config_0), its configuration, where that came from (in words) and its stage-1
    validation accuracy."""
    return {"model": name, "config": config.to_dict(), "source": source, "stage1_val_acc": stage1_val_acc}


def candidates_from_study(storage, url: str, study_name: str, numbers: list | None, top_k: int, flags: dict) -> list:
    """The chosen trials of stage 1's study: these numbers (--trials), else the top k completed."""
    where = f"study {study_name!r} in {redact_url(url)}"  # into config.json and the report: no password
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        held = ", ".join(repr(n) for n in optuna.study.get_all_study_names(storage) if not n.endswith("-stage2"))
        held = held or "none"
        raise StorageError(f"no study {study_name!r} in {redact_url(url)} (it holds: {held}); pass "
                           f"--study-name") from None
    if numbers:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        missing = [n for n in numbers if n not in by_number]
        if missing:
            raise StorageError(f"{where} has no trial {', '.join(map(str, missing))} "
                               f"(its trials are numbered 0 to {len(by_number) - 1})")
        chosen = [by_number[n] for n in dict.fromkeys(numbers)]  # a number given twice trains once
        for t in chosen:
            if not t.params:
                raise StorageError(f"trial {t.number} of {where} is {t.state.name} and has no configuration yet")
            if t.state != TrialState.COMPLETE:
                tqdm.write(f"note: trial {t.number} is {t.state.name}, not COMPLETE; retraining it as asked")
    else:
        chosen = completed_by_value(study)[:top_k]
        if not chosen:
            raise StorageError(f"{where} has no completed trial yet ({len(study.trials)} trials in all); "
                               f"let stage1_search.py finish one, or pass --config")
        if len(chosen) < top_k:
            tqdm.write(f"note: {where} has only {len(chosen)} completed trial(s); retraining those instead of "
                       f"the top {top_k}")
    # params win over the stored config: they are what Optuna proposed, and every key is a TrainConfig field.
    return [model(f"trial_{t.number:04d}", stage2_config({**t.user_attrs.get("config", {}), **t.params}, flags,
                                                         from_study=True), f"stage-1 trial {t.number} of {where}",
                  t.value) for t in chosen]


def candidates_from_file(path: str, flags: dict) -> list:
    """One configuration or a list: TrainConfig keys, or whole top3.json entries (checked key by key, so that
    a typo, or a key that belongs to a flag, is refused in one line instead of ignored)."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read --config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--config {path} is not valid JSON: {e}") from None
    entries = [entries] if isinstance(entries, dict) else entries
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"--config {path} must hold a configuration (a JSON object) or a non-empty list of them")
    candidates = []
    for i, entry in enumerate(entries):
        number, val_acc = entry.get("number"), entry.get("val_acc")
        if "params" in entry:  # a top3.json entry: its full config (stage 1's schedule), Optuna's params on top
            d = {**(entry.get("config") or {}), **entry["params"]}
        else:
            d, number, val_acc = entry, None, None
            scheduled = [k for k in SCHEDULE_FLAGS if k in d]  # the flags' values would override it silently
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
            cfg = stage2_config(d, flags, from_study="params" in entry)
        except (TypeError, ValueError) as e:
            raise DataError(f"--config {path}, configuration {i}: {e}") from None
        name = f"trial_{number:04d}" if isinstance(number, int) else f"config_{i}"
        name = name if name not in {c["model"] for c in candidates} else f"config_{i}"
        origin = f" (stage-1 trial {number})" if isinstance(number, int) else ""
        candidates.append(model(name, cfg, f"configuration {i} of {path}{origin}", val_acc))
    return candidates


def queue_models(study: optuna.Study, candidates: list):
    """Enqueue each model that no trial of the study has in hand (waiting, running) or done with its configuration."""
    trials = study.get_trials(deepcopy=False)  # one read: each candidate's trials are its own
    for c in candidates:
        mine = [t for t in trials if t.user_attrs.get("model") == c["model"]]
        done = [t for t in mine if t.state == TrialState.COMPLETE]
        if done and done[-1].user_attrs["config"] != c["config"]:
            raise DataError(f"{c['model']} was trained with another configuration than {c['source']}; pass --fresh "
                            f"to start it over, or --results to write elsewhere")
        if done:
            tqdm.write(f"{c['model']}: already trained and tested (--fresh trains it again)")
        elif not any(t.state in LIVE for t in mine):
            study.enqueue_trial({}, user_attrs=c)


def report_row(attrs: dict) -> dict:
    """The row of a model's report that its trial's user attributes (MODEL_ATTRS) give."""
    return {**{k: attrs[k] for k in MODEL_ATTRS}, "max_epochs": attrs["config"]["epochs"]}


def rows_of(study: optuna.Study | None, candidates: list) -> list:
    """Each model's report row: its trial's, once tested, or how far its trials got (their reported epochs)."""
    rows, trials = [], study.get_trials(deepcopy=False) if study else ()
    for c in candidates:
        mine = [t for t in trials if t.user_attrs.get("model") == c["model"]]
        done = [t for t in mine if t.state == TrialState.COMPLETE]
        if done:
            rows.append(done[-1].user_attrs["row"])
            continue
        row = report_row(mine[-1].user_attrs if mine else c)  # its trial's schedule, not --report-only's flags
        epochs = max((max(t.intermediate_values, default=0) for t in mine), default=0)
        rows.append({**row, "epochs_run": epochs, "stopped_early": False, "failure": "",
                     "unfinished": f"not finished yet ({epochs} of {epochs_phrase(row['max_epochs'])} so far)"})
    return rows
