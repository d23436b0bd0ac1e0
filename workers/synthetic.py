"""Images whose evidence is known by construction, and small pure-ReLU CNNs trained on them.

A ground truth for saliency methods (and for dataset-level analysis): every image holds one
object whose shape is its class (square, disc, cross, ring), at a random size, on a random
textured background; ``masks`` are the object's exact pixels.

Two styles (``style``):

* ``"texture"`` (default): background and object are the same texture (one colour, one
  sinusoidal grating of a random colour, period and phase, pixel noise), vertical stripes in
  the background and horizontal ones, at their own random phase, in the object. Every
  pixel's value, inside the object or out, is drawn from the same distribution, so the object
  is found by its shape, an orientation boundary, and never by its colour or its contrast to
  mid-grey: model-blind maps of ``|x|``, of colour saturation or of the Sobel magnitude
  (the same for both orientations) score at chance. A map built for this generator (the
  energy of horizontal stripes) would find it; that is the cue the models must learn. (With
  a random background orientation and the object turned by 90 degrees, so that the object
  is only the odd orientation out, the small bias-free CNNs did not learn in 40 epochs.)
* ``"colour"``: the earlier data, a saturated colour on a mid-grey background of two faint
  gratings: contrast alone finds the object (``|x|`` ranks its pixels first), so it is no
  ground truth for maps multiplied by the input; kept for the planted-shortcut analysis
  (``bench/planted_shortcut.py``), whose data must not change.

The object's centre is uniform over every position where the whole object fits in the
image, so a map that knows nothing of the image (a centred blob) has no edge over a random
one beyond the geometry of fitting inside the frame. With
``spurious_fraction > 0`` that share of the images also carries a small bright mark in a
corner that depends on the class (class c: corner c % 4), a shortcut a model can learn instead
of the shape; ``cue_flags`` says which images carry it and :func:`cue_masks` where it is. On
those images only, a position whose object would touch the mark (or the 1-px ring around it)
is drawn again, so object and cue never overlap and images without the mark are placed with no
restriction at all.

Models (:func:`train_model`): ``"vgg"`` (conv-ReLU stacks and max-pooling) and ``"resnet"``
(residual blocks), the architectures DMBP was designed for, small enough to train on a CPU in
a minute; pure ReLU networks with no BatchNorm and, by default, no biases, so the output is
exactly ``F(x) = A(x) x`` with ``A(x)`` the input gradient (the identity DMBP's decomposition
rests on). Trained with Adam from ``seed`` (deterministic on one machine) and cached as a state
dict under ``cache_dir`` (default ``runs/synthetic_models``, not committed), keyed by the data
and every training parameter.

Inputs are in [0, 1]; models expect :func:`normalise`d images (``(x - 0.5) / 0.25``), so 0 in
model space is mid-grey, the "zero" fill of the metrics and of HDM.

    from salmap.workers.synthetic import make_dataset, normalise, train_model
    data = make_dataset(2000, seed=0, spurious_fraction=0.0, num_classes=4)
    model = train_model("vgg", data, seed=0)
    logits = model(normalise(data.images[:4]))
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHAPES = ("square", "disc", "cross", "ring")
ARCHS = ("vgg", "resnet")
STYLES = ("texture", "colour")
MEAN, STD = 0.5, 0.25


@dataclass(frozen=True)
class SyntheticData:
    """What :func:`make_dataset` returns (iterable as ``images, labels, masks, cue_flags``)."""

    #: ``[n,3,H,W]`` float32 in [0, 1]
    images: Tensor
    #: ``[n]`` int64, the object's shape index (``SHAPES[label]``)
    labels: Tensor
    #: ``[n,H,W]`` bool, the object's exact pixels (never the cue)
    masks: Tensor
    #: ``[n]`` bool, whether the image carries the class's corner mark
    cue_flags: Tensor
    #: side of the corner mark in pixels
    cue_size: int

    def __iter__(self):
        return iter((self.images, self.labels, self.masks, self.cue_flags))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor | slice) -> SyntheticData:
        return SyntheticData(self.images[index], self.labels[index], self.masks[index],
                             self.cue_flags[index], self.cue_size)


def normalise(images: Tensor) -> Tensor:
    """Model-space images: ``(x - 0.5) / 0.25``."""
    return (images - MEAN) / STD


def _shape_mask(kind: str, cy: Tensor, cx: Tensor, r: Tensor, size: int) -> Tensor:
    """Bool ``[n,H,W]`` of one shape per image, centre ``(cy, cx)``, half-size ``r``."""
    yy = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    dy, dx = yy - cy.view(-1, 1, 1), xx - cx.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    if kind == "square":
        return (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
    if kind == "disc":
        return dy * dy + dx * dx <= r * r
    if kind == "cross":
        arm = (r / 3).clamp_min(1.0)
        return ((dy.abs() <= arm) & (dx.abs() <= r)) | ((dx.abs() <= arm) & (dy.abs() <= r))
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def cue_masks(labels: Tensor, size: int, cue_size: int) -> Tensor:
    """Bool ``[n,H,W]``: where the corner mark of each image's class is (class c: corner c % 4,
    clockwise from the top left), whether or not the image carries it."""
    out = torch.zeros(labels.shape[0], size, size, dtype=torch.bool)
    for i, c in enumerate(labels.tolist()):
        corner = c % 4
        y0 = 1 if corner in (0, 1) else size - 1 - cue_size
        x0 = 1 if corner in (0, 3) else size - 1 - cue_size
        out[i, y0:y0 + cue_size, x0:x0 + cue_size] = True
    return out


def _grating(theta: Tensor, period: Tensor, phase: Tensor, size: int) -> Tensor:
    """``sin`` of a plane wave per image ``[n,1,H,W]``: orientation ``theta`` (radians),
    ``period`` in pixels, ``phase``; each argument ``[n,1,1,1]``."""
    yy = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    return torch.sin(2 * math.pi / period * (xx * torch.cos(theta) + yy * torch.sin(theta))
                     + phase)


def _texture_images(masks: Tensor, rand, amplitude: float) -> Tensor:
    """``"texture"`` images: per image a base colour, one grating (a random colour of norm
    0.5 times ``amplitude``, period 3.5 to 6 px, vertical stripes) and pixel noise; inside
    the object the same grating turned by 90 degrees (horizontal stripes) at an independent
    phase. Both sides draw every pixel from the same distribution, so only the orientation
    gives the object away."""
    n, size = masks.shape[0], masks.shape[-1]
    base = 0.5 + 0.15 * (rand(n, 3, 1, 1) - 0.5)
    colour = rand(n, 3, 1, 1) - 0.5
    colour = 0.5 * colour / colour.norm(dim=1, keepdim=True).clamp_min(1e-6)
    theta = torch.zeros(n, 1, 1, 1)
    period = 3.5 + 2.5 * rand(n, 1, 1, 1)
    phase_bg, phase_obj = 2 * math.pi * rand(n, 1, 1, 1), 2 * math.pi * rand(n, 1, 1, 1)
    wave = torch.where(masks[:, None], _grating(theta + math.pi / 2, period, phase_obj, size),
                       _grating(theta, period, phase_bg, size))
    noise = 0.3 * (rand(n, 3, size, size) - 0.5)
    return base + amplitude * (colour * wave + noise)


def _colour_images(masks: Tensor, rand, texture: float, g: torch.Generator) -> Tensor:
    """``"colour"`` images (the earlier data, unchanged draw for draw): a background of two
    random gratings of random colours plus pixel noise, amplitude ``texture``; the object a
    saturated colour (one channel at 0.05 or 0.95) with a little noise."""
    n, size = masks.shape[0], masks.shape[-1]
    yy = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    bg = 0.5 + 0.15 * (rand(n, 3, 1, 1) - 0.5)
    for _ in range(2):
        theta = math.pi * rand(n, 1, 1, 1)
        freq = (2 * math.pi / size) * (2 + 6 * rand(n, 1, 1, 1))
        phase = 2 * math.pi * rand(n, 1, 1, 1)
        colour = rand(n, 3, 1, 1) - 0.5
        wave = torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
        bg = bg + texture * 0.5 * colour * wave
    bg = bg + texture * 0.3 * (rand(n, 3, size, size) - 0.5)
    obj = rand(n, 3, 1, 1)
    obj[torch.arange(n), torch.randint(0, 3, (n,), generator=g)] = (
        rand(n) < 0.5).float().view(n, 1, 1) * 0.9 + 0.05
    obj = obj + 0.05 * (rand(n, 3, size, size) - 0.5)
    return torch.where(masks[:, None], obj, bg)


def make_dataset(
    n: int,
    seed: int,
    spurious_fraction: float = 0.0,
    size: int = 32,
    num_classes: int = 2,
    cue_size: int = 3,
    min_radius: float | None = None,
    max_radius: float | None = None,
    texture: float | None = None,
    style: str = "texture",
) -> SyntheticData:
    """``n`` images, balanced classes in a random order, all drawn from ``seed``.

    Args:
        spurious_fraction: share of the images (drawn at random) that carry their class's
            corner mark (a bright ``cue_size`` square 1 px from the corner).
        size: image side; num_classes: how many shapes (2 to 4: square, disc, cross, ring).
        min_radius, max_radius: object half-size range (``"texture"``: ``size/6`` to
            ``size/4``, larger because a texture boundary is harder to read than a colour;
            ``"colour"``: ``max(4, size/10)`` to ``max(6, size/5)``); the centre is uniform
            over the positions where the object fits, redrawn (on images that carry the mark)
            while it touches the mark.
        texture: amplitude of the gratings and noise (``"texture"``: default 0.5, 0 leaves
            nothing to see; ``"colour"``: the background's, default 0.25, 0 = flat grey).
        style: ``"texture"`` (object drawn like the background) or ``"colour"`` (the
            earlier saturated objects; module docstring).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 2..{len(SHAPES)}, got {num_classes}")
    if not 0.0 <= spurious_fraction <= 1.0:
        raise ValueError(f"spurious_fraction must be in [0, 1], got {spurious_fraction}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if n < 1 or size < 16:
        raise ValueError("make_dataset needs n >= 1 and size >= 16")
    g = torch.Generator().manual_seed(int(seed))
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    colour = style == "colour"
    lo = (max(4.0, size / 10) if colour else size / 6) if min_radius is None else float(min_radius)
    hi = (max(6.0, size / 5) if colour else size / 4) if max_radius is None else float(max_radius)
    if not 0 < lo <= hi or 2 * hi + 1 > size:
        raise ValueError(f"need 0 < min_radius <= max_radius and 2 * max_radius + 1 <= size, "
                         f"got {lo}, {hi} at size {size}")
    r = lo + (hi - lo) * rand(n)
    cue_flags = rand(n) < spurious_fraction
    # per class: its mark and the 1-px ring around it
    near_cue = F.max_pool2d(cue_masks(torch.arange(num_classes), size, cue_size)[:, None].float(),
                            3, 1, 1)[:, 0] > 0
    cy, cx = torch.empty(n), torch.empty(n)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    todo = torch.arange(n)
    for _ in range(1000):  # redraw only the objects that touch their image's mark
        # uniform over the centres where the whole object (half-size r) lies inside the image
        cy[todo] = r[todo] + (size - 1 - 2 * r[todo]) * rand(len(todo))
        cx[todo] = r[todo] + (size - 1 - 2 * r[todo]) * rand(len(todo))
        for c in range(num_classes):
            sel = todo[labels[todo] == c]
            if len(sel):
                masks[sel] = _shape_mask(SHAPES[c], cy[sel], cx[sel], r[sel], size)
        todo = todo[cue_flags[todo]]
        todo = todo[(masks[todo] & near_cue[labels[todo]]).flatten(1).any(1)]
        if len(todo) == 0:
            break
    else:  # pragma: no cover - the mark is a few pixels of a corner
        raise ValueError("could not place the objects clear of the corner marks")

    if colour:
        images = _colour_images(masks, rand, 0.25 if texture is None else float(texture), g)
    else:
        images = _texture_images(masks, rand, 0.5 if texture is None else float(texture))
    if cue_flags.any():
        cue = cue_masks(labels, size, cue_size) & cue_flags.view(n, 1, 1)
        images = torch.where(cue[:, None], torch.ones_like(images), images)
    return SyntheticData(images.clamp(0, 1).float(), labels.long(), masks, cue_flags, cue_size)


# -- models ------------------------------------------------------------------------------------
class SmallVGG(nn.Module):
    """conv-ReLU x2, pool, conv-ReLU x2, pool, conv-ReLU, global average pool, linear."""

    def __init__(self, num_classes: int, width: int = 16, bias: bool = False) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=bias), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=bias), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=bias), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=bias), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=bias), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class Block(nn.Module):
    """Residual block without BatchNorm: relu(x + conv(relu(conv(x)))), 1x1 projection when
    the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.shortcut = (nn.Identity() if cin == cout and stride == 1
                         else nn.Conv2d(cin, cout, 1, stride, bias=bias))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.shortcut(x) + self.conv2(self.relu1(self.conv1(x))))


class SmallResNet(nn.Module):
    """Stem conv-ReLU, three residual blocks (the last two downsample), pool, linear."""

    def __init__(self, num_classes: int, width: int = 16, bias: bool = False) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=bias), nn.ReLU())
        self.layer1 = Block(w, w, 1, bias)
        self.layer2 = Block(w, 2 * w, 2, bias)
        self.layer3 = Block(2 * w, 4 * w, 2, bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


INITS = ("kaiming", "torch")


def build_model(arch: str, num_classes: int, width: int = 16, bias: bool = False,
                init: str = "kaiming") -> nn.Module:
    """A fresh ``arch`` model. ``init="kaiming"``: conv weights He-normal (fan in, ReLU gain),
    which keeps the signal's scale through a network without BatchNorm or biases (PyTorch's
    default shrinks it about 0.6x a layer, and on the ``"texture"`` data the models then did
    not learn); ``"torch"``: PyTorch's default (what the planted-shortcut models use)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if arch == "vgg":
        model: nn.Module = SmallVGG(num_classes, width, bias)
    elif arch == "resnet":
        model = SmallResNet(num_classes, width, bias)
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if init == "kaiming":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def _data_key(data: SyntheticData) -> str:
    h = hashlib.sha256()
    for t in (data.images, data.labels, data.masks, data.cue_flags):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_model(
    arch: str,
    data: SyntheticData,
    seed: int,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    width: int = 16,
    bias: bool = False,
    cache_dir: str | Path | None = "runs/synthetic_models",
    init: str = "kaiming",
) -> nn.Module:
    """A ``arch`` model trained on ``data`` (Adam, cross-entropy, ``seed`` for the init and the
    batch order), returned in eval mode with frozen parameters; ``init``: :func:`build_model`.

    ``cache_dir``: where the state dict is kept, keyed by the data's hash and every argument;
    a second call with the same key loads it instead of training (None = never cache).
    """
    num_classes = int(data.labels.max()) + 1
    extra = () if init == "torch" else (init,)  # keys of the earlier (torch-init) models kept
    key = hashlib.sha256(repr((arch, _data_key(data), seed, epochs, lr, batch_size, width, bias,
                               num_classes, *extra)).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"{arch}-{key}.pt"
    torch.manual_seed(int(seed))
    model = build_model(arch, num_classes, width, bias, init)
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        g = torch.Generator().manual_seed(int(seed))
        x, y = normalise(data.images), data.labels
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * math.ceil(len(data) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=g)
            for i in range(0, len(data), batch_size):
                idx = order[i:i + batch_size]
                xb = x[idx]
                flip = torch.rand(idx.shape[0], generator=g) < 0.5  # shapes are symmetric
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb) if not \
                    data.cue_flags.any() else xb  # flipping would move a corner cue
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: SyntheticData) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    pred = torch.cat([model(normalise(data.images[i:i + 256])).argmax(1)
                      for i in range(0, len(data), 256)])
    return float((pred == data.labels).float().mean())


# -- ground-truth scores of saliency maps ------------------------------------------------------
def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """CLEVR-XAI relevance mass accuracy ``[n]``: the share of the positive relevance that lies
    inside the mask (NaN for a map without positive values)."""
    pos = maps.float().clamp_min(0).flatten(1)
    total = pos.sum(1)
    inside = (pos * masks.flatten(1).float()).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.nan)


def relevance_rank(maps: Tensor, masks: Tensor, tie_seed: int = 0) -> Tensor:
    """CLEVR-XAI relevance rank accuracy ``[n]``: of the K highest-ranked pixels (K = the
    mask's size), the share inside the mask; exact ties in a fixed random pixel order."""
    flat = maps.float().flatten(1)
    m = masks.flatten(1)
    perm = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(tie_seed))
    order = perm[torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices]
    out = torch.empty(flat.shape[0])
    for i in range(flat.shape[0]):
        k = int(m[i].sum())
        out[i] = m[i][order[i, :k]].float().mean() if k else torch.nan
    return out


def pointing_hits(maps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game ``[n]`` bool: the map's maximum (first in raster order) lies in the mask."""
    idx = maps.float().flatten(1).argmax(1)
    return masks.flatten(1)[torch.arange(maps.shape[0]), idx]
