"""KNNHead: exact search, vote, leave-one-out, memory policies, credibility, an empty memory, non-finite rows, argument
checks, and accuracy on digits."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lightning_lens.interpretable_models import KNNHead, MomentumEncoder
from lightning_lens.interpretable_models.knn import _exact_topk
from lightning_lens.interpretable_models.knn_evaluation import linear_probe_accuracy


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
    with pytest.raises(ValueError, match="refresh must be one of"):
        KNNHead(4, 2, memory_size=10, refresh="sometimes")
    with pytest.raises(TypeError, match="k must be an int"):
        KNNHead(4, 2, k=2.0, memory_size=10)
    with pytest.raises(TypeError, match="memory_size must be an int"):
        KNNHead(4, 2, memory_size=10.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KNNHead(4, 2, memory_size=10, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        KNNHead(4, 1, memory_size=10)
    with pytest.raises(ValueError, match=r"momentum must be < 1.0"):
        MomentumEncoder(torch.nn.Linear(2, 2), momentum=1.0)
    head = KNNHead(4, 2, memory_size=10).eval()
    with pytest.raises(RuntimeError, match="memory is empty, so there is nothing to calibrate"):
        head.calibrate(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"embedding_dim=4"):
        head.write(torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_empty_memory_predicts_uniform_probabilities_and_warns_once():
    # regression: an empty memory raised, so Lightning's sanity pass crashed before the first refresh
    head = KNNHead(4, 3, k=2, memory_size=6).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = head(torch.randn(2, 4)), head(torch.randn(1, 4))
    assert torch.allclose(first, torch.full((2, 3), math.log(1 / 3))) and torch.allclose(second, first[:1])
    assert [str(w.message)[:26] for w in caught] == ["the kNN memory is empty, s"]
    nb = head.explain(torch.randn(2, 4))
    assert (nb.indices == -1).all() and torch.isinf(nb.similarities).all() and nb.credibility is None


def test_partly_filled_memory_votes_with_the_neighbours_it_has():
    head = KNNHead(2, 2, k=3, temperature=0.5, memory_size=5).eval()
    head.write(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([3, 4]))  # rows 0-2 empty
    q = torch.tensor([[2.0, 1.0]])
    w = torch.exp(F.normalize(q, dim=1) @ torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T / 0.5)
    assert torch.allclose(head(q).exp(), w / w.sum(), atol=1e-6)


def test_first_in_place_training_step_votes_within_the_batch():
    # regression: refresh="in_place" (the default) could not take its first step on an empty memory
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=gen, requires_grad=True)
    labels, ids = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([5, 1, 7, 3, 0, 9])
    head = KNNHead(8, 3, k=3, memory_size=10).train()
    logp = head(emb, labels=labels, ids=ids)
    # the same as a memory holding the batch, searched leave-one-out
    seeded = KNNHead(8, 3, k=3, memory_size=10).train()
    seeded.write(emb.detach(), labels, ids)
    assert torch.allclose(logp, seeded(emb, labels=labels, ids=ids))
    F.nll_loss(logp, labels).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert sorted(torch.nonzero(head.filled).squeeze(1).tolist()) == sorted(ids.tolist())
    assert int(head.step) == 1


def test_write_skips_nonfinite_rows_and_counts_them():
    # regression: one NaN/inf key turned every later prediction into NaN
    head = KNNHead(2, 2, k=2, memory_size=4).eval()
    emb = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0], [float("inf"), 1.0]])
    with pytest.warns(RuntimeWarning, match="skipped 2 memory entries whose embedding holds NaN or inf"):
        head.write(emb, torch.tensor([0, 0, 1, 1]), torch.arange(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        head.write(emb[1:2], torch.tensor([1]), torch.tensor([1]))
    assert head.nonfinite_skipped == 3
    assert head.filled.tolist() == [True, False, True, False]
    clean = KNNHead(2, 2, k=2, memory_size=4).eval()
    clean.write(emb[[0, 2]], torch.tensor([0, 1]), torch.tensor([0, 2]))
    q = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    assert torch.isfinite(head(q)).all() and torch.equal(head(q), clean(q))
    queue = KNNHead(2, 2, k=1, memory_size=4, refresh="queue")
    with pytest.warns(RuntimeWarning, match="skipped 2 memory entries"):
        queue.enqueue(emb, torch.tensor([0, 0, 1, 1]), torch.arange(4))
    assert queue.memory_ids[:2].tolist() == [0, 2] and int(queue.queue_pointer) == 2 and queue.nonfinite_skipped == 2


def test_calibration_scores_can_stay_outside_the_head():
    head = KNNHead(2, 2, k=1, memory_size=4, credibility_k=2)
    head.write(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), torch.tensor([0, 0, 1, 1]),
               torch.arange(4))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    cal_x, cal_y = torch.tensor([[1.0, 0.05], [1.0, 0.05]]), torch.tensor([0, 1])
    scores = head.calibration_scores_for(cal_x, cal_y)
    q = torch.tensor([[1.0, 0.02], [1.0, 1.0]])
    outside = head.explain(q, calibration_scores=scores)
    after = head.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    head.calibrate(cal_x, cal_y)
    inside = head.explain(q)
    assert scores.tolist() == [0.0, 2.0]
    assert torch.equal(outside.credibility, inside.credibility) and torch.equal(outside.confidence, inside.confidence)
    # a calibrated head's checkpoint loads into a fresh head (the scores' length is the checkpoint's)
    fresh = KNNHead(2, 2, k=1, memory_size=4, credibility_k=2)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.explain(q).credibility, inside.credibility)


def test_digits_knn_matches_linear_probe_and_flags_noise(knn_digits, trained_knn):
    model = trained_knn
    with torch.no_grad():
        emb_test = model.encoder(knn_digits.x[knn_digits.test])
        knn_acc = (model.head(emb_test).argmax(1) == knn_digits.y[knn_digits.test]).float().mean().item()
        lin_acc = linear_probe_accuracy(model.head.memory_keys, model.head.memory_labels, emb_test,
                                        knn_digits.y[knn_digits.test])
        assert knn_acc >= lin_acc - 0.01, (knn_acc, lin_acc)
        assert knn_acc > 0.95
        model.head.calibrate(model.encoder(knn_digits.x[knn_digits.cal]), knn_digits.y[knn_digits.cal])
        cred_in = model.explain(knn_digits.x[knn_digits.test]).credibility
        noise = torch.rand(len(knn_digits.test), 64, generator=torch.Generator().manual_seed(1))
        cred_out = model.explain(noise).credibility
    scores = torch.cat([cred_in, cred_out]).numpy()
    labels = np.r_[np.ones(len(cred_in)), np.zeros(len(cred_out))]
    assert roc_auc_score(labels, scores) >= 0.9
    assert not math.isnan(float(cred_in.mean()))


def test_faiss_index_follows_load_state_dict_and_edits_of_the_memory():
    # regression (issue 18): the index was rebuilt only on write/enqueue/clear, so after load_state_dict (every
    # checkpoint resume) FAISS returned neighbours from the old memory (faiss_recall 0.12)
    pytest.importorskip("faiss")
    resumed, gen = _filled_head(n=200, k=5, backend="faiss", refresh="reencode")
    checkpoint = KNNHead(8, 3, k=5, memory_size=200, refresh="reencode")
    checkpoint.write(torch.randn(200, 8, generator=gen), torch.randint(0, 3, (200,), generator=gen),
                     torch.arange(200))
    q = torch.randn(30, 8, generator=gen)
    resumed.search(q)  # builds the index on the old memory
    index = resumed._faiss_index
    resumed.search(q)
    assert resumed._faiss_index is index  # an unchanged memory is not re-indexed
    resumed.load_state_dict(checkpoint.state_dict())
    _, found = resumed.search(q)
    assert torch.equal(found, checkpoint.search(q)[1])
    assert resumed.faiss_recall(q) == 1.0
    # an in-place edit of the buffers from outside the head is seen too
    with torch.no_grad():
        resumed.memory_keys.copy_(F.normalize(torch.randn(200, 8, generator=gen), dim=1))
    _, found = resumed.search(q)
    resumed.backend = "torch"
    assert torch.equal(found, resumed.search(q)[1])


def test_faiss_leave_one_out_with_an_id_stored_several_times():
    # regression (issue 18): FAISS fetched k+1 candidates, so with one id stored three times in a queue leave-one-out
    # left [x, -1, -1] where exact search gives three neighbours
    pytest.importorskip("faiss")
    head = KNNHead(4, 2, k=3, memory_size=6, refresh="queue", backend="faiss").eval()
    keys = torch.eye(4)[[0, 0, 0, 1, 2, 3]] + 0.1 * torch.arange(6.0)[:, None]
    head.enqueue(keys, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([7, 7, 7, 3, 4, 5]))
    query, exclude = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([7])
    _, found = head.search(query, exclude_ids=exclude)
    assert head.memory_ids[found[0]].tolist() == [5, 4, 3]
    # a longer queue where ids repeat up to 5 times: both backends agree query by query
    gen = torch.Generator().manual_seed(0)
    queue = KNNHead(8, 3, k=4, memory_size=60, refresh="queue", backend="faiss").eval()
    ids = torch.randint(0, 15, (60,), generator=gen)
    queue.enqueue(torch.randn(60, 8, generator=gen), ids % 3, ids)
    q, exclude = torch.randn(25, 8, generator=gen), torch.randint(0, 17, (25,), generator=gen)  # 15, 16 are not stored
    _, approx = queue.search(q, exclude_ids=exclude)
    queue.backend = "torch"
    _, exact = queue.search(q, exclude_ids=exclude)
    assert int(torch.bincount(ids).max()) >= 5
    assert torch.equal(approx, exact) and (exact >= 0).all()
