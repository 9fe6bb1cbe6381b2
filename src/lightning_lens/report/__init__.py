"""What a user reads after a run: console summaries (:mod:`~lightning_lens.report.summaries`) and the self-contained
HTML run report built from a log directory (:mod:`~lightning_lens.report.html`, ``python -m lightning_lens report``).

Plain Python and PyTorch: no Lightning import.
"""

from lightning_lens.report import summaries
from lightning_lens.report.summaries import (
    CONTROL_EXPECTED,
    epochs_text,
    format_number,
    knn_summary,
    saliency_summary,
    sanity_rule_text,
    sanity_summary,
    text_table,
    tracin_summary,
    verdict_meaning,
)

__all__ = list(summaries.__all__)
