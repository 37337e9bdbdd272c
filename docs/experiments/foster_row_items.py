"""Experiment: FOSTER whose item subset B also contains each latent row's current top item.

FOSTER's rows are trained over B, the real batch's items and N uniform draws.
On games only about a third of the rows' starting items fall in B, so most data
updates act on the renormalised tails of the rows. This script patches
``FosterRun.sample_subset`` to add every row's exact argmax over the cached
text vectors. That reads every cached vector once per step, which the
package's FOSTER avoids. Its option ``subset_row_tops`` adds tracked top items
instead (see ``methods/foster.py``); this script stays as the exact reference
for that option. It is meant for the frozen encoder mode: in tune-top-k mode
the same call would encode the whole catalogue on every step.

Usage, from the repository root after the README's install command:

    python docs/experiments/foster_row_items.py --threads 1 run --suite games \
        --name games-exp-rowitems --methods foster --seeds 0,1,2 --budgets 20 --no-pop \
        --data-dir ../shared/data
"""

import sys

import torch

from methods import foster

_sample_subset = foster.FosterRun.sample_subset


def subset_with_row_items(self, batch):
    """Return FOSTER's subset B united with the top item of every latent row."""
    items = _sample_subset(self, batch)
    if len(items) >= self.n_items:
        return items
    with torch.no_grad():
        vectors = self.item_text.vectors(torch.arange(self.n_items))
        top = (self.z.detach().reshape(-1, self.z.shape[-1]) @ vectors.T).argmax(dim=-1)
    return torch.unique(torch.cat([items, top]))


if __name__ == "__main__":
    foster.FosterRun.sample_subset = subset_with_row_items
    from bench.cli import main

    sys.exit(main(sys.argv[1:]))
