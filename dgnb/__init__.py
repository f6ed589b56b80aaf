"""dgnb: domain generalization and adaptation for semantic segmentation, as a hands-on course."""

__version__ = "0.1.0"
