import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from report import log_hparams


def read_hparams(log_dir):
    """The session TensorBoard's HParams dashboard shows for a run, read with TensorBoard's own reader."""
    acc = EventAccumulator(log_dir)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return values, [m.name.tag for m in experiment.metric_infos], scalars


def test_hparams_are_read_back_by_tensorboards_event_reader(tmp_path):
    run = str(tmp_path / "trial_0003")
    log_hparams(run, {"patch_size": 4, "lr": 3e-4, "optimizer": "adamw", "state": "PRUNED", "note": None},
                {"best_val_acc": 0.4125, "epochs_run": 7})
    values, metric_tags, scalars = read_hparams(run)
    assert values == {"patch_size": 4.0, "lr": 3e-4, "optimizer": "adamw", "state": "PRUNED", "note": "none"}
    assert sorted(metric_tags) == ["hparams/best_val_acc", "hparams/epochs_run"]
    assert abs(scalars["hparams/best_val_acc"] - 0.4125) < 1e-6 and scalars["hparams/epochs_run"] == 7
    assert not [d for d in os.listdir(run) if os.path.isdir(os.path.join(run, d))]  # no stray time-stamped folder
