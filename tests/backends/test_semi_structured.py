"""2:4 weights in torch's semi-structured sparse format: the pattern check and the planning on the
CPU, the conversion itself on a CUDA GPU (skipped without one)."""

import pytest
import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                       sparse_semi_structured_to_dense_cutlass)

import sparsetrain as st
from sparsetrain.backends import semi_structured as ss
from sparsetrain.backends.semi_structured import (check_two_four, semi_structured_plan,
                                                  shape_multiples, to_semi_structured)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def two_four_mask(rows, cols, seed=0):
    """A random mask with exactly 2 active in every group of 4 along the inputs."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows * cols // 4, 4, generator=g).topk(2, dim=1).indices
    return torch.zeros(rows * cols // 4, 4, dtype=torch.bool).scatter_(1, keep, True).view(
        rows, cols)


def mlp(sizes=(64, 128, 64, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def trained_two_four_mlp(sizes=(64, 128, 64, 10), steps=20):
    """An MLP trained a few steps (on the CPU, float32) with fixed 2:4 masks; its masks."""
    torch.manual_seed(0)
    model = mlp(sizes)
    masks = st.prune_at_init(model, "magnitude", 0.5, scope="layer", structure="2:4")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = st.Static(model, opt, density=0.5, masks=masks, total_steps=steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
    return model, {n: m.clone() for n, m in sparsifier.masks.items()}


# --- check_two_four ---------------------------------------------------------------------------
def test_two_four_patterns_pass():
    mask = two_four_mask(8, 16)
    check_two_four(mask)
    check_two_four(torch.randn(8, 16) * mask)
    sparser = mask.clone()
    sparser[0, :4] = False  # a group with no active weight
    sparser[1, 4:8] = torch.tensor([False, True, False, False])  # one active
    check_two_four(sparser)
    check_two_four(torch.zeros(3, 8))


def test_groups_with_more_than_two_are_named():
    w = torch.randn(4, 16) * two_four_mask(4, 16)
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    w[3, 12:16] = 1.0
    with pytest.raises(ValueError, match=r"fc1\.weight \(4, 16\) is not 2:4.*2 of 16 groups.*"
                       r"row 2, columns 4-7: 3; row 3, columns 12-15: 4.*2 rows \(2, 3\)"):
        check_two_four(w, "fc1.weight")
    with pytest.raises(ValueError, match="not 2:4"):
        check_two_four(torch.ones(2, 4, dtype=torch.bool))


def test_input_dimension_not_a_multiple_of_four_and_wrong_rank():
    with pytest.raises(ValueError, match="input dimension 6 is not a multiple of 4"):
        check_two_four(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="2-D"):
        check_two_four(torch.zeros(8))


def test_torch_packing_keeps_at_most_two_and_drops_the_rest():
    """Why the check accepts at most 2: torch's (CUTLASS) packing, pure torch and so runnable on
    the CPU, stores groups of 0, 1 or 2 non-zeros exactly and silently drops a third."""
    w = torch.randn(32, 64).half() * two_four_mask(32, 64)
    w[0, :4] = 0
    w[1, :4] = torch.tensor([0.0, 0.0, 1.5, 0.0])
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)
    w[2, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert not torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)
    with pytest.raises(ValueError, match="not 2:4"):
        check_two_four(w)


# --- planning (CPU) ---------------------------------------------------------------------------
def test_plan_from_trained_masks():
    model, masks = trained_two_four_mlp()
    for name, mask in masks.items():
        check_two_four(mask, name)
    rows, _ = shape_multiples(torch.float16)
    plan = semi_structured_plan(model, masks)
    assert plan["0.weight"] == plan["2.weight"] == "convert"  # (128, 64), (64, 128)
    assert plan["4.weight"].startswith("shape (10, 64)") and f"multiple of {rows}" in plan[
        "4.weight"]
    # without masks the pattern is the weights' zeros: the masked backend keeps them exact
    assert semi_structured_plan(model) == plan


def test_plan_reasons_and_errors():
    model = mlp()
    plan = semi_structured_plan(model)  # dense weights: not 2:4
    assert all("not 2:4" in r for r in plan.values())
    masks = {"0.weight": two_four_mask(128, 64), "2.weight": torch.ones(64, 128, dtype=bool)}
    plan = semi_structured_plan(model, masks)
    assert plan["0.weight"] == "convert" and "not 2:4" in plan["2.weight"]
    assert plan["4.weight"] == "no mask given"
    with pytest.raises(ValueError, match="masks name no parameter of the model: fc9.weight"):
        semi_structured_plan(model, {"fc9.weight": two_four_mask(4, 4)})
    with pytest.raises(ValueError, match=r"mask of 0\.weight has shape \(64, 128\)"):
        semi_structured_plan(model, {"0.weight": two_four_mask(64, 128)})
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        semi_structured_plan(model, dtype=torch.float32)


# --- to_semi_structured: errors, and its bookkeeping with a CPU stand-in for the GPU ---------
def test_without_cuda_the_error_says_what_is_needed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = mlp()
    masks = {"0.weight": two_four_mask(128, 64)}
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU with semi-structured sparse "
                       r"support, compute capability >= 8\.0.*is_available\(\) is False"):
        to_semi_structured(model, masks)
    with pytest.raises(RuntimeError, match="got device 'cpu'"):
        to_semi_structured(model, masks, device="cpu")
    with pytest.raises(ValueError, match="float16 or torch.bfloat16.*got torch.float32"):
        to_semi_structured(model, masks, dtype=torch.float32)


def cpu_pack(weight):
    """torch's CUTLASS packing run on the CPU: the tensor a GPU conversion makes, minus the GPU."""
    packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
    return SparseSemiStructuredTensorCUTLASS(weight.shape, packed=packed, meta=meta,
                                             packed_t=None, meta_t=None,
                                             compressed_swizzled_bitmask=None)


def test_conversion_bookkeeping_with_a_cpu_stand_in(monkeypatch):
    monkeypatch.setattr(ss, "require_sparse_gpu", lambda device: torch.device("cpu"))
    monkeypatch.setattr(ss, "_compress", cpu_pack)
    monkeypatch.setattr(ss, "semi_structured_class", lambda: SparseSemiStructuredTensorCUTLASS)
    torch.manual_seed(0)
    model = mlp()  # dense weights: those off the masks must not reach the converted layers
    masks = {n: two_four_mask(*p.shape, seed=i) for i, (n, p) in enumerate(
        model.named_parameters()) if n.endswith("weight")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    result = to_semi_structured(model, masks, device="cpu")
    assert result.converted == ["0.weight", "2.weight"] and list(result.dense) == ["4.weight"]
    copy = result.model
    assert not copy.training and model.training
    for i in (0, 2):
        w = copy[i].weight
        assert isinstance(w, SparseSemiStructuredTensor) and not w.requires_grad
        expected = (before[f"{i}.weight"] * masks[f"{i}.weight"]).half()
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(w.packed, w.meta), expected)
        assert copy[i].bias.dtype == torch.float16
    assert type(copy[4].weight) is nn.Parameter and copy[4].weight.dtype == torch.float16
    for n, p in model.named_parameters():  # the input model is untouched
        assert type(p) is nn.Parameter and p.dtype == torch.float32 and torch.equal(p, before[n])
    with pytest.raises(ValueError, match="no Linear weight of the model can be converted"):
        to_semi_structured(mlp(), device="cpu")


# --- on a CUDA GPU ----------------------------------------------------------------------------
def dense_reference(model, masks, dtype):
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mask in masks.items():
            ref.get_parameter(name).mul_(mask)
    return ref.to(device="cuda", dtype=dtype).eval()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_mlp_matches_the_masked_dense_model(dtype):
    model, masks = trained_two_four_mlp()
    result = to_semi_structured(model, masks, dtype=dtype)
    assert result.converted == ["0.weight", "2.weight"]
    assert all(isinstance(result.model[i].weight, SparseSemiStructuredTensor) for i in (0, 2))
    ref = dense_reference(model, masks, dtype)
    g = torch.Generator().manual_seed(2)
    tol = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.float16 else {"atol": 1e-1, "rtol": 5e-2}
    with torch.inference_mode():
        for shape in [(5, 64), (256, 64), (2, 3, 64)]:  # any batch: torch pads the activations
            x = torch.randn(*shape, generator=g).to(device="cuda", dtype=dtype)
            out = result.model(x)
            assert out.shape == (*shape[:-1], 10) and out.dtype == dtype
            torch.testing.assert_close(out, ref(x), **tol)
    assert next(model.parameters()).device.type == "cpu"  # the input model stays where it was


@cuda
def test_layers_failing_the_shape_requirements_stay_dense():
    rows, _ = shape_multiples(torch.float16)
    torch.manual_seed(0)
    # 24 outputs: not a multiple of 16 (cuSPARSELt) nor 32 (CUTLASS); nor are 24 inputs of 16/64
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 24), nn.ReLU(),
                          nn.Linear(24, 8))
    masks = {n: two_four_mask(*p.shape, seed=i) for i, (n, p) in enumerate(
        model.named_parameters()) if n.endswith("weight")}
    result = to_semi_structured(model, masks)
    assert result.converted == ["0.weight"]
    assert sorted(result.dense) == ["2.weight", "4.weight"]
    assert result.dense["2.weight"].startswith("shape (24, 128)")
    assert result.dense["4.weight"].startswith("shape (8, 24)")
    assert f"multiple of {rows}" in result.dense["2.weight"]
    assert type(result.model[2].weight) is nn.Parameter
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    ref = model.to(device="cuda", dtype=torch.float16).eval()
    x = torch.randn(16, 128, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        torch.testing.assert_close(result.model(x), ref(x), atol=2e-2, rtol=1e-2)
