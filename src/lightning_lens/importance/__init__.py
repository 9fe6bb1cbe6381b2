"""Global feature importance of a trained model on a dataset (pure PyTorch).

- :func:`permutation_importance`: the drop of a score when one feature (or feature group) is shuffled across the
  examples, repeated ``n_repeats`` times (Breiman, 2001; Fisher, Rudin and Dominici, 2019), with the fields of
  scikit-learn's ``permutation_importance`` result.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    >>> permutation_importance(model, x, y, n_repeats=2).importances.shape
    (3, 2)
"""

from lightning_lens.importance.permutation import PermutationImportance, permutation_importance

__all__ = ["PermutationImportance", "permutation_importance"]
