"""oneDNN-prepacked linear layers on CPU (`par_demo.cpu_kernels`): the same products as the stock layers, the same
Parameters and state dict, the stock path under autograd, counted by FlopCounterMode, and off on request."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from par_demo import cpu_kernels
from par_demo.cpu_kernels import PackedLinear, PackedPatchConv, prepack

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="this torch build has no oneDNN linear op")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 39, 300])
@pytest.mark.parametrize("width", [96, 768])  # small layers take the stock product on few rows, large ones never
def test_packed_linear_computes_the_stock_product(bias, rows, width):
    torch.manual_seed(0)
    linear = nn.Linear(width, 160 if width < 768 else 768, bias=bias)
    x = torch.randn(2, rows, width)
    with torch.no_grad():
        assert torch.allclose(PackedLinear(linear)(x), linear(x), rtol=1e-4, atol=1e-4)


def test_packed_patch_conv_equals_the_convolution_on_whole_windows_and_runs_it_on_others():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(2, 14, 14))
    packed = PackedPatchConv(conv)
    windows = torch.randn(50, 3, 2, 14, 14)  # Qwen2.5-VL's patch embedding input: one window per row
    image = torch.randn(1, 3, 4, 28, 42)  # several windows: not a linear map of one window
    with torch.no_grad():
        assert torch.allclose(packed(windows), conv(windows), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed(image), conv(image))


def test_prepack_keeps_the_parameters_state_dict_and_lm_head():
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    model.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    model.lm_head = nn.Linear(8, 30, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert prepack(model) == 3
    assert isinstance(model.body[0], PackedLinear) and isinstance(model.patch, PackedPatchConv)
    assert type(model.lm_head) is nn.Linear  # one row per step, and tied to the embeddings in some models
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())


def test_packed_layers_follow_their_weights_after_an_update_a_load_or_a_cast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 768), nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(2, 14, 14)))
    x, windows = torch.randn(50, 768), torch.randn(50, 3, 2, 14, 14)
    packed = nn.Sequential(PackedLinear(model[0]), PackedPatchConv(model[1]))  # the same Parameters as `model`
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: what a merged adapter does
        assert torch.allclose(packed[0](x), model[0](x), rtol=1e-4, atol=1e-4)
        packed.load_state_dict({k: v * 0.5 for k, v in packed.state_dict().items()})
        assert torch.allclose(packed[0](x), model[0](x), rtol=1e-4, atol=1e-4)
        assert torch.allclose(packed[1](windows), model[1](windows), rtol=1e-4, atol=1e-4)
        packed.to(torch.bfloat16)  # a cast: the stock call in the new dtype
        assert packed[0](x.bfloat16()).dtype == torch.bfloat16
        assert packed[1](windows.bfloat16()).dtype == torch.bfloat16


def test_packed_layers_follow_a_merge_through_data_an_assigned_load_autocast_and_a_copy():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 768), nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(2, 14, 14)))
    x, windows = torch.randn(50, 768), torch.randn(50, 3, 2, 14, 14)
    packed = nn.Sequential(PackedLinear(model[0]), PackedPatchConv(model[1]))
    with torch.no_grad():
        packed[0](x)  # packed once
        model[0].weight.data += 0.5  # how PEFT merges an adapter: no version counter sees it
        assert torch.allclose(packed[0](x), F.linear(x, model[0].weight, model[0].bias), rtol=1e-4, atol=1e-4)
        fresh = {k: torch.randn_like(v) for k, v in packed.state_dict().items()}
        packed.load_state_dict(fresh, assign=True)  # new Parameters: the conv must not keep reading the old one
        image = torch.randn(1, 3, 4, 28, 42)  # not a whole window: the stock convolution, on the new weight
        assert torch.allclose(packed[1](image), F.conv3d(image, fresh["1.weight"], fresh["1.bias"], stride=(2, 14, 14)),
                              rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed[0](x).dtype == torch.bfloat16  # as the stock layer under autocast
        with pytest.raises(RuntimeError, match="same dtype"):  # bf16 activations: the stock layer's own message
            packed[0](x.bfloat16())
        twin = copy.deepcopy(packed)  # oneDNN's layout has no storage to copy: the copy packs again when called
        assert torch.allclose(twin[0](x), packed[0](x), rtol=1e-5, atol=1e-5)


def test_with_gradients_the_stock_linear_runs_and_backpropagates():
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    packed = PackedLinear(linear)
    x = torch.randn(4, 12, requires_grad=True)
    packed(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None
    assert torch.allclose(linear.weight.grad, F.linear(x, linear.weight, linear.bias).new_ones(4, 6).t() @ x)


def test_flop_counter_counts_a_packed_linear_as_its_matrix_product():
    linear = PackedLinear(nn.Linear(1024, 512))  # large enough for the packed op on any row count
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        linear(torch.randn(1, 10, 1024))
    assert counter.get_flop_counts()["Global"] == {torch.ops.mkldnn._linear_pointwise: 2 * 10 * 1024 * 512}


def test_a_cpu_model_is_prepacked_and_the_environment_switch_keeps_the_stock_layers(monkeypatch):
    from par_demo.models import load_model

    layers = load_model("random:llava-tiny", device="cpu").model.model.language_model.layers
    assert isinstance(layers[0].mlp.gate_proj, PackedLinear)
    monkeypatch.setenv(cpu_kernels.ENV, "stock")
    layers = load_model("random:llava-tiny", device="cpu").model.model.language_model.layers
    assert type(layers[0].mlp.gate_proj) is nn.Linear
