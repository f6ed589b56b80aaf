"""Figures (return matplotlib Figures) and ipywidgets explorers (return widgets)."""

from .figures import (class_legend, curve, domain_bars, domains_figure, image_grid, knob_sweep_figure, overlay,
                      per_class_heatmap, style_scatter, to_numpy_image)
from .memory import (class_mean_features, memory_activation_figure, memory_over_training_figure, slot_separation,
                     slot_similarity_figure, step_table_figure, tsne_features_figure)
from .meta import episode_figure, gradient_parts_figure, meta_gradient_figure
from .training import plot_history, results_over_seeds, target_points_figure

__all__ = ["class_legend", "class_mean_features", "curve", "domain_bars", "domains_figure", "episode_figure",
           "gradient_parts_figure", "image_grid", "knob_sweep_figure", "memory_activation_figure", "memory_over_training_figure",
           "meta_gradient_figure", "overlay", "per_class_heatmap", "plot_history", "results_over_seeds",
           "slot_separation", "slot_similarity_figure", "step_table_figure", "style_scatter", "target_points_figure",
           "to_numpy_image", "tsne_features_figure"]
