"""SaliencyMapCallback on text (token ids + attention mask, layer attribution on the embeddings), tabular
(feature bar charts) and multi-input batches; the seeded SpuriousText shortcut test; non-perturbation, validate()
under inference mode, configuration errors at setup."""

from __future__ import annotations

import glob
import html
import os

import pytest
import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens.attribution import Gradient, IntegratedGradients
from lightning_lens.attribution.layer import reduce_tokens
from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import LeakyTabular, SpuriousText
from lightning_lens.testing import LitClassifier, TabularMLP, TinyTextTransformer

VOCAB = len(SpuriousText("val", size=1).vocabulary)


# ------------------------------------------------------------------------------------ the seeded shortcut test
def _train_text_model(shortcut_fraction: float, seed: int = 0) -> nn.Module:
    """The tiny transformer trained for 4 epochs on 1000 SpuriousText sentences (plain PyTorch: seconds)."""
    torch.manual_seed(seed)
    data = SpuriousText("train", seed=0, size=1000, train_shortcut_fraction=shortcut_fraction)
    model = TinyTextTransformer(VOCAB, 2, dim=32, heads=2, layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 50):
            rows = order[i : i + 50]
            logits = model(data.input_ids[rows], data.attention_mask[rows])
            loss = nn.functional.cross_entropy(logits, data.labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _share_where_the_shortcut_token_is_largest(model: nn.Module) -> float:
    """Among validation sentences carrying a shortcut token: how often it gets the largest |token score| of layer IG
    (on the token embeddings, summed over the hidden dimension; [CLS] and padding excluded), for the predicted class."""
    val = SpuriousText("val", seed=0, size=300)
    inputs = {"input_ids": val.input_ids, "attention_mask": val.attention_mask}
    with torch.no_grad():
        pred = model(**inputs).argmax(dim=1)
    ig = IntegratedGradients(model, layer="token_embedding", n_steps=16)
    scores = reduce_tokens(ig.attribute(inputs, target=pred), how="sum").abs()
    scores[(val.input_ids == val.pad_id) | (val.input_ids == val.cls_id)] = -1.0
    position = torch.as_tensor(val.metadata["shortcut_position"])
    carries = position >= 0
    return float((scores.argmax(dim=1)[carries] == position[carries]).float().mean())


def test_a_model_trained_with_the_shortcut_gives_the_shortcut_token_the_largest_attribution():
    with_shortcut = _share_where_the_shortcut_token_is_largest(_train_text_model(0.9))
    without = _share_where_the_shortcut_token_is_largest(_train_text_model(0.0))
    assert with_shortcut >= 0.9
    assert without < 0.3  # never seen in training: its embedding carries nothing


# ------------------------------------------------------------------------------------------------ text, end to end
def _text_loaders(n_train: int = 128, n_val: int = 32):
    train = SpuriousText("train", seed=0, size=n_train)
    val = SpuriousText("val", seed=0, size=n_val)
    return train, DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)), \
        DataLoader(val, batch_size=16)


def _text_module() -> LitClassifier:
    return LitClassifier(TinyTextTransformer(VOCAB, 2, dim=16, heads=2), num_classes=2, lr=3e-3)


def _trainer(tmp_path, callbacks, loggers=None, max_epochs=1, **kwargs) -> Trainer:
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   logger=loggers if loggers is not None else CSVLogger(str(tmp_path)), callbacks=callbacks,
                   num_sanity_val_steps=0, **kwargs)


def test_text_maps_are_logged_to_tensorboard_and_html_and_equal_layer_attribution(tmp_path, read_tensorboard):
    seed_everything(0)
    data, train, val = _text_loaders()
    lit = _text_module()
    cb = SaliencyMapCallback(methods=["gradient_x_input", ("integrated_gradients", {"n_steps": 8})],
                             layer="model.token_embedding", tokenizer=data, num_probes=4, max_overhead=None,
                             strict=True)
    tb, csv = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path, [cb], loggers=[tb, csv]).fit(lit, train, val)

    # the maps: one score per token, what the layer method gives reduced over the hidden dimension
    probes = cb.probes
    assert set(probes.inputs) == {"input_ids", "attention_mask"} and probes.masks == {}
    lit.eval()
    expected = IntegratedGradients(lit, layer="model.token_embedding", n_steps=8).attribute(
        dict(probes.inputs), target=probes.targets)
    torch.testing.assert_close(cb.last_attributions["integrated_gradients"], reduce_tokens(expected), rtol=1e-4,
                               atol=1e-6)
    assert cb.last_attributions["gradient_x_input"].shape == probes.inputs["input_ids"].shape

    # TensorBoard: one image per method; the file sink: HTML with the probes' words, escaped, padding hidden
    images = read_tensorboard(tb.log_dir).Tags()["images"]
    assert {"saliency/gradient_x_input", "saliency/integrated_gradients"} <= set(images)
    pages = sorted(glob.glob(os.path.join(csv.log_dir, "lens", "saliency", "integrated_gradients", "*.html")))
    assert len(pages) == 1
    page = open(pages[0], encoding="utf-8").read()
    val_data = SpuriousText("val", seed=0, size=32)
    for i in probes.indices.tolist():
        for word in val_data.decode(val_data.input_ids[i]).split():
            assert f">{html.escape(word)}</span>" in page
    assert "[PAD]" not in page and "[CLS]" not in page
    assert page.count('class="lens-row"') == 4


def test_text_fit_with_and_without_the_callback_end_bit_identical(tmp_path):
    def fit(callbacks):
        seed_everything(0)
        _, train, val = _text_loaders(n_train=64)
        lit = _text_module()
        _trainer(tmp_path, callbacks, max_epochs=2).fit(lit, train, val)
        return lit, torch.get_rng_state()

    plain, rng_plain = fit([])
    cb = SaliencyMapCallback(layer="model.token_embedding", num_probes=2, max_overhead=None, strict=True)
    observed, rng_observed = fit([cb])
    assert sorted(cb.last_attributions) == ["gradient", "integrated_gradients", "smoothgrad"]  # Grad-CAM left out
    for (name, a), (_, b) in zip(plain.state_dict().items(), observed.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(rng_plain, rng_observed)
    assert observed.training == plain.training


def test_text_maps_under_validate_in_inference_mode(tmp_path):
    data, _, val = _text_loaders()
    lit = _text_module()
    cb = SaliencyMapCallback(methods=["gradient"], layer="model.token_embedding", tokenizer=data.vocabulary,
                             num_probes=3, strict=True)
    trainer = _trainer(tmp_path, [cb], inference_mode=True)
    trainer.validate(lit, val)
    maps = cb.last_attributions["gradient"]
    assert maps.shape == (3, 24) and bool(torch.isfinite(maps).all()) and bool((maps != 0).any())
    assert all(p.grad is None for p in lit.parameters())
    assert glob.glob(os.path.join(trainer.logger.log_dir, "lens", "saliency", "gradient", "*.html"))


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, TypeError, r"token ids .* pass layer='model.token_embedding'"),
    ({"layer": "model.token_embedding", "tokenizer": ["a", "b"]}, ValueError, "tokenizer could not decode"),
    ({"layer": "model.token_embedding", "quality_metrics": ["deletion_auc"]}, ValueError,
     "quality_metrics applies to image inputs"),
    ({"layer": "model.token_embedding", "layout": "methods_x_probes"}, ValueError, "layout=.* applies to image"),
    ({"layer": "model.no_such_layer"}, ValueError, "no_such_layer"),
])
def test_text_configuration_errors_stop_the_fit_before_training(tmp_path, kwargs, error, match):
    _, train, val = _text_loaders(n_train=32)
    lit = _text_module()
    before = [p.detach().clone() for p in lit.parameters()]
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=2, **kwargs)
    with pytest.raises(error, match=match):
        _trainer(tmp_path, [cb]).fit(lit, train, val)
    assert all(torch.equal(a, b) for a, b in zip(before, lit.parameters()))


def test_a_bad_tokenizer_type_is_refused_at_construction():
    with pytest.raises(TypeError, match="tokenizer must be a HuggingFace tokenizer"):
        SaliencyMapCallback(tokenizer=3)


# ---------------------------------------------------------------------------------------------------- tabular
def test_tabular_maps_are_bar_charts_and_equal_the_method(tmp_path, read_tensorboard):
    seed_everything(0)
    train_data, val_data = LeakyTabular("train"), LeakyTabular("val")
    lit = LitClassifier(TabularMLP(train_data.num_features, 2), num_classes=2, lr=3e-3)
    cb = SaliencyMapCallback(methods=["gradient"], feature_names=train_data.feature_names, num_probes=4,
                             top_k_features=5, max_overhead=None, strict=True)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, [cb], loggers=[tb]).fit(lit, DataLoader(train_data, batch_size=64),
                                               DataLoader(val_data, batch_size=64))
    lit.eval()
    expected = Gradient(lit).attribute(cb.probes.inputs, target=cb.probes.targets)
    torch.testing.assert_close(cb.last_attributions["gradient"], expected)
    events = read_tensorboard(tb.log_dir)
    image = events.Images("saliency/gradient")[-1]
    assert image.width > 400 and image.height > 150  # a bar chart, not a 6x6 padded square
    with pytest.raises(ValueError, match="feature_names has 3 names, but the inputs have 31 columns"):
        _trainer(tmp_path, [SaliencyMapCallback(methods=["gradient"], feature_names=["a", "b", "c"])]).fit(
            lit, DataLoader(train_data, batch_size=64), DataLoader(val_data, batch_size=64))


# ------------------------------------------------------------------------------------------------ multi-input
class ImageAndMeta(nn.Module):
    """forward(image, meta): a linear read-out of both."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(16, 2)
        self.meta = nn.Linear(3, 2)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.image(image.flatten(1)) + self.meta(meta)


def test_multi_input_batches_explain_every_input(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 4, 4, generator=gen), torch.randn(32, 3, generator=gen),
                         torch.randint(0, 2, (32,), generator=gen))
    lit = LitClassifier(ImageAndMeta(), num_classes=2, input_key=None)
    lit.accessor.input_key = (0, 1)  # LitClassifier reads the same two inputs
    lit.accessor.target_key = 2
    cb = SaliencyMapCallback(methods=["gradient"], input_key=(0, 1), target_key=2, num_probes=4,
                             feature_names=["age", "dose", "bmi"], max_overhead=None, strict=True)
    csv = CSVLogger(str(tmp_path))
    _trainer(tmp_path, [cb], loggers=[csv]).fit(lit, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    maps = cb.last_attributions["gradient"]
    assert isinstance(maps, tuple) and len(maps) == 2
    lit.eval()
    # a linear model: the gradient of the target logit is the weights' row, whatever the input
    target = cb.probes.targets
    torch.testing.assert_close(maps[0], lit.model.image.weight[target].detach().reshape(4, 1, 4, 4))
    torch.testing.assert_close(maps[1], lit.model.meta.weight[target].detach())
    files = {os.path.relpath(p, csv.log_dir) for p in glob.glob(os.path.join(csv.log_dir, "lens", "**", "*.png"),
                                                                 recursive=True)}
    assert {os.path.dirname(f) for f in files} == {"lens/saliency/gradient/0", "lens/saliency/gradient/1"}
