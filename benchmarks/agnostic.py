"""Model-agnostic methods against their reference implementations, at equal numbers of model evaluations.

A small MLP fitted for a second on scikit-learn's bundled breast-cancer table (30 standardised features, so the
baseline 0 is the mean), explained for ``--examples`` rows of the table:

* KernelSHAP (ours) vs ``shap.KernelExplainer`` (background = the zero row, ``l1_reg=False``) and Captum's
  ``KernelShap`` (``perturbations_per_eval=--per-eval``), all with ``n`` coalitions per example: on the first 10
  features (``2^10 - 2 = 1022`` coalitions: ours and shap enumerate them all and must agree to ~1e-6; Captum samples)
  and on all 30 (everyone samples).
* LIME (ours, Lasso ``alpha``) vs Captum's ``Lime`` (the same Lasso; Captum's default sampling and kernel) and lime's
  ``LimeTabularExplainer`` (``discretize_continuous=False``: Gaussian samples around the training statistics, so its
  coefficients are per unit of a standardised feature; they are compared as ``coef * x``), ``n`` samples each.
* Permutation importance (ours) vs ``sklearn.inspection.permutation_importance`` on the same model wrapped as an
  estimator, ``--repeats`` shuffles per feature on the whole table.

Columns: seconds (median of ``--timing-repeats`` calls, fewer for a contender slower than 3 s a call), ``x ours`` =
their time / ours (above 1: we are faster), and
agreement with our answer: the mean Spearman rank correlation per example (per importance vector) and the relative
L2 distance ``|theirs - ours| / |ours|``. One intra-op thread by default (``--threads``): on a busy machine a second
thread's spin-waiting slows torch far more than NumPy. Timings on a loaded machine are not meaningful: re-run on a
quiet one.

Run: ``python benchmarks/agnostic.py [--threads 1] [--examples 8] [--samples 1000]`` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_breast_cancer
from sklearn.inspection import permutation_importance as sk_permutation_importance
from threadpoolctl import threadpool_limits
from torch import nn

from lightning_lens.attribution import LIME, KernelSHAP
from lightning_lens.importance import permutation_importance

try:
    import captum.attr as captum_attr
    from captum._utils.models.linear_model import SkLearnLasso
except ImportError:  # optional columns
    captum_attr = None
try:
    import shap
except ImportError:
    shap = None
try:
    from lime.lime_tabular import LimeTabularExplainer
except ImportError:
    LimeTabularExplainer = None


def fitted_model(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def timed(fn: Callable[[], Any], repeats: int, budget: float = 3.0) -> tuple[float, Any]:
    """Median seconds over ``repeats`` calls, fewer once ``budget`` seconds are spent (slow references run once)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if sum(times) > budget:
            break
    return statistics.median(times), out


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    ours, theirs = np.atleast_2d(ours), np.atleast_2d(theirs)
    rho = float(np.mean([spearmanr(a, b).statistic for a, b in zip(ours, theirs)]))
    return rho, float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours))


class Rows:
    """Prints each row of the table as soon as it is measured."""

    def append(self, row: tuple[str, str, float, Optional[float], Optional[tuple[float, float]]]) -> None:
        task, who, seconds, ratio, agree = row
        rho, dist = agree if agree is not None else (float("nan"), float("nan"))
        print(f"{task:<42} {who:<32} {seconds:8.3f} {ratio:7.2f} {rho:9.3f} {dist:8.3f}", flush=True)


class Estimator(ClassifierMixin, BaseEstimator):
    """The torch model as a fitted scikit-learn classifier."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classes_ = np.array([0, 1])

    def fit(self, X: Any, y: Any) -> "Estimator":
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(X), dtype=torch.float32)).softmax(1).double().numpy()

    def predict(self, X: Any) -> np.ndarray:
        return self.predict_proba(X).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000, help="model evaluations per example (KernelSHAP, LIME)")
    parser.add_argument("--repeats", type=int, default=10, help="shuffles per feature (permutation importance)")
    parser.add_argument("--per-eval", type=int, default=64, help="Captum's perturbations_per_eval")
    parser.add_argument("--timing-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with threadpool_limits(args.threads):  # NumPy's BLAS (shap, lime, scikit-learn) too
        run(args)


def run(args: argparse.Namespace) -> None:

    data = load_breast_cancer()
    table = torch.as_tensor(data.data, dtype=torch.float32)
    table = (table - table.mean(0)) / table.std(0)
    labels = torch.as_tensor(data.target)
    rows = Rows()
    n, reps = args.samples, args.timing_repeats
    print(f"{args.examples} examples, {n} model evaluations per example (KernelSHAP on 10 features: all 1022),"
          f" {args.threads} thread(s); seconds are medians of up to {reps} calls")
    print(f"{'task':<42} {'contender':<32} {'seconds':>8} {'x ours':>7} {'spearman':>9} {'rel L2':>8}", flush=True)

    for features in (10, 30):
        n_coalitions = 2**features - 2 if features == 10 else n  # 10 features: every coalition, an exact answer
        x_all = table[:, :features]
        model = fitted_model(x_all, labels)
        x = x_all[: args.examples]
        with torch.no_grad():
            target = model(x).argmax(1)
        task = f"KernelSHAP, {features} features, n={n_coalitions}"
        t_ours, ours = timed(lambda: KernelSHAP(model, n_samples=n_coalitions).attribute(x, target=target), reps)
        ours = ours.double().numpy()
        rows.append((task, "ours", t_ours, 1.0, None))
        if shap is not None:
            def shap_values() -> np.ndarray:
                def predict(a: np.ndarray) -> np.ndarray:
                    with torch.no_grad():
                        out = model(torch.as_tensor(a, dtype=torch.float32))
                    return out.double().numpy()

                explainer = shap.KernelExplainer(predict, np.zeros((1, features)))
                values = explainer.shap_values(x.numpy(), nsamples=n_coalitions, l1_reg=False, silent=True)
                values = np.asarray(values)  # (B, M, classes) in recent shap
                return values[np.arange(len(x)), :, target.numpy()] if values.ndim == 3 else values

            t, theirs = timed(shap_values, reps)
            rows.append((task, "shap KernelExplainer", t, t / t_ours, agreement(ours, theirs)))
        if captum_attr is not None:
            def captum_values() -> np.ndarray:
                ks = captum_attr.KernelShap(model)
                return ks.attribute(x, baselines=0.0, target=target, n_samples=n_coalitions,
                                    perturbations_per_eval=args.per_eval).double().numpy()

            t, theirs = timed(captum_values, reps)
            rows.append((task, "Captum KernelShap", t, t / t_ours, agreement(ours, theirs)))

    x_all = table
    model = fitted_model(x_all, labels)
    x = x_all[: args.examples]
    with torch.no_grad():
        target = model(x).argmax(1)
    alpha = 0.001
    task = "LIME, 30 features"
    t_ours, ours = timed(lambda: LIME(model, n_samples=n, alpha=alpha).attribute(x, target=target), reps)
    ours = ours.double().numpy()
    rows.append((task, "ours", t_ours, 1.0, None))
    if captum_attr is not None:
        def captum_lime() -> np.ndarray:
            lime_method = captum_attr.Lime(model, interpretable_model=SkLearnLasso(alpha=alpha))
            return lime_method.attribute(x, baselines=0.0, target=target, n_samples=n,
                                         perturbations_per_eval=args.per_eval).double().numpy()

        t, theirs = timed(captum_lime, reps)
        rows.append((task, "Captum Lime", t, t / t_ours, agreement(ours, theirs)))
    if LimeTabularExplainer is not None:
        def lime_tabular() -> np.ndarray:
            explainer = LimeTabularExplainer(x_all.numpy(), mode="classification", discretize_continuous=False,
                                             random_state=0)
            estimator = Estimator(model)
            out = np.zeros((len(x), x.shape[1]))
            for i in range(len(x)):
                label = int(target[i])
                exp = explainer.explain_instance(x[i].numpy(), estimator.predict_proba, labels=(label,),
                                                 num_features=x.shape[1], num_samples=n)
                for feature, weight in exp.as_map()[label]:
                    out[i, feature] = weight * float(x[i, feature])  # per standardised unit -> contribution
            return out

        t, theirs = timed(lime_tabular, reps)
        rows.append((task, "lime LimeTabularExplainer", t, t / t_ours, agreement(ours, theirs)))

    task = f"permutation importance, 30 features x {args.repeats}"
    y = labels
    t_ours, ours_pi = timed(lambda: permutation_importance(model, x_all, y, n_repeats=args.repeats), reps)
    rows.append((task, "ours", t_ours, 1.0, None))
    t, theirs_pi = timed(lambda: sk_permutation_importance(Estimator(model), x_all.numpy(), y.numpy(),
                                                           n_repeats=args.repeats, random_state=0), reps)
    rows.append((task, "sklearn permutation_importance", t, t / t_ours,
                 agreement(ours_pi.importances_mean, theirs_pi.importances_mean)))

    missing = [name for name, mod in (("shap", shap), ("captum", captum_attr), ("lime", LimeTabularExplainer))
               if mod is None]
    if missing:
        print(f"not installed (columns left out): {', '.join(missing)}")


if __name__ == "__main__":
    main()
