"""``snnadv evaluate``: a thin wrapper over :func:`snnadv.adaptive.run_evaluate`."""

from __future__ import annotations

import click

from snnadv.attacks.protocols import ATTACK_NAMES, PROTOCOLS
from snnadv.registry import GRADIENTS

from .options import RegistryChoice, common_options, flags


@click.command("evaluate")
@common_options
@click.option("--target-ckpt", type=click.Path(), help="Checkpoint of the model to evaluate (ANN, SNN-conv or SNN-BP).")
@click.option("--suite", type=click.Choice(["paper", "adaptive", "full"]),
              help="paper (FGSM, PGD-7, paper gradient) | adaptive (PGD over gradient paths, APGD, Square) | "
                   "full (both + accuracy vs eps + sanity checks; default).")
@click.option("--protocol", type=click.Choice(list(PROTOCOLS)),
              help="A named preset run as a cascade: paper (FGSM, PGD-7) | strong (APGD-CE/DLR 100 steps, EOT 10, "
                   "every estimator, sharpness search, Square 5000, eps 2,4,8/255) | strong-cpu (paper's FGSM and "
                   "PGD-7 first, then APGD-CE/DLR 25 steps EOT 4 through alg1, sharpened bptt and rate, Square 300) "
                   "| quick (tests). Options given beside it override the preset; replaces --suite.")
@click.option("--attacks", "protocol_attacks",
              help=f"Protocols: the attacks in cascade order, comma separated ({', '.join(ATTACK_NAMES)}; "
                   "default: the protocol's).")
@click.option("--chunk", type=int, help="Images per resumable piece of a protocol (default: the protocol's).")
@click.option("--cascade/--no-cascade", default=None,
              help="Protocols: attack only the images still correct (default) or every image.")
@click.option("--early-exit/--no-early-exit", default=None,
              help="Protocols: PGD keeps each image's best iterate and drops the image once adversarial "
                   "(default: the protocol's; on for strong and quick, off for paper).")
@click.option("--sharpness-images", type=int,
              help="Protocols with the sharpness search (strong, strong-cpu): held-out training images it "
                   "runs on (default: the protocol's, 32).")
@click.option("--eps", help="L-inf budget(s), one or a comma-separated list, e.g. 2/255,8/255,64/255 (default 8/255).")
@click.option("--eot", type=int, help="Encoder draws averaged per gradient step (EOT; 1 = the paper; default 4).")
@click.option("--eval-draws", type=int, help="Encoder draws an SNN's accuracy is averaged over (default 4).")
@click.option("--paths", type=RegistryChoice(GRADIENTS, several=True, extra=("all", "paper", "autograd")),
              help="Gradient paths, comma separated: registered SNN paths, or all (default).")
@click.option("--steps", type=int, help="Adaptive PGD steps (default 20).")
@click.option("--restarts", type=int, help="Adaptive PGD / APGD restarts (default 2).")
@click.option("--alpha", help="Adaptive PGD step size (default max(2.5 eps/steps, eps/8)).")
@click.option("--apgd-steps", type=int, help="APGD iterations (default 20).")
@click.option("--square-queries", type=int, help="Square attack queries (default 1000).")
@click.option("--sweep-eps", help="Accuracy-vs-eps points of the full suite (default 0,2/255,...,64/255).")
@click.option("--sweep-steps", type=int, help="PGD steps of the accuracy-vs-eps sweep (default 20).")
@click.option("--slope", type=float, help="Sharpness k of the attack-time fast-sigmoid surrogate (default 5).")
@click.option("--timesteps", type=int, help="T for an SNN target (default: the checkpoint's).")
@click.option("--source-timesteps", type=int, help="T for an SNN --source-ckpt (default: the checkpoint's).")
@click.option("--input-bits", type=int, help="Quantise the inputs to this many bits.")
@click.option("--proxy-ckpt", type=click.Path(), help="ANN for the 'ann' path (default: found through the parents).")
@click.option("--blackbox-ckpt", type=click.Path(),
              help="--suite: also run a transfer attack crafted on this model (refused with --protocol: "
                   "use --source-ckpt).")
@click.option("--source-ckpt", type=click.Path(),
              help="--protocol: craft the protocol's attacks on this model (ANN, SNN-conv or SNN-BP; its own T) "
                   "and score them on the target: a transfer (blackbox) run; Square is left out.")
@click.option("--library/--no-library", default=None, help="Run APGD and Square from torchattacks (default on).")
def evaluate(**kw):
    """Honest robustness: adaptive attacks, expected accuracy over encoder draws, gradient-masking checks.

    Prints one row per attack and gradient path (the per-sample worst case last) with
    sanity flags, and writes JSON, a Markdown section and an accuracy-vs-eps plot
    (--out: a .json file or a folder; default runs/evaluate/).
    """
    from snnadv.adaptive import run_evaluate
    from snnadv.config import resolve

    run_evaluate(resolve("evaluate", kw.get("config"), flags(kw)))


def _named(ctx, param, values):
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"'{v}' is not NAME=RESULT.json", ctx, param)
        out.append((name, path))
    return out


@click.command("compare")
@click.argument("results", nargs=-1, required=True, callback=_named, metavar="NAME=RESULT.json...")
@click.option("--reference", help="The model the others are compared with (default: the first).")
@click.option("--out", type=click.Path(), help="Write JSON and Markdown (a .json file or a folder).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--quiet", is_flag=True, default=None, help="Print nothing.")
def compare(results, reference, out, overwrite, quiet):
    """Protocol results of several models on the same images side by side, with paired tests.

    Each RESULT is a JSON of `snnadv evaluate --protocol` (e.g. ANN=ann.json SNN-BP=bp.json).
    Per model: clean, after the paper's attacks (when the protocol runs them first, as
    strong-cpu does) and under the protocol's worst case, with 95 % intervals; the cut the
    stronger protocol makes; each model minus the reference, paired; and whether an
    advantage under the paper's attacks survives the stronger protocol.
    """
    from snnadv.adaptive import run_compare
    from snnadv.report import Reporter

    run_compare(results, reference, out, Reporter(quiet=bool(quiet)), overwrite=overwrite)
