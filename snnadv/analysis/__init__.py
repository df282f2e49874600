"""The paper's analyses (Sec. 4.1), one function and one ``snnadv analyze`` command each.

* :func:`timesteps_sweep` (Fig. 2): accuracy vs timesteps per input bit-width,
  fine-tuned (SNN-BP) or converted (SNN-conv), clean and blackbox FGSM/PGD;
* :func:`leak_sweep` (Fig. 6b): the same per leak factor;
* :func:`eq7_analysis` (Eq. 7, Fig. 5, 6a): spike rate vs leak, closed form beside
  the simulated LIF neuron;
* :func:`encoder_analysis` (Fig. 3): the rate encoder's transfer characteristic;
* :func:`perturbation_analysis` (Fig. 4): a perturbation's l2 norm through ReLU and LIF;
* :func:`build_report`: ``snnadv report RUN_DIR``, a Markdown report of a run directory.

Each writes ``<name>.json``, ``<name>.csv`` and ``<name>.png`` into its run directory
(see :mod:`snnadv.analysis.common`).  matplotlib is imported only to draw.
"""

from .common import claimed
from .encoder import encoder_analysis
from .eq7 import eq7_analysis
from .markdown import build_report
from .perturbation import perturbation_analysis
from .sweep import leak_sweep, timesteps_sweep

#: the analyses by name, each claiming its run directory first (snnadv.outputs)
ANALYZE = {name: claimed(name, fn) for name, fn in
           {"timesteps": timesteps_sweep, "leak": leak_sweep, "eq7": eq7_analysis, "encoder": encoder_analysis,
            "perturbation": perturbation_analysis}.items()}

__all__ = ["ANALYZE", "build_report", "encoder_analysis", "eq7_analysis", "leak_sweep", "perturbation_analysis",
           "timesteps_sweep"]
