"""Experiment: FOSTER with every latent row of Z rescaled to unit length after each step.

Nothing in FOSTER fixes the length of a latent vector, and the length acts as an
inverse temperature of the row's softmax. On games the data step shrinks it, so
the rows flatten as distillation goes on. This script patches ``FosterRun.step``
to project Z back onto the unit sphere and then runs the normal CLI, so its
records go under the suite name given by ``--name``.

Usage, from the repository root after the README's install command:

    python docs/experiments/foster_unit_latents.py --threads 1 run --suite games \
        --name games-exp-unitz --methods foster --seeds 0 --budgets 20 --no-pop \
        --data-dir ../shared/data
"""

import sys

import torch

from methods import foster

_step = foster.FosterRun.step


def step_on_unit_sphere(self, step):
    """Run one FOSTER step, then rescale each latent row to length 1."""
    losses = _step(self, step)
    with torch.no_grad():
        self.z.div_(self.z.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return losses


if __name__ == "__main__":
    foster.FosterRun.step = step_on_unit_sphere
    from bench.cli import main

    sys.exit(main(sys.argv[1:]))
