"""FLOPs against hand counts and the training formulas."""

import pytest
import torch
from torch import nn

import sparsetrain as st
from sparsetrain import training_flops_per_example
from sparsetrain.flops import flops, gmp_training_flops


def lenet300():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def test_lenet300_dense_by_hand():
    report = flops(lenet300(), torch.zeros(5, 1, 28, 28))
    assert report.weights == 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert report.bias == 300 + 100 + 10
    assert report.other == 300 + 100  # the two ReLUs
    assert report.total == report.weights + report.bias + report.other


def test_masks_count_active_weights_only():
    torch.manual_seed(0)
    model = lenet300()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.Static(model, opt, density=0.1, distribution="erk", total_steps=1)
    report = flops(model, torch.zeros(1, 1, 28, 28), sp.masks)
    assert report.weights == 2 * sum(int(m.sum()) for m in sp.masks.values())
    assert report.bias == 410


def test_convolutions_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=8, bias=False),
                          nn.AdaptiveAvgPool2d(1))
    report = flops(model, torch.zeros(2, 3, 16, 16))
    conv1 = 2 * (8 * 3 * 9) * 16 * 16
    depthwise = 2 * (8 * 1 * 9) * 6 * 6
    assert report.layers["0"].weights == conv1 and report.layers["0"].bias == 8 * 16 * 16
    assert report.layers["4"].weights == depthwise and report.layers["4"].bias == 0
    assert report.layers["1"].other == 2 * 8 * 16 * 16
    assert report.layers["3"].other == 8 * 8 * 8 * 4
    assert report.layers["5"].other == 8 * 6 * 6


def test_conv_mask():
    conv = nn.Conv2d(2, 4, 3, bias=False)
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 1] = mask[3, 1, 0, 2] = True
    model = nn.Sequential(conv)
    report = flops(model, torch.zeros(1, 2, 7, 7), {"0.weight": mask})
    assert report.weights == 2 * 2 * 5 * 5


def test_lstm_and_attention():
    lstm = nn.LSTM(6, 5, batch_first=True)
    report = flops(lstm, torch.zeros(3, 7, 6))
    assert report.weights == 2 * 7 * (4 * 5 * 6 + 4 * 5 * 5)
    assert report.bias == 7 * 2 * 4 * 5
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.zeros(1, 5, 8)
    report = flops(attention, (x, x, x))
    assert report.weights == 2 * (3 * 8 * 8 * 5 + 8 * 8 * 5)
    assert report.other == 2 * 2 * 5 * 5 * 8 + 2 * 5 * 5


def test_model_mode_is_kept_and_bad_masks():
    model = lenet300().train()
    flops(model, torch.zeros(1, 784))
    assert model.training
    with pytest.raises(ValueError, match="does not have"):
        flops(model, torch.zeros(1, 784), {"nope.weight": torch.ones(1, dtype=torch.bool)})


def test_training_formulas():
    fd, fs = 100.0, 10.0
    assert training_flops_per_example("dense", fd, fs) == 300
    assert training_flops_per_example("static", fd, fs) == 30
    assert training_flops_per_example("set", fd, fs) == 30
    assert training_flops_per_example("snfs", fd, fs) == 120
    assert training_flops_per_example("rigl", fd, fs, delta_t=100) == pytest.approx(
        (3 * 10 * 100 + 2 * 10 + 100) / 101)
    assert gmp_training_flops(fd, [1.0, 0.5, 0.1]) == pytest.approx(3 * 100 * 1.6)
    assert training_flops_per_example("gmp", fd, fs) == 30  # with the masks of the moment
    with pytest.raises(ValueError, match="unknown method 'lottery'"):
        training_flops_per_example("lottery", fd, fs)


@pytest.mark.parametrize("method,backend", st.supported_pairs())
def test_every_method_carries_its_training_flops_rule(method, backend):
    """A run's own rule equals the registry's, on every backend, from public methods only."""
    torch.manual_seed(0)
    model = lenet300()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dense = flops(model, torch.zeros(2, 784)).total
    sp = st.make_sparsifier(method, model, opt, density=0.1, total_steps=10, delta_t=5,
                            backend=backend)
    by_counts = flops(model, torch.zeros(2, 784), sp.active_counts())
    by_masks = flops(model, torch.zeros(2, 784), dict(sp.masks))
    assert by_counts.to_dict() == by_masks.to_dict()
    sparse = flops(model, torch.zeros(2, 784), sp.forward_counts())  # the sparse model's
    if sp.fixed_budget:
        assert sparse.weights == pytest.approx(2 * sum(sp.forward_counts().values()))
    # the registry's rule from the densities alone; a run counts its own sets (Top-KAST's
    # backward set from its counts), within 1%
    assert sp.training_flops_per_example(dense, sparse.total) == pytest.approx(
        training_flops_per_example(method, dense, sparse.total, delta_t=5), rel=1e-2)


def test_gpt_mini_counts_its_functional_attention_once():
    context, embed, heads = 8, 16, 4  # width 1/16: an embedding of 16 in 4 heads
    model = st.models.build_model("gpt-mini", num_classes=256, input_shape=(context,),
                                  width=0.0625)
    x = st.models.example_input("gpt-mini", (context,), 256, batch=3)
    report = flops(model, x)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert report.weights == 2 * linear * context
    # F.scaled_dot_product_attention in each block: two products and the softmax
    attention = 2 * context * context * (embed + embed) + heads * context * context
    assert [report.layers[f"blocks.{i}"].other for i in range(4)] == [attention] * 4
    # active counts shrink the weight products only
    counts = {n: p.numel() // 4 for n, p in model.named_parameters()
              if n.endswith("weight") and p.dim() == 2 and not n.startswith(("wte", "wpe"))}
    sparse = flops(model, x, counts)
    assert sparse.weights == pytest.approx(report.weights / 4)
    assert sparse.other == report.other
    # attention inside nn.MultiheadAttention is counted by its own rule, not a second time
    mha = nn.MultiheadAttention(embed, heads, batch_first=True)
    q = torch.randn(2, context, embed)
    wrapped = nn.Sequential()
    wrapped.forward = lambda x: mha(x, x, x, need_weights=False)[0]
    wrapped.add_module("mha", mha)
    assert flops(wrapped, q).layers["mha"].other == \
        2 * 2 * context * context * embed + heads * context * context


def test_declared_linear_modules_count_their_active_weights():
    """transformers' Conv1D and other module types declared with register_weight_layout: each
    active weight is one multiply-add per output row, whatever the weight's layout."""
    from sparsetrain.sparsity import targets

    class InOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))  # in x out
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x @ self.weight + self.bias

    st.register_weight_layout(InOut, ("weight",), in_dim=0)
    try:
        model = nn.Sequential(InOut())
        report = flops(model, torch.randn(2, 5, 6))  # 5 rows an example
        assert report.weights == 2 * 24 * 5 and report.bias == 4 * 5
        half = {"0.weight": 12}
        assert flops(model, torch.randn(2, 5, 6), half).weights == 2 * 12 * 5
    finally:
        targets._LAYOUTS.pop(targets._type_key(InOut))


def test_the_report_names_the_weights_it_does_not_count():
    """A module type the counting does not know, owning a 2-D weight, costs no FLOPs in the
    totals: the report says so (embeddings cost nothing by design and are not listed)."""
    from sparsetrain.sparsity import targets

    class Bilinear2(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ self.weight.t()

    model = nn.Sequential(nn.Embedding(10, 6), Bilinear2(), nn.ReLU(), nn.Linear(4, 3))
    report = flops(model, torch.randint(0, 10, (2, 5)))
    assert report.uncounted == ["1"]
    assert report.to_dict()["uncounted"] == ["1"]
    assert report.weights == 2 * 12 * 5  # the Linear only
    st.register_weight_layout(Bilinear2, ("weight",), in_dim=1)
    try:
        report = flops(model, torch.randint(0, 10, (2, 5)))
        assert report.uncounted == [] and report.weights == 2 * (12 + 24) * 5
    finally:
        targets._LAYOUTS.pop(targets._type_key(Bilinear2))


@pytest.mark.parametrize("backend", st.available_backends())
def test_zoo_models_and_sparse_layers_are_fully_counted(backend):
    model = st.models.build_model("gpt-mini", num_classes=256, input_shape=(16,), width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = st.RigL(model, opt, density=0.2, total_steps=10, backend=backend)
    report = flops(model, torch.randint(0, 256, (2, 16)), sparsifier.active_counts())
    assert report.uncounted == []
