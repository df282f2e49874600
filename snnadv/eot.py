"""EOT with the M draws batched into the batch dimension.

:class:`snnadv.gradients.EOT` runs a gradient source M times on a batch of B images
(M forward and backward passes).  :class:`BatchedEOT` runs it once on the batch
repeated M times ([M*B] images, copy m of image b at row m*B + b) and averages the M
copies' gradients and logits: the same estimate

    g = (1/M) sum_m dJ/dx(x, spikes_m)

(the loss is a sum over images, so every copy's gradient is its own) in one larger
pass, which keeps a CPU's or GPU's cores busier than M small ones.

Keyed draws.  Inside an :func:`snnadv.encoding.encoder_keys` block (a keyed attack) the
copy m of the image with global index i draws the spikes of the virtual image
``i + m * COPY_STRIDE`` under a seed derived from the block's seed and its call count;
one batched call counts as one call of the enclosing block.  :func:`sequential_eot`
computes the same draws one copy at a time (the reference it equals, up to float
rounding).  Outside a keyed block the copies draw from the encoder's generator.
Memory: M times one pass's activations.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .encoding import current_keys, encoder_keys, mix32
from .errors import SnnadvError

#: the index offset between the copies of one image (far above any data set's size)
COPY_STRIDE = 1 << 40


def _copy_seed(seed: int, call: int) -> int:
    return (int(seed) * 0x9E3779B1 + int(mix32((int(call) * 0x85EBCA6B + 0x2545F491) & 0xFFFFFFFF))) & (2 ** 62 - 1)


@contextmanager
def _copies(model, index_of_copy):
    """The keys of the copies (``index_of_copy(base_index)`` -> their indices) inside the
    enclosing keyed block, counting one call there; nothing outside one."""
    keys = current_keys(model)
    if keys is None:
        yield
        return
    seed = _copy_seed(keys.seed, keys.calls)
    keys.calls += 1
    with encoder_keys(model, seed, index_of_copy(keys.index)):
        yield


class BatchedEOT:
    """The mean gradient of ``m`` draws of ``source`` in one pass over [m*B] images."""

    def __init__(self, source, m: int, model):
        if m < 1:
            raise SnnadvError(f"--eot must be at least 1, got {m}")
        self.source, self.m, self.model = source, int(m), model
        self.name = f"{source.name}+eot{m}" if m > 1 else source.name

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        M, B = self.m, len(images)
        if M == 1:
            return self.source(images, labels)
        x = images.repeat(M, *([1] * (images.dim() - 1)))
        y = labels.repeat(M, *([1] * (labels.dim() - 1)))

        def index(base):
            return torch.cat([base + m * COPY_STRIDE for m in range(M)])

        with _copies(self.model, index):
            grad, logits = self.source(x, y)
        return grad.view(M, B, *images.shape[1:]).mean(0), logits.view(M, B, -1).mean(0)


def sequential_eot(source, m: int, model, images: torch.Tensor, labels: torch.Tensor):
    """:class:`BatchedEOT`'s draws one copy at a time (the reference; M passes)."""
    if m == 1:
        return source(images, labels)
    keys = current_keys(model)
    if keys is None:
        grads = [source(images, labels) for _ in range(m)]
    else:
        seed = _copy_seed(keys.seed, keys.calls)
        keys.calls += 1
        base = keys.index
        grads = []
        for c in range(m):
            with encoder_keys(model, seed, base + c * COPY_STRIDE):
                grads.append(source(images, labels))
    return (torch.stack([g for g, _ in grads]).mean(0), torch.stack([z for _, z in grads]).mean(0))
