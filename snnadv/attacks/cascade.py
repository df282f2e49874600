"""The cascade: an evaluation protocol's attacks run AutoAttack-style, resumably.

Per eps, the attacks run in order; attack a runs only on the images still *alive*:
correct on at least one of the K evaluation draws under the worst case so far,

    W_0 = C^clean,   W_a = W_{a-1} AND C^a   ([K, N] boolean, per draw),

and an image leaves the cascade once W is False on every draw.  Its later C^a are not
computed (recorded False): it is already wrong on every draw, so AND-ing anything
changes nothing.  Hence the cascade's per-sample worst case W_A *equals* running every
attack on every image and then :func:`snnadv.attacks.suite.worst_case`, provided an
attack's result on an image does not depend on which other images share its batch.
That holds for the keyed attacks (FGSM, PGD: spikes and random starts keyed by the
image's global index, :meth:`snnadv.attacks.Attack.keyed`) and for the evaluation
draws (keyed the same way); torchattacks' APGD and Square draw their random numbers
per batch, so for them the cascade is the same attack in distribution, not bit for bit.

Early exit per sample: torchattacks' APGD and Square themselves only work on the
points the model still classifies correctly (and across restarts on those not yet
fooled), so a sample leaves as soon as it is fooled.  The package's PGD does so with
``early_exit`` (a protocol's setting, :mod:`snnadv.attacks.protocols`: it keeps each
image's best iterate and drops the image once adversarial, keyed as before, so the
cascade still equals every attack on every image); FGSM and the paper's PGD-7 (the
last iterate) run their fixed steps on the alive images.

Resumable: the images are cut into fixed chunks of global indices; each (attack, eps,
chunk) is one piece, its result the [K, alive-in-chunk] correctness of the attacked
images.  ``store`` (``load(what)``, ``seconds(what)`` (what the piece cost, None if not
recorded), ``save(what, tensor, seconds=...)``; e.g. :class:`snnadv.adaptive.PieceStore`
in the experiment layer) keeps them; ``what`` names the attack, eps, chunk and the alive
images, so an interrupted run resumes where it stopped with the same result and cost.

Processes (:mod:`snnadv.parallel`): under ``torchrun`` the ranks share out each piece's
images, every rank attacks and evaluates its contiguous part (keyed by the images'
global indices) and the piece's correctness is gathered in order on every rank
(:func:`snnadv.parallel.gather_cat`), so every rank holds the whole run and it equals
one process's, image by image and draw by draw.  A keyable attack's part is a shard of
the images (:func:`snnadv.parallel.shard`); any other (torchattacks' APGD and Square,
seeded per batch) gets whole batches of the piece, the very batches one process makes,
so it too gives one process's result (but at most as many ranks work on a piece as it
has batches: a chunk of at least ranks x batch size keeps them all busy).  Rank 0 alone
reads and writes the pieces: it decides which are done (its answer broadcast, so the
ranks never disagree) and saves each new one.  The clean evaluation is sharded too.

Cost: wall-clock seconds per (attack, eps), the images attacked, and seconds per 100
attacked images (``clock`` may be replaced in tests; under ``torchrun`` this rank's
clock).  Nothing here prints or writes.
"""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .. import parallel
from ..encoding import encoder_seed
from ..evaluation import is_snn, predictions
from .base import attack_index, batch_seed


@torch.no_grad()
def keyed_correct(model, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, draws: int = 1,
                  seed: int = 0, batch_size: int = 256, sharded: bool = False) -> torch.Tensor:
    """Boolean [K, n] on the CPU: image ``index[i]`` correct at evaluation draw k, keyed by
    the images' *global* indices (so equal, column by column, to
    :func:`snnadv.evaluation.correctness` on the whole set); ``sharded``: shared out over
    the ranks and gathered (:func:`snnadv.evaluation.predictions`)."""
    pred = predictions(model, images, batch_size, draws, seed, index=index, sharded=sharded)
    return (pred == labels.to(pred.device)).cpu()


def share(n: int, batch_size: int, whole_batches: bool, w: parallel.World | None = None) -> slice:
    """This rank's contiguous part of a piece of ``n`` images: its shard of the images
    (:func:`snnadv.parallel.shard`), or with ``whole_batches`` its shard of the piece's
    batches of ``batch_size`` (the batches one process makes)."""
    if not whole_batches:
        return parallel.shard(n, w)
    b = parallel.shard(-(-n // batch_size), w)
    return slice(min(b.start * batch_size, n), min(b.stop * batch_size, n))


@contextmanager
def seeded(model, seed: int, device):
    """The encoder (:func:`snnadv.encoding.encoder_seed`) *and* the global RNG seeded with
    ``seed`` (restored after): an attack that draws from the global RNG (APGD's first
    pass through an :class:`~snnadv.estimator.EstimatorModule`, Square) then gives the same
    result in any process, whatever ran before it (a resumed run, another rank)."""
    devices = [device.index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), encoder_seed(model, seed, device):
        torch.manual_seed(int(seed))
        yield


def craft_at(attack, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, batch_size: int,
             seed: int) -> torch.Tensor:
    """Adversarial ``images`` whose global indices are ``index``: a keyable attack per batch
    inside :meth:`~snnadv.attacks.Attack.keyed` (the result of an image depends only on
    it and its index), any other with the encoder and the global RNG seeded per batch (from
    ``seed`` and the batch's first index, :func:`seeded`)."""
    out = []
    for i in range(0, len(images), batch_size):
        x, y, idx = images[i:i + batch_size], labels[i:i + batch_size], index[i:i + batch_size].to(images.device)
        if getattr(attack, "keyable", False):
            block = attack.keyed(seed, idx)
        else:
            block = seeded(attack.model, batch_seed(seed, int(idx[0])), images.device)
        with block, attack_index(attack, idx):
            out.append(attack(x, y))
    return torch.cat(out) if out else images.clone()


def attack_seed(seed: int, key) -> int:
    """A stable seed per attack setting (independent of its place in the cascade)."""
    return (int(seed) * 7919 + zlib.crc32(repr(tuple(map(str, key))).encode())) & 0x7FFFFFFFFFFF


@dataclass
class CascadeRun:
    """What :func:`run_cascade` computed: ``clean`` [K, N]; per eps index j,
    ``matrices[key][j]`` [K, N] (False where the image was not attacked), ``cumulative[key][j]``
    (W after that attack), ``worst[j]``; ``attacked[key][j]`` images (resumed pieces
    included); ``seconds[key][j]`` (a resumed piece adds the seconds its store recorded);
    ``untimed[key][j]``: resumed pieces whose seconds the store does not know (then
    ``seconds`` is a lower bound)."""

    clean: torch.Tensor
    worst: list = field(default_factory=list)
    matrices: dict = field(default_factory=dict)
    cumulative: dict = field(default_factory=dict)
    attacked: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    untimed: dict = field(default_factory=dict)
    eval_seconds: float = 0.0
    resumed: int = 0
    pieces: int = 0


def run_cascade(model, images: torch.Tensor, labels: torch.Tensor, attacks: list, eps_list: list[float], *,
                draws: int = 1, seed: int = 0, batch_size: int = 64, chunk: int = 100, cascade: bool = True,
                store=None, advance=None, clock=time.perf_counter) -> CascadeRun:
    """Run ``attacks`` (a list of ``(key, build)``: ``build(eps)`` returns the attack) on
    ``images`` for every eps of ``eps_list``; ``cascade=False`` runs every attack on every
    image (the reference the cascade equals).  ``store``: see the module docstring;
    ``advance(info)`` after every piece.  Returns a :class:`CascadeRun`."""
    N = len(images)
    K = draws if is_snn(model) else 1
    w = parallel.world()
    allidx = torch.arange(N)
    t0 = clock()
    clean = keyed_correct(model, images, labels, allidx, K, seed, batch_size, sharded=True)
    run = CascadeRun(clean=clean, eval_seconds=clock() - t0)
    chunks = [(a, min(a + chunk, N)) for a in range(0, N, chunk)]
    for key, _ in attacks:
        for d in (run.matrices, run.cumulative, run.attacked, run.seconds, run.untimed):
            d[key] = []
    for j, eps in enumerate(eps_list):
        W = clean.clone()
        for key, build in attacks:
            C = torch.zeros(K, N, dtype=torch.bool)
            n_att, secs, untimed = 0, 0.0, 0
            attack = None
            for a, b in chunks:
                sub = torch.arange(a, b)
                alive = sub[W[:, a:b].any(0)] if cascade else sub
                if len(alive) == 0:
                    continue
                what = {"attack": list(map(str, key)), "eps": float(eps), "chunk": [a, b],
                        "alive": alive.tolist(), "draws": K, "seed": seed, "batch_size": batch_size}
                got = known = None
                if store is not None:  # rank 0 decides, so that every rank computes the same pieces
                    got = store.load(what) if w.main else None
                    if got is not None and tuple(got.shape) != (K, len(alive)):
                        got = None
                    if got is not None:
                        known = store.seconds(what)  # what making it cost (None: not recorded)
                    got, known = parallel.broadcast_object((None, None) if got is None else (got.bool().cpu(), known))
                if got is not None:
                    C[:, alive] = got
                    run.resumed += 1
                    n_att += len(alive)
                    if known is None:
                        untimed += 1
                    else:
                        secs += known["attack"]
                        run.eval_seconds += known["eval"]
                else:
                    t1 = clock()
                    if eps != 0:
                        attack = attack or build(eps)
                    keyable = eps == 0 or getattr(attack, "keyable", False)
                    mine = alive[share(len(alive), batch_size, not keyable, w)]
                    if eps == 0:
                        x_adv = images[mine]
                    else:
                        x_adv = craft_at(attack, images[mine], labels[mine], mine, batch_size,
                                         attack_seed(seed, key))
                    te = clock()
                    got = keyed_correct(model, x_adv, labels[mine], mine, K, seed, batch_size)
                    got = parallel.gather_cat(got.t().contiguous(), w).t()
                    t2 = clock()
                    secs += te - t1
                    run.eval_seconds += t2 - te
                    n_att += len(alive)
                    C[:, alive] = got
                    if store is not None and w.main:
                        store.save(what, got, seconds={"attack": te - t1, "eval": t2 - te})
                    run.pieces += 1
                if advance:
                    advance({"attack": key, "eps": eps, "chunk": (a, b), "images": len(alive)})
            W &= C
            run.matrices[key].append(C)
            run.cumulative[key].append(W.clone())
            run.attacked[key].append(n_att)
            run.seconds[key].append(secs)
            run.untimed[key].append(untimed)
        run.worst.append(W)
    return run
