"""Image examples as model inputs: decoded once, normalised per channel, cropped and flipped.

Images are decoded through ``datasets.Image`` (the feature the hub's image data sets use, so
stored ``{"bytes", "path"}`` values and plain file paths read alike) into one uint8 tensor per
split. A batch is ``Batch(inputs={"pixel_values": [batch, 3, H, W]})``, which is what Hugging
Face image classifiers take, so the engine calls them unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from datamanip.data.sources import Split, short_error
from datamanip.errors import DatamanipError
from datamanip.manipulations.base import Batch

logger = logging.getLogger(__name__)

# The usual CIFAR baseline: pad 4 pixels of black on every side, crop back at a random offset.
CROP_PADDING = 4
# At most this many bad images are named in one error message; the count covers the rest.
NAMED_BAD_IMAGES = 5


@dataclass
class ImageSplit:
    """A split decoded for an image classifier.

    Attributes:
        pixels: [examples, 3, H, W] uint8, as decoded.
        labels: [examples] class ids.
        mean: [3] per-channel mean of the training subset, on the 0..1 scale.
        std: [3] per-channel standard deviation of the training subset, on the 0..1 scale.
        crop_flip: Whether :meth:`batch` applies the random crop and horizontal flip.
        generator: Draws the crops and flips, so that a training seed fixes them.
    """

    pixels: Tensor
    labels: Tensor
    mean: Tensor
    std: Tensor
    crop_flip: bool = False
    generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, positions: Tensor) -> Batch:
        """The examples at ``positions`` as ``pixel_values`` [batch, 3, H, W], normalised."""
        images = self.pixels[positions].float() / 255  # [batch, 3, H, W] in 0..1
        if self.crop_flip:
            images = random_crop_flip(images, self.generator)
        pixel_values = (images - self.mean[:, None, None]) / self.std[:, None, None]
        return Batch(positions, self.labels[positions], {"pixel_values": pixel_values})

    def lengths(self) -> np.ndarray:
        """All images have one size; ``predict`` orders examples by length."""
        return np.zeros(len(self), dtype=np.int64)

    def plain(self) -> ImageSplit:
        """The same split without the random crop and flip (for scoring examples)."""
        return replace(self, crop_flip=False)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Crops every image of ``images`` padded by :data:`CROP_PADDING`, then mirrors some.

    Args:
        images: [batch, C, H, W].
        offsets: [batch, 2] top and left corner of each crop in the padded image, each in
            ``0..2 * CROP_PADDING``; ``CROP_PADDING`` on both is the image itself.
        flips: [batch] True where the crop is mirrored left to right.

    Returns:
        [batch, C, H, W] the cropped and flipped images.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)  # [batch, C, H+8, W+8]
    rows = offsets[:, 0, None] + torch.arange(h)  # [batch, H]
    cols = offsets[:, 1, None] + torch.arange(w)  # [batch, W]
    cropped = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return torch.where(flips[:, None, None, None], cropped.flip(-1), cropped)


def random_crop_flip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`crop_flip` at offsets drawn uniformly and a flip with probability 1/2."""
    n = len(images)
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return crop_flip(images, offsets, flips)


def channel_stats(pixels: Tensor) -> tuple[Tensor, Tensor]:
    """[3] mean and [3] standard deviation per channel of uint8 images, on the 0..1 scale."""
    values = pixels.double().div(255).transpose(0, 1).reshape(pixels.shape[1], -1)
    std = values.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return values.mean(dim=1).float(), std.float()


def decode_images(split: Split, name: str) -> Tensor:
    """Decodes every image of ``split`` to [examples, 3, H, W] uint8 (RGB).

    Args:
        split: Rows whose inputs are stored images (``{"bytes", "path"}`` dicts, bytes or paths).
        name: What the split is, for error messages (``"train subset of cifar10"``).

    Raises:
        DatamanipError: Naming the ids of images that cannot be decoded, or of an image whose
            size differs from the first one's.
    """
    from datasets import Image  # slow to import; only image runs need it

    feature = Image(mode="RGB")
    arrays, bad = [], []
    for value, row_id in zip(split.inputs, split.ids, strict=True):
        try:
            image = feature.decode_example(_as_stored(value))
            arrays.append(np.asarray(image, dtype=np.uint8))
        except Exception as error:  # PIL raises many kinds for a broken file: all mean "bad"
            bad.append((int(row_id), _place(value), short_error(error)))
    if bad:
        raise DatamanipError(_bad_images_message(bad, name))

    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape
        odd = next(i for i, array in enumerate(arrays) if array.shape != first)
        raise DatamanipError(
            f"images of the {name} differ in size: id {split.ids[0]} is "
            f"{first[1]}x{first[0]}, id {split.ids[odd]} is {arrays[odd].shape[1]}x"
            f"{arrays[odd].shape[0]}; resize them all to one size before training"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_stored(value) -> dict:
    """The ``{"bytes", "path"}`` form ``datasets.Image`` decodes."""
    if isinstance(value, dict):
        return value
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    return {"bytes": None, "path": str(value)}


def _place(value) -> str | None:
    return value.get("path") if isinstance(value, dict) else None


def _bad_images_message(bad: list, name: str) -> str:
    named = []
    for row_id, path, _ in bad[:NAMED_BAD_IMAGES]:
        where = f" ({path})" if path else ""
        named.append(f"id {row_id}{where}")
    more = f" and {len(bad) - NAMED_BAD_IMAGES} more" if len(bad) > NAMED_BAD_IMAGES else ""
    count = f"{len(bad)} image{'s' if len(bad) > 1 else ''}"
    return (
        f"cannot decode {count} of the {name}: {', '.join(named)}{more} ({bad[0][2]}); "
        f"replace or remove the unreadable files"
    )


def encode_images(
    train: Split, val: Split, test: Split, *, dataset: str, crop_flip: bool, seed: int
) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
    """Decodes the three subsets of an image run and normalises them by the training subset.

    Args:
        train, val, test: The run's subsets.
        dataset: The data set's name, for error messages.
        crop_flip: Random crop with 4-pixel padding and horizontal flip on training batches
            (the usual fixed CIFAR augmentation); validation and test batches are never changed.
        seed: Seeds the crops and flips.

    Returns:
        ``(train, val, test)`` as :class:`ImageSplit`.
    """
    pixels = {
        part: decode_images(split, f"{part} subset of {dataset}")
        for part, split in (("train", train), ("val", val), ("test", test))
    }
    shapes = {tuple(p.shape[1:]) for p in pixels.values()}
    if len(shapes) > 1:
        raise DatamanipError(
            f"the subsets of {dataset} hold images of different sizes ({sorted(shapes)}); "
            f"resize them all to one size before training"
        )
    mean, std = channel_stats(pixels["train"])
    logger.info(
        "images %s, channel mean %s, std %s",
        "x".join(map(str, pixels["train"].shape[2:])),
        [round(v, 3) for v in mean.tolist()],
        [round(v, 3) for v in std.tolist()],
    )
    generator = torch.Generator().manual_seed(seed)

    def encoded(part: str, split: Split, augment: bool) -> ImageSplit:
        labels = torch.tensor(split.labels, dtype=torch.long)  # a copy: the split may be read-only
        return ImageSplit(pixels[part], labels, mean, std, augment, generator if augment else None)

    return (
        encoded("train", train, crop_flip),
        encoded("val", val, False),
        encoded("test", test, False),
    )
