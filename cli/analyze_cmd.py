"""``snnadv analyze ...`` (the paper's Sec. 4.1 analyses) and ``snnadv report RUN_DIR``.

Thin wrappers over :mod:`snnadv.analysis`: settings resolve as for every stage
(defaults < ``--config`` [common] < [analyze] < flags); lists are comma-separated.
Each analysis writes ``<name>.json``, ``<name>.csv`` and ``<name>.png`` into its run
directory ``--out`` (default ``runs/analysis/<name>``).
"""

from __future__ import annotations

import click

from snnadv.registry import ATTACKS

from .options import ATTACK, SURROGATE, RegistryChoice, common_options, flags


def _run(name: str, kw: dict):
    from snnadv.analysis import ANALYZE
    from snnadv.config import resolve

    cfg = resolve("analyze", kw.get("config"), flags(kw))
    try:
        return ANALYZE[name](cfg)
    except KeyboardInterrupt:
        if name in ("timesteps", "leak"):
            click.echo("interrupted: every finished setting is saved under <out>/settings; run the same "
                       "command again to continue from there", err=True)
        raise


def sweep_options(fn):
    opts = [
        click.option("--checkpoint", type=click.Path(),
                     help="The snn-conv checkpoint to fine-tune from (or to evaluate with --model snn-conv)."),
        click.option("--source-ckpt", type=click.Path(),
                     help="The separately trained ANN that crafts the blackbox FGSM/PGD images."),
        click.option("--ann-ckpt", type=click.Path(),
                     help="The ANN shown beside the SNNs (default: the converted network's own ANN, if found)."),
        click.option("--model", type=click.Choice(["snn-bp", "snn-conv"]),
                     help="snn-bp: fine-tune at every setting (default); snn-conv: evaluate the converted network."),
        click.option("--timesteps", help="Timesteps T, comma separated."),
        click.option("--bits", help="Input bit-widths, comma separated: 1-8 or none."),
        click.option("--leaks", help="Leak factors in (0, 1], comma separated (1.0 = IF)."),
        click.option("--attacks", type=RegistryChoice(ATTACKS, several=True),
                     help="Blackbox attacks, comma separated (default fgsm,pgd)."),
        click.option("--eps", help="L-inf budget, e.g. 8/255 (default)."),
        click.option("--alpha", help="PGD step size (default 2/255)."),
        click.option("--steps", type=int, help="PGD steps (default 7)."),
        click.option("--random-start", is_flag=True, default=None, help="PGD from a random point in the eps-ball."),
        click.option("--eval-draws", type=int, help="Encoder draws to average SNN accuracy over (default 1)."),
        click.option("--epochs", type=int, help="Fine-tuning epochs (default: the finetune stage's, 15)."),
        click.option("--lr", type=float, help="Fine-tuning learning rate (default: the finetune stage's, 1e-4)."),
        click.option("--surrogate", type=SURROGATE, help="Fine-tuning surrogate gradient (default stdb)."),
        click.option("--scale", type=float, help="Threshold scale for fine-tuning (default: the converted one's)."),
        click.option("--force", is_flag=True, default=None, help="Recompute every setting (ignore saved results)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


class _InOrder(click.Group):
    """Lists the analyses in the paper's order, not alphabetically."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group("analyze", cls=_InOrder, short_help="The paper's analyses (Fig. 2-6, Eq. 7) with plots, JSON and CSV.")
def analyze():
    """The paper's analyses (Sec. 4.1), each with a figure, JSON and CSV.

    \b
      snnadv analyze timesteps --checkpoint conv.pt --source-ckpt ann-s1.pt --timesteps 50,75,100,150 --bits 2,4
      snnadv analyze leak      --checkpoint conv.pt --source-ckpt ann-s1.pt --leaks 1.0,0.99,0.98,0.95
      snnadv analyze eq7       --ratios 0.1,0.2,0.5,0.8
      snnadv analyze encoder   --bits 4,2 --timesteps 50,150,300,2000
      snnadv analyze perturbation --checkpoint ann-s0.pt --attack pgd
      snnadv report runs/analysis
    """


@analyze.command("timesteps", short_help="Fig. 2: accuracy vs timesteps x input bits (resumable sweep).")
@common_options
@sweep_options
def timesteps(**kw):
    """Fig. 2: clean and blackbox accuracy vs timesteps, one line per input bit-width.

    Each (bits, leak, T) setting is fine-tuned from the same converted network and
    saved as it completes: a re-run skips finished settings (resumable).
    """
    _run("timesteps", kw)


@analyze.command("leak", short_help="Fig. 6b: clean/FGSM/PGD accuracy per leak (resumable sweep).")
@common_options
@sweep_options
def leak(**kw):
    """Fig. 6b: clean and blackbox FGSM/PGD accuracy of SNN-BP per leak factor (resumable)."""
    _run("leak", kw)


@analyze.command("eq7", short_help="Eq. 7 / Fig. 6a: spike rate vs leak, closed form vs simulated LIF.")
@common_options
@click.option("--ratios", help="V_mem / V_th values, comma separated (default 0.1,0.2,0.5,0.8).")
@click.option("--lam-min", type=float, help="Smallest leak (default 0.75).")
@click.option("--lam-max", type=float, help="Largest leak (default 0.9999).")
@click.option("--points", type=int, help="Leak values between them (default 50).")
@click.option("--sim-steps", type=int, help="Simulated timesteps per neuron (default 2000).")
@click.option("--threshold", type=float, help="V_th (default 1.0).")
def eq7(**kw):
    """Eq. 7 / Fig. 6a: spike rate vs leak, closed form beside the simulated LIF neuron."""
    _run("eq7", kw)


@analyze.command("encoder", short_help="Fig. 3: rate-encoder transfer x -> time-averaged y.")
@common_options
@click.option("--bits", help="Pre-quantisation bit-widths, comma separated: 1-8 or none (default 4,2).")
@click.option("--timesteps", help="Timesteps T, comma separated (default 50,150,300,2000).")
@click.option("--points", type=int, help="Input intensities x in [0, 1] (default 1001).")
def encoder(**kw):
    """Fig. 3: input x vs the time-averaged rate-encoder output y, per bit-width and T."""
    _run("encoder", kw)


@analyze.command("perturbation", short_help="Fig. 4: perturbation l2 norm through ReLU vs LIF.")
@common_options
@click.option("--checkpoint", type=click.Path(),
              help="ANN that crafts the adversarial image (default: none, a random sign perturbation).")
@click.option("--attack", type=ATTACK, help="Attack (default pgd).")
@click.option("--eps", help="L-inf budget, e.g. 8/255 (default).")
@click.option("--alpha", help="PGD step size (default 2/255).")
@click.option("--steps", type=int, help="PGD steps (default 7).")
@click.option("--image", type=int, help="Index of the test image (default 0).")
@click.option("--timesteps", help="T of the LIF neuron (default 100).")
@click.option("--leak", type=float, help="Leak of the LIF neuron (default 0.99, as the paper).")
@click.option("--threshold", type=float, help="Threshold of the LIF neuron (default 1.0).")
@click.option("--reset", type=click.Choice(["subtract", "zero"]), help="Reset of the LIF neuron (default zero, Eq. 3).")
def perturbation(**kw):
    """Fig. 4: l2 norm of a perturbation at the input, after a ReLU and after an LIF neuron."""
    _run("perturbation", kw)


@click.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(), help="The report file (default RUN_DIR/report.md).")
@click.option("--title", help="Report title (default: the run directory's name).")
@click.option("--quiet", is_flag=True, default=None, help="Print nothing.")
def report(run_dir, out, title, quiet):
    """Gather a run directory's results (JSON, figures) into one Markdown report."""
    from snnadv.analysis import build_report
    from snnadv.report import Reporter

    build_report(run_dir, out, title, Reporter(quiet=bool(quiet)))
