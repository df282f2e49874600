"""A gradient estimator as an ``nn.Module``: the SNN forward, the estimator backward.

:class:`EstimatorModule` wraps an SNN and one of its gradient paths
(:data:`snnadv.registry.GRADIENTS`: ``alg1``, ``bptt-<surrogate>``, ``rate``, ``hart``,
``pdsg``, ``ann``, ...; EOT over M draws) into a module that any attack library can
differentiate unchanged (torchattacks' APGD / APGD-T / Square, ...):

* forward: the SNN's logits z(x) for fresh encoder draws (the mean over the M draws with
  EOT), so the library sees the real model's outputs;
* backward: for an upstream gradient c = dL/dz (whatever loss L the library uses), the
  estimator's vector-Jacobian product

      dL/dx  :=  (1/M) sum_m  G_m(x)^T c,

  where G_m(x)^T c is what the path computes as "dJ/dx" for the loss J(z) = <z, c>
  (:func:`vjp_loss`) on draw m.  For an autograd path (``bptt``) this is exactly the
  chain rule; for the others it is their estimate of it.

The logits of forward and the gradient of backward come from the same encoder draws: the
module draws one seed per draw in forward (from ``generator``, else the global RNG; kept
in :attr:`EstimatorModule.last_seeds`), runs the SNN under those seeds
(:func:`snnadv.encoding.encoder_seed`), and in backward runs the path under the same
seeds.  The time loop's chunking is pinned for both passes (the chunks are where the
encoder draws happen), to what the gradient pass would use; paths that need the whole
time loop at once (``hart``, ``pdsg``) get one chunk in both.  The cost of a step is
one forward without a graph plus the path's own forward and backward.

Batched EOT (``batched=True``): the M draws run as one pass over the batch repeated M
times ([M*B] images, one seed: the copies draw independent spikes from one generator),
forward and backward, instead of M passes over B (:mod:`snnadv.eot`); the same estimate,
M times one pass's memory.

Dropout in training mode draws from the global RNG and is not replayed: attack models
in eval mode.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .encoding import encoder_seed
from .errors import SnnadvError
from .gradients import EOT, DEFAULT_PATH, make_gradient
from .paths.unrolled import one_chunk
from .models import SNN


def vjp_loss(logits: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """J(z) = <z, c>: its gradient w.r.t. the logits z is the cotangent c, so a path's
    dJ/dx for this loss is its vector-Jacobian product with c."""
    return (logits.float() * cotangent.float()).sum()


class _Estimate(torch.autograd.Function):
    """Forward: the SNN's (mean) logits under the given seeds; backward: the path's VJP."""

    @staticmethod
    def forward(ctx, x, module, seeds):
        ctx.save_for_backward(x)
        ctx.module, ctx.seeds = module, seeds
        if module.batched:
            M, B = module.eot, len(x)
            return module.logits(module.repeat(x, M), seeds[0]).view(M, B, -1).mean(0)
        return torch.stack([module.logits(x, s) for s in seeds]).mean(0)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module, seeds = ctx.module, ctx.seeds
        if module.batched:
            M, B = module.eot, len(x)
            rep = module.repeat(x, M)
            g = module.vjp(rep, module.repeat(grad_out, M) / M, seeds[0])
            return g.view(M, B, *x.shape[1:]).sum(0).to(x.dtype), None, None
        grad = sum(module.vjp(x, grad_out, s) for s in seeds) / len(seeds)
        return grad.to(x.dtype), None, None


class EstimatorModule(nn.Module):
    """``model`` (an SNN) whose backward is the gradient path ``path``.

    Args:
        model: the SNN.
        path: a registered gradient path (default :data:`snnadv.gradients.DEFAULT_PATH`).
        eot: M, the number of encoder draws per call (forward: mean logits, backward: mean
            gradient).
        source: a gradient source to use instead of ``path`` (built with
            ``loss=vjp_loss``; an :class:`~snnadv.gradients.EOT` gives its M).
        generator: a :class:`torch.Generator` for the draws' seeds (None: the global RNG,
            so a library that seeds it makes the run reproducible).
        options: the path's options (``slope``, ``proxy``, ``gamma``, ``mix``, ``sigma``).
    """

    def __init__(self, model: SNN, path: str | None = None, *, eot: int = 1, source=None,
                 generator: torch.Generator | None = None, batched: bool = False, **options):
        super().__init__()
        if not isinstance(model, SNN):
            raise SnnadvError("an estimator module wraps an SNN (an ANN is differentiated as it is)")
        if source is None:
            source = make_gradient(model, path or DEFAULT_PATH, loss=vjp_loss, **options)
        elif path is not None or options:
            raise SnnadvError("give an estimator module a path (and its options) or a source, not both")
        if isinstance(source, EOT):
            source, eot = source.source, source.m
        if getattr(source, "loss", None) is not vjp_loss:
            raise SnnadvError(f"gradient path '{getattr(source, 'name', source)}' does not take a loss "
                              f"(its factory must pass loss= on to the source)")
        if int(eot) < 1:
            raise SnnadvError(f"eot must be at least 1, got {eot}")
        self.model, self.source, self.eot, self.generator = model, source, int(eot), generator
        self.batched = bool(batched) and self.eot > 1
        self.last_seeds: list[int] = []
        self._fits: set[int] = set()  # row counts whose gradient pass fits the free memory
        self.train(model.training)  # the SNN's mode (a library restores the mode it found: an eval SNN stays eval)

    @property
    def name(self) -> str:
        return f"{self.source.name}+eot{self.eot}" if self.eot > 1 else self.source.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.require_memory(x)
        n = 1 if self.batched else self.eot
        seeds = [int(torch.randint(0, 2 ** 62, (1,), generator=self.generator)) for _ in range(n)]
        self.last_seeds = seeds
        return _Estimate.apply(x, self, tuple(seeds))

    @staticmethod
    def repeat(x: torch.Tensor, m: int) -> torch.Tensor:
        """``x`` repeated ``m`` times along the batch (copy c of row b at c*B + b)."""
        return x.repeat(m, *([1] * (x.dim() - 1)))

    # -- the two passes of one draw ----------------------------------------------------
    @contextmanager
    def pinned(self, x: torch.Tensor):
        """The SNN's time loop chunked the same way in both passes (see the module docstring)."""
        m = self.model
        if getattr(self.source, "one_chunk", False):
            with one_chunk(m):
                yield
            return
        saved = m.chunk_steps
        if saved is None and m.mode == "fused":
            with torch.enable_grad():
                m.chunk_steps = m.chunk_for(x.shape[0], m.num_steps, x.device.type)
        try:
            yield
        finally:
            m.chunk_steps = saved

    def logits(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The SNN's logits for ``x`` on the draw of ``seed`` (no graph)."""
        with torch.no_grad(), self.pinned(x), encoder_seed(self.model, seed):
            return self.model(x.detach())

    def vjp(self, x: torch.Tensor, cotangent: torch.Tensor, seed: int) -> torch.Tensor:
        """The path's input gradient for J = <logits, cotangent> on the draw of ``seed``."""
        with torch.enable_grad(), self.pinned(x), encoder_seed(self.model, seed):
            grad, _ = self.source(x.detach(), cotangent.detach())
        return grad

    def require_memory(self, x: torch.Tensor) -> None:
        """Refuse the passes over ``x`` (with its EOT copies when batched) that would not fit
        the free memory, once per batch size (:func:`snnadv.memory.require`): their draws
        come from one seed for the whole batch, so they are not split into pieces.  Asked
        before the forward pass, whose chunks are the gradient pass's (:meth:`pinned`: at
        T=32 and 172 rows a no-graph forward of ~3 GiB), for the gradient pass's estimate."""
        rows = len(x) * (self.eot if self.batched else 1)
        if rows in self._fits:
            return
        from . import memory

        m = self.model
        with self.pinned(x[:1].expand(rows, *x.shape[1:])):  # (a view: only its size is read)
            chunk = min(m.chunk_steps, m.num_steps) if m.chunk_steps else m.num_steps
        memory.require(m, rows, m.num_steps, memory.gradient_kind(self.source), chunk,
                       f"gradient path {self.name}", per_row=self.eot if self.batched else 1)
        self._fits.add(rows)
