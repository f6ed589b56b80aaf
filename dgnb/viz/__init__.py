"""Figures (return matplotlib Figures) and ipywidgets explorers (return widgets)."""

from .figures import (class_legend, curve, domain_bars, domains_figure, image_grid, knob_sweep_figure, overlay,
                      per_class_heatmap, seed_intervals_figure, style_scatter, to_numpy_image)
from .memory import (class_mean_features, memory_activation_figure, slot_similarity_figure, step_table_figure,
                     tsne_features_figure)

__all__ = ["class_legend", "class_mean_features", "curve", "domain_bars", "domains_figure", "image_grid",
           "knob_sweep_figure", "memory_activation_figure", "overlay", "per_class_heatmap", "seed_intervals_figure", "slot_similarity_figure", "step_table_figure", "style_scatter",
           "to_numpy_image", "tsne_features_figure"]
