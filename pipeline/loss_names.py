"""The loss's parts by name, in the order the loss returns them. A module of its own, so that what
only names them (the history and its plots) does not rerun when the loss's arithmetic changes."""

LOSS_NAMES = ("reconstruction", "kl", "total")
