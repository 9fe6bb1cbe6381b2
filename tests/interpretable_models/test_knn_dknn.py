"""DeepKNN (DkNN over several layers): nonconformity, p-values, credibility and confidence computed by hand on a toy
memory, one layer equal to KNNHead's own credibility, FAISS equal to exact search, calibration kept outside or saved,
layer_outputs, argument errors, and out-of-distribution detection on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from lightning_lens.interpretable_models import DeepKNN, KNNHead
from lightning_lens.interpretable_models.dknn import layer_outputs

LABELS = torch.tensor([0, 0, 1, 1])
# two layers of the same 4 training examples: A on the axes of R^4, B in the plane
TRAIN_A = torch.eye(4)
TRAIN_B = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
# queries, each given in both layers; with k=2 their neighbours' labels are (layer A | layer B):
Q1 = (torch.tensor([1.0, 1.0, 0, 0]), torch.tensor([1.0, 0.05]))  # rows 0,1 (0, 0) | rows 0,1 (0, 0)
Q2 = (torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1.0]))  # rows 2,3 (1, 1) | rows 2,3 (1, 1)
Q3 = (torch.tensor([1.0, 1.0, 0, 0]), torch.tensor([0.0, 1.0]))  # rows 0,1 (0, 0) | rows 2,3 (1, 1)


def toy_dknn() -> DeepKNN:
    return DeepKNN.from_layers([TRAIN_A, TRAIN_B], LABELS, num_classes=2, k=2)


def layers_of(*queries):
    return [torch.stack([q[0] for q in queries]), torch.stack([q[1] for q in queries])]


def test_nonconformity_p_values_and_credibility_equal_hand_computation():
    dknn = toy_dknn()
    # alpha_j = neighbours (2 per layer, 2 layers) whose label is not j
    assert dknn.nonconformity(layers_of(Q1, Q2, Q3)).tolist() == [[0.0, 4.0], [4.0, 0.0], [2.0, 2.0]]
    # calibration: (Q1, 0) -> 0, (Q2, 1) -> 0, (Q3, 0) -> 2, (Q1 mislabelled 1) -> 4
    scores = dknn.calibration_scores_for(layers_of(Q1, Q2, Q3, Q1), torch.tensor([0, 1, 0, 1]))
    assert scores.tolist() == [0.0, 0.0, 2.0, 4.0]
    out = dknn.explain(layers_of(Q1, Q2, Q3), calibration_scores=scores)
    # p_j = share of calibration scores >= alpha_j: Q1 (1, 1/4), Q2 (1/4, 1), Q3 (1/2, 1/2)
    assert out.p_values.tolist() == [[1.0, 0.25], [0.25, 1.0], [0.5, 0.5]]
    assert out.prediction.tolist() == [0, 1, 0]  # a tie goes to the lower class
    assert out.credibility.tolist() == [1.0, 1.0, 0.5]
    assert out.confidence.tolist() == [0.75, 0.75, 0.5]


def test_one_layer_equals_the_heads_own_credibility():
    gen = torch.Generator().manual_seed(0)
    train, labels = torch.randn(80, 6, generator=gen), torch.randint(0, 3, (80,), generator=gen)
    cal_x, cal_y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    q = torch.randn(20, 6, generator=gen)
    head = KNNHead(6, 3, k=5, memory_size=80, refresh="reencode", credibility_k=7)
    head.write(train, labels, torch.arange(80))
    expected = head.explain(q, calibration_scores=head.calibration_scores_for(cal_x, cal_y))
    dknn = DeepKNN([head])
    dknn.calibrate([cal_x], cal_y)
    out = dknn.explain([q])
    assert torch.equal(out.credibility, expected.credibility) and torch.equal(out.confidence, expected.confidence)
    assert torch.equal(out.prediction, expected.prediction)
    # two layers: the nonconformity is the sum of each layer's
    other = torch.randn(80, 4, generator=gen)
    both = DeepKNN.from_layers([train, other], labels, num_classes=3, k=7)
    q_other = torch.randn(20, 4, generator=gen)
    alone = [DeepKNN.from_layers([t], labels, num_classes=3, k=7).nonconformity([x])
             for t, x in ((train, q), (other, q_other))]
    assert torch.equal(both.nonconformity([q, q_other]), alone[0] + alone[1])


def test_faiss_backend_equals_exact_search():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(1)
    layers = [torch.randn(100, 5, generator=gen), torch.randn(100, 3, 2, 2, generator=gen)]  # 4-D is flattened
    labels = torch.randint(0, 4, (100,), generator=gen)
    queries = [torch.randn(15, 5, generator=gen), torch.randn(15, 3, 2, 2, generator=gen)]
    exact = DeepKNN.from_layers(layers, labels, num_classes=4, k=9).nonconformity(queries)
    approx = DeepKNN.from_layers(layers, labels, num_classes=4, k=9, backend="faiss").nonconformity(queries)
    assert torch.equal(exact, approx)


def test_calibration_stays_outside_unless_stored_and_loads_into_a_fresh_module():
    dknn = toy_dknn()
    before = {k: v.clone() for k, v in dknn.state_dict().items()}
    scores = dknn.calibration_scores_for(layers_of(Q1, Q2, Q3), torch.tensor([0, 1, 0]))
    assert all(torch.equal(before[k], v) for k, v in dknn.state_dict().items())
    with pytest.raises(RuntimeError, match="call calibrate"):
        dknn.explain(layers_of(Q1))
    dknn.calibrate(layers_of(Q1, Q2, Q3), torch.tensor([0, 1, 0]))
    assert torch.equal(dknn.calibration_scores, scores)
    fresh = DeepKNN([KNNHead(4, 2, k=2, memory_size=4, credibility_k=2), KNNHead(2, 2, k=2, memory_size=4,
                                                                                   credibility_k=2)])
    fresh.load_state_dict(dknn.state_dict())
    assert torch.equal(fresh.explain(layers_of(Q3)).p_values, dknn.explain(layers_of(Q3)).p_values)


def test_layer_outputs_equal_the_layers_and_leave_the_model_as_it_was():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    hidden, out = layer_outputs(net, x, ["1", net[3]], batch_size=3)  # 3 batches, dropout off (eval mode)
    with torch.no_grad():
        expected_hidden = torch.relu(net[0](x))
        assert torch.allclose(hidden, expected_hidden) and torch.allclose(out, net[3](expected_hidden))
    assert net.training and all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match=r"layers\[0\]='nope' is not a module"):
        layer_outputs(net, x, ["nope"])
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="exactly once per forward pass"):
        layer_outputs(twice, x, [shared])
    assert not shared._forward_hooks


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="at least one KNNHead"):
        DeepKNN([])
    with pytest.raises(TypeError, match=r"heads\[1\] must be a KNNHead"):
        DeepKNN([KNNHead(2, 2, memory_size=10), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="heads must share num_classes"):
        DeepKNN([KNNHead(2, 2, memory_size=10), KNNHead(2, 3, memory_size=10)])
    dknn = toy_dknn()
    with pytest.raises(ValueError, match=r"one representation per head \(2\), got 1"):
        dknn.nonconformity([TRAIN_A])
    with pytest.raises(TypeError, match="layers must be a list of tensors"):
        dknn.nonconformity(TRAIN_A)
    with pytest.raises(ValueError, match="same examples"):
        dknn.nonconformity([TRAIN_A, TRAIN_B[:3]])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        dknn.calibration_scores_for(layers_of(Q1), torch.tensor([2]))
    with pytest.raises(ValueError, match="one label per training example"):
        DeepKNN.from_layers([TRAIN_A], LABELS[:3], num_classes=2)


def test_several_layers_flag_noise_on_digits(knn_digits, trained_knn):
    # benchmarks/knn.py measures this over seeds; here the fixture's encoder (seed 0): pixels + hidden + embedding
    d, enc = knn_digits, trained_knn.encoder

    def layers(x):
        return [x, *layer_outputs(enc, x, ["1", "2"])]

    noise = torch.rand(len(d.test), 64, generator=torch.Generator().manual_seed(1))
    dknn = DeepKNN.from_layers(layers(d.x[d.train]), d.y[d.train], num_classes=10, k=30)
    scores = dknn.calibration_scores_for(layers(d.x[d.cal]), d.y[d.cal])
    cred_in = dknn.explain(layers(d.x[d.test]), calibration_scores=scores).credibility
    cred_out = dknn.explain(layers(noise), calibration_scores=scores).credibility
    auroc = roc_auc_score(np.r_[np.ones(len(cred_in)), np.zeros(len(cred_out))], torch.cat([cred_in, cred_out]))
    assert auroc >= 0.95
