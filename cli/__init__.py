"""Click command line for snnadv (installed as ``snnadv.cli``)."""
