"""The training step and the epoch loop: what `pipeline.train` runs every batch, and what the
benchmarks time.

Everything here stays on the device: the data order is a seeded permutation drawn there, the loss
sums and the first non-finite step are kept there, and nothing waits for the GPU until an epoch ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable

import torch

from pipeline.errors import PipelineError
from pipeline.loss_names import LOSS_NAMES
from pipeline.losses import LossParts, loss_function, vae_loss
from pipeline.model import VAE, to_input
from pipeline.params import Params, TrainParams

WARMUP_STEPS = 3  # eager steps before a CUDA graph is captured (PyTorch's guidance for whole-step capture)
STREAM_POOL_SIZE = 32  # PyTorch's streams of a device and priority, handed out round robin
_streams_held: set[tuple[int, int]] = set()  # (device, stream) of this process's live steps (own_stream)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # train.precision -> the forward pass's autocast dtype


class TrainStep:
    """One optimisation step on a batch of image indices, with the epoch's bookkeeping (the loss
    sums, the first step whose loss was not finite) kept on the device: nothing here waits for the GPU.

    With `cuda_graph` (CUDA, one process) a full batch replays one CUDA graph of the whole step
    (gather, forward, loss, backward, Adam, bookkeeping): one launch instead of about a hundred
    small kernels that the GPU would otherwise wait on Python for. The first WARMUP_STEPS full
    batches of the run are ordinary steps that set up what a capture must find in place (cuDNN's
    and cuBLAS's workspaces, Adam's state); the graph is captured once and replayed every epoch; a
    ragged last batch runs eagerly. The optimizer must be capturable (`make_optimizer`).

    Under DistributedDataParallel every rank takes every world_size-th image of each global batch
    and weights its loss by its share, so the averaged gradient is the global batch's.

    In bf16 `precision` the forward pass runs under autocast (convolutions and linear layers in
    bf16); the loss, the gradients' accumulation into fp32 weights and Adam stay fp32."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        *,
        batch_size: int,
        channels_last: bool = False,
        loss=vae_loss,
        rank: int = 0,
        world_size: int = 1,
        cuda_graph: bool = False,
        precision: str = "fp32",
        compile: bool = False,
        noise_generator: torch.Generator | None = None,
        kl_warmup_epochs: int = 0,
    ):
        device = images.device
        self.model, self.optimizer, self.images, self.loss = model, optimizer, images, loss
        self.batch_size, self.channels_last, self.rank, self.world_size = batch_size, channels_last, rank, world_size
        self.autocast = AUTOCAST_DTYPES[precision]
        self.noise_generator = noise_generator  # None: the device's default generator
        self.latent_dim = getattr(model, "module", model).config["latent_dim"]  # the model, or the one DDP wraps
        self.sums = torch.zeros(len(LOSS_NAMES), device=device)
        self.first_bad_step = torch.full((), -1, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)
        # KL warm-up: beta's factor rises linearly from 0 at the run's first step to 1 after
        # kl_warmup_epochs; counted on the device, so a CUDA graph's replay reads the step it is at.
        self.steps_per_epoch = -(-len(images) // batch_size)
        self.kl_warmup_steps = kl_warmup_epochs * self.steps_per_epoch
        self.run_steps = torch.zeros((), dtype=torch.long, device=device)  # steps since the run began
        self.uses_graph = cuda_graph and device.type == "cuda" and world_size == 1
        self.batch = torch.empty(batch_size, dtype=torch.long, device=device)  # at one address, for the graph
        self.warmup_left = WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None
        # Off the default stream: where the warm-up runs, where the graph is captured, and where the
        # step runs beside other trials; no other live step's (`own_stream`).
        self.stream = own_stream(device, self) if device.type == "cuda" else None
        # Inductor fuses the elementwise work around each convolution (bias, LeakyReLU, their
        # gradients) and the loss; a full batch is always one shape, so it compiles once (and
        # once for every step of a process: the compiled code does not depend on the instance).
        # A free function, not a bound method: the step holds it, and it must not hold the step,
        # or the step and its graph would live until the garbage collector found the cycle.
        self.compiled_losses = torch.compile(forward_losses) if compile else None

    @classmethod
    def from_params(
        cls,
        cfg: TrainParams,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        *,
        precision: str,
        compile: bool,
        rank: int = 0,
        world_size: int = 1,
        noise_generator: torch.Generator | None = None,
    ) -> TrainStep:
        """The step `train` params describe (batch size, memory format, loss, CUDA graph), with what
        the run resolved (precision, whether the forward compiles) and the process's place."""
        return cls(
            model,
            optimizer,
            images,
            batch_size=cfg.batch_size,
            channels_last=cfg.channels_last,
            loss=loss_function(cfg),
            rank=rank,
            world_size=world_size,
            cuda_graph=cfg.cuda_graph,
            precision=precision,
            compile=compile,
            noise_generator=noise_generator,
            kl_warmup_epochs=cfg.kl_warmup_epochs,
        )

    def resume_after(self, epochs: int) -> None:
        """Count the steps of `epochs` already trained (a resumed or continued run's), so beta's
        warm-up goes on where it was."""
        self.run_steps.fill_(epochs * self.steps_per_epoch)

    def kl_weight(self) -> torch.Tensor | None:
        """Beta's warm-up factor at this step (None: no warm-up, beta as it is)."""
        if not self.kl_warmup_steps:
            return None
        return (self.run_steps / self.kl_warmup_steps).clamp(max=1.0)

    def start_epoch(self) -> None:
        self.sums.zero_()
        self.first_bad_step.fill_(-1)
        self.steps.zero_()

    def __call__(self, index: torch.Tensor) -> None:
        if len(index) < self.batch_size:
            self.run(index, compiled=False)  # the ragged last batch: eager, not a second compiled shape
            return
        if not self.uses_graph:
            self.run(index)
            return
        self.batch.copy_(index)
        if self.graph is not None:
            self.graph.replay()
        elif self.warmup_left > 0:
            self.warmup_left -= 1
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self.run(self.batch)
            current.wait_stream(self.stream)
        else:
            self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients
            self.graph = torch.cuda.CUDAGraph()
            if self.noise_generator is not None:  # the default generator is registered by the capture itself
                self.graph.register_generator_state(self.noise_generator)
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.run(self.batch)
            self.graph.replay()  # capturing records the step without running it

    def run(self, index: torch.Tensor, compiled: bool = True) -> None:
        """The step itself, as plain PyTorch (the forward compiled if the step compiles and `compiled`)."""
        images = self.images[index[self.rank :: self.world_size]]
        # Drawn here, outside what is compiled, so a compiled and an eager step see the same noise.
        noise = torch.randn(
            len(images),
            self.latent_dim,
            device=images.device,
            dtype=self.autocast or torch.float32,
            generator=self.noise_generator,
        )
        forward = self.compiled_losses if compiled and self.compiled_losses else forward_losses
        parts = forward(self.model, self.loss, images, noise, self.channels_last, self.autocast, self.kl_weight())
        self.optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:  # DDP averages over ranks; weighting by each rank's share gives the global mean
            (parts.optimised * (len(images) * self.world_size / len(index))).backward()
        else:
            parts.optimised.backward()
        self.optimizer.step()
        self.sums += torch.stack(parts).detach() * len(images)
        bad = ~torch.isfinite(parts.total.detach()) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(bad, self.steps, self.first_bad_step))
        self.steps += 1
        self.run_steps += 1


def forward_losses(
    model: torch.nn.Module,
    loss: Callable[..., LossParts],
    images: torch.Tensor,
    noise: torch.Tensor,
    channels_last: bool,
    autocast: torch.dtype | None,
    kl_weight: torch.Tensor | None,
) -> LossParts:
    """The loss parts of uint8 `images`, reparameterised with `noise`: the forward pass, in the
    `autocast` dtype (None: fp32), with beta's warm-up factor `kl_weight` (None: none)."""
    x = to_input(images, channels_last)
    # No cast cache: each weight is used once per forward, and a CUDA graph must not keep a cached cast.
    with torch.autocast(x.device.type, autocast, cache_enabled=False) if autocast else contextlib.nullcontext():
        output = model(x, noise)
    warmup = {} if kl_weight is None else {"kl_weight": kl_weight}
    return loss(x, *(t.float() for t in output), **warmup)  # the loss in fp32 whatever the forward's precision


def seeded_start(params: Params, device: torch.device) -> tuple[VAE, torch.optim.Adam, torch.Generator]:
    """What a run starts from, all drawn from `seed`: the model's initial weights, its Adam, and
    the generator of each epoch's data order. A trial trained beside others starts here too."""
    torch.manual_seed(params.seed)
    model = VAE(**dataclasses.asdict(params.model)).to(device)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, params.train.learning_rate, device)
    return model, optimizer, torch.Generator(device=device).manual_seed(params.seed)


def divergence(first_bad_step: int, epoch: int, learning_rate: float) -> str | None:
    """Why the run stops, if the epoch had a step whose loss was not finite (None if it had not)."""
    if first_bad_step < 0:
        return None
    return (
        f"loss became NaN or infinite at epoch {epoch}, step {first_bad_step}; "
        f"train.learning_rate {learning_rate} may be too high"
    )


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, device: torch.device, fused: bool = True
) -> torch.optim.Adam:
    """The reference's Adam. On CUDA it keeps its step count on the GPU (`capturable`), so a CUDA
    graph can hold the update, and by default updates every weight in one fused kernel."""
    if device.type != "cuda":
        return torch.optim.Adam(model.parameters(), lr=learning_rate)
    return torch.optim.Adam(model.parameters(), lr=learning_rate, capturable=True, fused=fused)


def train_epoch(
    step: TrainStep, generator: torch.Generator, advance: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the step's images in a seeded order. Returns the mean loss parts and the first
    step whose loss was not finite (-1 if none), both still on the device. `advance(n)` hears of
    each step's n images (for a progress bar).

    Under DistributedDataParallel every rank draws the same permutation, so the batches, and the
    order the model sees the data in, are those of a single process."""
    n = len(step.images)
    order = torch.randperm(n, generator=generator, device=step.images.device)
    step.start_epoch()
    for start in range(0, n, step.batch_size):
        step(order[start : start + step.batch_size])
        if advance is not None:
            advance(min(step.batch_size, n - start))
    sums, first_bad_step = step.sums.clone(), step.first_bad_step.clone()
    if step.world_size > 1:
        torch.distributed.all_reduce(sums)
        first_bad_step = earliest_over_ranks(first_bad_step)
    return sums / n, first_bad_step


def earliest_over_ranks(first_bad_step: torch.Tensor) -> torch.Tensor:
    """The earliest of the ranks' first bad steps (-1: none on any rank)."""
    none = torch.iinfo(first_bad_step.dtype).max
    earliest = torch.where(first_bad_step < 0, none, first_bad_step)
    torch.distributed.all_reduce(earliest, torch.distributed.ReduceOp.MIN)
    return torch.where(earliest == none, -1, earliest)


def own_stream(device: torch.device, holder: object) -> torch.cuda.Stream:
    """A stream of `device` that no other live holder in this process has, nor `torch.cuda.graph`
    when given none, held until `holder` is collected. A CUDA graph is captured on its step's
    stream: cuBLAS keeps a workspace per stream and a captured GEMM keeps its address, so two graphs
    of one stream replayed at once race on it, and destroying one can free it under the other.
    PyTorch hands out streams round robin from a pool of STREAM_POOL_SIZE."""
    default = torch.cuda.graph.default_capture_stream
    for _ in range(STREAM_POOL_SIZE):
        stream = torch.cuda.Stream(device)
        held = (stream.device_index, stream.cuda_stream)
        if held not in _streams_held and (default is None or default.cuda_stream != stream.cuda_stream):
            _streams_held.add(held)
            weakref.finalize(holder, _streams_held.discard, held)
            return stream
    raise PipelineError(
        f"every CUDA stream of PyTorch's pool of {STREAM_POOL_SIZE} is held by a trial in this process: "
        "train fewer together on one GPU (--together)"
    )
