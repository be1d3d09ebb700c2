"""interp.train at full size: each task develops the mechanism it documents (slow; run in CI).

Every check here measures the trained model directly (attention patterns, per-position loss,
routing counts) instead of trusting the task's own ``evaluate``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interp.train import Domains, domain_batches, knowledge_facts, train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def test_induction_heads_form():
    """Olsson et al. 2022: in-context loss on the repeated half falls, the first half stays at
    log(vocab), and a layer-1 head attends to the token after the previous occurrence."""
    model, history, _ = train("induction", seed=0, quiet=True)
    V, H = 64, 16
    g = torch.Generator().manual_seed(2024)
    # distinct x1..xn, so the previous occurrence (and the induction target) is unique
    half = torch.stack([torch.randperm(V, generator=g)[:H] for _ in range(64)]) + 1
    tokens = torch.cat([torch.zeros(64, 1, dtype=torch.long), half, half], 1)  # [BOS] x x
    logits, cache = model.run_with_cache(tokens)
    # position t predicts t+1
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    first = nll[:, 1:H].mean().item()  # predicting x2..xn in the first copy
    repeat = nll[:, H + 1:2 * H].mean().item()  # predicting x2..xn in the second copy
    assert repeat < 0.3, repeat
    assert abs(first - math.log(V)) < 0.15, (first, math.log(V))
    q = torch.arange(H + 1, 2 * H)  # query holds x_k of the second copy (k = 1..n-1)
    target = q - H + 1  # position of x_{k+1} in the first copy
    pattern = cache["pattern", 1]  # [batch, head, q, k]
    induction = pattern[:, :, q, target].mean((0, 2))
    assert induction.max() >= 0.7, induction
    prev = cache["pattern", 0][:, :, torch.arange(1, 2 * H + 1),
                               torch.arange(0, 2 * H)].mean((0, 2))
    assert prev.max() >= 0.4, prev  # the previous-token head it composes with
    assert history.loss.iloc[-1] < history.loss.iloc[0]


def test_knowledge_is_memorised():
    """At least 99% top-1 accuracy on every trained fact."""
    model, _, _ = train("knowledge", seed=0, quiet=True)
    facts = knowledge_facts(model)
    width = max(len(f.prompt_tokens) for f in facts)
    tokens = torch.full((len(facts), width), 1)  # <pad>
    for i, f in enumerate(facts):
        tokens[i, :len(f.prompt_tokens)] = torch.tensor(f.prompt_tokens)
    last = torch.tensor([len(f.prompt_tokens) - 1 for f in facts])
    with torch.no_grad():
        pred = model(tokens)[torch.arange(len(facts)), last].argmax(-1)
    accuracy = (pred == torch.tensor([f.answer for f in facts])).float().mean().item()
    assert accuracy >= 0.99, accuracy


def test_domains_moe_load_is_balanced():
    """8 experts, top-2: the Switch auxiliary loss keeps expert load CV under 0.5."""
    model, _, _ = train("domains", {"n_experts": 8, "experts_per_token": 2}, seed=0, quiet=True)
    counts = torch.zeros(model.cfg.n_layers, 8)
    names = [f"blocks.{i}.mlp.hook_expert_indices" for i in range(model.cfg.n_layers)]
    for tokens, domains in domain_batches(model, batch_size=32, n_batches=4, seed=99):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        for i, n in enumerate(names):
            idx = cache[n][domains >= 0]  # [tokens, top_k], BOS excluded
            counts[i] += torch.bincount(idx.reshape(-1), minlength=8).float()
    load = counts / counts.sum(1, keepdim=True)
    cv = load.std(1, unbiased=False) / load.mean(1)
    assert (cv < 0.5).all(), cv
    assert isinstance(Domains(), Domains)
