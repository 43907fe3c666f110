"""`python -m longrange.cli ...` (e.g. `torchrun --nproc_per_node 2 -m longrange.cli lra train ...`)."""

from longrange.cli import app

app()
