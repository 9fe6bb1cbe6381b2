"""KNNHead: exact search, vote, leave-one-out, memory policies, credibility, and accuracy on digits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lightning_lens.callbacks.neighbor_gallery import linear_probe_accuracy
from lightning_lens.interpretable_models import KNNHead, MomentumEncoder
from lightning_lens.interpretable_models.knn import _exact_topk


def _filled_head(n=50, d=8, classes=3, **kw):
    gen = torch.Generator().manual_seed(0)
    head = KNNHead(d, classes, memory_size=n, **kw)
    head.write(torch.randn(n, d, generator=gen), torch.arange(n) % classes, torch.arange(n))
    return head, gen


def test_exact_search_matches_brute_force_and_chunking():
    head, gen = _filled_head(k=5)
    q = torch.randn(7, 8, generator=gen)
    sims, pos = head.search(q)
    brute = F.normalize(q, dim=1) @ F.normalize(head.memory_keys, dim=1).T
    ref_s, ref_p = brute.topk(5, dim=1)
    assert torch.equal(pos, ref_p) and torch.allclose(sims, ref_s)
    s2, p2 = _exact_topk(F.normalize(q, dim=1), head.memory_keys, 5, head.filled, chunk_size=3)
    assert torch.equal(p2, pos) and torch.allclose(s2, sims)


def test_leave_one_out_excludes_own_entry():
    head, _ = _filled_head(k=3)
    q = head.memory_keys[:4].clone()
    _, with_self = head.search(q)
    assert with_self[:, 0].tolist() == [0, 1, 2, 3]  # an entry is its own nearest neighbour
    _, loo = head.search(q, exclude_ids=torch.arange(4))
    assert not (loo == torch.arange(4)[:, None]).any()
    head.train()
    with pytest.raises(ValueError, match="pass ids="):
        head(q)


def test_vote_equals_hand_computation():
    head = KNNHead(2, 2, k=3, temperature=0.5, memory_size=3).eval()
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    head.write(keys, torch.tensor([0, 1, 1]), torch.arange(3))
    q = torch.tensor([[2.0, 1.0]])
    cos = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T  # [0.894, 0.447, 0.949]
    w = torch.exp(cos / 0.5)
    expected = torch.tensor([[w[0, 0], w[0, 1] + w[0, 2]]]) / w.sum()
    assert torch.allclose(head(q).exp(), expected, atol=1e-6)


def test_gradient_flows_to_query_only():
    head, gen = _filled_head(k=4)
    head.eval()
    q = torch.randn(3, 8, generator=gen, requires_grad=True)
    head(q)[:, 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert not head.memory_keys.requires_grad


def test_faiss_backend_agrees_with_exact_search():
    pytest.importorskip("faiss")
    head, gen = _filled_head(n=300, k=6)
    q = torch.randn(20, 8, generator=gen)
    assert head.faiss_recall(q) == 1.0
    head.backend = "faiss"
    _, p_loo = head.search(head.memory_keys[:5], exclude_ids=torch.arange(5))
    head.backend = "torch"
    _, e_loo = head.search(head.memory_keys[:5], exclude_ids=torch.arange(5))
    assert torch.equal(p_loo, e_loo)


def test_in_place_and_queue_policies_and_age():
    head, gen = _filled_head(n=10, k=2, refresh="in_place")
    head.train()
    new = torch.randn(2, 8, generator=gen)
    head(new, labels=torch.tensor([2, 2]), ids=torch.tensor([3, 7]))
    assert torch.allclose(head.memory_keys[[3, 7]], F.normalize(new, dim=1))
    assert head.memory_age[[3, 7]].tolist() == [1, 1] and head.memory_age[0].item() == 1  # written before the step
    q = KNNHead(8, 3, k=1, memory_size=4, refresh="queue")
    for i in range(3):
        q.enqueue(torch.randn(2, 8, generator=gen), torch.tensor([i, i]), torch.tensor([2 * i, 2 * i + 1]))
    assert q.memory_ids.tolist() == [4, 5, 2, 3]  # the oldest pair was overwritten
    with pytest.raises(RuntimeError, match="enqueue is for refresh='queue'"):
        head.enqueue(new, torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="set memory_size to the training set size"):
        head.write(new, torch.tensor([0, 0]), torch.tensor([0, 10]))


def test_momentum_encoder_moves_slowly():
    enc = torch.nn.Linear(2, 2)
    mom = MomentumEncoder(enc, momentum=0.9)
    before = mom.encoder.weight.clone()
    with torch.no_grad():
        enc.weight.add_(1.0)
    mom.update(enc)
    assert torch.allclose(mom.encoder.weight, 0.9 * before + 0.1 * enc.weight)


def test_credibility_is_the_calibrated_p_value():
    head = KNNHead(2, 2, k=1, memory_size=4, credibility_k=2)
    head.write(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), torch.tensor([0, 0, 1, 1]),
               torch.arange(4))
    # calibration: one clean example (alpha=0) and one whose 2 neighbours disagree with its label (alpha=2)
    head.calibrate(torch.tensor([[1.0, 0.05], [1.0, 0.05]]), torch.tensor([0, 1]))
    assert head.calibration_scores.tolist() == [0.0, 2.0]
    nb = head.explain(torch.tensor([[1.0, 0.02], [1.0, 1.0]]))
    # first query: both neighbours class 0 -> alpha_0=0 (p=1), alpha_1=2 (p=0.5)
    assert nb.prediction[0].item() == 0 and nb.credibility[0].item() == 1.0 and nb.confidence[0].item() == 0.5


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="memory_size must be given"):
        KNNHead(4, 2)
    with pytest.raises(ValueError, match="refresh must be"):
        KNNHead(4, 2, memory_size=10, refresh="sometimes")
    head = KNNHead(4, 2, memory_size=10).eval()
    with pytest.raises(RuntimeError, match="memory is empty"):
        head(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"embedding_dim=4"):
        head.write(torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_digits_knn_matches_linear_probe_and_flags_noise(digits, trained_knn):
    model = trained_knn
    with torch.no_grad():
        emb_test = model.encoder(digits.x[digits.test])
        knn_acc = (model.head(emb_test).argmax(1) == digits.y[digits.test]).float().mean().item()
        lin_acc = linear_probe_accuracy(model.head.memory_keys, model.head.memory_labels, emb_test,
                                        digits.y[digits.test])
        assert knn_acc >= lin_acc - 0.01, (knn_acc, lin_acc)
        assert knn_acc > 0.95
        model.head.calibrate(model.encoder(digits.x[digits.cal]), digits.y[digits.cal])
        cred_in = model.explain(digits.x[digits.test]).credibility
        noise = torch.rand(len(digits.test), 64, generator=torch.Generator().manual_seed(1))
        cred_out = model.explain(noise).credibility
    scores = torch.cat([cred_in, cred_out]).numpy()
    labels = np.r_[np.ones(len(cred_in)), np.zeros(len(cred_out))]
    assert roc_auc_score(labels, scores) >= 0.9
    assert not math.isnan(float(cred_in.mean()))
