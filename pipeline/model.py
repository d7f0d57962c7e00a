"""The reference convolutional VAE, and how images go in and latent means come out.

Encoder: 4 conv layers (stride 2 in the middle two) with LeakyReLU, then linear heads for the mean
and log-variance of q(z|x). Decoder: a linear expand back to the last conv map, 4 transposed convs
(LeakyReLU between them) and a sigmoid. For 28x28 inputs the conv map is hidden_dim x 7 x 7.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.idx import IMAGE_SIZE

_FEATURE_SIZE = IMAGE_SIZE // 4  # two stride-2 convs: 28 -> 14 -> 7


class VAE(nn.Module):
    def __init__(self, input_dim: int = 1, hidden_dim: int = 64, latent_dim: int = 2, leaky_relu: float = 0.01):
        super().__init__()
        self.config = dict(input_dim=input_dim, hidden_dim=hidden_dim, latent_dim=latent_dim, leaky_relu=leaky_relu)
        # In place: the same values and gradients, without a new full-size tensor per activation
        # (decoding on a CPU runs about 1.4x faster).
        act = lambda: nn.LeakyReLU(leaky_relu, inplace=True)  # noqa: E731
        h = hidden_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(input_dim, h, 3, stride=1, padding=1),
            act(),
            nn.Conv2d(h, h, 3, stride=2, padding=1),
            act(),
            nn.Conv2d(h, h, 3, stride=2, padding=1),
            act(),
            nn.Conv2d(h, h, 3, stride=1, padding=1),
            act(),
            nn.Flatten(),
        )
        flat = h * _FEATURE_SIZE * _FEATURE_SIZE
        self.to_mean = nn.Linear(flat, latent_dim)
        self.to_log_var = nn.Linear(flat, latent_dim)
        self.expand = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (h, _FEATURE_SIZE, _FEATURE_SIZE)),
            nn.ConvTranspose2d(h, h, 3, stride=1, padding=1),
            act(),
            nn.ConvTranspose2d(h, h, 3, stride=2, padding=1, output_padding=1),
            act(),
            nn.ConvTranspose2d(h, h, 3, stride=2, padding=1, output_padding=1),
            act(),
            nn.ConvTranspose2d(h, input_dim, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.to_mean(features), self.to_log_var(features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.expand(z))

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x through a sample z ~ q(z|x) (the reparameterisation trick), from the given
        standard normal `noise` (batch x latent_dim) or from noise drawn on x's device."""
        mean, log_var = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        z = mean + noise * torch.exp(0.5 * log_var)
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


EVAL_BATCH_SIZE = 1024  # large batches for no-grad passes; the result does not depend on it beyond rounding


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N x 28 x 28), on any device, as the model's float input in [0, 1] (N x 1 x 28 x 28)."""
    x = images.unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def latent_means(
    model: VAE, images: torch.Tensor, channels_last: bool = False, advance: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Posterior means E[z|x] of uint8 `images`, in large batches; `advance(n)` hears of each batch."""
    means = []
    for batch in images.split(EVAL_BATCH_SIZE):
        means.append(model.encode(to_input(batch, channels_last))[0])
        if advance is not None:
            advance(len(batch))
    return torch.cat(means)
