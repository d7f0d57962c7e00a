import pytest
import torch

from pipeline.losses import ACTIVE_UNIT_THRESHOLD, dataset_loss, kl_divergence, vae_loss
from pipeline.model import VAE, to_input


def test_shapes_follow_the_reference_architecture():
    model = VAE(input_dim=1, hidden_dim=64, latent_dim=2, leaky_relu=0.01)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 1]
    assert [d.stride[0] for d in deconvs] == [1, 2, 2, 1]
    assert all(c.out_channels == 64 for c in convs)
    assert all(m.negative_slope == 0.01 for m in model.modules() if isinstance(m, torch.nn.LeakyReLU))
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)

    x = torch.rand(5, 1, 28, 28)
    reconstruction, mean, log_var = model(x)
    assert reconstruction.shape == x.shape
    assert mean.shape == log_var.shape == (5, 2)
    assert model.encoder(x).shape == (5, 64 * 7 * 7)
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1


def test_latent_dim_is_configurable():
    model = VAE(latent_dim=8)
    assert model.decode(torch.zeros(3, 8)).shape == (3, 1, 28, 28)
    assert model.encode(torch.rand(3, 1, 28, 28))[0].shape == (3, 8)


def test_loss_parts_are_per_image_sums_averaged_over_the_batch():
    x = torch.rand(4, 1, 28, 28)
    reconstruction = torch.rand(4, 1, 28, 28)
    mean, log_var = torch.randn(4, 2), torch.randn(4, 2)
    parts = vae_loss(x, reconstruction, mean, log_var)

    expected_recon = ((reconstruction - x) ** 2).sum((1, 2, 3)).mean()
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    expected_kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(parts.reconstruction, expected_recon)
    torch.testing.assert_close(parts.kl, expected_kl)
    torch.testing.assert_close(parts.total, expected_recon + expected_kl)


def test_free_bits_and_the_warm_up_change_what_is_optimised_and_leave_the_reported_parts_true():
    """The floor applies to each dimension's KL averaged over the batch (Kingma et al., 2016), not
    per image; the warm-up weighs the KL by beta x its factor; kl and total stay the true ones."""
    x, reconstruction = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    mean = torch.tensor([[0.0, 2.0]] * 4)  # dimension 0 at the prior (KL 0), dimension 1 away from it (KL 2)
    mean[0, 0] = 0.4  # one image's KL in dimension 0 is 0.08: averaged over 4 images, 0.02
    log_var = torch.zeros(4, 2)
    plain = vae_loss(x, reconstruction, mean, log_var, beta=2.0)
    torch.testing.assert_close(plain.kl, torch.tensor(0.02 + 2.0))
    assert plain.optimised is plain.total, "without either, the total is optimised"

    floored = vae_loss(x, reconstruction, mean, log_var, beta=2.0, free_bits=0.5)
    for name in ("reconstruction", "kl", "total"):
        assert torch.equal(getattr(floored, name), getattr(plain, name)), f"{name} is reported as it is"
    torch.testing.assert_close(floored.optimised, plain.reconstruction + 2.0 * (0.5 + 2.0), msg="0.02 counts as 0.5")
    mean.requires_grad_(True)
    vae_loss(x, reconstruction, mean, log_var, free_bits=0.5).optimised.backward()
    assert torch.all(mean.grad[:, 0] == 0), "below the floor, the KL gives a dimension no gradient"
    assert torch.all(mean.grad[:, 1] != 0), "above it, as before"

    for weight in (0.0, 0.25, 1.0):
        warming = vae_loss(x, reconstruction, mean, log_var, beta=2.0, kl_weight=torch.tensor(weight))
        assert torch.equal(warming.total, plain.total)
        torch.testing.assert_close(warming.optimised, plain.reconstruction + 2.0 * weight * plain.kl)
    both = vae_loss(x, reconstruction, mean, log_var, beta=2.0, free_bits=0.5, kl_weight=torch.tensor(0.25))
    torch.testing.assert_close(both.optimised, plain.reconstruction + 2.0 * 0.25 * (0.5 + 2.0))


def test_loss_does_not_depend_on_batch_size():
    x, reconstruction = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    mean, log_var = torch.randn(3, 2), torch.randn(3, 2)
    single = vae_loss(x, reconstruction, mean, log_var)
    doubled = vae_loss(*(torch.cat([t, t]) for t in (x, reconstruction, mean, log_var)))
    for a, b in zip(single, doubled):
        torch.testing.assert_close(a, b)


def test_perfect_reconstruction_at_the_prior_costs_nothing():
    x = torch.rand(2, 1, 28, 28)
    parts = vae_loss(x, x.clone(), torch.zeros(2, 2), torch.zeros(2, 2))
    assert parts.reconstruction == 0 and parts.kl == 0 and parts.total == 0


def test_to_input_scales_uint8_images_to_unit_floats():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = to_input(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))


def test_dataset_loss_weights_a_ragged_last_batch_by_its_size():
    torch.manual_seed(0)
    model = VAE()
    images = torch.randint(0, 256, (1100, 28, 28), dtype=torch.uint8)  # one full eval batch and 76 more
    torch.manual_seed(1)
    result = dataset_loss(model, images)

    torch.manual_seed(1)  # the same noise, batch by batch
    with torch.no_grad():
        full, rest = (torch.stack(vae_loss(x, *model(x))) for x in (to_input(images[:1024]), to_input(images[1024:])))
    torch.testing.assert_close(result.parts, (full * 1024 + rest * 76) / 1100)
    torch.testing.assert_close(result.parts[2], result.parts[0] + result.parts[1])


def test_dataset_loss_splits_the_kl_by_latent_dimension_and_counts_the_active_ones_without_noise():
    """Each dimension's KL sums to the KL part; a dimension whose mean is the same for every image is
    not active. The latent statistics draw no random number, so a run's noise stays as it was."""
    torch.manual_seed(0)
    model = VAE(latent_dim=3)
    with torch.no_grad():  # dimensions 0 and 1 vary with the image; dimension 2's mean does not
        model.to_mean.weight[:2] *= 100
        model.to_mean.weight[2] = 0
        model.to_mean.bias[2] = 0.5
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    torch.manual_seed(1)
    result = dataset_loss(model, images, batch_size=128)
    after = torch.randn(1)
    torch.manual_seed(1)
    torch.randn(300, 3)  # exactly the noise the loss itself drew, 128 + 128 + 44 rows
    assert torch.equal(torch.randn(1), after), "only the reparameterisation noise was drawn"

    with torch.no_grad():
        mean, log_var = model.encode(to_input(images))
    torch.testing.assert_close(result.kl_per_dim, kl_divergence(mean, log_var).mean(0))
    torch.testing.assert_close(result.kl_per_dim.sum(), result.parts[1])
    assert result.active_units.item() == int((mean.var(0) > ACTIVE_UNIT_THRESHOLD).sum()) == 2


def test_importance_weighted_likelihood_tightens_the_elbo():
    import math

    from pipeline.evaluation import importance_weighted_log_likelihood

    torch.manual_seed(0)
    model = VAE().eval()
    x = torch.rand(64, 1, 28, 28)
    parts = vae_loss(x, *model(x))
    elbo = -(parts.total.item() + 0.5 * 784 * math.log(math.pi))  # the MSE loss is -log N(x; r, 1/2) up to this
    posterior = model.encode(x)
    one_sample = importance_weighted_log_likelihood(model, x, *posterior, 1, "mse").mean().item()
    many = importance_weighted_log_likelihood(model, x, *posterior, 64, "mse").mean().item()
    assert one_sample == pytest.approx(elbo, rel=0.01)  # K=1 is an unbiased estimate of the ELBO
    assert many > one_sample


def test_knn_accuracy_on_separated_and_mixed_clusters():
    from pipeline.evaluation import knn_accuracy

    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(20)
    train = centres[labels] + torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    test = centres[labels] + torch.randn(60, 2, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train, labels, test, labels, k=5) == 1.0
    assert knn_accuracy(train, labels, test, (labels + 1) % 3, k=5) == 0.0


def test_bce_and_beta_options():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        outputs = VAE()(x)
    mse, bce = vae_loss(x, *outputs), vae_loss(x, *outputs, beta=0.5, kind="bce")
    assert bce.kl.item() == mse.kl.item()
    assert bce.total.item() == pytest.approx((bce.reconstruction + 0.5 * bce.kl).item())
    expected = torch.nn.functional.binary_cross_entropy(outputs[0], x, reduction="sum") / 4
    assert bce.reconstruction.item() == pytest.approx(expected.item())


def plain_importance_weighted_log_likelihood(model, x, mean, log_var, samples: int, kind: str) -> torch.Tensor:
    """The estimate written the plain way: one sample for every image at a time, densities from
    torch.distributions."""
    import math

    from pipeline.evaluation import log_likelihood

    std = torch.exp(0.5 * log_var)
    estimates = []
    for _ in range(samples):
        z = mean + torch.randn_like(std) * std
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_posterior = torch.distributions.Normal(mean, std).log_prob(z).sum(1)
        estimates.append(log_likelihood(x, model.decode(z), kind) + log_prior - log_posterior)
    return torch.logsumexp(torch.stack(estimates), 0) - math.log(samples)


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_batched_importance_weighted_estimate_matches_the_plain_per_sample_one(kind):
    from pipeline.evaluation import importance_weighted_log_likelihood

    torch.manual_seed(0)
    model = VAE().eval()
    x = torch.rand(64, 1, 28, 28)  # 64 images x 2 latent dimensions: one draw of K x 64 is K draws of 64
    with torch.no_grad():
        posterior = model.encode(x)
        torch.manual_seed(1)
        plain = plain_importance_weighted_log_likelihood(model, x, *posterior, 10, kind)
    torch.manual_seed(1)
    decoded = []
    batched = importance_weighted_log_likelihood(model, x, *posterior, 10, kind, rows=48, advance=decoded.append)
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-4)
    assert sum(decoded) == 640 and max(decoded) == 48, "640 decodes in passes of at most 48 rows"

    model.to(memory_format=torch.channels_last)  # the layout evaluate runs in
    torch.manual_seed(1)
    x_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        importance_weighted_log_likelihood(model, x_last, *posterior, 10, kind, rows=64), plain, rtol=1e-5, atol=1e-3
    )
