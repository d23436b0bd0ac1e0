"""Dense-CRF refinement of label maps (Krähenbühl & Koltun, NeurIPS 2011), as IRN does it.

Optional: needs the ``pydensecrf2`` package (``pip install 'salmap[crf]'``), a maintained build
of the ``pydensecrf`` binding; without it :func:`crf_label_map` raises :class:`CRFUnavailable`.

IRN (``jiwoon-ahn/irn``, ``step/cam_to_ir_label.py`` and ``misc/imutils.py``
``crf_inference_label``) refines twice, once with the background score set to the foreground
threshold and once with it set to the background threshold, and combines the two labellings
as :func:`salmap.workers.metrics.label_maps.label_map` combines thresholds: a pixel is a class where
the first labelling says so, background where both say background, ignored elsewhere. Its
unary is ``unary_from_labels`` of the arg-max labels with ``gt_prob=0.7``; its pairwise terms
are a Gaussian kernel (``sxy=3, compat=3``) and a bilateral kernel on the image (``sxy=50,
srgb=5, compat=10``), 10 mean-field iterations; these are the defaults here. ``unary="scores"``
uses the normalised scores themselves (``-log p`` with the background column at the threshold,
then normalised per pixel), as AffinityNet's ``crf_inference`` does with its score maps.
Pixels outside the model's view get a uniform unary (no opinion), then are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .label_maps import BACKGROUND, IGNORE, check_thresholds, label_ids

INSTALL_HINT = ("dense-CRF refinement (pseudo_labels.crf) needs the pydensecrf2 package: "
                "pip install 'salmap[crf]' (or pip install pydensecrf2) on every node")
UNARIES = ("labels", "scores")


class CRFUnavailable(ImportError):
    """The dense-CRF binding is not installed (the message says how to install it)."""


def available() -> bool:
    """Whether the dense-CRF binding can be imported here."""
    try:
        _densecrf()
    except CRFUnavailable:
        return False
    return True


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise CRFUnavailable(f"{INSTALL_HINT} ({err})") from None
    return dcrf


def unary_from_labels(labels: np.ndarray, n: int, gt_prob: float,
                      unsure: np.ndarray | None = None) -> np.ndarray:
    """``[n, H*W]`` energies: ``-log gt_prob`` for the given label, ``-log((1-gt_prob)/(n-1))``
    for the others; uniform where ``unsure``."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"crf_gt_prob must be in (0, 1), got {gt_prob}")
    flat = np.asarray(labels).reshape(-1)
    u = np.full((n, flat.size), -np.log((1.0 - gt_prob) / (n - 1)), dtype=np.float32)
    u[flat, np.arange(flat.size)] = -np.log(gt_prob)
    if unsure is not None:
        u[:, np.asarray(unsure).reshape(-1)] = -np.log(1.0 / n)
    return u


def unary_from_scores(padded: np.ndarray, unsure: np.ndarray | None = None,
                      clip: float = 1e-5) -> np.ndarray:
    """``[n, H*W]`` energies ``-log p`` of scores normalised to sum 1 per pixel."""
    p = np.asarray(padded, dtype=np.float32).reshape(len(padded), -1)
    total = p.sum(axis=0, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / len(p))
    if unsure is not None:
        p[:, np.asarray(unsure).reshape(-1)] = 1.0 / len(p)
    return -np.log(np.clip(p, clip, 1.0)).astype(np.float32)


def _infer(image: np.ndarray, unary: np.ndarray, iterations: int, gaussian: Sequence[float],
           bilateral: Sequence[float]) -> np.ndarray:
    dcrf = _densecrf()
    h, w = image.shape[:2]
    n = unary.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=float(gaussian[0]), compat=float(gaussian[1]))
    d.addPairwiseBilateral(sxy=float(bilateral[0]), srgb=float(bilateral[1]),
                           rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),
                           compat=float(bilateral[2]))
    q = np.asarray(d.inference(int(iterations)), dtype=np.float32)
    return q.reshape(n, h, w).argmax(axis=0)


def crf_label_map(image: np.ndarray, scores: np.ndarray, classes: Sequence[int],
                  fg: float, bg: float, valid: np.ndarray | None = None, iterations: int = 10,
                  unary: str = "labels", gt_prob: float = 0.7,
                  gaussian: Sequence[float] = (3, 3),
                  bilateral: Sequence[float] = (50, 5, 10)) -> np.ndarray:
    """The CRF-refined label map (uint16 ``[H, W]``, values as in
    :func:`salmap.workers.metrics.label_maps.label_map`) of normalised class scores ``[k, H, W]`` on
    the RGB image ``[H, W, 3]`` (uint8) they were computed for."""
    check_thresholds(fg, bg)
    if unary not in UNARIES:
        raise ValueError(f"crf_unary must be one of {', '.join(UNARIES)}, got {unary!r}")
    s = np.asarray(scores, dtype=np.float32)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != s.shape[1:]:
        raise ValueError(f"the image {img.shape} must be RGB at the scores' size {s.shape[1:]}")
    ids = label_ids(classes)
    unsure = None if valid is None else ~np.asarray(valid, dtype=bool)
    n = len(s) + 1
    labellings = []
    for t in (fg, bg):
        padded = np.concatenate([np.full((1, *s.shape[1:]), t, np.float32), s])
        u = (unary_from_labels(padded.argmax(axis=0), n, gt_prob, unsure) if unary == "labels"
             else unary_from_scores(padded, unsure))
        labellings.append(_infer(img, u, iterations, gaussian, bilateral))
    at_fg, at_bg = labellings
    out = np.full(s.shape[1:], IGNORE, np.uint16)
    fg_pixels = at_fg > 0
    out[fg_pixels] = ids[at_fg[fg_pixels] - 1]
    out[(at_fg == 0) & (at_bg == 0)] = BACKGROUND
    if unsure is not None:
        out[unsure] = IGNORE
    return out
