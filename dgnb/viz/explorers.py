"""ipywidgets explorers. Each returns a widget (display it in a notebook; testable headless)."""

from __future__ import annotations

from typing import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..analysis import image_tensor
from .figures import overlay


def shift_explorer(method, domains: Sequence[str], knobs: Sequence[str], size: tuple[int, int] = (128, 256),
                   split: str = "val", seed: int = 0) -> widgets.Widget:
    """Choose a domain, an image and a knob's severity; see image, ground truth and prediction.

    Images are rendered on the fly by the procedural city, so any severity of any knob can be tried.
    """
    from ..data.city import DOMAINS, render

    domain = widgets.Dropdown(options=list(domains), description="domain")
    index = widgets.IntSlider(0, 0, 99, description="image")
    knob = widgets.Dropdown(options=["(none)", *knobs], description="knob")
    severity = widgets.IntSlider(0, 0, 5, description="severity")
    out = widgets.Output()

    def draw(*_):
        dom = DOMAINS[domain.value]
        if knob.value != "(none)":
            dom = dom.with_knobs(**{knob.value: severity.value})
        r = render(dom, split, index.value, seed=seed, size=size)
        with torch.no_grad():
            pred = method.predict(image_tensor([r.image]).to(next(method.parameters()).device)).argmax(1)[0].cpu().numpy()
        out.clear_output(wait=True)
        with out:
            fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
            for ax, img, title in zip(axes, [r.image, overlay(r.image, r.label), overlay(r.image, pred)],
                                      ["image", "ground truth", "prediction"]):
                ax.imshow(img)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            plt.show()

    for w in (domain, index, knob, severity):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([domain, index]), widgets.HBox([knob, severity]), out])
