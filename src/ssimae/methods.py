"""The methods, by name: what each is made of. The one source of method names in the package.

Two kinds share one Detector interface (detector.py):
    reconstruction  a network trained on defect-free patches; the anomaly map is a residual between
                    each sliding-window patch and its reconstruction, averaged over the windows
    memory          no gradient training; the map comes from the whole image at once: distances to a
                    bank of defect-free features (patchcore) or a filter residual (blur, no network)

    name      kind            model  loss                        residual
    ssim-ae   reconstruction  ae     1 - SSIM (paper)            1 - SSIM per pixel
    l2-ae     reconstruction  ae     squared error               squared error per pixel
    vae       reconstruction  vae    L2 + beta * KL              squared error of the mean's decoding
    fm-ae     reconstruction  ae     L2 + lambda * feature L2    squared error per pixel
    patchcore memory          bank   -                           distance to the nearest bank feature
    blur      memory          -      -                           |x - GaussianBlur(x)|
"""

from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    kind: str  # "reconstruction" | "memory"
    model: str  # "ae" | "vae" | "patchcore" | "blur"
    loss: str | None  # "ssim" | "l2" | "vae" | "fm"; None for memory methods
    residual: str | None  # "ssim" | "l2"; None for memory methods


METHODS: dict[str, Method] = {
    "ssim-ae": Method("reconstruction", "ae", "ssim", "ssim"),
    "l2-ae": Method("reconstruction", "ae", "l2", "l2"),
    "vae": Method("reconstruction", "vae", "vae", "l2"),
    "fm-ae": Method("reconstruction", "ae", "fm", "l2"),
    "patchcore": Method("memory", "patchcore", None, None),
    "blur": Method("memory", "blur", None, None),
}
PAPER_METHODS = ("ssim-ae", "l2-ae", "vae", "fm-ae")  # the paper's comparison
# What `compare` runs unless told otherwise: the paper's four, the modern reference and the floor,
# so that every comparison shows where each method stands against a detector without a network.
COMPARED = PAPER_METHODS + ("patchcore", "blur")


def is_reconstruction(name: str) -> bool:
    return METHODS[name].kind == "reconstruction"
