import pytest
import torch
from torch import nn

from memloc.hooks import (SiteError, ablate, capture, hooks, neuron_dim, replace_parameters, require_eval,
                          resolve_site, scale_neurons, valid_sites)
from memloc.models import build_model


@pytest.fixture
def cnn():
    return build_model("cnn1d", (40,), 10, seed=0, channels=[8, 8, 8]).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_capture_matches_direct_computation_and_is_batch_size_invariant(cnn):
    x = torch.randn(37, 40)
    acts = capture(cnn, x, ["layers.0", "layers.1", "layers.4"], batch_size=5)
    with torch.no_grad():
        h0 = cnn.layers[0](x.unsqueeze(1))
        h1 = cnn.layers[1](h0)
        logits = cnn(x)
    assert torch.allclose(acts["layers.0"], h0, atol=1e-6) and torch.allclose(acts["layers.1"], h1, atol=1e-6)
    assert torch.allclose(acts["layers.4"], logits, atol=1e-6)
    again = capture(cnn, x, "layers.1", batch_size=64)
    assert set(again) == {"layers.1"} and torch.allclose(again["layers.1"], h1, atol=1e-6)
    flat = capture(cnn, x, "layers.1", batch_size=8, reduce=lambda a: a.mean(-1))
    assert flat["layers.1"].shape == (37, 8)


def test_misspelt_site_lists_valid_names(cnn):
    with pytest.raises(SiteError) as err:
        capture(cnn, torch.randn(2, 40), ["layers.0", "layers.9"])
    msg = str(err.value)
    assert "no site 'layers.9'" in msg and "Did you mean" in msg and "'layers.1'" in msg
    assert "Valid sites" in msg
    with pytest.raises(SiteError, match="layer.0"):
        resolve_site(cnn, "layer.0")
    assert "layers.0.conv" in valid_sites(cnn)


def test_analyses_refuse_training_mode(cnn):
    cnn.train()
    with pytest.raises(RuntimeError, match=r"evaluation mode.*Call model.eval\(\)"):
        capture(cnn, torch.randn(2, 40), "layers.0")
    assert cnn.training, "the model must not be switched silently"
    cnn.layers[1].eval()
    with pytest.raises(RuntimeError, match="training mode"):
        require_eval(cnn)


def test_ablate_zeros_exactly_the_given_neurons_and_restores(cnn):
    x = torch.randn(6, 40)
    before = _state(cnn)
    base = capture(cnn, x, ["layers.1", "layers.4"])
    with ablate(cnn, {"layers.1": [0, 3]}):
        inside = capture(cnn, x, ["layers.1", "layers.4"])
    after = capture(cnn, x, ["layers.1", "layers.4"])
    assert torch.all(inside["layers.1"][:, [0, 3]] == 0)
    keep = [i for i in range(8) if i not in (0, 3)]
    assert torch.equal(inside["layers.1"][:, keep], base["layers.1"][:, keep])
    assert not torch.allclose(inside["layers.4"], base["layers.4"])
    assert torch.equal(after["layers.4"], base["layers.4"])
    assert _same_bits(before, _state(cnn))
    with scale_neurons(cnn, [("layers.0", 2)], factor=3.0):
        tripled = capture(cnn, x, "layers.0")["layers.0"]
    assert torch.allclose(tripled[:, 2], 3 * base_l0(cnn, x)[:, 2])


def base_l0(model, x):
    return capture(model, x, "layers.0")["layers.0"]


def test_interventions_restore_on_exceptions(cnn):
    x = torch.randn(4, 40)
    before, out_before = _state(cnn), cnn(x).detach()
    new = {k: torch.randn_like(v) if v.is_floating_point() else v + 1 for k, v in cnn.state_dict().items()}
    with pytest.raises(ZeroDivisionError):
        with ablate(cnn, {"layers.0": [1]}), replace_parameters(cnn, new):
            assert not torch.equal(cnn.layers[0].conv.weight, before["layers.0.conv.weight"])
            1 / 0
    assert _same_bits(before, _state(cnn))
    assert torch.equal(cnn(x), out_before), "a hook was left behind"
    assert all(not m._forward_hooks for m in cnn.modules())


def test_replace_parameters_validates_before_writing(cnn):
    before = _state(cnn)
    bad = {"layers.0.conv.weight": torch.zeros_like(before["layers.0.conv.weight"]),
           "layers.1.conv.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"Shape mismatch for 'layers.1.conv.weight'"):
        with replace_parameters(cnn, bad):
            pass
    with pytest.raises(SiteError, match="Unknown parameter"):
        with replace_parameters(cnn, {"layers.0.conv.weigth": before["layers.0.conv.weight"]}):
            pass
    assert _same_bits(before, _state(cnn))
    # a rewind of one layer (weights and BN buffers) really changes the function, then is undone
    other = build_model("cnn1d", (40,), 10, seed=1, channels=[8, 8, 8]).eval()
    x = torch.randn(5, 40)
    with replace_parameters(cnn, {k: v for k, v in other.state_dict().items() if k.startswith("layers.0.")}):
        with torch.no_grad():
            mixed = cnn(x)
    assert not torch.allclose(mixed, cnn(x).detach())
    assert _same_bits(before, _state(cnn))


def test_neuron_index_out_of_range(cnn):
    with pytest.raises(IndexError, match="it has 8 neurons"):
        with ablate(cnn, {"layers.1": [8]}):
            cnn(torch.randn(2, 40))


def test_user_module_paths():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3)
    acts = capture(model, x, "1")
    assert torch.equal(acts["1"], torch.relu(model[0](x)).detach())
    seen = []
    with hooks(model, {"0": lambda out: seen.append(out.shape)}):
        model(x)
    assert seen == [torch.Size([4, 5])]
    assert neuron_dim(model, "1") == 1


@pytest.fixture(scope="module")
def bridge():
    pytest.importorskip("transformer_lens")
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="gelu",
               normalization_type="LN")
    return TransformerBridge.boot_native(cfg)


def test_transformer_bridge_hook_names(bridge):
    tokens = torch.randint(0, 50, (6, 8))
    with pytest.raises(RuntimeError, match="eval"):  # boot_native returns a model in training mode
        capture(bridge, tokens, "blocks.0.mlp.hook_post")
    bridge.eval()
    _, cache = bridge.run_with_cache(tokens)
    acts = capture(bridge, tokens, ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"], batch_size=4)
    assert torch.allclose(acts["blocks.0.mlp.hook_post"], cache["blocks.0.mlp.hook_post"], atol=1e-6)
    assert torch.allclose(acts["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"], atol=1e-6)
    assert neuron_dim(bridge, "blocks.0.mlp.hook_post") == -1
    with ablate(bridge, {"blocks.0.mlp.hook_post": [5, 9]}):
        zeroed = capture(bridge, tokens, "blocks.0.mlp.hook_post")["blocks.0.mlp.hook_post"]
    assert torch.all(zeroed[..., [5, 9]] == 0) and torch.equal(zeroed[..., :5], acts["blocks.0.mlp.hook_post"][..., :5])
    with pytest.raises(SiteError, match="blocks.0.mlp.hook_post"):
        resolve_site(bridge, "blocks.0.mlp.hook_pots")
