"""Figures (return matplotlib Figures) and ipywidgets explorers (return widgets)."""

from .figures import (class_legend, curve, domain_bars, domains_figure, image_grid, knob_sweep_figure, overlay,
                      per_class_heatmap, style_scatter, to_numpy_image)

__all__ = ["class_legend", "curve", "domain_bars", "domains_figure", "image_grid", "knob_sweep_figure", "overlay", "per_class_heatmap", "style_scatter",
           "to_numpy_image"]
