"""Differentiable image transforms with learnable magnitudes and probabilities: the image
augmenter.

Each transform k has two learnable numbers: a magnitude m_k (its largest strength) and a
probability p_k = σ(ℓ_k) of being applied (ℓ_k, the logit, is the parameter). Per example i the
transform is applied with strength

    s_ik = b_ik · m_k · u_ik,

where u_ik is drawn uniformly from [-1, 1] (from [0, 1] for cutout's size; cutout's position and
a second direction for translation are drawn as well) and b_ik is a relaxed Bernoulli draw of
p_k (σ((ℓ_k + log U − log(1 − U)) / τ), U uniform), or a hard 0/1 draw with the straight-through
gradient of the relaxed one. Every transform is the identity at strength 0, so m_k = 0 switches
it off exactly, and the strength is differentiable in m_k and ℓ_k: the reward reaches both.

The transforms work on images in pixel space, [0, 1]; :class:`ImageAugmenter` takes and returns
the model's normalised ``pixel_values`` and undoes the per-channel normalisation around them.
The geometric transforms (translation, rotation, shear) are composed into one affine map and
sampled once (``affine_grid``/``grid_sample``, bilinear, zeros outside the image), so an image
is interpolated once however many of them act.

The random draws (:class:`Draws`) are made apart from the transforms, so that a transform is a
deterministic function of φ for fixed draws: the lookahead's forwards and finite-difference
checks see the same augmented images.
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# name: (initial magnitude, largest magnitude). Units: colour strengths are fractions (0.2 moves
# brightness by up to 0.2 of the pixel range, contrast and saturation by up to ±20%);
# translation is a fraction of the image side (0.125 = 4 pixels of 32); rotation is in radians
# (0.26 ≈ 15°); shear is the x-shear factor; cutout is the side of the square cut out as a
# fraction of the image side (0.5 = 16 pixels of 32, as DeVries & Taylor 2017 use on CIFAR-10).
TRANSFORMS: dict[str, tuple[float, float]] = {
    "brightness": (0.2, 1.0),
    "contrast": (0.2, 1.0),
    "saturation": (0.2, 1.0),
    "translation": (0.125, 0.5),
    "rotation": (0.26, math.pi / 2),
    "shear": (0.2, 1.0),
    "cutout": (0.5, 1.0),
}
INITIAL_PROBABILITY = 0.5
GEOMETRIC = ("translation", "rotation", "shear")
# Luma weights (ITU-R BT.601), the grey level of contrast and saturation.
LUMA = (0.299, 0.587, 0.114)


@dataclass
class Draws:
    """The random part of one augmentation of a batch, fixed apart from φ.

    Attributes:
        strength: [batch, transforms] u in [-1, 1] (cutout: [0, 1]), the share of the magnitude.
        gate: [batch, transforms] U in (0, 1), the uniform noise of the relaxed Bernoulli.
        direction: [batch, 2] the translation's direction, each coordinate in [-1, 1].
        centre: [batch, 2] the cutout's centre (x, y) in normalised coordinates [-1, 1].
    """

    strength: Tensor
    gate: Tensor
    direction: Tensor
    centre: Tensor

    def to(self, device) -> "Draws":
        return Draws(
            *(t.to(device) for t in (self.strength, self.gate, self.direction, self.centre))
        )


def draw(batch: int, names: tuple[str, ...], generator: torch.Generator) -> Draws:
    """Fresh random draws for ``batch`` images and the transforms ``names`` (on the CPU)."""
    strength = torch.rand(batch, len(names), generator=generator, dtype=torch.float64) * 2 - 1
    if "cutout" in names:
        column = names.index("cutout")
        strength[:, column] = (strength[:, column] + 1) / 2
    gate = torch.rand(batch, len(names), generator=generator, dtype=torch.float64)
    direction = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * 2 - 1
    centre = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * 2 - 1
    return Draws(strength, gate.clamp(1e-6, 1 - 1e-6), direction, centre)


# --- the transforms on pixel-space images [batch, 3, H, W] -------------------------------------


def grey(x: Tensor) -> Tensor:
    """[batch, 1, H, W] luma of each pixel."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def brightness(x: Tensor, s: Tensor) -> Tensor:
    """Adds s (per example, a fraction of the pixel range) to every pixel."""
    return (x + s.view(-1, 1, 1, 1)).clamp(0, 1)


def contrast(x: Tensor, s: Tensor) -> Tensor:
    """Scales the distance of each pixel from the image's mean grey level by 1 + s."""
    mean = grey(x).mean(dim=(2, 3), keepdim=True)
    return (mean + (1 + s.view(-1, 1, 1, 1)) * (x - mean)).clamp(0, 1)


def saturation(x: Tensor, s: Tensor) -> Tensor:
    """Scales the distance of each pixel from its own grey level by 1 + s."""
    g = grey(x)
    return (g + (1 + s.view(-1, 1, 1, 1)) * (x - g)).clamp(0, 1)


def affine(x: Tensor, translation: Tensor, angle: Tensor, shear: Tensor) -> Tensor:
    """Translation ([batch, 2], fractions of the side), rotation (radians) and x-shear, composed
    into one affine map and sampled once; zeros (black) come in from outside the image."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    # [batch, 2, 2] rotation times shear [[1, k], [0, 1]], in normalised coordinates
    linear = torch.stack(
        [torch.stack([cos, cos * shear - sin], -1), torch.stack([sin, sin * shear + cos], -1)], -2
    )
    offset = 2 * translation  # normalised coordinates span 2 across the image
    theta = torch.cat([linear, offset.unsqueeze(-1)], -1).to(x.dtype)  # [batch, 2, 3]
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def soft_box(coords: Tensor, centre: Tensor, half: Tensor, edge: float) -> Tensor:
    """[batch, n] σ((d + h)/e) − σ((d − h)/e), d = coords − centre: 1 inside a box of half-width
    h, 0 outside, a soft edge of width e, and exactly 0 everywhere at h = 0."""
    d = coords.view(1, -1) - centre.view(-1, 1)
    h = half.view(-1, 1)
    return torch.sigmoid((d + h) / edge) - torch.sigmoid((d - h) / edge)


def cutout(x: Tensor, side: Tensor, centre: Tensor, fill: Tensor) -> Tensor:
    """Replaces a square of ``side`` (a fraction of the image side) around ``centre``
    ([batch, 2] in [-1, 1]) with ``fill`` ([3]), through a soft mask so that the side and the
    probability get gradients."""
    _, _, height, width = x.shape
    ys = (torch.arange(height, dtype=x.dtype, device=x.device) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=x.dtype, device=x.device) * 2 + 1) / width - 1
    # The half-width is ``side`` in coordinates that span 2. The edge scale is half a pixel:
    # the mask goes from 0.1 to 0.9 over about two pixels.
    box_y = soft_box(ys, centre[:, 1].to(x.dtype), side.to(x.dtype), 1 / height)
    box_x = soft_box(xs, centre[:, 0].to(x.dtype), side.to(x.dtype), 1 / width)
    mask = (box_y.unsqueeze(-1) * box_x.unsqueeze(-2)).unsqueeze(1)  # [batch, 1, H, W]
    return x * (1 - mask) + fill.view(1, 3, 1, 1) * mask


class _StraightThrough(torch.autograd.Function):
    """Exactly 0 or 1 forward (the relaxed gate rounded), the relaxed gate's gradient backward."""

    @staticmethod
    def forward(ctx, relaxed: Tensor) -> Tensor:
        return (relaxed > 0.5).to(relaxed.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class ImageAugmenter(nn.Module):
    """Learnable random image transforms applied per example (the image augmenter).

    Args:
        names: the transforms to use, a subset of :data:`TRANSFORMS`, applied geometric first,
            then colour, then cutout.
        mean, std: the per-channel normalisation of the model's ``pixel_values`` (pixel space
            is [0, 1]); cutout fills with ``mean``, the value 0 takes after normalisation.
        tau: temperature of the relaxed Bernoulli (lower: closer to 0/1 gates).
        straight_through: hard 0/1 gates in the forward, the relaxed gate's gradient backward.
        magnitudes, probabilities: initial settings by name (default :data:`TRANSFORMS` and
            :data:`INITIAL_PROBABILITY`).

    Example::

        augmenter = ImageAugmenter(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
        draws = draw(len(pixel_values), augmenter.names, torch.Generator().manual_seed(0))
        augmented = augmenter(pixel_values, draws)  # differentiable in augmenter.parameters()
    """

    def __init__(
        self,
        names: tuple[str, ...] = tuple(TRANSFORMS),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        tau: float = 0.5,
        straight_through: bool = False,
        magnitudes: dict[str, float] | None = None,
        probabilities: dict[str, float] | None = None,
    ):
        super().__init__()
        unknown = sorted(set(names) - set(TRANSFORMS))
        if unknown or not names:
            raise ValueError(f"unknown transforms {unknown}; choose from {', '.join(TRANSFORMS)}")
        self.names = tuple(n for n in TRANSFORMS if n in names)  # the fixed order of application
        magnitudes = {n: TRANSFORMS[n][0] for n in self.names} | (magnitudes or {})
        probabilities = {n: INITIAL_PROBABILITY for n in self.names} | (probabilities or {})
        self.magnitude = nn.Parameter(torch.tensor([float(magnitudes[n]) for n in self.names]))
        p = torch.tensor([float(probabilities[n]) for n in self.names]).clamp(1e-4, 1 - 1e-4)
        self.logit = nn.Parameter(torch.log(p) - torch.log1p(-p))
        self.register_buffer("largest", torch.tensor([TRANSFORMS[n][1] for n in self.names]))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.tau, self.straight_through = tau, straight_through

    def probability(self) -> Tensor:
        return torch.sigmoid(self.logit)

    def gates(self, draws: Draws) -> Tensor:
        """[batch, transforms] b in [0, 1]: relaxed Bernoulli draws of the probabilities."""
        u = draws.gate.to(self.logit.dtype)
        relaxed = torch.sigmoid((self.logit + torch.log(u) - torch.log1p(-u)) / self.tau)
        return _StraightThrough.apply(relaxed) if self.straight_through else relaxed

    def strengths(self, draws: Draws) -> dict[str, Tensor]:
        """Per transform, [batch] s = b · m · u, the strength each example gets."""
        s = self.gates(draws) * self.magnitude * draws.strength.to(self.magnitude.dtype)
        return {name: s[:, k] for k, name in enumerate(self.names)}

    def forward(self, pixel_values: Tensor, draws: Draws) -> Tensor:
        """Augments normalised ``pixel_values`` [batch, 3, H, W]; returns them normalised.

        The arithmetic runs in float64 (the images are small beside the model), so that zero
        strength gives back the input exactly in float32; MPS has no float64 and keeps the
        input's precision.
        """
        dtype = pixel_values.dtype if pixel_values.device.type == "mps" else torch.float64
        mean = self.mean.to(dtype).view(1, 3, 1, 1)
        std = self.std.to(dtype).view(1, 3, 1, 1)
        x = pixel_values.to(dtype) * std + mean
        s = {n: v.to(x.dtype) for n, v in self.strengths(draws.to(x.device)).items()}
        zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)

        if any(n in s for n in GEOMETRIC):
            direction = draws.direction.to(x.device, x.dtype)
            translation = s.get("translation", zero).unsqueeze(-1) * direction  # [batch, 2]
            x = affine(x, translation, s.get("rotation", zero), s.get("shear", zero))
        for name, colour in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if name in s:
                x = colour(x, s[name])
        if "cutout" in s:
            # Half the side in coordinates spanning 2 is the side as a fraction of the image.
            x = cutout(x, s["cutout"], draws.centre.to(x.device), self.mean.to(x.dtype))
        return ((x - mean) / std).to(pixel_values.dtype)

    @torch.no_grad()
    def project(self) -> None:
        """Keeps each magnitude in [0, its largest] after an optimiser step."""
        self.magnitude.copy_(
            torch.minimum(self.magnitude.clamp(min=0), self.largest.to(self.magnitude.dtype))
        )

    def settings(self) -> dict[str, float]:
        """``{transform/NAME/magnitude, transform/NAME/probability}`` for the step log."""
        out = {}
        for k, name in enumerate(self.names):
            out[f"transform/{name}/magnitude"] = self.magnitude[k].item()
            out[f"transform/{name}/probability"] = self.probability()[k].item()
        return out
