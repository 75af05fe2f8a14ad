"""Structures: parsing, what fits a layer (with errors that say what would), the counts they
can hold, and the structured top-k against a slow reference that sorts."""

import math

import pytest
import torch

from sparsetrain.sparsity.structure import (Structure, check_fits, count_for, matrix_positions,
                                            parse_structure, structured_top_k)

SHAPES = [(8, 16), (4, 8, 3, 3), (12, 4, 1, 1)]
STRUCTURES = ["unstructured", "2:4", "1:4", "fan-in", "block:4x4", "block:4x1", "block:2x2"]


def test_parse_and_print():
    assert parse_structure(None).kind == "unstructured"
    assert parse_structure("2:4") == Structure("n:m", n=2, m=4)
    assert parse_structure("Block:8x1") == Structure("block", rows=8, cols=1)
    assert parse_structure("fan-in").kind == "fan-in"
    for text in STRUCTURES:
        assert str(parse_structure(text)) == text
    for bad, match in [("3:2", "1 <= N < M"), ("block:1x1", "unstructured"), ("2x4", "unknown"),
                       ("dense", "unknown"), (4, "must be a string")]:
        with pytest.raises(ValueError, match=match):
            parse_structure(bad)


def test_matrix_positions_run_along_input_channels():
    assert torch.equal(matrix_positions((2, 3)), torch.arange(6).view(2, 3))
    w = torch.arange(2 * 3 * 2 * 2).view(2, 3, 2, 2)
    where = matrix_positions(tuple(w.shape))
    # row 0, kernel position (0, 0): input channels 0, 1, 2
    assert w.view(-1)[where[0, :3]].tolist() == [w[0, c, 0, 0].item() for c in range(3)]
    assert sorted(where.reshape(-1).tolist()) == list(range(w.numel()))


def test_errors_name_the_layer_and_what_fits():
    with pytest.raises(ValueError, match=r"fc3.weight \(10, 30\): 2:4 needs its 30 inputs.*"
                                         r"M = 2 would fit"):
        check_fits(parse_structure("2:4"), (10, 30), "fc3.weight")
    with pytest.raises(ValueError, match="keeps density 0.5, not 0.1"):
        check_fits(parse_structure("2:4"), (8, 16), "w", density=0.1)
    with pytest.raises(ValueError, match=r"block:4x4 does not tile it \(4 does not divide its "
                                         r"10 outputs\); blocks that tile it: block:1x2"):
        check_fits(parse_structure("block:4x4"), (10, 100), "fc3.weight")
    check_fits(parse_structure("block:4x4"), (8, 16, 3, 3), "conv")  # 16 input channels


def test_counts_the_structures_can_hold():
    assert count_for(parse_structure("2:4"), (8, 16), 13) == 64
    assert count_for(parse_structure("fan-in"), (8, 16), 13) == 16  # 2 a row
    assert count_for(parse_structure("fan-in"), (8, 16), 1) == 8  # never an empty row
    assert count_for(parse_structure("block:4x4"), (8, 16), 20) == 16
    assert count_for(parse_structure("unstructured"), (8, 16), 13) == 13


def reference(structure, scores, count, key):
    """Sorts every candidate set: obviously right, slow."""
    s = parse_structure(structure)
    where = matrix_positions(tuple(scores.shape))
    flat = scores.reshape(-1).tolist()
    rows, cols = where.shape
    order = lambda items: sorted(items, key=lambda p: (-flat[p], key[p]))  # noqa: E731
    if s.kind == "unstructured":
        return sorted(order(range(len(flat)))[:count])
    if s.kind in ("n:m", "fan-in"):
        width = s.m if s.kind == "n:m" else cols
        k = s.n if s.kind == "n:m" else count // rows
        groups = where.reshape(-1, width).tolist()
        return sorted(p for g in groups for p in order(g)[:k])
    blocks = []
    for i in range(0, rows, s.rows):
        for j in range(0, cols, s.cols):
            members = where[i:i + s.rows, j:j + s.cols].reshape(-1).tolist()
            blocks.append((-sum(flat[p] for p in members), key[members[0]], members))
    chosen = sorted(blocks)[:count // (s.rows * s.cols)]
    return sorted(p for _, _, members in chosen for p in members)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("text", STRUCTURES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_top_k_matches_the_reference(shape, text, seed):
    s = parse_structure(text)
    try:
        check_fits(s, shape)
    except ValueError:
        pytest.skip(f"{text} does not fit {shape}")
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    scores = torch.randint(0, 4, shape, generator=g).float()  # many ties
    key = torch.randperm(n, generator=g)
    count = count_for(s, shape, n // 4)
    got = structured_top_k(s, scores, count, lambda p: key[p])
    assert got.tolist() == reference(text, scores, count, key.tolist())
    assert got.numel() == count


def test_every_group_row_and_block_holds_its_exact_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 32, generator=g)
    key = torch.randperm(512, generator=g)
    for text, count in [("2:4", 256), ("fan-in", 96), ("block:4x4", 128)]:
        s = parse_structure(text)
        mask = torch.zeros(512, dtype=torch.bool)
        mask[structured_top_k(s, scores, count, lambda p: key[p])] = True
        mask = mask.view(16, 32)
        if text == "2:4":
            assert (mask.view(16, 8, 4).sum(2) == 2).all()
        elif text == "fan-in":
            assert (mask.sum(1) == 6).all()
        else:
            per_block = mask.view(4, 4, 8, 4).sum((1, 3))
            assert ((per_block == 0) | (per_block == 16)).all() and per_block.sum() == 128


def test_a_count_the_structure_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="nearest it can is 16"):
        structured_top_k(parse_structure("fan-in"), torch.zeros(8, 16), 13, lambda p: p)
