"""An unmodified Hugging Face GPT-2 trained sparsely with RigL in a user's own loop: AdamW with
two parameter groups, bf16 autocast, gradient accumulation and clipping, the tied embedding as
one weight. Its Conv1D projections are sparsified; its position embeddings stay dense."""

import pytest
import torch

import sparsetrain as st

transformers = pytest.importorskip("transformers")


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def optimizer_of(model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)


def test_gpt2_trains_sparsely_in_a_users_loop():
    model = gpt2()
    opt = optimizer_of(model)
    sp = st.RigL(model, opt, density=0.1, total_steps=12, delta_t=3)
    conv1d = [n for n in sp.names if ".h." in n]
    assert len(conv1d) == 8 and "transformer.wte.weight" in sp.names
    assert "transformer.wpe.weight" not in sp.names
    assert sp.coverage.tied == {"transformer.wte.weight": ["lm_head.weight"]}
    assert sp.coverage.fraction > 0.9
    counts = sp.active_counts()
    g = torch.Generator().manual_seed(0)
    grown = 0
    for _ in range(12):
        opt.zero_grad()
        for _ in range(2):  # accumulate two micro-batches
            ids = torch.randint(0, 64, (4, 16), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / 2).backward()
        sp.clip_grad_norm_(1.0)
        before = {n: sp.active_positions(n).clone() for n in conv1d}
        sp.step()
        if sp.is_update_step(sp.step_count):
            grown += sum(int((~torch.isin(sp.active_positions(n), before[n])).sum())
                         for n in conv1d)
    assert sp.active_counts() == counts
    for name in conv1d:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert type(module).__name__ == "Conv1D"
        assert torch.count_nonzero(module.weight) <= counts[name]
    assert torch.count_nonzero(model.lm_head.weight) <= counts["transformer.wte.weight"]
    assert torch.count_nonzero(model.transformer.wpe.weight) == model.transformer.wpe.weight.numel()
    assert grown > 100  # the updates grew weights by gradient, not one or two by ties
