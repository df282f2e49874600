"""PDSG (Lun et al., CVPR 2025) as the gradient path ``pdsg``: a surrogate as wide as the membranes' spread."""

from __future__ import annotations

import torch

from ..errors import SnnadvError
from ..gradients import Autograd, _loss
from ..models import SNN
from ..registry import register_gradient
from ..surrogates import ShiftedGaussian
from .unrolled import _ObservedSpike, layer_backward, lif_membranes


def pdsg_sigma(mems: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """PDSG's widths: for each step t, the standard deviation (unbiased) of the membranes
    u[0..t] over time so far, the batch and the spatial positions, per channel (a conv
    layer's frames [B, C, H, W]) or per feature (a linear layer's [B, F]): a tensor
    [T, 1, C, 1, 1] (or [T, 1, F]); 1 where it is 0 or undefined (fewer than 2 values)."""
    u = (torch.stack(list(mems)) if not torch.is_tensor(mems) else mems).detach().double()
    dims = tuple(d for d in range(1, u.dim()) if d != 2)
    count = 1
    for d in dims:
        count *= u.shape[d]
    n = torch.arange(1, u.shape[0] + 1, dtype=torch.float64, device=u.device).view(-1, *[1] * (u.dim() - 1)) * count
    s1 = u.sum(dims, keepdim=True).cumsum(0)
    s2 = (u * u).sum(dims, keepdim=True).cumsum(0)
    var = ((s2 - s1 * s1 / n) / (n - 1).clamp(min=1)).clamp(min=0.0)
    sigma = var.sqrt()
    sigma = torch.where((sigma > 0) & (n > 1), sigma, torch.ones_like(sigma))
    return sigma.float()


def pdsg_spikes(current, spikes, mem0, leak: float, thr: float, reset: str,
                sigma: float | None = None) -> torch.Tensor:
    """One LIF layer with PDSG's backward (see :class:`PDSGGradient`); forward = ``spikes``.
    ``sigma``: a fixed width instead of the membrane statistics (for tests and ablations)."""
    mems = lif_membranes(current, spikes, mem0, leak, thr, reset, through_time=True)
    widths = pdsg_sigma(mems) if sigma is None else [float(sigma)] * len(mems)
    return torch.stack([_ObservedSpike.apply(u, spikes[t], ShiftedGaussian(widths[t]).grad(u.detach(), thr, None))
                        for t, u in enumerate(mems)])


class PDSGGradient:
    """PDSG, the potential-dependent surrogate gradient (Lun et al., "Towards effective and
    sparse adversarial attack on spiking neural networks via breaking invisible surrogate
    gradients", CVPR 2025): full BPTT (straight-through encoder, the reset carrying no
    gradient) in which the surrogate of layer l at step t is

        ds/du = exp(-((u - thr - sigma/2) / (sqrt(2) sigma))^2) / (sqrt(2 pi) sigma),
        sigma = std of u[0..t] of layer l over time so far, batch and space, per channel

    (:class:`~snnadv.surrogates.ShiftedGaussian`, :func:`pdsg_sigma`): the surrogate's
    width follows the spread of the membrane potentials, so it never becomes "invisible"
    (zero where the membranes actually are).  The widths depend on the whole batch.
    ``sigma``: a fixed width instead (an ablation; then it is BPTT with that surrogate).
    """

    name = "pdsg"
    one_chunk = True

    def __init__(self, model: SNN, sigma: float | None = None, loss=_loss):
        if not isinstance(model, SNN):
            raise SnnadvError("the PDSG gradient needs an SNN source")
        if sigma is not None and not float(sigma) > 0:
            raise SnnadvError(f"PDSG's sigma must be positive, got {sigma}")
        self.model, self.sigma, self.loss = model, sigma, loss
        self.inner = Autograd(model, loss)

    def rule(self, current, spikes, mem0, leak, thr, reset):
        return pdsg_spikes(current, spikes, mem0, leak, thr, reset, self.sigma)

    def __call__(self, images, labels):
        self.inner.loss = self.loss
        with layer_backward(self.model, self.rule), torch.enable_grad():
            return self.inner(images, labels)


@register_gradient("pdsg")
def _pdsg(model, *, sigma: float | None = None, loss=_loss, **_):
    return PDSGGradient(model, sigma, loss)


# Not in the adaptive suite's "all" (snnadv.attacks.settings.all_paths): each has a parameter
# that its paper tunes per model (HART's gamma, searched per model; PDSG is defined for the
# whole batch at once), and "all" is the fixed list behind the existing tables.  Name them
# in --paths to run them.
_pdsg.opt_in = True
