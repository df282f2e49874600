"""APGD (Croce & Hein, ICML 2020, Algorithm 1), L-inf, with a per-sample early exit.

The step-size-free PGD of AutoAttack.  N steps of

    z   = P(x_k + eta_k * sign(grad L(x_k)))
    x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))      (momentum a = 0.75; 1 at k = 0)

from a random point of the eps-ball, eta_0 = 2 eps per image.  At the checkpoints (the
first after 0.22 N steps, then every max(previous interval - 0.03 N, 0.06 N) steps) an
image's eta is halved, and it restarts from its best point, when fewer than rho = 0.75
of its steps since the last checkpoint raised the loss, or when its eta was not halved
at the last checkpoint and its best loss has not risen since.  Losses: cross-entropy
(``apgd-ce``) or DLR, -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3) (``apgd-dlr``).
Restarts run only on the images not yet fooled.

This is the same algorithm as torchattacks' ``APGD`` (AutoAttack's "cheap" version),
step for step and in the same random numbers (its reference twin, registered as
``apgd-ce-torchattacks`` / ``apgd-dlr-torchattacks``; ``tests/test_apgd.py`` checks they
agree), with two differences:

* ``early_exit``: an image leaves the batch at the first step whose logits misclassify
  it (the AutoAttack criterion), with that iterate as its adversarial; the remaining
  steps compute only on the images still standing.  Every per-image quantity of APGD
  (step size, best point and loss, checkpoint tests) is the image's own and the
  checkpoint schedule is global, so for a deterministic model the images that stay
  get exactly the iterates they get without the exit; for an SNN, whose encoder draws
  for the whole batch, they get other draws of the same distribution.
* ``confirm``: for a stochastic model, one step's draws misclassifying an iterate says
  little (fresh draws often classify it correctly: exiting on it made PGD 9-14 points
  weaker on an SNN-BP).  With ``confirm(x, labels, index) -> fooled``, a candidate
  (misclassified by the step's logits) leaves only if ``confirm`` says it is fooled;
  :class:`FooledOnEveryDraw` asks whether it is wrong on *every* one of the evaluation
  draws that will score it (keyed by the images' global indices, :attr:`Attack.index`),
  so an image leaves with an iterate the evaluation counts as fooled on every draw:
  the exit never weakens the result by the evaluation's own measure.
* an image never fooled comes back as its highest-loss iterate (torchattacks returns
  the clean image): re-evaluated under fresh encoder draws, it is the attack's best bet.

The model is differentiated as a module (``loss.backward()`` through it), like
torchattacks' APGD: pass an :class:`snnadv.estimator.EstimatorModule` to attack an SNN
through a chosen gradient estimator (with EOT inside it), or an ANN.  ``eot``: the
gradient averaged over that many forward passes of the module (torchattacks' eot_iter).
Randomness: the module's first pass (which images are already misclassified) draws
from the caller's RNG state, then the global RNG is seeded with ``seed`` (the random
starts, then every later pass), all inside :func:`torch.random.fork_rng`, so the
caller's RNG is untouched.  Not keyable (the draws are per batch, as torchattacks').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SnnadvError
from ..registry import register_attack
from .base import Attack, check_eps, project


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12) per image (Croce & Hein, Eq. 6)."""
    z, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == labels).float()
    zy = logits.gather(1, labels[:, None])[:, 0]
    return -(zy - z[:, -2] * top_is_y - z[:, -1] * (1.0 - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def checkpoints(steps: int) -> tuple[int, int, int]:
    """(first interval, smallest interval, interval decrease) of the step-size checkpoints."""
    return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


@register_attack("apgd-ce")
class APGD(Attack):
    """APGD with the cross-entropy loss (see the module docstring)."""

    name = "apgd-ce"
    loss = "ce"
    keyable = False
    rho = 0.75

    def __init__(self, model, eps: float = 8 / 255, steps: int = 20, restarts: int = 1, eot: int = 1, seed: int = 0,
                 targeted: bool = False, *, early_exit: bool = False, confirm=None):
        check_eps(eps, None, steps)
        if targeted:
            raise SnnadvError(f"{self.name} runs untargeted only here")
        self.model, self.eps, self.targeted, self.gradient = model, float(eps), False, None
        self.steps, self.restarts, self.eot, self.seed = int(steps), int(restarts), int(eot), int(seed)
        self.early_exit, self.confirm = bool(early_exit), confirm
        if confirm is not None and not early_exit:
            raise SnnadvError(f"{self.name}: confirm is the early exit's test: it needs early_exit=True")
        #: image-steps computed by the last call (the cost early exit saves)
        self.image_steps = 0

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none") if self.loss == "ce" else dlr_loss(logits, labels)

    def gradient_at(self, x: torch.Tensor, y: torch.Tensor):
        """(mean gradient over ``eot`` passes, the last pass's per-image loss and logits)."""
        x = x.detach().requires_grad_()
        grad = torch.zeros_like(x)
        for _ in range(self.eot):
            with torch.enable_grad():
                logits = self.model(x)
                loss = self.criterion(logits, y)
                grad += torch.autograd.grad(loss.sum(), [x])[0].detach()
        self.image_steps += len(x)
        return grad / float(self.eot), loss.detach(), logits.detach()

    def fooled(self, x, y, logits, index) -> torch.Tensor:
        """Which iterates count as fooled: misclassified by the step's logits, and with
        ``confirm`` also by ``confirm`` (asked only about those candidates)."""
        wrong = logits.argmax(1) != y
        if self.confirm is None or not wrong.any():
            return wrong
        rows = wrong.nonzero()[:, 0]
        out = torch.zeros_like(wrong)
        out[rows] = self.confirm(x[rows], y[rows], index[rows.to(index.device)]).to(out.device)
        return out

    def forward(self, images, labels):
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.image_steps = 0
            with torch.no_grad():
                fooled = self.model(images).argmax(1) != labels
            torch.manual_seed(self.seed)
            if images.device.type == "cuda":
                torch.cuda.manual_seed(self.seed)
            adv = images.clone()
            best_loss = torch.full((len(images),), float("-inf"), device=images.device)
            for _ in range(self.restarts):
                todo = (~fooled).nonzero()[:, 0]
                if len(todo) == 0:
                    break
                index = None if self.index is None else self.index[todo.to(self.index.device)]
                x_best, hit, loss_best, x_hit = self.run(images[todo], labels[todo], index)
                fooled[todo[hit]] = True
                adv[todo[hit]] = x_hit[hit]
                better = ~hit & (loss_best > best_loss[todo])  # never fooled: the highest-loss iterate
                adv[todo[better]] = x_best[better]
                best_loss[todo[better]] = loss_best[better]
        return self.project(adv, images)

    def run(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """One run of Algorithm 1 on images ``x`` (global indices ``index``, for ``confirm``):
        (best point, fooled, best loss, the fooled iterate) per image, as torchattacks'
        ``attack_single_run``; with ``early_exit``, "fooled" is the exit test."""
        n, eps, steps = len(x), self.eps, self.steps
        if self.confirm is not None and index is None:
            raise SnnadvError(f"{self.name}: confirm needs the images' global indices (craft sets them)")
        k, k_min, k_decr = checkpoints(steps)
        t = 2 * torch.rand(x.shape).to(x.device) - 1  # on the CPU RNG, as torchattacks
        x_adv = (x + eps * t / t.flatten(1).abs().amax(1).view(-1, *[1] * (x.dim() - 1))).clamp(0.0, 1.0)
        # every per-image quantity below is indexed by the images of `live` (all, without early exit)
        live = torch.arange(n, device=x.device)
        out_best, out_hit = x_adv.clone(), x_adv.clone()
        out_loss = torch.empty(n, device=x.device)
        x_best = x_adv.clone()
        grad, loss, logits = self.gradient_at(x_adv, y)
        grad_best, loss_best = grad.clone(), loss.clone()
        hit = self.fooled(x_adv, y, logits, index)  # out_hit already holds these (the start)
        step = torch.full((n, *[1] * (x.dim() - 1)), 2.0 * eps, device=x.device)
        x_old = x_adv.clone()
        loss_steps = torch.zeros(steps, n, device=x.device)
        last_best, reduced = loss_best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
        since = 0
        xs, ys = x, y
        for i in range(steps):
            if self.early_exit:
                keep = ~hit[live]
                if not keep.all():
                    done = live[~keep]
                    out_best[done], out_loss[done] = x_best[~keep], loss_best[~keep]
                    live = live[keep]
                    if len(live) == 0:
                        return out_best, hit, out_loss, out_hit
                    xs, ys, x_adv, x_old, x_best = xs[keep], ys[keep], x_adv[keep], x_old[keep], x_best[keep]
                    grad, grad_best, loss_best, step = grad[keep], grad_best[keep], loss_best[keep], step[keep]
                    loss_steps, last_best, reduced = loss_steps[:, keep], last_best[keep], reduced[keep]
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                momentum = x_adv - x_old
                x_old = x_adv
                z = project(x_adv + step * grad.sign(), xs, eps)
                x_adv = project(x_adv + (z - x_adv) * a + momentum * (1 - a), xs, eps)
            grad, loss, logits = self.gradient_at(x_adv, ys)
            with torch.no_grad():
                wrong = self.fooled(x_adv, ys, logits, None if index is None else index[live.to(index.device)])
                out_hit[live[wrong]] = x_adv[wrong]
                hit[live[wrong]] = True
                loss_steps[i] = loss
                up = loss > loss_best
                x_best[up], grad_best[up], loss_best[up] = x_adv[up], grad[up], loss[up]
                since += 1
                if since == k:
                    rises = sum((loss_steps[i - j] > loss_steps[i - j - 1]).float() for j in range(k))
                    cut = (rises <= k * self.rho) | (~reduced & (last_best >= loss_best))
                    reduced, last_best = cut.clone(), loss_best.clone()
                    if cut.any():
                        step[cut] /= 2.0
                        x_adv[cut], grad[cut] = x_best[cut], grad_best[cut]
                    since = 0
                    k = max(k - k_decr, k_min)
        out_best[live], out_loss[live] = x_best, loss_best
        return out_best, hit, out_loss, out_hit


@register_attack("apgd-dlr")
class APGDDLR(APGD):
    """APGD with the DLR loss (see the module docstring)."""

    name = "apgd-dlr"
    loss = "dlr"


class FooledOnEveryDraw:
    """``confirm`` for :class:`APGD`'s early exit on an SNN: is the iterate wrong on every
    one of the ``draws`` evaluation draws (``seed``; keyed by the images' global indices,
    :func:`snnadv.attacks.cascade.keyed_correct`, i.e. the very draws the cascade scores
    the attack's result with)?"""

    def __init__(self, model, draws: int, seed: int, batch_size: int = 256):
        self.model, self.draws, self.seed, self.batch_size = model, int(draws), int(seed), int(batch_size)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        from .cascade import keyed_correct

        return ~keyed_correct(self.model, x.detach(), labels, index.cpu(), self.draws, self.seed,
                              self.batch_size).any(0)
