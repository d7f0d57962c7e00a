"""`train.precision`: which devices `auto` trains in bf16 on, the notice where bf16 is not native,
and what bf16 training does to the weights and losses (tests/test_faults.py runs it through DVC)."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipeline import device
from pipeline.device import has_native_bf16, resolve_precision
from pipeline.losses import dataset_loss
from pipeline.model import VAE
from pipeline.step import TrainStep, make_optimizer, train_epoch
from tests.synthetic import make_images
from tests.tolerances import BF16_LOSS_TOLERANCE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def lscpu_flags() -> set[str]:
    """This CPU's flags as util-linux reads them (the code reads /proc/cpuinfo)."""
    if shutil.which("lscpu") is None:
        pytest.skip("lscpu is not installed")
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    return set(next(line for line in lines if line.startswith("Flags:")).split()[1:])


def test_auto_trains_in_bf16_exactly_where_this_cpu_has_native_bf16():
    flags = lscpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert has_native_bf16(CPU) is native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    "flags, native",
    [
        ({"sse4_2", "avx", "avx2", "fma"}, False),  # AVX2 only
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, False),  # AVX-512 without its BF16 extension
        ({"avx2", "avx512f", "avx512_bf16"}, True),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, True),  # Intel Sapphire Rapids
        ({"amx_tile", "amx_bf16"}, True),
        (set(), False),  # not Linux: no flags to read
    ],
)
def test_native_bf16_on_stated_cpu_flags(flags, native):
    assert has_native_bf16(CPU, flags=flags) is native


@pytest.mark.parametrize(
    "capability, native",
    [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)],
    ids=["V100", "T4", "A100", "A10", "H100"],
)
def test_native_bf16_on_stated_gpus(capability, native):
    assert has_native_bf16(CUDA, capability=capability) is native


@pytest.mark.parametrize(
    "spec, native, used, notice",
    [
        ("fp32", True, "fp32", False),
        ("auto", True, "bf16", False),
        ("auto", False, "fp32", False),
        ("bf16", True, "bf16", False),
        ("bf16", False, "bf16", True),
    ],
)
def test_bf16_without_native_support_runs_and_says_so_once(capsys, spec, native, used, notice):
    assert resolve_precision(spec, CPU, native=native) == used
    out, err = capsys.readouterr()
    assert out == ""
    if notice:
        assert err == (
            "note: train.precision is bf16 but this CPU (no AVX512_BF16 or AMX) has no native bf16: "
            "oneDNN emulates it, and an epoch measured 7x slower than fp32 where it did "
            "(docs/performance.md); train.precision auto picks fp32\n"
        ), err
    else:
        assert err == ""


@pytest.mark.parametrize("spec", ["auto", "bf16"])
def test_an_os_without_cpu_flags_trains_auto_in_fp32_and_says_so_once(capsys, monkeypatch, tmp_path, spec):
    monkeypatch.setattr(device, "CPUINFO", tmp_path / "no-cpuinfo")  # macOS and Windows have none
    assert resolve_precision(spec, CPU) == ("fp32" if spec == "auto" else "bf16")
    notes = capsys.readouterr().err.splitlines()
    assert notes[0] == (
        "note: this OS does not tell which CPU features there are (Linux's /proc/cpuinfo), so the "
        "CPU counts as without native bf16"
    )
    assert len(notes) == (1 if spec == "auto" else 2)


def test_the_notice_is_left_to_the_first_rank(capsys):
    assert resolve_precision("bf16", CPU, native=False, quiet=True) == "bf16"
    assert capsys.readouterr().err == ""


def train(precision: str, epochs: int = 2) -> tuple[VAE, list[tuple[float, float]]]:
    """`epochs` of the pipeline's step on 600 synthetic images (480 train, 120 validation);
    the train and validation totals per epoch."""
    rng = np.random.default_rng(0)
    data = torch.from_numpy(make_images(rng.integers(0, 10, 600), rng))
    validation, images = data[:120], data[120:]
    torch.manual_seed(0)
    model = VAE().to(memory_format=torch.channels_last)
    step = TrainStep(
        model, make_optimizer(model, 5e-4, CPU), images, batch_size=32, channels_last=True, precision=precision
    )
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(epochs):
        parts, first_bad_step = train_epoch(step, generator)
        assert first_bad_step.item() == -1
        losses.append((parts[2].item(), dataset_loss(model, validation, True).parts[2].item()))
    return model, losses


def test_bf16_training_is_bit_identical_run_to_run_and_tracks_fp32():
    fp32, fp32_losses = train("fp32")
    bf16, bf16_losses = train("bf16")
    again, again_losses = train("bf16")
    assert again_losses == bf16_losses
    assert all(torch.equal(a, b) for a, b in zip(bf16.state_dict().values(), again.state_dict().values()))
    assert all(p.dtype == torch.float32 for p in bf16.parameters()), "bf16 autocasts the forward; weights stay fp32"
    assert any(not torch.equal(a, b) for a, b in zip(bf16.state_dict().values(), fp32.state_dict().values())), (
        "bf16 trained the same weights as fp32: the forward pass did not run in bf16"
    )
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=BF16_LOSS_TOLERANCE)
