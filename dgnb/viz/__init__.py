"""Figures (return matplotlib Figures) and ipywidgets explorers (return widgets)."""

from .figures import (class_legend, curve, domain_bars, domains_figure, image_grid, knob_sweep_figure, overlay,
                      per_class_heatmap, seed_intervals_figure, style_scatter, to_numpy_image)
from .memory import (class_mean_features, memory_activation_figure, slot_similarity_figure, step_table_figure,
                     tsne_features_figure)

__all__ = ["class_legend", "class_mean_features", "curve", "domain_bars", "domains_figure", "image_grid",
           "knob_sweep_figure", "memory_activation_figure", "overlay", "per_class_heatmap", "seed_intervals_figure", "slot_similarity_figure", "step_table_figure", "style_scatter",
           "to_numpy_image", "tsne_features_figure"]

# training curves, per-target intervals over seeds, meta-learning and memory-over-training figures
from .memory import memory_over_training_figure, slot_separation  # noqa: E402
from .meta import episode_figure, gradient_parts_figure, meta_gradient_figure  # noqa: E402
from .training import plot_history, results_over_seeds, target_points_figure  # noqa: E402

__all__ += ["episode_figure", "gradient_parts_figure", "memory_over_training_figure", "meta_gradient_figure",
            "plot_history", "results_over_seeds", "slot_separation", "target_points_figure"]
