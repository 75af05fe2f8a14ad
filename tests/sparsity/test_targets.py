import pytest
import torch
from torch import nn

from sparsetrain.sparsity.targets import find_targets, partition, split_dense


def names(model):
    return [t.name for t in find_targets(model)]


def test_conv_linear_weights_but_never_biases_or_norms(model):
    assert names(model) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize(
    "layer, expected",
    [
        (nn.Conv1d(4, 6, 3), ["weight"]),
        (nn.Conv3d(4, 6, 3), ["weight"]),
        (nn.Conv2d(6, 6, 3, groups=6), ["weight"]),  # depthwise
        (nn.ConvTranspose2d(4, 6, 3), ["weight"]),
        (nn.Embedding(10, 4), ["weight"]),
        (nn.LSTM(4, 6, num_layers=2, bidirectional=True),
         [f"weight_{k}_l{l}{s}" for l in range(2) for s in ("", "_reverse") for k in ("ih", "hh")]),
        (nn.GRU(4, 6), ["weight_ih_l0", "weight_hh_l0"]),
        (nn.MultiheadAttention(8, 2), ["in_proj_weight", "out_proj.weight"]),
        (nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
         ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]),
        (nn.LayerNorm(4), []),
        (nn.BatchNorm1d(4), []),
    ],
)
def test_every_supported_layer_kind(layer, expected):
    assert sorted(names(layer)) == sorted(expected)


def test_tied_weights_are_one_target():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

    assert names(Tied()) == ["embed.weight"]


def test_dense_layers_by_name_module_or_glob(model):
    targets = find_targets(model)
    sparse, dense = split_dense(targets, ["conv1", "fc*.weight"])
    assert [t.name for t in dense] == ["conv1.weight", "fc1.weight", "fc2.weight"]
    assert [t.name for t in sparse] == ["conv2.weight"]
    sparse, dense = split_dense(targets, "fc2.weight")
    assert [t.name for t in dense] == ["fc2.weight"]


def test_dense_layer_pattern_matching_nothing_is_an_error(model):
    with pytest.raises(ValueError, match="'fc3' matches none"):
        split_dense(find_targets(model), ["fc3"])


def test_nothing_to_sparsify():
    with pytest.raises(ValueError, match="no weight that sparsetrain can sparsify"):
        partition(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="nothing is left to sparsify"):
        partition(nn.Linear(3, 3), ["*"])
    with pytest.raises(TypeError):
        find_targets(torch.zeros(3))
