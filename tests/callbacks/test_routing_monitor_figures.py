"""Issue 14: RoutingMonitor's per-expert series as one multi-line chart each (custom-scalar layout, read back from
TensorBoard) and its signed ablation heatmap on a diverging colour scale centred at zero."""

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from torch import nn

from lightning_lens import render
from lightning_lens._pl import Trainer
from lightning_lens.callbacks import RoutingMonitor
from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.testing import LitClassifier


def _model() -> LitClassifier:
    """As in test_routing_monitor: LayerNorm, the MoE layer ``model.1`` (4 experts), ReLU, a linear head."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(64), MixtureOfExperts(64, 32, num_experts=4, k=2, noise_seed=0), nn.ReLU(),
                        nn.Linear(32, 10))
    return LitClassifier(net, num_classes=10, lr=1e-2)


def _trainer(tmp_path, callbacks, max_epochs=1):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=tb, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   limit_train_batches=6, callbacks=callbacks), tb


def _events(logger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_per_expert_series_share_a_chart_and_the_ablation_map_is_centred_at_zero(tmp_path, flat_digits_loaders,
                                                                                    monkeypatch):
    drawn = []
    original = render.plot_heatmap_matrix

    def spy(matrix, *args, **kwargs):
        fig = original(matrix, *args, **kwargs)
        drawn.append((kwargs.get("ylabel"), fig.axes[0].images[0]))
        return fig

    monkeypatch.setattr(render, "plot_heatmap_matrix", spy)
    train, val = flat_digits_loaders()
    trainer, logger = _trainer(tmp_path, [RoutingMonitor(ablation_every_n_epochs=1)], max_epochs=1)
    trainer.fit(_model(), train, val)

    acc = _events(logger)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert charts == {"moe/model.1": {
        "load per expert": [r"moe/model\.1/load/expert_\d+"],
        "purity per expert": [r"moe/model\.1/purity/expert_\d+"],
        "ablation/acc_drop per expert": [r"moe/model\.1/ablation/acc_drop/expert_\d+"],
    }}
    assert {f"moe/model.1/load/expert_{e}" for e in range(4)} <= set(acc.Tags()["scalars"])  # what the regex draws
    (ablation,) = [image for ylabel, image in drawn if ylabel == "masked expert"]
    low, high = ablation.get_clim()
    assert low == -high and high > 0 and ablation.get_cmap().name == "RdBu_r"
