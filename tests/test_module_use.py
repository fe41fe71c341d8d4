"""A ModelNew in a user's hands: copied, saved, set, run where it cannot run, fed an input too small."""

import copy
import importlib.util
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, load_spec

from fusegen.bench import randomize_batchnorm

ROOT = Path(__file__).resolve().parent.parent
POOLED = "model Pooled(c=8)\ninput(2, 3, 14, 14)\nforward:\n    conv: conv1x1(3, c) -> bn: bn(c) -> relu -> pool: avgpool(7)\n"

TWO_KERNELS = "model Two(c=8)\ninput(2, 3, 8, 8)\nforward:\n    conv: conv3x3(3, c) -> bn: bn(c) -> relu\n    conv2: conv3x3(c, c) -> bn2: bn(c)\n"


@pytest.fixture(scope="module")
def basic_block():
    """generated/resnet_basic_block.py imported under its own name, as torch.load finds its class."""
    spec = importlib.util.spec_from_file_location("resnet_basic_block", ROOT / "generated" / "resnet_basic_block.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def small_block(module) -> torch.nn.Module:
    torch.manual_seed(0)
    model = module.ModelNew(3, 8, 1)
    randomize_batchnorm(model)
    return model.eval()


def test_deepcopy_and_torch_save_leave_cuda_graphs_behind(basic_block):
    """A CUDA graph cannot be copied or pickled (on the GPU the forward captured real ones; a lock stands
    in for one besides); the copy starts without graphs, shares no tensor with the original and computes
    what it computes."""
    model = small_block(basic_block).to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
    model.cuda_graphs[("key",)] = {0: threading.Lock()}
    model.cuda_graph_pools["lock"] = threading.Lock()
    graphs = set(model.cuda_graphs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert type(other) is type(model)
        assert other.cuda_graphs == {} and other.cuda_graph_pools == {}
        assert other.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    assert set(model.cuda_graphs) == graphs  # the original keeps its graphs


def test_activation_dtype_of_a_float32_spec_refuses_another_dtype(basic_block):
    model = small_block(basic_block)
    assert model.activation_dtype == torch.float32
    model.activation_dtype = torch.float32
    with pytest.raises(ValueError, match=r"ResNetBasicBlock's kernels store float32 between them, not torch.float16"):
        model.activation_dtype = torch.float16


def test_activation_dtype_where_no_kernel_stores_float16_refuses_it():
    model = load_spec(POOLED.replace("forward:", "activations(float16)\nforward:"), "pooled16").ModelNew()
    with pytest.raises(ValueError, match="not torch.float16; its spec has activations.float16., but the output"):
        model.activation_dtype = torch.float16


def test_activation_dtype_of_a_float16_spec_is_an_attribute():
    module = load_spec(TWO_KERNELS.replace("forward:", "activations(float16)\nforward:"), "two16")
    model = module.ModelNew()
    assert model.activation_dtype == torch.float16
    model.activation_dtype = torch.float32
    assert model.activation_dtype == torch.float32


@pytest.mark.parametrize("training", [False, True])
def test_an_input_smaller_than_the_pool_is_a_value_error(training):
    model = load_spec(POOLED, "pooled").ModelNew().to(DEVICE).train(training)
    with torch.no_grad(), pytest.raises(ValueError, match="a 7x7 pooling window does not fit in 6x6 pixels"):
        model(torch.randn(2, 3, 6, 6, device=DEVICE))


def test_on_a_cpu_without_the_interpreter_forward_says_what_to_do(tmp_path):
    """Compiled kernels and a CPU tensor (with or without a GPU): Triton would say "0 active drivers"."""
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'generated')!r})\n"
        "import resnet_basic_block\n"
        "resnet_basic_block.ModelNew(3, 8, 1).eval()(torch.randn(1, 3, 6, 6))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "RuntimeError: ModelNew runs Triton kernels: move the model and the input to a GPU, or set"
        " TRITON_INTERPRET=1 before triton is first imported to run them (slowly) on the CPU"
    )


def test_a_constructor_argument_the_spec_does_not_read_is_taken_only_at_its_default():
    """KernelBench passes every argument of the reference, positionally: ModelNew takes one its spec ignores,
    at its default; another value would build the default net, so it raises instead."""
    spec = "model Fixed(c=8, alpha=0.5, layers=[1, 2])\ninput(2, 3, 8, 8)\nforward:\n    conv: conv1x1(3, c) -> relu\n"
    module = load_spec(spec)
    assert module.ModelNew(8, 0.5, [1, 2]).conv.out_channels == 8
    assert module.ModelNew(4).conv.out_channels == 4  # c is read: it follows
    with pytest.raises(ValueError, match=r"Fixed's spec fixes alpha at 0\.5: .* got alpha=0\.25"):
        module.ModelNew(8, 0.25)
    with pytest.raises(ValueError, match=r"fixes layers at \[1, 2\]"):
        module.ModelNew(layers=[3])
