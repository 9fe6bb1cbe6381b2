"""The report of seeded small randomization tests, pinned to the values the code computed before the cascade's
speed work (issue 11, section 6): optimizations of the cascade (the discovery forward merged into the first
explanation, batched similarity, fewer copies) must not change any number of the report.

Fingerprints per ``(S, B)`` similarity tensor / map stack: ``[nansum, sum of value * (1-based flat index), nan count]``
(float64), so a changed, swapped or missing value changes them. Regenerate only for a deliberate change of results.
"""

import math

import pytest
import torch

from lightning_lens.attribution import RandomMap
from lightning_lens.sanity import cascading_randomization, independent_randomization
from lightning_lens.testing import SmallCNN


def _fingerprint(t):
    t = t.double().flatten()
    weights = torch.arange(1, t.numel() + 1, dtype=torch.float64)
    return [round(float(t.nansum()), 9), round(float((t.nan_to_num(0) * weights).sum()), 8), int(t.isnan().sum())]


def _net():
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, width=4, input_size=24).eval()


def _inputs():
    torch.manual_seed(1)
    return torch.rand(4, 1, 24, 24)


def _summarize(report):
    out = {"stages": report.stages, "targets": report.targets.tolist(), "predictions": report.predictions.tolist(),
           "results": {}}
    for name, result in report.results.items():
        out["results"][name] = {
            "similarity": {m: _fingerprint(s) for m, s in result.similarity.items()},
            "floor": {m: round(f, 9) for m, f in result.floor.items()},
            "ceiling": {m: round(f, 9) for m, f in result.ceiling.items()},
            "outcome": result.verdict.outcome,
            "maps": None if result.maps is None else _fingerprint(result.maps) + _fingerprint(result.signed_maps),
        }
    return out


def _cascade():
    methods = {"gradient": "gradient", "integrated_gradients": ("integrated_gradients", {"n_steps": 5}),
               "smoothgrad": ("smoothgrad", {"n_samples": 3, "seed": 2}), "random": RandomMap(seed=5)}
    return cascading_randomization(_net(), _inputs(), torch.tensor([0, 1, 2, 3]), methods, seed=7)


def _independent():
    return independent_randomization(_net(), _inputs(), "randomized_prediction",
                                     {"gradient": "gradient", "random": RandomMap(seed=1)}, seed=2, order="bottom_up",
                                     batchnorm="reset")


def _smooth():
    return cascading_randomization(_net(), _inputs(), None, {"gradient": "gradient", "random": RandomMap(seed=1)},
                                   seed=4, smooth_samples=3, smooth_noise=0.1)


RUNS = {"cascade": _cascade, "independent": _independent, "smooth": _smooth}

EXPECTED = {'cascade': {'predictions': [[8, 8, 8, 8]],
             'results': {'edge': {'ceiling': {'hog': 1.0,
                                              'spearman_abs': 1.0,
                                              'spearman_signed': 1.0,
                                              'ssim': 1.0,
                                              'topk': 1.0},
                                  'floor': {'hog': 0.153687581,
                                            'spearman_abs': -0.02495119,
                                            'spearman_signed': -0.02495119,
                                            'ssim': 0.053131416,
                                            'topk': 0.103448279},
                                  'maps': [7041.126697967, 56928078.03794159, 0, 7256.01317439, 58627056.27417853, 0],
                                  'outcome': 'fails',
                                  'similarity': {'hog': [24.0, 300.0, 0],
                                                 'spearman_abs': [24.0, 300.0, 0],
                                                 'spearman_signed': [24.0, 300.0, 0],
                                                 'ssim': [24.0, 300.0, 0],
                                                 'topk': [24.0, 300.0, 0]}},
                         'gradient': {'ceiling': {'hog': 1.0,
                                                  'spearman_abs': 1.0,
                                                  'spearman_signed': 1.0,
                                                  'ssim': 1.0,
                                                  'topk': 1.0},
                                      'floor': {'hog': 0.060870327,
                                                'spearman_abs': 0.063775785,
                                                'spearman_signed': -0.024622057,
                                                'ssim': 0.001987672,
                                                'topk': 0.137931034},
                                      'maps': [4084.310968306, 32213755.03766511, 0, -8.074614453, 57512.99106881, 0],
                                      'outcome': 'passes',
                                      'similarity': {'hog': [4.017479582, 55.82485184, 0],
                                                     'spearman_abs': [2.386854476, 22.80661381, 0],
                                                     'spearman_signed': [0.457115507, 3.64268809, 0],
                                                     'ssim': [1.529864734, 13.4638424, 0],
                                                     'topk': [3.551724117, 38.1379308, 0]}},
                         'integrated_gradients': {'ceiling': {'hog': 1.0,
                                                              'spearman_abs': 1.0,
                                                              'spearman_signed': 1.0,
                                                              'ssim': 1.0,
                                                              'topk': 1.0},
                                                  'floor': {'hog': 0.321638674,
                                                            'spearman_abs': -0.003497103,
                                                            'spearman_signed': -0.016013084,
                                                            'ssim': -0.054203782,
                                                            'topk': 0.086206898},
                                                  'maps': [3221.310057332, 26475964.15047083, 0, 40.618709923,
                                                           618110.83547296, 0],
                                                  'outcome': 'passes',
                                                  'similarity': {'hog': [8.508505598, 101.66842818, 0],
                                                                 'spearman_abs': [9.759020984, 121.41619024, 0],
                                                                 'spearman_signed': [0.450537818, 3.10372786, 0],
                                                                 'ssim': [6.935684845, 86.79979834, 0],
                                                                 'topk': [5.844827577, 70.05172397, 0]}},
                         'random': {'ceiling': {'hog': 0.266063392,
                                                'spearman_abs': 0.002978427,
                                                'spearman_signed': -0.048136309,
                                                'ssim': -0.040525425,
                                                'topk': 0.068965517},
                                    'floor': {'hog': 0.274464726,
                                              'spearman_abs': -0.011688689,
                                              'spearman_signed': -0.047547378,
                                              'ssim': -0.008765062,
                                              'topk': 0.068965517},
                                    'maps': [5170.515976115, 41792525.58688134, 0, 112.520584243, 888288.19259258, 0],
                                    'outcome': 'fails',
                                    'similarity': {'hog': [24.0, 300.0, 0],
                                                   'spearman_abs': [24.0, 300.0, 0],
                                                   'spearman_signed': [24.0, 300.0, 0],
                                                   'ssim': [24.0, 300.0, 0],
                                                   'topk': [24.0, 300.0, 0]}},
                         'smoothgrad': {'ceiling': {'hog': 0.37892285,
                                                    'spearman_abs': 0.307508916,
                                                    'spearman_signed': 0.530762553,
                                                    'ssim': 0.274650663,
                                                    'topk': 0.344827592},
                                        'floor': {'hog': 0.28144756,
                                                  'spearman_abs': 0.046670046,
                                                  'spearman_signed': -0.010292623,
                                                  'ssim': 0.071451955,
                                                  'topk': 0.103448279},
                                        'maps': [4203.016466941, 33072718.45769313, 0, -3.475973199, -10498.65047514,
                                                 0],
                                        'outcome': 'passes',
                                        'similarity': {'hog': [5.787439734, 65.9279826, 0],
                                                       'spearman_abs': [2.269615032, 22.20101003, 0],
                                                       'spearman_signed': [0.741497966, 7.32465367, 0],
                                                       'ssim': [0.89201505, 5.47867652, 0],
                                                       'topk': [3.172413774, 34.89655169, 0]}}},
             'stages': ['classifier.3', 'classifier.1', 'features.7', 'features.5', 'features.2', 'features.0'],
             'targets': [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3],
                         [0, 1, 2, 3]]},
 'independent': {'predictions': [[8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [5, 5, 5, 5], [5, 5, 5, 5],
                                 [4, 4, 4, 4]],
                 'results': {'edge': {'ceiling': {'hog': 1.0,
                                                  'spearman_abs': 1.0,
                                                  'spearman_signed': 1.0,
                                                  'ssim': 1.0,
                                                  'topk': 1.0},
                                      'floor': {'hog': 0.153687581,
                                                'spearman_abs': -0.02495119,
                                                'spearman_signed': -0.02495119,
                                                'ssim': 0.053131416,
                                                'topk': 0.103448279},
                                      'maps': [7041.126697967, 56928078.03794159, 0, 7256.01317439, 58627056.27417853,
                                               0],
                                      'outcome': 'fails',
                                      'similarity': {'hog': [24.0, 300.0, 0],
                                                     'spearman_abs': [24.0, 300.0, 0],
                                                     'spearman_signed': [24.0, 300.0, 0],
                                                     'ssim': [24.0, 300.0, 0],
                                                     'topk': [24.0, 300.0, 0]}},
                             'gradient': {'ceiling': {'hog': 1.0,
                                                      'spearman_abs': 1.0,
                                                      'spearman_signed': 1.0,
                                                      'ssim': 1.0,
                                                      'topk': 1.0},
                                          'floor': {'hog': 0.326901495,
                                                    'spearman_abs': 0.0955358,
                                                    'spearman_signed': -0.013752045,
                                                    'ssim': 0.030080877,
                                                    'topk': 0.103448279},
                                          'maps': [4274.201524353, 34357534.77974173, 0, -49.066390147,
                                                   -135355.97385286, 0],
                                          'outcome': 'passes',
                                          'similarity': {'hog': [5.760227866, 74.51286707, 0],
                                                         'spearman_abs': [2.480612612, 41.16793502, 0],
                                                         'spearman_signed': [-0.023858218, -7.79512199, 0],
                                                         'ssim': [1.566803799, 27.33501928, 0],
                                                         'topk': [3.775862038, 52.91379256, 0]}},
                             'random': {'ceiling': {'hog': 0.35370189,
                                                    'spearman_abs': -0.042622432,
                                                    'spearman_signed': -0.018893961,
                                                    'ssim': 0.011987387,
                                                    'topk': 0.086206898},
                                        'floor': {'hog': 0.265262038,
                                                  'spearman_abs': -0.01968213,
                                                  'spearman_signed': -0.027197316,
                                                  'ssim': -0.013711902,
                                                  'topk': 0.034482758},
                                        'maps': [4970.105491502, 40042579.78138822, 0, 117.507540281, 942003.16923307,
                                                 0],
                                        'outcome': 'fails',
                                        'similarity': {'hog': [24.0, 300.0, 0],
                                                       'spearman_abs': [24.0, 300.0, 0],
                                                       'spearman_signed': [24.0, 300.0, 0],
                                                       'ssim': [24.0, 300.0, 0],
                                                       'topk': [24.0, 300.0, 0]}}},
                 'stages': ['features.0', 'features.2', 'features.5', 'features.7', 'classifier.1', 'classifier.3'],
                 'targets': [[8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [5, 5, 5, 5], [5, 5, 5, 5],
                             [4, 4, 4, 4]]},
 'smooth': {'predictions': [[8, 8, 8, 8]],
            'results': {'edge': {'ceiling': {'hog': 1.0,
                                             'spearman_abs': 1.0,
                                             'spearman_signed': 1.0,
                                             'ssim': 1.0,
                                             'topk': 1.0},
                                 'floor': {'hog': 0.260148436,
                                           'spearman_abs': -0.020990716,
                                           'spearman_signed': -0.020990716,
                                           'ssim': 0.039494678,
                                           'topk': 0.120689653},
                                 'maps': [6738.750254077, 54439998.27873228, 0, 7408.920386016, 59861067.76963742, 0],
                                 'outcome': 'fails',
                                 'similarity': {'hog': [24.0, 300.0, 0],
                                                'spearman_abs': [24.0, 300.0, 0],
                                                'spearman_signed': [24.0, 300.0, 0],
                                                'ssim': [24.0, 300.0, 0],
                                                'topk': [24.0, 300.0, 0]}},
                        'gradient': {'ceiling': {'hog': 1.0,
                                                 'spearman_abs': 1.0,
                                                 'spearman_signed': 1.0,
                                                 'ssim': 1.0,
                                                 'topk': 1.0},
                                     'floor': {'hog': 0.171790034,
                                               'spearman_abs': 0.023391474,
                                               'spearman_signed': 0.015368539,
                                               'ssim': 0.005997109,
                                               'topk': 0.120689653},
                                     'maps': [4092.109921524, 32322018.59039538, 0, 20.165193576, 413365.23528859, 0],
                                     'outcome': 'passes',
                                     'similarity': {'hog': [3.528188745, 41.80165753, 0],
                                                    'spearman_abs': [2.44317587, 24.86866755, 0],
                                                    'spearman_signed': [-0.898777701, -8.77157135, 0],
                                                    'ssim': [1.313125148, 13.11768562, 0],
                                                    'topk': [3.603448238, 39.91379268, 0]}},
                        'random': {'ceiling': {'hog': 0.35370189,
                                               'spearman_abs': -0.042622432,
                                               'spearman_signed': -0.018893961,
                                               'ssim': 0.011987388,
                                               'topk': 0.086206898},
                                   'floor': {'hog': 0.265262008,
                                             'spearman_abs': -0.01968213,
                                             'spearman_signed': -0.027197316,
                                             'ssim': -0.013711895,
                                             'topk': 0.034482758},
                                   'maps': [4970.105395111, 40042579.00956041, 0, 117.507536939, 942003.14388344, 0],
                                   'outcome': 'fails',
                                   'similarity': {'hog': [24.0, 300.0, 0],
                                                  'spearman_abs': [24.0, 300.0, 0],
                                                  'spearman_signed': [24.0, 300.0, 0],
                                                  'ssim': [24.0, 300.0, 0],
                                                  'topk': [24.0, 300.0, 0]}}},
            'stages': ['classifier.3', 'classifier.1', 'features.7', 'features.5', 'features.2', 'features.0'],
            'targets': [[8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8], [8, 8, 8, 8],
                        [8, 8, 8, 8]]}}


def _close(actual, expected, where):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            _close(actual[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(actual) and math.isnan(
            expected)), f"{where}: {actual!r} != pinned {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != pinned {expected!r}"


@pytest.mark.parametrize("run", sorted(RUNS))
def test_report_matches_the_pinned_values(run):
    _close(_summarize(RUNS[run]()), EXPECTED[run], run)


def test_the_merged_discovery_pass_gives_the_plain_paths_report(monkeypatch):
    """With a given target the layer discovery rides on the first explanation's forward; without it (target=None
    needs the prediction first) the plain discovery pass runs. Forcing the plain path must not change the report."""
    from lightning_lens.sanity import randomization

    merged = _summarize(_cascade())
    calls = []
    monkeypatch.setattr(randomization, "_stage_zero_merged", lambda *args: calls.append(1))  # -> None: plain path
    plain = _summarize(_cascade())
    assert calls == [1]
    _close(plain, merged, "plain vs merged")


def test_the_first_explanation_records_the_execution_order_instead_of_a_discovery_pass(monkeypatch):
    from lightning_lens.sanity import randomization

    def no_discovery(*args, **kwargs):
        raise AssertionError("the discovery forward ran although the first explanation could record the layers")

    monkeypatch.setattr(randomization, "find_layers", no_discovery)
    report = cascading_randomization(_net(), _inputs(), torch.tensor([0, 1, 2, 3]), "gradient", controls=False)
    assert report.stages == EXPECTED["cascade"]["stages"]


def test_a_first_method_that_never_runs_the_model_on_the_inputs_still_finds_the_layers(monkeypatch):
    """Integrated gradients runs the model on path points only: the discovery pass runs after its explanation, and
    the report equals the plain path's."""
    from lightning_lens.sanity import randomization

    def run():
        methods = {"integrated_gradients": ("integrated_gradients", {"n_steps": 4}), "gradient": "gradient"}
        return _summarize(cascading_randomization(_net(), _inputs(), 3, methods, seed=1, controls=False))

    merged = run()
    monkeypatch.setattr(randomization, "_stage_zero_merged", lambda *args: None)
    _close(run(), merged, "plain vs merged")
    assert merged["stages"] == EXPECTED["cascade"]["stages"]


def test_execution_recorder_matches_the_discovery_pass_and_ignores_other_forwards():
    from lightning_lens.sanity.layers import ExecutionRecorder
    from lightning_lens.utils import modules_in_execution_order

    net, x = _net(), _inputs()
    with ExecutionRecorder(net, x) as recorder:
        logits = net(x.clone().requires_grad_(True))
        net(x[:2])  # later forwards are ignored
    assert recorder.order == modules_in_execution_order(net, x)
    torch.testing.assert_close(recorder.output, logits.detach(), rtol=0, atol=0)
    assert not recorder._handles and all(not m._forward_pre_hooks for m in net.modules())

    with ExecutionRecorder(net, x) as other_inputs:
        net(x + 1)  # a path point or a noisy copy: not the inputs
        net(x)  # only the first forward decides
    assert other_inputs.order is None and other_inputs.output is None

    net.train()
    with ExecutionRecorder(net, x) as train_mode:  # dropout or batch statistics would give other logits
        net(x)
    assert train_mode.order is None


@pytest.mark.parametrize("metrics", [None, ["spearman_abs"], ["spearman_signed", "topk"]])
def test_prepare_without_signed_maps_gives_the_same_statistics(metrics):
    from lightning_lens.sanity import MapSimilarity

    torch.manual_seed(3)
    maps = torch.randn(6, 2, 24, 24)
    sim = MapSimilarity(metrics=metrics)
    full, lean = sim.prepare(maps), sim.prepare(maps, signed=False)
    assert torch.equal(full.absolute, lean.absolute)
    if "spearman_signed" in sim.applicable(maps.shape):  # the metric needs them: prepared anyway
        assert torch.equal(full.signed, lean.signed)
    else:
        assert lean.signed is None and lean.take(torch.tensor([1, 0])).signed is None
    for name, stat in full.stats.items():
        for a, b in zip(stat if isinstance(stat, tuple) else (stat,), lean.stats[name] if isinstance(stat, tuple)
                        else (lean.stats[name],)):
            assert torch.equal(a, b), name
    scores, lean_scores = sim.compare(full, full.roll()), sim.compare(lean, lean.roll())
    for name in scores:
        torch.testing.assert_close(scores[name], lean_scores[name], rtol=0, atol=0, equal_nan=True)
