import pytest
import torch
from torch import nn

from memloc.hooks import resolve_site
from memloc.models import MODELS, ResNet9, build_model, layer_names


@pytest.mark.parametrize("name,shape", [("mlp", (40,)), ("mlp", (1, 8, 8)), ("cnn1d", (40,)), ("cnn1d", (1, 40)),
                                        ("cnn2d", (1, 8, 8)), ("cnn2d", (3, 32, 32)), ("resnet9", (3, 32, 32))])
def test_models_map_inputs_to_logits_and_name_their_layers(name, shape):
    kw = {"width": 0.125} if name == "resnet9" else {}
    model = build_model(name, shape, 7, seed=0, **kw).eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    names = layer_names(model, head=True)
    assert names[-1] != names[0] and layer_names(model) == names[:-1]
    for n in names:
        mod = resolve_site(model, n)
        assert any(True for _ in mod.parameters()), f"{n} owns no parameters"
    # together the named layers own every parameter of the model
    owned = {id(p) for n in names for p in resolve_site(model, n).parameters()}
    assert owned == {id(p) for p in model.parameters()}


def test_resnet9_matches_the_localization_literature():
    model = ResNet9((3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 8 and len(bns) == 8
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 256, 256, 128]
    assert convs[1].kernel_size == (5, 5) and convs[1].stride == (2, 2)
    fc = model.layers[8]
    assert isinstance(fc, nn.Linear) and fc.bias is None
    assert len(model.layer_names) == 9
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), 0.2 * fc(model.layers[:8](x)))


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    expect = torch.rand(1)
    torch.manual_seed(0)
    a = build_model("mlp", (10,), 3, seed=4)
    assert torch.equal(torch.rand(1), expect)
    b = build_model("mlp", (10,), 3, seed=4)
    c = build_model("mlp", (10,), 3, seed=5)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb)
    assert not torch.equal(a.layers[0].linear.weight, c.layers[0].linear.weight)


def test_unknown_model():
    with pytest.raises(ValueError, match=r"Unknown model 'vit'.*valid models are \['cnn1d'"):
        build_model("vit", (3,), 2)
    assert set(MODELS) == {"mlp", "cnn1d", "cnn2d", "resnet9"}


def test_layer_names_of_an_arbitrary_module():
    # the blocks of the outermost container; the last one is the head
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert layer_names(model, head=True) == ["0", "2"] and layer_names(model) == ["0"]


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class _UserNet(nn.Module):
    """A wrapper around the real container, user module names, a residual block, a parameter-free pool."""

    def __init__(self):
        super().__init__()
        self.net = nn.ModuleDict({"stem": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                  "res1": _Res(4), "pool": nn.AdaptiveAvgPool2d(1), "fc": nn.Linear(4, 3)})

    def forward(self, x):
        h = self.net["pool"](self.net["res1"](self.net["stem"](x)))
        return self.net["fc"](h.flatten(1))


def test_layer_names_rule_descends_a_wrapper_and_keeps_a_residual_block_whole():
    model = _UserNet()
    assert layer_names(model) == ["net.stem", "net.res1"]
    assert layer_names(model, head=True) == ["net.stem", "net.res1", "net.fc"]
    model.layer_names = ["net.res1", "net.fc"]  # the model's own choice wins
    assert layer_names(model) == ["net.res1"]
    with pytest.raises(ValueError, match="no submodule with parameters"):
        layer_names(nn.ReLU())
