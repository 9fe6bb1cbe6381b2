"""Rendering for humans: attribution heatmaps and overlays, labelled image grids, line and matrix plots.

Everything returns uint8 (H, W, 3) numpy arrays or ``matplotlib.figure.Figure`` objects built through the object
API with an Agg canvas: no pyplot global state, never opens a window, safe in training processes and DDP workers.

Colour conventions: signed maps on a diverging colormap centred at 0 (``RdBu_r``: blue negative, red positive),
absolute maps on a sequential one (``inferno``); channels aggregated by ``reduce`` (``"sum"`` by default), the scale
is the 99th percentile of ``|a|``, NaN/inf are drawn as 0.
"""

from lightning_lens.render.chart import ChartPanel, ChartSeries, LineChart
from lightning_lens.render.figures import figure_to_array, new_figure, plot_curves, plot_heatmap_matrix
from lightning_lens.render.grid import MISTAKE_COLOR, colorbar_strip, image_grid
from lightning_lens.render.heatmap import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    colorize,
    heatmap,
    normalize_attribution,
    overlay,
    reduce_channels,
    to_rgb_uint8,
)
from lightning_lens.render.sanity import (
    CONTROL_EXPECTATIONS,
    cascade_grid,
    short_layer_names,
    similarity_chart,
    similarity_figure,
    verdict_lines,
    verdict_table,
)
from lightning_lens.render.tabular import feature_bars, importance_chart, top_features
from lightning_lens.render.text import decode_tokens, special_token_ids, text_heatmap, text_html, token_colors

__all__ = [
    "CONTROL_EXPECTATIONS",
    "ChartPanel",
    "ChartSeries",
    "LineChart",
    "DIVERGING_CMAP",
    "MISTAKE_COLOR",
    "SEQUENTIAL_CMAP",
    "cascade_grid",
    "colorbar_strip",
    "colorize",
    "decode_tokens",
    "feature_bars",
    "figure_to_array",
    "heatmap",
    "image_grid",
    "importance_chart",
    "new_figure",
    "normalize_attribution",
    "overlay",
    "plot_curves",
    "plot_heatmap_matrix",
    "reduce_channels",
    "short_layer_names",
    "similarity_chart",
    "similarity_figure",
    "special_token_ids",
    "text_heatmap",
    "text_html",
    "to_rgb_uint8",
    "token_colors",
    "top_features",
    "verdict_lines",
    "verdict_table",
]
