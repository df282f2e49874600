"""The ``snnadv`` command line: one small function per subcommand.

Each command parses its options, resolves the settings (defaults < ``--config`` <
flags, see :mod:`snnadv.config`) and calls the library.  Every error a user can
cause ends as one line on stderr and a non-zero exit:

* :class:`snnadv.errors.SnnadvError` and Click usage errors: exit 2;
* Ctrl-C: exit 130, with the last completed epoch's checkpoint left in place (a
  training run says which epoch is saved where);
* anything else is a bug: one line naming the file its traceback was saved to, exit 1.

Library warnings (:class:`snnadv.errors.SnnadvWarning`) print as one ``warning:`` line.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
import warnings

import click

from snnadv import __version__
from snnadv.errors import Interrupted, SnnadvError, SnnadvWarning

from .analyze_cmd import analyze, report
from .doctor_cmd import doctor
from .evaluate_cmd import compare, evaluate
from .options import ARCH, NEURON, SURROGATE, common_options, flags
from .reproduce_cmd import reproduce
from .robustness_cmds import attack, table


#: subcommands in pipeline order (``snnadv --help`` lists them so)
ORDER = ["train-ann", "convert", "finetune", "attack", "table", "evaluate", "compare", "analyze", "report",
         "reproduce", "bench"]


class PipelineGroup(click.Group):
    """Lists subcommands in pipeline order, not alphabetically."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c))


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="snnadv")
def cli():
    """Adversarial robustness of deep spiking neural networks (Sharmin et al., ECCV 2020).

    The pipeline, one command per stage:

    \b
      snnadv train-ann --config configs/quick.toml --out runs/ann.pt
      snnadv convert   --config configs/quick.toml --checkpoint runs/ann.pt --out runs/conv.pt
      snnadv finetune  --config configs/quick.toml --checkpoint runs/conv.pt --leak 0.95 --out runs/bp.pt
    """
    from snnadv.memory import limit_bytes
    from snnadv.parallel import init_from_env
    from snnadv.runtime import keep_freed_memory, tf32_policy

    limit_bytes()  # a bad SNNADV_MEMORY_LIMIT is an error now, not when an attack first plans

    if init_from_env().distributed:  # under torchrun: join the process group (gloo on CPUs, NCCL on GPUs)
        signal.signal(signal.SIGTERM, _terminated)  # torchrun ends the other ranks when one fails
    keep_freed_memory()  # large CPU tensors are reused, not page-faulted in again (snnadv.runtime)
    tf32_policy()  # fp32 means fp32 on a GPU too (SNNADV_TF32=1 allows TF32)


@cli.command("train-ann")
@common_options
@click.option("--arch", type=ARCH, help="A registered architecture (default vgg5).")
@click.option("--epochs", type=int, help="Epochs (paper: 200 VGG5/ResNet20, 250 VGG11).")
@click.option("--lr", type=float, help="Initial SGD learning rate (paper: 0.1 VGG, 0.05 ResNet20).")
@click.option("--milestones", help="Epochs at which the lr is divided by 10, comma separated.")
@click.option("--momentum", type=float, help="SGD momentum (0.9).")
@click.option("--weight-decay", type=float, help="Weight decay (1e-4).")
@click.option("--input-bits", type=int, help="Quantise inputs to this many bits (1-8; default none).")
@click.option("--input-range", type=click.Choice(["unit", "signed"]), help="Model input range (default unit = [0,1]).")
@click.option("--resume", is_flag=True, default=None, help="Continue the interrupted run saved at --out.")
def train_ann(**kw):
    """Train an ANN with the paper's recipe (SGD, step schedule, augmentation)."""
    from snnadv.config import resolve
    from snnadv.train import train_ann as run

    run(resolve("train-ann", kw.get("config"), flags(kw)))


@cli.command("convert")
@common_options
@click.option("--checkpoint", type=click.Path(), help="The ANN checkpoint to convert.")
@click.option("--timesteps", type=int, help="T for balancing and evaluation (paper: 2500).")
@click.option("--batches", type=int, help="Training batches to balance on (default 1, as the original code).")
@click.option("--percentile", type=float, help="Threshold = this percentile of the input current (default 100 = max).")
@click.option("--scale", type=float, help="Threshold scale applied before fine-tuning (default 0.7).")
@click.option("--balance", type=click.Choice(["all", "stem"]), help="Balance all spiking layers or only the non-residual stem.")
@click.option("--curve", help="Timesteps at which to report accuracy, comma separated.")
@click.option("--neuron", type=NEURON, help="The registered neuron of the SNN (default lif, at leak 1: IF).")
def convert(**kw):
    """Convert an ANN to an SNN (SNN-conv) by threshold balancing."""
    from snnadv.config import resolve
    from snnadv.convert import convert as run

    run(resolve("convert", kw.get("config"), flags(kw)))


@cli.command("finetune")
@common_options
@click.option("--checkpoint", type=click.Path(), help="The snn-conv checkpoint to start from.")
@click.option("--leak", type=float, help="Leak lambda in (0, 1]; 1.0 = IF (default 0.99).")
@click.option("--timesteps", type=int, help="T (paper: 100 VGG5, 200 ResNet20/VGG11).")
@click.option("--surrogate", type=SURROGATE, help="Surrogate gradient (default stdb, Eq. 4).")
@click.option("--alpha", type=float, help="Eq. 4 alpha (0.3).")
@click.option("--beta", type=float, help="Eq. 4 beta (0.01).")
@click.option("--gamma", type=float, help="Linear surrogate gamma (0.3).")
@click.option("--epochs", type=int, help="Epochs (15).")
@click.option("--lr", type=float, help="Adam learning rate (1e-4), halved every --lr-step epochs.")
@click.option("--lr-step", type=int, help="Epochs between lr halvings (5).")
@click.option("--weight-decay", type=float, help="Weight decay (5e-4).")
@click.option("--scale", type=float, help="Threshold scale (default: the one stored by convert, 0.7).")
@click.option("--resume", is_flag=True, default=None, help="Continue the interrupted run saved at --out.")
def finetune(**kw):
    """Fine-tune a converted SNN with spike-based backpropagation (SNN-BP)."""
    from snnadv.config import resolve
    from snnadv.train import finetune as run

    run(resolve("finetune", kw.get("config"), flags(kw)))


for command in (attack, table, reproduce, analyze, report, evaluate, compare, doctor):  # defined in their own modules
    cli.add_command(command)


@cli.command("bench")
@common_options
@click.option("--preset", type=click.Choice(["auto", "cpu", "paper", "tiny"]),
              help="auto (paper on CUDA, cpu otherwise) | cpu (small) | paper (T=100/2500) | tiny (smoke test).")
@click.option("--arch", type=ARCH, help="A registered architecture (default: the preset's, vgg5).")
@click.option("--timesteps", help="T of the SNN workloads: one number for all, or workload=T pairs, comma separated.")
@click.option("--only", help="Workloads to run, comma separated: ann_train, snn_train, snn_infer, pgd.")
@click.option("--iters", type=int, help="Timed iterations per workload (default: the preset's).")
@click.option("--peak-tflops", type=float, help="Peak TFLOP/s for the hardware-limit column (CUDA default 989).")
@click.option("--peak-tbps", type=float, help="Peak memory bandwidth in TB/s (default 4.8 on H200, 3.35 on H100).")
@click.option("--chunk-steps", type=int, help="snnadv timesteps per chunk (default automatic).")
def bench(**kw):
    """Images/s and peak memory of ANN training, SNN-BP training, SNN inference and PGD,
    against a plain snnTorch step-by-step loop (JSON in --out, default runs/bench.json)."""
    from snnadv.bench import bench as run
    from snnadv.bench import resolve_bench

    run(resolve_bench(kw.get("config"), flags(kw)))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Library warnings (:class:`SnnadvWarning`) as one ``warning:`` line; others as Python shows them."""
    if issubclass(category, SnnadvWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _save_traceback(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to a file in the temp dir; its path."""
    fd, path = tempfile.mkstemp(prefix="snnadv-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"snnadv {__version__}, python {sys.version.split()[0]}\nargv: {sys.argv}\n\n")
        traceback.print_exception(exc, file=f)
    return path


def main(argv=None) -> int:
    """Entry point: run the CLI, turning every user error into one line and an exit code."""
    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="snnadv", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:  # click's wrapper of Ctrl-C
        cause = e.__cause__ or e.__context__
        click.echo(f"interrupted; {cause}" if isinstance(cause, Interrupted) else "interrupted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except SnnadvError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except Interrupted as e:
        click.echo(f"interrupted; {e}", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: the last completed epoch's checkpoint is intact (continue with --resume)", err=True)
        return 130
    except Exception as e:  # a bug: one line, the traceback in a file
        peer = _peer_failure(e)  # (also a SIGTERM from torchrun: _Terminated)
        if peer:
            click.echo(f"error: {peer}", err=True)
            return 1
        what = " ".join(str(e).split())[:200] or type(e).__name__
        try:
            where = f"the traceback is in {_save_traceback(e)}"
        except OSError:
            where = "the traceback could not be saved"
        click.echo(f"error: unexpected {type(e).__name__}: {what} (an snnadv bug; {where})", err=True)
        return 1
    finally:
        warnings.showwarning = _python_showwarning
        _leave_process_group()
    return 0


class _Terminated(Exception):
    """SIGTERM under torchrun: the launcher is ending this rank (another one failed)."""


def _terminated(signum, frame):
    raise _Terminated()


def _peer_failure(exc: BaseException) -> str | None:
    """Under torchrun: the line for a collective that failed because another rank stopped
    (that rank printed its own reason); None for anything else."""
    from snnadv.parallel import initialized, world

    if not initialized() or not world().distributed:
        return None
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if k)
    text = str(exc)
    if isinstance(exc, (_Terminated, *kinds)) or any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                                          "gloo", "NCCL")):
        return (f"rank {world().rank} of {world().size} stopped: another rank failed or was stopped "
                f"(its own line says why)")
    return None


def _leave_process_group() -> None:
    from snnadv.parallel import initialized

    if initialized():
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:  # a peer is gone: nothing left to close cleanly
            pass


if __name__ == "__main__":
    sys.exit(main())
