"""Issue 13: the callbacks take the attention methods by name on a vision transformer: the setup dry run passes and
a short fit logs a cascade report for attention rollout and gradient rollout (read back from the callback)."""

from __future__ import annotations

import torch
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier
from lightning_lens.testing.models import TinyViT


def test_saliency_and_randomization_callbacks_run_the_rollouts_on_a_vit(tmp_path):
    train = DataLoader(Subset(SpuriousDigits("train", seed=0), range(64)), batch_size=32)
    val = DataLoader(Subset(SpuriousDigits("val", seed=0), range(16)), batch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LitClassifier(TinyViT(image_size=32, patch_size=8, num_classes=10, dim=16, depth=2), lr=3e-3)
    saliency = SaliencyMapCallback(methods=["attention_rollout", "gradient_rollout", "gradcam", "hirescam"],
                                   num_probes=4, max_overhead=None)
    check = RandomizationSanityCheck(methods=["attention_rollout", "gradient_rollout"], num_probes=4, grid_probes=0,
                                     controls=False, max_overhead=None, run_at_fit_end=True)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[saliency, check], num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    maps = saliency.last_attributions
    assert {name: tuple(m.shape) for name, m in maps.items()} == {
        name: (4, 1, 32, 32) for name in ("attention_rollout", "gradient_rollout", "gradcam", "hirescam")}
    report = check.last_report
    assert report is not None and report.methods == ["attention_rollout", "gradient_rollout"]
    # the input-side stage holds the ViT's own parameters: [CLS] token and position embeddings
    assert report.stages[-1] == "model"
    assert set(report.stage_parameters[-1]) == {"model.cls_token", "model.pos_embed"}
    assert any(s.endswith("self_attn") for s in report.stages)
