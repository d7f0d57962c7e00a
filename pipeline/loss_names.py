"""The loss's parts by name, in the order the loss returns them. A module of its own, so that what
only names them (the history and its plots) does not rerun when the loss's arithmetic changes."""

# total is reconstruction + train.beta x KL, the true KL: comparable across runs of one beta.
# optimised is what training minimises, which differs from total only with train.free_bits (the
# KL's floor per dimension) or train.kl_warmup_epochs (beta's warm-up, in training alone).
LOSS_NAMES = ("reconstruction", "kl", "total", "optimised")
