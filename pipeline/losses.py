"""The VAE's loss and its named parts (reconstruction, KL, total), and how much each latent
dimension is used (its KL, active units): shared by training, validation, evaluation and the logs,
so every number with one of these names is computed one way."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.loss_names import LOSS_NAMES
from pipeline.model import EVAL_BATCH_SIZE, VAE, to_input
from pipeline.params import TrainParams

# Batch means of per-image sums, so numbers do not depend on the batch size.
LossParts = NamedTuple("LossParts", [(name, torch.Tensor) for name in LOSS_NAMES])
# The train params the loss reads (`loss_function`): each is an evaluate param too (dvc.yaml; the
# layout test holds it), and trials trained together may differ in each (pipeline.sweep.training).
LOSS_PARAMS = ("beta", "reconstruction", "free_bits")
# A latent dimension is active when its posterior mean varies across images, Cov_x E[z|x] above
# this (Burda et al., 2016): the ones below it carry no information about the image.
ACTIVE_UNIT_THRESHOLD = 0.01


def _pixel_loss(x: torch.Tensor, reconstruction: torch.Tensor, kind: str, reduction: str) -> torch.Tensor:
    """`kind` "mse" (the reference) is squared error, a Gaussian decoder of fixed variance 1/2;
    "bce" is binary cross-entropy, a Bernoulli decoder."""
    pixel_loss = F.mse_loss if kind == "mse" else F.binary_cross_entropy
    return pixel_loss(reconstruction, x, reduction=reduction)


def reconstruction_error(x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The loss's reconstruction term per image (summed over its pixels)."""
    return _pixel_loss(x, reconstruction, kind, "none").flatten(1).sum(1)


def kl_divergence(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image and latent dimension."""
    return -0.5 * (1 + log_var - mean.square() - log_var.exp())


def active_units(means: torch.Tensor) -> torch.Tensor:
    """How many latent dimensions are active, from the posterior means of a set of images (a
    device tensor)."""
    return (means.var(0) > ACTIVE_UNIT_THRESHOLD).sum()


def vae_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    beta: float = 1.0,
    kind: str = "mse",
    free_bits: float = 0.0,
    kl_weight: torch.Tensor | None = None,
) -> LossParts:
    """Reconstruction error summed over pixels plus beta x KL summed over latent dimensions. The
    pixel sum is one fused reduction here, the training step's hot path.

    What is optimised differs from that total only with `free_bits` (lambda nats: each latent
    dimension's KL, averaged over the batch, counts as at least lambda, so below it the KL gives
    no gradient; Kingma et al., 2016) or a `kl_weight` (beta's warm-up factor, in [0, 1]).

    Takes the model's outputs in the order it returns them: `vae_loss(x, *model(x))`.
    """
    batch = x.shape[0]
    recon = _pixel_loss(x, reconstruction, kind, "sum") / batch
    kl_per_image_and_dim = kl_divergence(mean, log_var)
    kl = kl_per_image_and_dim.sum() / batch
    total = optimised = recon + beta * kl  # the reference optimises its total
    if free_bits or kl_weight is not None:
        kl_optimised = kl_per_image_and_dim.mean(0).clamp(min=free_bits).sum() if free_bits else kl
        optimised = recon + (beta if kl_weight is None else beta * kl_weight) * kl_optimised
    return LossParts(recon, kl, total, optimised)


def loss_function(cfg: TrainParams):
    """The loss these train params select (LOSS_PARAMS: `train.beta`, `train.reconstruction`,
    `train.free_bits`); the training step adds beta's warm-up."""
    return functools.partial(vae_loss, beta=cfg.beta, kind=cfg.reconstruction, free_bits=cfg.free_bits)


class DatasetLoss(NamedTuple):
    """A dataset's mean loss parts per image and its latent dimensions' use, on the device."""

    parts: torch.Tensor  # by LOSS_NAMES: reconstruction, KL, total, optimised
    kl_per_dim: torch.Tensor  # the KL of each latent dimension: they sum to the KL part
    active_units: torch.Tensor  # `active_units` of the images' posterior means


@torch.no_grad()
def dataset_loss(
    model: VAE,
    images: torch.Tensor,
    channels_last: bool = False,
    loss=vae_loss,
    batch_size: int = EVAL_BATCH_SIZE,
    noise_generator: torch.Generator | None = None,
) -> DatasetLoss:
    """Mean loss parts over all `images`, with each latent dimension's KL and the active units,
    from one pass (read them when you must). The reparameterisation noise comes from
    `noise_generator` (default: the device's own); the latent statistics draw none."""
    model.eval()
    sums = torch.zeros(len(LOSS_NAMES), device=images.device)
    kl_sums = torch.zeros(model.config["latent_dim"], device=images.device)
    means = []
    for batch in images.split(batch_size):
        x = to_input(batch, channels_last)
        noise = torch.randn(len(batch), model.config["latent_dim"], device=x.device, generator=noise_generator)
        reconstruction, mean, log_var = model(x, noise)
        sums += torch.stack(loss(x, reconstruction, mean, log_var)) * len(batch)
        kl_sums += kl_divergence(mean, log_var).sum(0)
        means.append(mean)
    model.train()
    return DatasetLoss(sums / len(images), kl_sums / len(images), active_units(torch.cat(means)))
