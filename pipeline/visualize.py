"""Stage visualize: figures of the trained model, tracked by DVC and logged to its MLflow run.

reconstructions.png  test images (top row) and their reconstructions (bottom row)
prior_samples.png    decoded draws z ~ N(0, I)
latent_space.png     test images' latent means, coloured by label
manifold.png         decoded grid over the latent plane
interpolation.png    decoded straight lines through latent space between pairs of test images
traversals.png       a row per latent dimension: that one dimension swept from -3 to 3, the others
                     held at a test image's posterior mean (any number of dimensions)
loss_curves.png      train and validation losses per epoch

A latent space of more than 2 dimensions is shown in the plane of its first two principal
components (of the test means): the scatter plots the projection, the manifold decodes the plane.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pipeline import atomic, tracking
from pipeline.data_parts import part_on
from pipeline.device import resolve_device, standard_normal
from pipeline.history import EPOCH
from pipeline.idx import CLASS_NAMES, NUM_CLASSES
from pipeline.model import VAE, latent_means, to_input
from pipeline.model_files import file_sha256, load_model
from pipeline.params import VisualizeParams, load_params
from pipeline.paths import FIGURES_DIR, MODEL_FILE, TRAIN_HISTORY
from pipeline.progress import progress
from pipeline.stage import run_stage
from pipeline.tiling import tile

INTERPOLATED_PAIRS = 6
TRAVERSAL_SPAN = 3.0  # a traversed dimension goes from -3 to 3: the prior's 3 standard deviations each way
FIGURE_COUNT = 7  # the figures `figures` draws


def save_figure(fig: Figure, path: Path) -> None:
    """PNG without a software version stamp, so the same figure is the same bytes. The figures are
    matplotlib's Figure objects, not pyplot's: no GUI backend, no global state to close."""
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})


def image_grid(images: torch.Tensor, cols: int, title: str, row_labels: list[str] | None = None):
    """One figure of the images tiled `cols` to a row, each row named by `row_labels` if given."""
    grid = tile(images.cpu(), cols)
    rows = -(-len(images) // cols)
    labelled = row_labels is not None
    fig = Figure(figsize=(max(4.0, cols * 0.6) + 0.6 * labelled, rows * 0.6 + 0.5 + 0.4 * labelled))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    if labelled:
        height = grid.shape[0] / rows
        ax.set_yticks([height * (i + 0.5) for i in range(rows)], row_labels)
        ax.set_xticks([])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    else:
        ax.axis("off")
    ax.set_title(title)
    return fig


def latent_plane(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origin and two orthonormal axes of the plane shown: the latent axes themselves in 2-D,
    otherwise the first two principal components of the means."""
    if means.shape[1] == 2:
        return torch.zeros(2, device=means.device), torch.eye(2, device=means.device)
    centre = means.mean(0)
    _, _, v = torch.linalg.svd(means - centre, full_matrices=False)
    axes = v[:2] * torch.sign(v[:2].sum(1, keepdim=True) + 1e-12)  # fix the SVD's arbitrary signs
    return centre, axes


def plot_latent_space(means: torch.Tensor, labels, origin, axes, class_names: tuple[str, ...]):
    coords = ((means - origin) @ axes.T).cpu()
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap="tab10", s=2, vmin=-0.5, vmax=9.5)
    colorbar = fig.colorbar(points, ax=ax, ticks=range(NUM_CLASSES), label="class")
    colorbar.ax.set_yticklabels(class_names)
    projected = means.shape[1] > 2
    ax.set_xlabel("principal component 1" if projected else "z[0]")
    ax.set_ylabel("principal component 2" if projected else "z[1]")
    ax.set_title("Test set in latent space (posterior means)")
    return fig


@torch.no_grad()
def manifold(model: VAE, origin, axes, size: int) -> torch.Tensor:
    """Decode a size x size grid at the standard normal's quantiles 5%..95% along each axis of the plane."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, size, device=origin.device))
    u, v = torch.meshgrid(quantiles, quantiles.flip(0), indexing="xy")
    z = origin + u.reshape(-1, 1) * axes[0] + v.reshape(-1, 1) * axes[1]
    return model.decode(z)


@torch.no_grad()
def interpolation(model: VAE, start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """Rows of `steps` decodings along the line between the latent means of start[i] and end[i]."""
    a, b = model.encode(start)[0], model.encode(end)[0]
    t = torch.linspace(0, 1, steps, device=a.device).view(1, -1, 1)
    z = a.unsqueeze(1) + t * (b - a).unsqueeze(1)
    return model.decode(z.reshape(-1, z.shape[-1]))


TRAVERSALS_TITLE = (
    f"Latent traversals of test image 0: each row sweeps one dimension\nfrom {-TRAVERSAL_SPAN:g} to "
    f"{TRAVERSAL_SPAN:g}, the others at the image's posterior mean"
)


def traversal_labels(model: VAE) -> list[str]:
    return [f"z[{i}]" for i in range(model.config["latent_dim"])]


@torch.no_grad()
def traversals(model: VAE, image: torch.Tensor, steps: int) -> torch.Tensor:
    """Decodings, a row per latent dimension i: the image's posterior mean with z[i] alone set to
    each of `steps` values from -TRAVERSAL_SPAN to TRAVERSAL_SPAN."""
    centre = model.encode(image)[0][0]
    dims = len(centre)
    z = centre.repeat(dims, steps, 1)
    each = torch.arange(dims, device=centre.device)
    z[each, :, each] = torch.linspace(-TRAVERSAL_SPAN, TRAVERSAL_SPAN, steps, device=centre.device)
    return model.decode(z.reshape(-1, dims))


def plot_loss_curves(history_file: Path):
    """One panel per loss part, train and validation, as the history names them (train_<part>); the
    optimised loss only where it differs from the total."""
    with open(history_file) as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r[EPOCH]) for r in rows]
    loss_names = [column.removeprefix("train_") for column in rows[0] if column.startswith("train_")]
    if all(r["train_optimised"] == r["train_total"] for r in rows):  # neither free bits nor a warm-up
        loss_names.remove("optimised")
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, len(loss_names))
    for ax, name in zip(axes, loss_names):
        for split in ("train", "val"):
            ax.plot(
                epochs, [float(r[f"{split}_{name}"]) for r in rows], marker="." if len(rows) < 30 else None, label=split
            )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def figures(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: VisualizeParams,
    channels_last: bool,
    class_names: tuple[str, ...],
) -> Iterator[tuple[str, Figure]]:
    """Each figure with its file name, drawn one at a time; the labels named `class_names`."""
    with torch.no_grad():
        originals = to_input(images[: cfg.num_images], channels_last)
        reconstructions = model.reconstruct(originals)
        samples = model.decode(standard_normal((cfg.num_samples, model.config["latent_dim"]), images.device))
    yield (
        "reconstructions.png",
        image_grid(
            torch.cat([originals, reconstructions]),
            cfg.num_images,
            "Test images (top) and their reconstructions (bottom)",
        ),
    )
    cols = max(1, round(cfg.num_samples**0.5))
    yield "prior_samples.png", image_grid(samples, cols, "Samples from the prior")

    means = latent_means(model, images, channels_last)
    origin, axes = latent_plane(means)
    yield "latent_space.png", plot_latent_space(means, labels.cpu(), origin, axes, class_names)
    grid = manifold(model, origin, axes, cfg.manifold_size)
    yield "manifold.png", image_grid(grid, cfg.manifold_size, "Decoded latent manifold")
    pairs = to_input(images[: 2 * INTERPOLATED_PAIRS], channels_last)
    lines = interpolation(model, pairs[0::2], pairs[1::2], cfg.interpolation_steps)
    yield (
        "interpolation.png",
        image_grid(lines, cfg.interpolation_steps, "Interpolation between test images in latent space"),
    )
    swept = traversals(model, to_input(images[:1], channels_last), cfg.interpolation_steps)
    yield "traversals.png", image_grid(swept, cfg.interpolation_steps, TRAVERSALS_TITLE, traversal_labels(model))
    yield "loss_curves.png", plot_loss_curves(TRAIN_HISTORY)


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    tracked = tracking.run_for_stage(
        tracking.connect(params.mlflow), params, "visualize", device, file_sha256(MODEL_FILE)
    )
    model = load_model(MODEL_FILE, device, params.train.channels_last)
    images, labels = part_on("test", device)
    torch.manual_seed(params.seed)  # the prior samples, drawn on the CPU
    class_names = CLASS_NAMES[params.data.dataset]
    drawn = figures(model, images, labels, params.visualize, params.train.channels_last, class_names)
    # All the figures, or the previous ones untouched.
    with atomic.atomic_dir(FIGURES_DIR) as staging, progress(FIGURE_COUNT, "visualize", "figures") as advance:
        for name, fig in drawn:
            save_figure(fig, staging / name)
            advance(1)
    tracked.log_artifacts(FIGURES_DIR, "figures")
    tracked.describe()
    tracked.finish()
    print(f"figures written to {FIGURES_DIR}/")


if __name__ == "__main__":
    run_stage(main)
