"""The reference convolutional VAE and its loss.

Encoder: 4 conv layers (stride 2 in the middle two) with LeakyReLU, then linear heads for the mean
and log-variance of q(z|x). Decoder: a linear expand back to the last conv map, 4 transposed convs
(LeakyReLU between them) and a sigmoid. For 28x28 inputs the conv map is hidden_dim x 7 x 7.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 28
_FEATURE_SIZE = IMAGE_SIZE // 4  # two stride-2 convs: 28 -> 14 -> 7


class VAE(nn.Module):
    def __init__(self, input_dim: int = 1, hidden_dim: int = 64, latent_dim: int = 2, leaky_relu: float = 0.01):
        super().__init__()
        self.config = dict(input_dim=input_dim, hidden_dim=hidden_dim, latent_dim=latent_dim, leaky_relu=leaky_relu)
        act = lambda: nn.LeakyReLU(leaky_relu)  # noqa: E731
        h = hidden_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, h, 3, stride=1, padding=1), act(),
            nn.Conv2d(h, h, 3, stride=2, padding=1), act(),
            nn.Conv2d(h, h, 3, stride=2, padding=1), act(),
            nn.Conv2d(h, h, 3, stride=1, padding=1), act(),
            nn.Flatten(),
        )
        flat = h * _FEATURE_SIZE * _FEATURE_SIZE
        self.to_mean = nn.Linear(flat, latent_dim)
        self.to_log_var = nn.Linear(flat, latent_dim)
        self.expand = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (h, _FEATURE_SIZE, _FEATURE_SIZE)),
            nn.ConvTranspose2d(h, h, 3, stride=1, padding=1), act(),
            nn.ConvTranspose2d(h, h, 3, stride=2, padding=1, output_padding=1), act(),
            nn.ConvTranspose2d(h, h, 3, stride=2, padding=1, output_padding=1), act(),
            nn.ConvTranspose2d(h, input_dim, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.to_mean(features), self.to_log_var(features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.expand(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x through a sample z ~ q(z|x) (the reparameterisation trick)."""
        mean, log_var = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        return self.decode(z), mean, log_var

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: decode the posterior mean."""
        return self.decode(self.encode(x)[0])


class Reconstructor(nn.Module):
    """The VAE as a deterministic image -> image function (`VAE.reconstruct`): the form logged to
    MLflow, where a model must map one input tensor to one output tensor."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(x)


class LossParts(NamedTuple):
    """Batch means of per-image sums, so numbers do not depend on the batch size."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    total: torch.Tensor


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


def vae_loss(
    x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor,
    beta: float = 1.0, kind: str = "mse",
) -> LossParts:
    """Reconstruction error summed over pixels plus beta x KL summed over latent dimensions. The
    pixel sum is one fused reduction here, the training step's hot path.

    Takes the model's outputs in the order it returns them: `vae_loss(x, *model(x))`.
    """
    batch = x.shape[0]
    recon = _pixel_loss(x, reconstruction, kind, "sum") / batch
    kl = kl_divergence(mean, log_var).sum() / batch
    return LossParts(recon, kl, recon + beta * kl)


EVAL_BATCH_SIZE = 1024  # large batches for no-grad passes; the result does not depend on it beyond rounding


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N x 28 x 28), on any device, as the model's float input in [0, 1] (N x 1 x 28 x 28)."""
    x = images.unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def dataset_loss(model: VAE, images: torch.Tensor, channels_last: bool = False, loss=vae_loss) -> torch.Tensor:
    """Mean reconstruction, KL and total over all `images`, as one device tensor (read it when you must)."""
    model.eval()
    sums = torch.zeros(3, device=images.device)
    for batch in images.split(EVAL_BATCH_SIZE):
        x = to_input(batch, channels_last)
        sums += torch.stack(loss(x, *model(x))) * len(batch)
    model.train()
    return sums / len(images)


@torch.no_grad()
def latent_means(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """Posterior means E[z|x] of uint8 `images`, in large batches."""
    return torch.cat([model.encode(to_input(batch))[0] for batch in images.split(EVAL_BATCH_SIZE)])
