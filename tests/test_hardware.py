import pytest
import torch

from gptcore.hardware import gpu_memory_of, model_flops_utilisation, peak_flops, peak_flops_of


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA A10G", 70),
        ("Tesla T4", 65),
    ],
)
def test_known_gpus_get_their_datasheet_peak(name, tflops):
    assert peak_flops_of(name) == tflops * 1e12


def test_unknown_devices_get_no_mfu():
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilisation(1000.0, 1e9, None) is None


def test_mfu_is_achieved_over_peak():
    assert model_flops_utilisation(400_000.0, 857e6, 989e12) == pytest.approx(0.3466, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "gb"),
    [
        ("NVIDIA A100-SXM4-80GB", 80),  # CUDA's names
        ("NVIDIA A100 80GB PCIe", 80),
        ("NVIDIA A100-SXM4-40GB", 40),
        ("NVIDIA H100 NVL", 94),
        ("NVIDIA H100 80GB HBM3", 80),
        ("A100-80G", 80),  # Ray's accelerator types
        ("A100", 40),  # Ray's name for either size: the smaller
        ("A10G", 24),
        ("L40S", 48),
        ("L4", 24),
    ],
)
def test_known_gpus_get_their_memory_the_specific_variant_first(name, gb):
    assert gpu_memory_of(name) == gb * 10**9


def test_unknown_gpus_get_no_memory():
    assert gpu_memory_of("NVIDIA GeForce RTX 4090") is None
