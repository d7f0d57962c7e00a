"""The numbers researchers quote for a VAE, computed on the test images (the evaluate stage's work):

- test reconstruction, KL and total (per image, as in training);
- an importance-weighted estimate of log p(x) in nats with K samples (Burda et al., 2016): with the
  MSE loss the decoder is a Gaussian of fixed variance 1/2 per pixel, so this is a density of the
  continuous pixel values; with BCE it is a Bernoulli likelihood;
- KL per latent dimension and the number of active units (Cov_x E[z|x] above 0.01);
- k-nearest-neighbour accuracy of the test images' latent means, fitted on the training means;
- reconstruction error per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.device import standard_normal
from pipeline.idx import NUM_CLASSES
from pipeline.loss_names import LOSS_NAMES
from pipeline.losses import active_units, kl_divergence, loss_function, reconstruction_error
from pipeline.model import EVAL_BATCH_SIZE, VAE, latent_means, to_input
from pipeline.params import Params
from pipeline.progress import progress


def log_likelihood(x: torch.Tensor, reconstruction: torch.Tensor, kind: str) -> torch.Tensor:
    """log p(x|z) per image for the decoder the loss implies: for mse N(x; r, 1/2) per pixel,
    exp(-||x - r||^2) / pi^(D/2); for bce the Bernoulli likelihood."""
    normaliser = 0.5 * x[0].numel() * math.log(math.pi) if kind == "mse" else 0.0
    return -reconstruction_error(x, reconstruction, kind) - normaliser


def decode_rows(device: torch.device) -> int:
    """Latent points decoded per pass. On a CPU few: the decoder's activations then stay in cache
    (2 cores: about 4,800 decodes/s at 64 rows against 3,000 at 1,024); on a GPU, enough to fill it."""
    return 64 if device.type == "cpu" else 8192


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: VAE,
    x: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
    samples: int,
    kind: str,
    rows: int = EVAL_BATCH_SIZE,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) per image, z_k ~ q(z|x) = N(mean, exp(log_var)).

    All K x B samples are drawn in one call and decoded `rows` at a time, whatever K and B (no
    Python loop over the samples); `advance(n)` hears of each pass's n decodes."""
    noise = standard_normal((samples, *mean.shape), mean.device)
    z = mean + noise * torch.exp(0.5 * log_var)  # K x B x latent
    # log p(z) - log q(z|x), summed over the latent dimensions; the log(2 pi) terms cancel.
    log_prior_over_posterior = 0.5 * (noise.square() - z.square() + log_var).sum(-1)
    z = z.reshape(-1, z.shape[-1])
    image = torch.arange(len(z), device=z.device) % len(x)  # row k * B + b is a sample for image b
    log_px = torch.empty(len(z), device=z.device)
    for start in range(0, len(z), rows):
        chosen = slice(start, start + rows)
        log_px[chosen] = log_likelihood(x[image[chosen]], model.decode(z[chosen]), kind)
        if advance is not None:
            advance(min(rows, len(z) - start))
    return torch.logsumexp(log_px.view(samples, -1) + log_prior_over_posterior, 0) - math.log(samples)


@torch.no_grad()
def knn_accuracy(train_z, train_labels, test_z, test_labels, k: int) -> float:
    """Share of test points whose k nearest training points (Euclidean) vote for their label."""
    correct = 0
    for z, labels in zip(test_z.split(EVAL_BATCH_SIZE), test_labels.split(EVAL_BATCH_SIZE)):
        nearest = torch.cdist(z, train_z).topk(k, largest=False).indices
        votes = torch.nn.functional.one_hot(train_labels[nearest], NUM_CLASSES).sum(1)
        correct += (votes.argmax(1) == labels).sum().item()  # ties go to the lowest label
    return correct / len(test_z)


@torch.no_grad()
def evaluate(model: VAE, test_images, test_labels, train_images, train_labels, params: Params) -> dict[str, float]:
    loss = loss_function(params.train)
    cfg, kind, channels_last = params.evaluate, params.train.reconstruction, params.train.channels_last
    sums = torch.zeros(len(LOSS_NAMES), device=test_images.device)
    recon_per_image, kl_per_dim, iw, means = [], [], [], []
    rows, latent_dim = decode_rows(test_images.device), model.config["latent_dim"]
    with progress(
        len(test_images) * cfg.iw_samples, "evaluate: importance-weighted log-likelihood", "decodes"
    ) as advance:
        for batch in test_images.split(EVAL_BATCH_SIZE):
            x = to_input(batch, channels_last)
            reconstruction, mean, log_var = model(x, standard_normal((len(x), latent_dim), x.device))
            sums += torch.stack(loss(x, reconstruction, mean, log_var)) * len(x)
            recon_per_image.append(reconstruction_error(x, reconstruction, kind))
            kl_per_dim.append(kl_divergence(mean, log_var))
            iw.append(importance_weighted_log_likelihood(model, x, mean, log_var, cfg.iw_samples, kind, rows, advance))
            means.append(mean)

    metrics = {f"test_{name}": v for name, v in zip(LOSS_NAMES, (sums / len(test_images)).tolist())}
    metrics["test_log_likelihood"] = torch.cat(iw).mean().item()  # K is evaluate.iw_samples, a param
    kl_dims = torch.cat(kl_per_dim).mean(0)
    metrics |= {f"test_kl_dim{i}": v for i, v in enumerate(kl_dims.tolist())}

    test_z = torch.cat(means)
    metrics["active_units"] = int(active_units(test_z).item())
    with progress(len(train_images), "evaluate: latent means of the training images", "images") as advance:
        train_z = latent_means(model, train_images, channels_last, advance)
    metrics["test_knn_accuracy"] = knn_accuracy(  # k is evaluate.knn_neighbours
        train_z, train_labels, test_z, test_labels, cfg.knn_neighbours
    )

    errors = torch.cat(recon_per_image)
    for label in range(NUM_CLASSES):
        chosen = errors[test_labels == label]
        if len(chosen):
            metrics[f"test_reconstruction_class{label}"] = chosen.mean().item()
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
