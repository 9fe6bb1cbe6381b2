"""SaliencyMapCallback's text, tabular and HuggingFace paths under DDP (gloo, CPU processes), in
``trainer.validate()``: ``python saliency_maps_structured_ddp_script.py --out OUT --root DIR [--devices N] --task
text|tabular|bert``.

No training: every process holds the same seeded model, so 1 and 2 processes must draw the same probes and log the
same maps. Lightning relaunches this file for rank 1; each rank writes ``OUT.rank<r>.json`` with its probes and maps
(only rank zero computes them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, seed_everything
from torch.utils.data import DataLoader

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import LeakyTabular, SpuriousText
from lightning_lens.testing import LitClassifier, TabularMLP, TinyTextTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402


class LitBert(LightningModule):
    """A tiny BertForSequenceClassification (random weights, no download) whose forward returns its ModelOutput."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                         num_labels=2, attn_implementation="eager")
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass


def build(task: str) -> tuple[LightningModule, Any, SaliencyMapCallback]:
    """The seeded module, the validation data and the callback of ``task``."""
    torch.manual_seed(0)
    if task == "tabular":
        val = LeakyTabular("val", seed=0)
        module = LitClassifier(TabularMLP(val.num_features, 2), num_classes=2)
        cb = SaliencyMapCallback(methods=["gradient", ("integrated_gradients", {"n_steps": 8})],
                                 feature_names=val.feature_names, num_probes=5, strict=True)
        return module, val, cb
    val = SpuriousText("val", seed=0, size=40)
    if task == "text":
        module = LitClassifier(TinyTextTransformer(len(val.vocabulary), 2, dim=16), num_classes=2)
        layer = "model.token_embedding"
    else:
        module, layer = LitBert(len(val.vocabulary)), "model.bert.embeddings.word_embeddings"
    cb = SaliencyMapCallback(methods=["gradient_x_input", ("integrated_gradients", {"n_steps": 8})], layer=layer,
                             tokenizer=val, num_probes=5, strict=True)
    return module, val, cb


def run(devices: int, root: str, task: str) -> dict:
    seed_everything(0)
    module, val, cb = build(task)
    trainer = _ddp.trainer(devices, root, [cb], inference_mode=True)
    trainer.validate(module, DataLoader(val, batch_size=8))
    return {"rank": trainer.global_rank, "probe_indices": cb.probes.indices.tolist(),
            "maps": {k: v.tolist() for k, v in cb.last_attributions.items()},
            "grads": [p.grad is not None for p in module.parameters()]}


def main() -> None:
    parser = _ddp.script_arguments()
    parser.add_argument("--task", choices=("text", "tabular", "bert"), required=True)
    args = parser.parse_args()
    _ddp.write_result(args.out, run(args.devices, args.root, args.task))


if __name__ == "__main__":
    main()
