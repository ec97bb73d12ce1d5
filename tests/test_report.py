import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import touches_the_edge
from reports import log_hparams


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
    assert len(os.listdir(run)) == 1  # one events file, no empty second one


def test_the_gallery_holds_only_mistakes_most_confident_first_with_the_right_labels(tmp_path):
    import torch

    from reports import most_confident_mistakes, plot_mistakes

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100) % 10
    probs = torch.softmax(3 * torch.randn(100, 10, generator=g), 1)
    wrong = probs.argmax(1) != labels
    picked = most_confident_mistakes(probs, labels, k=36)
    assert len(picked) == min(36, int(wrong.sum())) and all(wrong[i] for i in picked)
    conf = probs.max(1).values
    assert all(conf[a] >= conf[b] for a, b in zip(picked, picked[1:]))
    assert min(conf[picked]) >= max(conf[[i for i in range(100) if wrong[i] and i not in picked]], default=0)
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g)
    path = tmp_path / "mistakes.png"
    shown = plot_mistakes(images, labels, probs, [f"c{i}" for i in range(10)], str(path), "model")
    assert shown == picked and path.stat().st_size > 10000


def test_the_per_class_plot_shows_each_class_accuracy_with_its_exact_interval(tmp_path, monkeypatch):
    import matplotlib.image
    import numpy as np

    import reports as report
    from reports import accuracy_interval

    shown = []
    monkeypatch.setattr(report.pyplot(), "close", shown.append)  # keep the figure to read back what it draws
    classes, correct, totals = [f"c{i}" for i in range(10)], [90, 80, 70, 60, 50, 40, 30, 20, 10, 0], [100] * 9 + [50]
    path = tmp_path / "per_class.png"
    report.plot_per_class_accuracy(classes, correct, totals, str(path), "model")
    (ax,) = shown[0].axes
    bars = ax.patches
    assert [b.get_height() for b in bars] == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    # each error bar spans the class's Clopper-Pearson interval: 0/50 from 0 to 7.1 %, not symmetric
    (caps_low, caps_high) = ax.containers[0].lines[1][:2] if ax.containers[0].lines[1] else (None, None)
    segments = ax.containers[0].lines[2][0].get_segments()
    for segment, c, n in zip(segments, correct, totals):
        low, high = accuracy_interval(c, n)
        assert np.allclose(sorted(segment[:, 1]), [100 * low, 100 * high])
    assert 100 * accuracy_interval(0, 50)[1] > 7 and segments[-1][:, 1].min() == 0
    assert [t.get_text() for t in ax.texts] == [f"{100 * c / n:.1f}" for c, n in zip(correct, totals)]
    assert ax.get_title() == "model" and caps_low is not None and caps_high is not None
    # the PNG itself: about 9 x 4 inches at 100 dpi, cropped to what is drawn, every label whole
    height, width = matplotlib.image.imread(path).shape[:2]
    assert 350 <= height <= 450 and 800 <= width <= 950 and touches_the_edge(path) == []
