import json
import os
import re

import pytest
import torch

import stage2_final
from candidates import candidates_from_file, stage2_config
from conftest import synthetic_splits
from tools import ablation
from train import with_defaults


def test_each_variant_trains_plain_changed_only_where_it_says(tmp_path):
    # The design of the experiment, written out here rather than read back from ablation.py's own tables:
    # a typo'd key (which TrainConfig.from_dict would drop) or a change leaking into another variant fails.
    expected = {
        "plus_label_smoothing": {"label_smoothing": 0.1}, "plus_warmup": {"warmup_epochs": 2},
        "plus_weight_decay": {"weight_decay": 0.05}, "plus_drop_path": {"drop_path": 0.1},
        "plus_grad_clip": {"grad_clip": 1.0}, "chosen": {"warmup_epochs": 2, "drop_path": 0.1, "grad_clip": 1.0},
        "sgd_unscaled": {"optimizer": "sgd", "sgd_lr_scale": 1.0}, "sgd_scaled": {"optimizer": "sgd"},
        "warmup_randaug_m5": {"warmup_epochs": 2, "randaug_magnitude": 5},
        "warmup_randaug_off": {"warmup_epochs": 2, "randaug_ops": 0},
        "warmup_randaug_off_mean_pool": {"warmup_epochs": 2, "randaug_ops": 0, "pool": "mean"},
    }
    plain = ablation.variant_config("plain").to_dict()
    # plain is plain whatever TrainConfig's defaults are: no warmup, smoothing, drop-path or clipping
    assert {k: plain[k] for k in ("warmup_epochs", "label_smoothing", "drop_path", "grad_clip")} == dict(
        warmup_epochs=0, label_smoothing=0.0, drop_path=0.0, grad_clip=0.0)
    assert set(ablation.VARIANTS) == {"plain", *expected}
    for name, change in expected.items():
        trained = ablation.variant_config(name).to_dict()
        assert {k: v for k, v in trained.items() if plain[k] != v} == change, name
    # the table's "change from plain" column says the same, from a run's JSON as run_one writes it
    (tmp_path / "chosen_seed0.json").write_text(json.dumps(
        {"variant": "chosen", "seed": 0, "best_val_acc": 0.5, "final_val_acc": 0.5, "wall_s": 60.0,
         "history": [{"train_acc": 0.4, "epoch_time": 6.0}]}))
    assert "| chosen | warmup_epochs=2, drop_path=0.1, grad_clip=1.0 | 0 | 50.00 |" in ablation.table(str(tmp_path))


def test_a_run_writes_its_json_once_and_the_table_reads_it(tmp_path, monkeypatch):
    # the seed's shape is slow on a CPU; the runner and the table are what is tested here
    monkeypatch.setitem(ablation.VARIANTS, "plain", dict(ablation.PLAIN, patch_size=8, embed_dim=32, depth=1,
                                                         num_heads=2, batch_size=64))
    splits = synthetic_splits(n_train=128, n_val=64)
    first = ablation.run_one("plain", 0, splits, torch.device("cpu"), 1, 0.2, str(tmp_path))
    saved = json.loads((tmp_path / "plain_seed0.json").read_text())
    assert saved["best_val_acc"] == first["best_val_acc"] and len(saved["history"]) == 1
    assert saved["config"]["label_smoothing"] == 0.0 and saved["config"]["warmup_epochs"] == 0
    again = ablation.run_one("plain", 0, splits, torch.device("cpu"), 1, 0.2, str(tmp_path))  # skipped: read back
    assert again == saved
    table = ablation.table(str(tmp_path))
    assert f"| 0 | {100 * first['best_val_acc']:.2f} | {100 * first['best_val_acc']:.2f} |" in table and "| plain |" in table


def test_the_defaults_are_the_seeds_recipe_everywhere():
    # One recipe: TrainConfig's defaults, DeviceLoader's, the ablation's "chosen", configs/seed_best.json and
    # configs/seed_recipe.json (the 120-epoch run's), the flags' help and the README all say the same.
    import inspect

    from augment import train_transform

    root = os.path.join(os.path.dirname(__file__), "..")
    recipe = set(ablation.PLAIN) - set(ablation.SEED_BEST)
    default = ablation.TrainConfig()
    assert recipe and {k: getattr(default, k) for k in recipe} == {k: ablation.CHOSEN[k] for k in recipe}
    assert (default.drop_path, default.grad_clip, default.warmup_epochs, default.randaug_ops,
            default.randaug_magnitude) == (0.1, 1.0, 2, 2, 9)  # the seed's
    transform = inspect.signature(train_transform).parameters  # what a DeviceLoader given no settings does
    assert (transform["num_ops"].default, transform["magnitude"].default) == (2, 9)
    for name in ("seed_best.json", "seed_recipe.json"):
        with open(os.path.join(root, "configs", name)) as f:
            shipped = json.load(f)
        assert {k: shipped[k] for k in ablation.CHOSEN} == ablation.CHOSEN, name
    assert ablation.CHOSEN != ablation.PLAIN
    from cli import OneLineParser
    from train import add_recipe_flags  # the one place both stages' recipe flags come from

    parser = OneLineParser()
    add_recipe_flags(parser)
    shown = parser.format_help()
    for flag, value in (("--drop-path", "0.1"), ("--grad-clip", "1.0"), ("--randaug-ops", "2")):
        assert re.search(re.escape(flag) + r" \w+\s+[^-]*?\(default: " + re.escape(value) + r"\)", shown), flag
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    phrase = (f"RandAugment({default.randaug_ops}, {default.randaug_magnitude}), drop-path {default.drop_path:g}, "
              f"gradient clipping at {default.grad_clip:g}")
    assert phrase in readme


def test_stage_2_defaults_to_the_long_recipe_its_run_measured(capsys):
    """Stage 2's recipe is configs/long_recipe.json's, the 120-epoch run's: over a stage-1 trial's proxy recipe,
    under a --config file's own keys, under a flag; its --help shows it."""
    from train import LONG_RECIPE

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "results", "reference", "120ep_long_recipe", "stage2", "config_0", "config.json")) as f:
        evidence = json.load(f)["config"]
    path = os.path.join(root, "configs", "long_recipe.json")
    flags = lambda *argv: stage2_final.model_flags(stage2_final.parse_args(list(argv)))  # noqa: E731
    (c,) = candidates_from_file(path, flags("--config", path))
    assert c["config"] == evidence  # the file rebuilds the run's configuration field for field
    best = os.path.join(root, "configs", "seed_best.json")
    shape_only = {k: v for k, v in json.load(open(best)).items() if k not in LONG_RECIPE}
    assert stage2_config(shape_only, flags()).to_dict() == evidence  # a file's missing keys: the long recipe
    proxy = ablation.TrainConfig(**shape_only).to_dict()  # a stage-1 trial: the seed's recipe, on the proxy
    assert stage2_config(proxy, flags(), from_study=True).to_dict() == evidence
    seed = candidates_from_file(best, flags("--config", best))[0]["config"]
    assert (seed["cutmix_alpha"], seed["weight_decay"], seed["warmup_epochs"]) == (0.0, 0.01, 2)  # its own keys win
    flagged = stage2_config(proxy, flags("--erase-prob", "0"), from_study=True)
    assert flagged.erase_prob == 0.0 and flagged.cutmix_alpha == 1.0
    with pytest.raises(SystemExit):
        stage2_final.parse_args(["--help"])
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    for flag, value in (("--cutmix-alpha FLOAT", "1.0"), ("--erase-prob FLOAT", "0.25"), ("--weight-decay FLOAT", "0.05"),
                        ("--warmup-epochs INT", "5"), ("--label-smoothing FLOAT", "0.1"), ("--mix-prob FLOAT", "0.5")):
        assert re.search(re.escape(flag) + r" (?:(?! --).)*?\(default: " + re.escape(value) + r"\)", shown), flag


def test_the_seed_recipe_config_is_the_long_runs_command():
    # configs/seed_recipe.json must rebuild the 120-epoch evidence's configuration field for field, and
    # equal seed_best.json with the three flags that run was started with (the defaults now): one run.
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "results", "reference", "120ep_seed_recipe_stopped_at_97", "config.json")) as f:
        evidence = json.load(f)["config"]
    recipe = os.path.join(root, "configs", "seed_recipe.json")
    flags = lambda *argv: stage2_final.model_flags(stage2_final.parse_args(list(argv)))  # noqa: E731
    from_file = candidates_from_file(recipe, flags("--config", recipe))
    best = os.path.join(root, "configs", "seed_best.json")
    argv = ["--config", best, "--randaug-ops", "2", "--drop-path", "0.1", "--grad-clip", "1"]
    from_flags = candidates_from_file(best, flags(*argv))
    # (fields added since, e.g. cutmix_alpha, take their defaults: off, as that run had them)
    assert from_file[0]["config"] == from_flags[0]["config"] == with_defaults(evidence)
    assert evidence["randaug_ops"] == 2 and evidence["epochs"] == 120  # not two copies of the chosen recipe
