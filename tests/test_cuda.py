"""The CUDA checks (snnadv/cuda_checks.py: Triton kernels at awkward sizes, automatic
backend selection, chunk boundaries, no host syncs, the memory estimate against the
measured peak); skipped without a GPU.  They live in the package so that
``snnadv doctor --device cuda --full`` runs them from an installed wheel."""

from snnadv.cuda_checks import *  # noqa: F401,F403
