"""ipywidgets explorers. Each returns a widget (display it in a notebook; testable headless).

Every explorer draws its picture into an `ipywidgets.Image` (a PNG), so a control's callback can be
checked without a kernel or a browser: the returned widget has `controls` (name -> control widget)
and `image` (the Image widget whose `value` changes when a control moves).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from ..analysis import image_tensor
from .figures import class_legend, overlay


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _present(*label_maps: np.ndarray) -> list[int]:
    """Classes present in any of the label maps (ignore excluded), for the colour legend."""
    from ..data.taxonomy import NUM_CLASSES

    values = np.unique(np.concatenate([np.asarray(m).ravel() for m in label_maps]))
    return [int(v) for v in values if v < NUM_CLASSES]


def _panels(pictures: Sequence[np.ndarray], titles: Sequence[str], legend: Sequence[int] | None,
            width: float = 3.6) -> Figure:
    """One row of pictures with titles, and a class-colour legend under them."""
    h, w = np.asarray(pictures[0]).shape[:2]
    fig, axes = plt.subplots(1, len(pictures), figsize=(width * len(pictures), width * h / w + 0.9), squeeze=False)
    for ax, picture, title in zip(axes[0], pictures, titles):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    if legend:
        fig.subplots_adjust(bottom=0.22)
        class_legend(fig, legend)
    return fig


def _explorer(controls: dict[str, widgets.Widget], rows: Sequence[Sequence[str]], draw) -> widgets.Widget:
    image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
    for w in controls.values():
        w.style.description_width = "initial"  # whole labels ("memory slot"), not truncated

    def redraw(*_: Any) -> None:
        image.value = figure_png(draw())

    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.VBox([widgets.HBox([controls[n] for n in row]) for row in rows]), image])
    box.controls, box.image = controls, image
    return box


def shift_explorer(method, domains: Sequence[str], knobs: Sequence[str], size: tuple[int, int] = (128, 256),
                   split: str = "val", seed: int = 0) -> widgets.Widget:
    """Choose a domain, an image and a knob's severity; see image, ground truth and prediction.

    Images are rendered on the fly by the procedural city, so any severity of any knob can be tried.
    """
    from ..data.city import DOMAINS, render

    controls = {"domain": widgets.Dropdown(options=list(domains), description="domain"),
                "image": widgets.IntSlider(0, 0, 99, description="image"),
                "knob": widgets.Dropdown(options=["(none)", *knobs], description="knob"),
                "severity": widgets.IntSlider(0, 0, 5, description="severity")}
    c = controls

    def draw() -> Figure:
        dom = DOMAINS[c["domain"].value]
        if c["knob"].value != "(none)":
            dom = dom.with_knobs(**{c["knob"].value: c["severity"].value})
        r = render(dom, split, c["image"].value, seed=seed, size=size)
        with torch.no_grad():
            pred = method.predict(image_tensor([r.image]).to(next(method.parameters()).device)).argmax(1)[0].cpu().numpy()
        return _panels([r.image, overlay(r.image, r.label), overlay(r.image, pred)],
                       ["image", "ground truth", "prediction"], _present(r.label, pred))

    return _explorer(controls, [["domain", "image"], ["knob", "severity"]], draw)


def memory_explorer(method, images_by_domain: dict[str, torch.Tensor],
                    labels: dict[str, torch.Tensor]) -> widgets.Widget:
    """Pin the Memory: choose a domain, an image and a memory slot; see image, ground truth, prediction
    and the slot's read weight (Eq. 4, normalised per pixel across slots) over the image.

    `images_by_domain[d]` is (N, 3, H, W) in [0, 1] and `labels[d]` (N, H, W) train ids; `method`
    needs `predict`, `read_weights` and `memory` (a `pinthemem` method).
    """
    from ..data.taxonomy import CLASSES
    from .figures import to_numpy_image
    from .memory import normalized_activation

    names = list(images_by_domain)
    controls = {"domain": widgets.Dropdown(options=names, description="domain"),
                "image": widgets.IntSlider(0, 0, len(images_by_domain[names[0]]) - 1, description="image"),
                "slot": widgets.Dropdown(options=[(c, i) for i, c in enumerate(CLASSES[: method.memory.shape[0]])],
                                         value=0, description="memory slot")}
    c = controls

    def draw() -> Figure:
        c["image"].max = len(images_by_domain[c["domain"].value]) - 1
        i = c["image"].value
        image = images_by_domain[c["domain"].value][i : i + 1].to(method.device)
        label = labels[c["domain"].value][i].cpu().numpy()
        with torch.no_grad():
            pred = method.predict(image).argmax(1)[0].cpu().numpy()
            weights = method.read_weights(image)[0].float().cpu()
        img = to_numpy_image(image[0])
        act = normalized_activation(weights, img.shape[:2])[c["slot"].value]
        heat = (plt.get_cmap("viridis")(act)[..., :3] * 255).astype(np.float32)
        blend = (0.35 * img + 0.65 * heat).round().astype(np.uint8)
        return _panels([img, overlay(img, label), overlay(img, pred), blend],
                       ["image", "ground truth", "prediction", f"read weight of slot '{CLASSES[c['slot'].value]}'"],
                       _present(label, pred))

    return _explorer(controls, [["domain", "image", "slot"]], draw)


def memory_training_explorer(snapshots: dict[str, Any], slots: Sequence[int] | None = None) -> widgets.Widget:
    """Pin the Memory over training, from a run's snapshots (`Run.snapshots`): an iteration slider, a
    probe image and a set of memory slots; one row with the image, its ground truth and the chosen
    slots' read weights (Eq. 4, normalised per pixel across slots) side by side, at that iteration,
    and the cosine similarity between the chosen slots.
    """
    from ..data.taxonomy import CLASS_ID, CLASSES
    from .figures import to_numpy_image
    from .memory import normalized_activation

    probe, snaps = snapshots["probe"], snapshots["snapshots"]
    iterations = [s["iteration"] for s in snaps]
    default = [CLASS_ID[n] for n in ("road", "building", "vegetation", "car")] if slots is None else list(slots)
    controls = {"iteration": widgets.SelectionSlider(options=iterations, value=iterations[-1], description="iteration",
                                                     continuous_update=False),
                "image": widgets.Dropdown(options=[(f"{d} (probe {i})", i) for i, d in enumerate(probe["domain"])],
                                          value=0, description="probe image"),
                "slots": widgets.SelectMultiple(options=[(c, i) for i, c in enumerate(CLASSES)], value=tuple(default),
                                                rows=4, description="slots")}
    c = controls

    def draw() -> Figure:
        snap = snaps[iterations.index(c["iteration"].value)]
        i, chosen = c["image"].value, list(c["slots"].value) or default
        img = to_numpy_image(probe["image"][i])
        label = probe["label"][i].numpy().astype(np.int64)
        act = normalized_activation(snap["read_weights"][i].float(), img.shape[:2])
        cmap = plt.get_cmap("viridis")
        pictures = [img, overlay(img, label)]
        for s in chosen:
            pictures.append((0.35 * img + 0.65 * cmap(act[s])[..., :3] * 255).round().astype(np.uint8))
        titles = ["image", "ground truth", *[f"slot '{CLASSES[s]}'" for s in chosen]]
        fig = _panels(pictures, titles, _present(label), width=2.8)
        title = f"iteration {snap['iteration']}: read weights of the {probe['domain'][i]} probe image"
        if len(chosen) > 1:
            m = torch.nn.functional.normalize(snap["memory"][chosen].float(), dim=1)
            sims = (m @ m.T).numpy()
            off = sims[~np.eye(len(chosen), dtype=bool)]
            title += f"\ncosine between the chosen slots: mean {off.mean():.2f}, max {off.max():.2f}"
        fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight())
        fig.suptitle(title, fontsize=9, y=0.995)
        return fig

    return _explorer(controls, [["iteration"], ["image", "slots"]], draw)
