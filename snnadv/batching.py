"""Batches of a dataset held in memory: the :class:`Split` tensors, class-balanced
subsets, augmentation (4-px pad + random crop, horizontal flip) and shuffled batches.

Computation only (no disk, no printing): :mod:`snnadv.data` reads the datasets into
:class:`Split` objects; training, conversion and evaluation batch them here.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import DataError


# --------------------------------------------------------------------------- Split


@dataclass
class Split:
    """One split of a dataset, held as whole tensors on one device."""

    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]  # class names in label order
    source: str  # "imagefolder" or "torchvision"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        """The device the tensors live on."""
        return self.images.device

    def to(self, device: str | torch.device) -> Split:
        """A copy with images and labels on ``device`` (self if already there)."""
        images, labels = self.images.to(device), self.labels.to(device)
        if images is self.images and labels is self.labels:
            return self
        return Split(images=images, labels=labels, classes=list(self.classes), source=self.source)

    def subset(self, n: int) -> Split:
        """The first ``n`` images taken round-robin over the classes.

        Inside each class images keep their order in the split; the round-robin
        takes the first image of every class, then the second of every class, and
        so on, so 100 images of a 10-class split are 10 per class.  The result keeps
        the split's order.  ``n >= len(self)`` returns ``self``.
        """
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)
        except TypeError:
            raise DataError(f"subset size must be an integer, got {n!r}") from None
        if n < 1:
            raise DataError(f"subset size must be at least 1, got {n}")
        total = len(self)
        if n >= total:
            return self
        labels = self.labels
        # Rank of each image inside its class (0 for the first image of the class).
        order = torch.sort(labels, stable=True).indices
        sorted_labels = labels[order]
        positions = torch.arange(total, device=labels.device)
        is_first = torch.ones(total, dtype=torch.bool, device=labels.device)
        is_first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        class_start = torch.cummax(torch.where(is_first, positions, 0), dim=0).values
        rank = torch.empty_like(positions)
        rank[order] = positions - class_start
        # Round-robin order: by rank, then by label; take the first n of that order.
        num_classes = max(len(self.classes), int(labels.max().item()) + 1)
        key = rank * num_classes + labels
        chosen = torch.sort(torch.argsort(key, stable=True)[:n]).values
        return Split(
            images=self.images[chosen],
            labels=self.labels[chosen],
            classes=list(self.classes),
            source=self.source,
        )


# --------------------------------------------------------------------------- batches


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` images -> ``float32`` in ``[0, 1]`` (same shape and device)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32).div_(255.0)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}")


def augment(
    images_uint8: torch.Tensor,
    generator: torch.Generator | None = None,
    pad: int = 4,
) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, per image.

    Each image of the ``uint8 [B, C, H, W]`` batch is zero-padded by ``pad`` pixels
    on every side, cropped back to ``H x W`` at a uniformly random offset, and
    mirrored with probability 1/2 (Sec. 3.2, after Lee et al.).  Everything is
    vectorised on the batch's device; random numbers come only from ``generator``
    when given (it must live on the batch's device).  Returns ``float32`` in
    ``[0, 1]``.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise TypeError(
            f"augment expects uint8 [B, C, H, W] images, got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    device = images_uint8.device
    _check_generator(generator, device)
    b, c, h, w = images_uint8.shape
    # Draw order is fixed (rows, columns, flips) so a generator state fixes the output.
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    flip = torch.randint(0, 2, (b,), generator=generator, device=device).bool()
    if b == 0:
        return to_float(images_uint8)

    padded = torch.nn.functional.pad(images_uint8, (pad, pad, pad, pad)) if pad else images_uint8
    rows = dy[:, None] + torch.arange(h, device=device)  # [B, H] rows of the padded image
    cols_ahead = torch.arange(w, device=device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols_ahead, cols_ahead)  # [B, W]
    wp = padded.shape[-1]
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, wp))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return to_float(out)


def batches(
    split: Split,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    train_augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(float32 images [B, 3, 32, 32] in [0, 1], int64 labels [B])`` batches.

    One pass over ``split`` on its own device.  With ``shuffle`` the order is one
    ``torch.randperm`` drawn from ``generator`` right away, when ``batches`` is
    called; with ``train_augment`` every batch then goes through :func:`augment`
    with the same generator, in batch order, as it is yielded.  The same generator
    state therefore gives the same sequence of batches, and after a full epoch the
    generator's state is deterministic too.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_generator(generator, split.images.device)
    order = None
    if shuffle:
        order = torch.randperm(len(split), generator=generator, device=split.images.device)
    return _iter_batches(split, batch_size, order, generator, train_augment, drop_last)


def _iter_batches(
    split: Split,
    batch_size: int,
    order: torch.Tensor | None,
    generator: torch.Generator | None,
    train_augment: bool,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if drop_last and stop - start < batch_size:
            break
        if order is None:
            images, labels = split.images[start:stop], split.labels[start:stop]
        else:
            idx = order[start:stop]
            images, labels = split.images[idx], split.labels[idx]
        x = augment(images, generator) if train_augment else to_float(images)
        yield x, labels
