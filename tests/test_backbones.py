"""ResNet / VGG backbones: torchvision key format, parameter counts, output strides."""

import pytest
import torch

from segtrain.models.backbones.pretrained import load_pretrained
from segtrain.models.backbones.resnet import resnet
from segtrain.models.backbones.vgg import vgg16


def torchvision_resnet_state(depth: int) -> dict[str, torch.Tensor]:
    """A state_dict in torchvision's key format, written from its naming scheme alone."""
    layers = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    bottleneck = depth >= 50
    exp = 4 if bottleneck else 1
    g = torch.Generator().manual_seed(depth)
    state: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.01

    def bn(name, c):
        state[f"{name}.weight"] = torch.rand(c, generator=g)
        state[f"{name}.bias"] = torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = torch.randn(c, generator=g)
        state[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 1 or inplanes != planes * exp):
                conv(f"{p}.downsample.0", planes * exp, inplanes, 1)
                bn(f"{p}.downsample.1", planes * exp)
            inplanes = planes * exp
    state["fc.weight"] = torch.randn(1000, 512 * exp, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


def test_resnet101_checkpoint_in_torchvision_format_loads_strictly(tmp_path):
    state = torchvision_resnet_state(101)
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(state, path)
    net = resnet(101, output_stride=8, pretrained=str(path))
    for key in ("conv1.weight", "layer3.22.bn3.running_var", "layer4.0.downsample.0.weight"):
        assert torch.equal(net.state_dict()[key], state[key])


def test_resnet_parameter_counts_match_torchvision():
    # torchvision's published sizes: resnet18 11,689,512; resnet50 25,557,032;
    # resnet101 44,549,160 (the classifier included).
    for depth, count in ((18, 11_689_512), (50, 25_557_032), (101, 44_549_160)):
        assert sum(p.numel() for p in resnet(depth).parameters()) == count


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = torchvision_resnet_state(18)
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['fc.bias'\].*extra.weight"):
        resnet(18, pretrained=str(path))


def test_missing_and_offline_pretrained_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint not found"):
        resnet(18, pretrained=str(tmp_path / "nope.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="put it at .*resnet18-f37072fd.pth"):
        resnet(18, pretrained="http://127.0.0.1:9/models/resnet18-f37072fd.pth")


@pytest.mark.parametrize("os_, expected", [(8, 5), (16, 3), (32, 2)])
def test_resnet_output_stride(os_, expected):
    net = resnet(18, output_stride=os_)
    feats = net.forward_features(torch.randn(1, 3, 33, 33))
    assert feats["c5"].shape[-1] == expected  # ceil(33 / os)
    assert feats["c2"].shape[-1] == 9


def test_dilation_keeps_the_parameters():
    a, b = resnet(50, output_stride=32), resnet(50, output_stride=8, multi_grid=(1, 2, 4))
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]
    assert b.layer4[2].conv2.dilation == (16, 16) and b.layer3[5].conv2.dilation == (2, 2)


def torchvision_vgg16_shapes() -> dict[str, tuple]:
    """torchvision vgg16 keys: conv layers at features.{0,2,5,...}, classifier.{0,3,6}."""
    shapes, idx, cin = {}, 0, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
        if v == "M":
            idx += 1
            continue
        shapes[f"features.{idx}.weight"] = (v, cin, 3, 3)
        shapes[f"features.{idx}.bias"] = (v,)
        idx, cin = idx + 2, v
    for i, (o, n) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        shapes[f"classifier.{i}.weight"] = (o, n)
        shapes[f"classifier.{i}.bias"] = (o,)
    return shapes


def test_vgg16_keys_and_shapes_equal_torchvision_and_load_strictly():
    net = vgg16(output_stride=8)
    expected = torchvision_vgg16_shapes()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected
    state = {k: torch.full(s, 0.5) for k, s in expected.items()}
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) == 138_357_544  # torchvision vgg16


def test_vgg16_output_stride_8_keeps_conv5_dilated():
    net = vgg16(output_stride=8)
    feats = net.forward_features(torch.randn(1, 3, 64, 64))
    assert feats["c3"].shape[-1] == 8 and feats["c5"].shape[-1] == 8
    dilations = [m.dilation for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert dilations[-3:] == [(2, 2)] * 3 and dilations[:10] == [(1, 1)] * 10


def test_load_pretrained_none_is_a_no_op():
    net = resnet(18)
    assert load_pretrained(net, None) is net


@pytest.mark.parametrize("depth", [18, 50])
def test_dilated_resnet_is_the_exact_dense_version_of_the_strided_one(depth):
    # Output stride 8 with the same weights computes the stride-32 features at every
    # 4th position (DeepLab v2 Sec. 3.1: atrous convolution = dense feature extraction).
    torch.manual_seed(0)
    strided = resnet(depth, output_stride=32).eval()
    dense = resnet(depth, output_stride=8).eval()
    dense.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = strided.forward_features(x)["c5"]
        b = dense.forward_features(x)["c5"]
    torch.testing.assert_close(b[..., ::4, ::4], a, rtol=1e-3, atol=1e-4)
