"""The sliding-window loop matches MONAI's, whatever the batch, padding or fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from conftest import ThresholdNet
from tumorseg.config import InferenceConfig
from tumorseg.stages.infer import (OutOfMemoryError, plan_windows, predict_probabilities, robust_sliding_window,
                                   sliding_window)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return DynUNet(3, 2, 4, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16]).eval()


def monai(network, image, patch, overlap) -> torch.Tensor:
    return sliding_window_inference(image, patch, 1, network, overlap=overlap, mode="gaussian")


@pytest.mark.parametrize("shape, patch, overlap, per_batch", [
    ((37, 41, 29), (16, 16, 16), 0.5, 4),
    ((37, 41, 29), (16, 16, 16), 0.25, 1),
    ((12, 40, 16), (16, 16, 16), 0.5, 3),   # smaller than a window on one axis: padded
    ((16, 16, 16), (16, 16, 16), 0.5, 2),   # exactly one window
    ((50, 20, 33), (24, 16, 16), 0.6, 5),
])
def test_matches_monai_sliding_window(network, shape, patch, overlap, per_batch):
    torch.manual_seed(1)
    image = torch.randn((1, 2) + shape)
    with torch.inference_mode():
        ours = sliding_window(network, image, patch, overlap, per_batch, CPU)
        theirs = monai(network, image, patch, overlap)
    assert ours.shape == theirs.shape == (1, 4) + shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), float((ours - theirs).abs().max())


def test_window_plan_covers_every_voxel():
    plan = plan_windows((37, 41, 29), (16, 16, 16), 0.5)
    covered = np.zeros(plan.padded_shape, bool)
    for x, y, z in plan.starts:
        covered[x:x + 16, y:y + 16, z:z + 16] = True
    assert covered.all() and len(set(plan.starts)) == len(plan.starts)


class RunsOutOfMemory(torch.nn.Module):
    """Raises the device's out-of-memory error for batches larger than ``limit`` windows."""

    def __init__(self, network, limit: int) -> None:
        super().__init__()
        self.network, self.limit, self.calls = network, limit, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise OutOfMemoryError("simulated")
        return self.network(x)


def test_out_of_memory_falls_back_to_fewer_windows_per_pass(network):
    image = torch.randn((1, 2, 37, 41, 29))
    limited = RunsOutOfMemory(network, limit=2)
    with torch.inference_mode():
        result = robust_sliding_window(limited, image, (16, 16, 16), 0.5, 8, CPU)
        reference = sliding_window(network, image, (16, 16, 16), 0.5, 1, CPU)
    assert max(limited.calls) == 8 and limited.calls[-1] <= 2
    assert torch.allclose(result, reference, atol=1e-5)
    limited.calls.clear()  # a second scan of that size starts at what fitted
    with torch.inference_mode():
        again = robust_sliding_window(limited, image, (16, 16, 16), 0.5, 8, CPU)
    assert max(limited.calls) == 2
    assert torch.equal(again, result)


def test_out_of_memory_at_one_window_is_a_memory_error(network):
    with pytest.raises(MemoryError, match="one window per pass"):
        with torch.inference_mode():
            robust_sliding_window(RunsOutOfMemory(network, limit=0), torch.randn((1, 2, 20, 20, 20)), (16, 16, 16),
                                  0.5, 4, CPU)


def test_gpu_inference_benchmark_runs_on_the_cpu_and_agrees():
    """benchmarks/gpu_inference.py --small: the comparison CI can run without a GPU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_inference.py"
    result = subprocess.run([sys.executable, str(script), "--small", "--repeats", "1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("MONAI", "tumorseg"))]
    assert len(rows) == 2 and all("100.000%" in row or "99.9" in row for row in rows), result.stdout
    assert "speed-up of the fastest tumorseg row over MONAI fp32" in result.stdout


def test_compiled_network_gets_full_batches_and_the_same_logits():
    """With compile on, every pass gets the full window batch (one compilation per batch size),
    and the blended logits equal the eager network's."""
    from tumorseg.stages.infer import PreparedNetwork

    torch.manual_seed(0)
    network = DynUNet(3, 2, 4, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16])
    seen = []
    network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    image = torch.randn((1, 2, 40, 36, 28))  # 48 windows of 16^3: batches of 5 leave 3 for the last
    with torch.inference_mode():
        eager = sliding_window(PreparedNetwork(network, CPU), image, (16, 16, 16), 0.5, 5, CPU)
        eager_batches, seen[:] = list(seen), []
        # dynamo without a C++ compiler: fast in CI
        wrapped = PreparedNetwork(network, CPU, compile=True, backend="eager")
        result = sliding_window(wrapped, image, (16, 16, 16), 0.5, 5, CPU)
    assert eager_batches[-1] == 3  # the eager run's last batch is short...
    assert set(seen) == {5}  # ...the compiled run's never is
    assert not wrapped.failed
    torch.testing.assert_close(result, eager, rtol=1e-5, atol=1e-5)


def test_compiled_network_falls_back_to_eager_when_compiling_fails(network, caplog):
    from tumorseg.stages.infer import PreparedNetwork

    wrapped = PreparedNetwork(network, CPU, compile=True, backend="eager")

    def broken(x):
        raise RuntimeError("no C++ compiler")

    wrapped.compiled = broken
    x = torch.randn((2, 2, 16, 16, 16))
    with torch.inference_mode():
        out = wrapped(x)
        torch.testing.assert_close(out, network(x))
    assert wrapped.failed and "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text


def test_mirroring_undoes_each_flip_on_its_own_axes():
    """A pointwise network commutes with flips, so 8-flip averaging must give back the plain
    result exactly; a flip undone on the wrong axis would mirror part of the object."""
    image = np.zeros((1, 30, 26, 22), np.float32)
    image[0, 3:12, 4:8, 15:20] = 5.0  # off-centre and asymmetric on every axis
    image[0, 3:6, 4:20, 15:17] = 5.0
    plain, mirrored = (predict_probabilities(ThresholdNet(), image, (16, 16, 16),
                                             InferenceConfig(tta=tta, device="cpu"), CPU) for tta in (False, True))
    assert (plain.argmax(0) == 1).sum() == (image[0] > 2.5).sum()
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch, native):
    from tumorseg.errors import ConfigError
    from tumorseg.stages import infer

    monkeypatch.setattr(infer, "native_bf16_cpu", lambda: native)
    assert infer.autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert infer.autocast_dtype("auto", torch.device("cuda")) == torch.float16
    assert infer.autocast_dtype("fp32", CPU) is None and infer.autocast_dtype("fp32", torch.device("cuda")) is None
    assert infer.autocast_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 is for CUDA GPUs"):
        infer.autocast_dtype("fp16", CPU)


@pytest.mark.parametrize("precision, conv_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_window_loop_runs_the_network_in_its_precision(network, precision, conv_dtype):
    """bf16: the convolutions compute in bf16 (oneDNN), the blended logits come back in fp32 and
    give the fp32 labels on all but a few voxels."""
    from tumorseg.stages.infer import PreparedNetwork

    seen = []
    hook = network.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    torch.manual_seed(2)
    image = torch.randn((1, 2, 37, 41, 29))
    try:
        with torch.inference_mode():
            prepared = PreparedNetwork(network, CPU, precision=precision)
            result = sliding_window(prepared, image, (16, 16, 16), 0.5, 4, CPU)
            ran_in = set(seen)
            reference = sliding_window(network, image, (16, 16, 16), 0.5, 4, CPU)  # a bare module: fp32
    finally:
        hook.remove()
    assert prepared.precision == precision and ran_in == {conv_dtype}
    assert result.dtype == torch.float32
    agreement = float((result.argmax(1) == reference.argmax(1)).float().mean())
    assert agreement == 1.0 if precision == "fp32" else agreement > 0.99
    if precision == "bf16":
        assert not torch.equal(result, reference)  # it did run in bf16
