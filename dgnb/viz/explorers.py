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


def memory_explorer(method, images_by_domain: dict[str, torch.Tensor],
                    labels: dict[str, torch.Tensor]) -> widgets.Widget:
    """Pin the Memory: choose a domain, an image and a memory slot; see image, ground truth, prediction
    and the slot's read weight (Eq. 4, normalised per pixel across slots) over the image.

    `images_by_domain[d]` is (N, 3, H, W) in [0, 1] and `labels[d]` (N, H, W) train ids; `method`
    needs `predict`, `read_weights` and `memory` (a `pinthemem` method).
    """
    import numpy as np

    from ..data.taxonomy import CLASSES
    from .figures import to_numpy_image
    from .memory import normalized_activation

    names = list(images_by_domain)
    domain = widgets.Dropdown(options=names, description="domain")
    index = widgets.IntSlider(0, 0, len(images_by_domain[names[0]]) - 1, description="image")
    slot = widgets.Dropdown(options=[(c, i) for i, c in enumerate(CLASSES[: method.memory.shape[0]])],
                            value=0, description="memory slot")
    out = widgets.Output()

    def draw(*_):
        index.max = len(images_by_domain[domain.value]) - 1
        image = images_by_domain[domain.value][index.value : index.value + 1].to(method.device)
        label = labels[domain.value][index.value].cpu().numpy()
        with torch.no_grad():
            pred = method.predict(image).argmax(1)[0].cpu().numpy()
            weights = method.read_weights(image)[0].float().cpu()
        img = to_numpy_image(image[0])
        act = normalized_activation(weights, img.shape[:2])[slot.value]
        heat = (plt.get_cmap("viridis")(act)[..., :3] * 255).astype(np.float32)
        out.clear_output(wait=True)
        with out:
            fig, axes = plt.subplots(1, 4, figsize=(15, 2.6))
            blend = (0.35 * img + 0.65 * heat).round().astype(np.uint8)
            panels = [img, overlay(img, label), overlay(img, pred), blend]
            titles = ["image", "ground truth", "prediction", f"read weight of slot '{CLASSES[slot.value]}'"]
            for ax, picture, title in zip(axes, panels, titles):
                ax.imshow(picture)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            plt.show()

    for w in (domain, index, slot):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([domain, index, slot]), out])
