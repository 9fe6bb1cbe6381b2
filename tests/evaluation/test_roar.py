"""remove_and_retrain (ROAR, Hooker et al. 2019) on a small tabular problem with three informative features."""

import pytest
import torch
from torch import nn

from lightning_lens.evaluation import ROARReport, remove_and_retrain, remove_features
from lightning_lens.testing import LitClassifier

_QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """12 features; the label is the sign of the sum of the first three, the other nine are noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long()
    return x, y


def _trained_module() -> LitClassifier:
    from lightning_lens.lightning_modules import fit_random_label_twin

    torch.manual_seed(0)
    lit = LitClassifier(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2)), num_classes=2, lr=1e-2)
    x, y = _data(400, 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    fit_random_label_twin(lit, loader, max_epochs=8, trainer_kwargs=_QUIET)
    return lit


def test_removal_by_a_good_method_hurts_accuracy_more_than_random_removal():
    lit = _trained_module()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    rng = torch.random.get_rng_state()
    report = remove_and_retrain(lit, _data(400, 1), _data(200, 2), methods=["gradient_x_input"],
                                fractions=(0.25, 0.5), max_epochs=8, batch_size=50, trainer_kwargs=_QUIET)
    assert isinstance(report, ROARReport)
    assert report.fractions == [0.0, 0.25, 0.5]
    assert report.retrainings == 1 + 2 * 2
    good, random = report.accuracy["gradient_x_input"], report.accuracy["random"]
    assert good[0] == random[0] and good[0] > 0.85  # t = 0: the same clean retraining
    # the top quarter of Gradient x Input holds the three informative features: the retrained model is near chance
    assert good[1] < 0.7 and random[1] > good[1] + 0.15, report.summary()
    assert report.verdicts["gradient_x_input"].outcome == "passes"
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in lit.state_dict().items():
        assert torch.equal(v, before[k])
    columns, rows = report.to_table()
    assert columns == ["method", "verdict", "gap to random", "acc@0", "acc@0.25", "acc@0.5"]
    assert [r[0] for r in rows] == ["gradient_x_input", "random"] and rows[1][1] == "control"
    assert report.to_dict()["accuracy"]["random"] == random.tolist()


def test_remove_features_replaces_top_pixels_in_every_channel():
    x = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).view(2, 2, 2, 2)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    fill = torch.tensor([-1.0, -2.0]).view(2, 1, 1)
    out = remove_features(x, scores, 0.5, fill)
    assert out[0, :, 0].tolist() == [[-1.0, -1.0], [-2.0, -2.0]]  # pixels (0, 0) and (0, 1) of example 0
    assert out[0, :, 1].tolist() == x[0, :, 1].tolist()
    assert out[1, :, 1].tolist() == [[-1.0, -1.0], [-2.0, -2.0]]  # pixels (1, 0) and (1, 1) of example 1
    assert torch.equal(remove_features(x, scores, 0.1, fill), x)  # rounds to zero positions


def test_bad_arguments():
    lit = LitClassifier(nn.Linear(12, 2), num_classes=2)
    data = _data(20, 0)
    with pytest.raises(TypeError, match="module must be a LightningModule"):
        remove_and_retrain(nn.Linear(12, 2), data, data)
    with pytest.raises(TypeError, match="train_data must be an"):
        remove_and_retrain(lit, [data[0]], data)
    with pytest.raises(ValueError, match="fractions must be < 1"):
        remove_and_retrain(lit, data, data, fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="'random' is the control"):
        remove_and_retrain(lit, data, data, methods=["random"])
    with pytest.raises(ValueError, match="test_data: the labels"):
        remove_and_retrain(lit, data, (data[0], data[1][:5]))
