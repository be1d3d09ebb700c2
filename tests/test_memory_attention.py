"""Memory-augmented attention (interp.components.memory, interp.memory): invariants, hooks,
interventions, the runner, save/load and the one-line errors. No training here (the shipped
retrieval models are tested in tests/test_memory_models.py)."""

from __future__ import annotations

import pytest
import torch

from interp import HookedTransformer, ModelConfig
from interp.errors import InterpError

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=23, n_ctx=8, positional="learned")
#: configs on which a memory that reads nothing must leave today's model bit for bit
PLAIN = {
    "mha_sdpa": {},
    "gqa_eager": dict(n_kv_heads=2, attn_kernel="eager"),
    "sinusoidal_rms": dict(positional="sinusoidal", norm="rmsnorm"),
    "attn_only": dict(attn_only=True),
}


def _pair(kind: str, extra: dict, **mem) -> tuple[HookedTransformer, HookedTransformer]:
    """A model without memory and the same weights with ``kind`` memory on layer 1."""
    base = {**BASE, **extra}
    torch.manual_seed(0)
    plain = HookedTransformer(ModelConfig(**base)).eval()
    cfg = ModelConfig(**base, memory_kind=kind, memory_layers=(1,), **mem)
    torch.manual_seed(0)
    with_mem = HookedTransformer(cfg).eval()
    missing = with_mem.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(".attn.memory." in k for k in missing)
    assert bool(missing) or kind == "xl" or mem.get("memory_joint")  # the gate, the scale
    return plain, with_mem


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("name", list(PLAIN))
def test_memory_off_is_todays_model(name: str, qk_norm: bool) -> None:
    """memory_kind=None builds no memory, no hook and no parameter: the same state dict keys,
    and the same logits bit for bit as a kNN model (cosine search or not) whose store is still
    empty (its first forward is the context alone) or whose gate is forced to 0."""
    plain, knn = _pair("knn", PLAIN[name], memory_topk=4, memory_qk_norm=qk_norm)
    assert plain.memory is None and not any("mem" in n for n in plain.hook_dict)
    t = torch.randint(0, 23, (3, 8))
    ref = plain(t)
    assert torch.equal(knn(t), ref)  # empty store: the context alone
    assert len(knn.memory) == 8
    zero = ("blocks.1.attn.hook_mem_gate", lambda g, hook: torch.zeros_like(g))
    with knn.memory.frozen():
        t2 = torch.randint(0, 23, (3, 8))
        assert torch.equal(knn.run_with_hooks(t2, fwd_hooks=[zero]), plain(t2))
        assert not torch.equal(knn(t2), plain(t2))  # the memory is read
    assert len(knn.memory) == 8  # frozen: nothing written


def test_xl_and_persistent_without_entries_equal_plain_attention() -> None:
    """An empty XL memory, and persistent slots whose scores are masked to the minimum,
    leave the context's softmax: equal to the model without memory (to float rounding, the
    joint kernel is eager)."""
    t = torch.randint(0, 23, (2, 8))
    plain, xl = _pair("xl", {}, mem_len=8)
    torch.testing.assert_close(xl(t), plain(t), rtol=0, atol=1e-5)
    plain, pers = _pair("persistent", {}, n_memory_slots=3)
    cut = ("blocks.1.attn.hook_mem_scores", lambda s, hook: torch.full_like(
        s, torch.finfo(s.dtype).min))
    torch.testing.assert_close(pers.run_with_hooks(t, fwd_hooks=[cut]), plain(t), rtol=0,
                               atol=1e-5)


def test_joint_softmax_sums_to_one_and_hooks_have_documented_shapes() -> None:
    cfg = ModelConfig(**BASE, memory_kind="xl", mem_len=8, cmem_len=4, cmem_rate=2)
    m = HookedTransformer(cfg).eval()
    for _ in range(3):
        _, cache = m.run_with_cache(torch.randint(0, 23, (2, 8)))
    mem, ctx = cache["blocks.0.attn.hook_mem_pattern"], cache["blocks.0.attn.hook_pattern"]
    assert mem.shape == (2, 4, 8, 12)  # 4 compressed + 8 recent states
    assert cache["blocks.0.attn.hook_mem_k"].shape == (2, 12, 4, 8)
    torch.testing.assert_close(mem.sum(-1) + ctx.sum(-1), torch.ones(2, 4, 8))


def test_xl_compression_is_mean_pooling_of_evicted_states() -> None:
    cfg = ModelConfig(**BASE, memory_kind="xl", mem_len=4, cmem_len=3, cmem_rate=2,
                      memory_layers=(0,))
    m = HookedTransformer(cfg).eval()
    states = []
    m.blocks[0].attn.hook_mem_k.add_hook(lambda t, hook: t)  # a hook changes nothing
    store = m.memory.stores[0]
    for _ in range(2):
        x = torch.randint(0, 23, (1, 8))
        _, cache = m.run_with_cache(x, names_filter="blocks.0.ln1.hook_normalized")
        states.append(cache["blocks.0.ln1.hook_normalized"])
    seq = torch.cat(states, 1)  # 16 states written; 4 kept, 12 evicted -> 6 pooled -> keep 3
    torch.testing.assert_close(store.states, seq[:, -4:])
    pooled = seq[:, :12].view(1, 6, 2, -1).mean(2)
    torch.testing.assert_close(store.compressed, pooled[:, -3:])


def test_knn_indices_edit_replaces_retrieved_entries_and_store_is_capped() -> None:
    cfg = ModelConfig(**BASE, memory_kind="knn", memory_topk=2, memory_size=12)
    m = HookedTransformer(cfg).eval()
    m(torch.randint(0, 23, (1, 8)))
    m(torch.randint(0, 23, (1, 8)))
    assert m.memory.stores[1].k.shape[1] == 12  # the oldest 4 dropped
    x = torch.randint(0, 23, (1, 8))
    to_first = ("blocks.1.attn.hook_mem_indices", lambda i, hook: torch.zeros_like(i))
    with m.memory.frozen():
        _, cache = m.run_with_cache(x, names_filter=lambda n: "mem" in n)
        edited = m.run_with_hooks(x, fwd_hooks=[to_first])
        plain = m(x)
    assert cache["blocks.1.attn.hook_mem_indices"].shape == (1, 4, 8, 2)
    assert cache["blocks.1.attn.hook_mem_gate"].shape == (4,)
    assert not torch.equal(edited, plain)
    bad = ("blocks.1.attn.hook_mem_indices", lambda i, hook: i + 100)
    with pytest.raises(InterpError, match="hook_mem_indices"), m.memory.frozen():
        m.run_with_hooks(x, fwd_hooks=[bad])


@pytest.mark.parametrize("kind", ["knn", "xl"])
@pytest.mark.parametrize("positional", ["rope", "relative", "alibi"])
def test_relative_position_memory_is_searched_by_content(kind: str, positional: str) -> None:
    """With RoPE, T5 or ALiBi biases the context gets its relative positions but the memory
    none (Wu et al. 2022): the kNN store holds the un-rotated hook_k and the memory scores are
    the un-rotated hook_q . hook_mem_k, no bias, so an entry matches by content, not by the
    position it had in its own segment."""
    cfg = ModelConfig(**{**BASE, "positional": positional}, memory_kind=kind,
                      memory_layers=(1,), mem_len=8)
    m = HookedTransformer(cfg).eval()
    first, nxt = torch.randint(0, 23, (1, 8)), torch.randint(0, 23, (1, 8))
    _, c0 = m.run_with_cache(first, names_filter=lambda n: n.startswith("blocks.1.attn"))
    if kind == "knn":
        assert torch.equal(m.memory.stores[1].k, c0["blocks.1.attn.hook_k"])
        if positional == "rope":
            assert not torch.equal(c0["blocks.1.attn.hook_k"], c0["blocks.1.attn.hook_rot_k"])
    with m.memory.frozen():
        _, c1 = m.run_with_cache(nxt, names_filter=lambda n: n.startswith("blocks.1.attn"))
    q, mk = c1["blocks.1.attn.hook_q"], c1["blocks.1.attn.hook_mem_k"]
    want = torch.einsum("bqhd,bkhd->bhqk", q, mk) * m.blocks[1].attn.scale
    if kind == "knn":  # the top-k entries' scores
        idx = c1["blocks.1.attn.hook_mem_indices"]
        want = want.gather(-1, idx)
    torch.testing.assert_close(c1["blocks.1.attn.hook_mem_scores"], want)


def test_memory_qk_norm_searches_and_scores_by_cosine() -> None:
    """memory_qk_norm: the store is searched by cos(q, k) and the retrieved entries scored
    cos * exp(mem_log_scale) per head, so a stored key's norm (a query-independent bias in a
    dot-product search) does not move its rank; hook_mem_k keeps the raw keys."""
    cfg = ModelConfig(**BASE, memory_kind="knn", memory_layers=(1,), memory_topk=3,
                      memory_qk_norm=True)
    m = HookedTransformer(cfg).eval()
    attn = m.blocks[1].attn
    m(torch.randint(0, 23, (1, 8)))
    x = torch.randint(0, 23, (1, 8))
    names = lambda n: n.startswith("blocks.1.attn")  # noqa: E731
    with m.memory.frozen():
        _, c = m.run_with_cache(x, names_filter=names)
        m.memory.stores[1].k = m.memory.stores[1].k * torch.linspace(0.01, 100, 8)[None, :, None,
                                                                                    None]
        _, c2 = m.run_with_cache(x, names_filter=names)
    q, mk = c["blocks.1.attn.hook_q"], c["blocks.1.attn.hook_mem_k"]
    cos = torch.einsum("bqhd,bkhd->bhqk", torch.nn.functional.normalize(q, dim=-1),
                       torch.nn.functional.normalize(mk, dim=-1))
    idx = c["blocks.1.attn.hook_mem_indices"]
    assert torch.equal(idx, cos.topk(3, dim=-1).indices)
    want = cos.gather(-1, idx) * attn.memory.mem_log_scale.exp()[None, :, None, None]
    torch.testing.assert_close(c["blocks.1.attn.hook_mem_scores"], want)
    assert torch.equal(c2["blocks.1.attn.hook_mem_indices"], idx)  # key norms do not rank
    torch.testing.assert_close(c2["blocks.1.attn.hook_mem_scores"],
                               c["blocks.1.attn.hook_mem_scores"])


@pytest.mark.parametrize("name", ["mha_sdpa", "gqa_eager"])
def test_memory_joint_is_one_softmax_over_retrieved_entries_and_context(name: str) -> None:
    """memory_joint: no gate; each query's top-k entries and the context share one softmax
    (hook_mem_pattern + hook_pattern sum to 1), an empty store leaves today's model bit for bit,
    and memory scores set to the minimum leave the context's softmax."""
    plain, joint = _pair("knn", PLAIN[name], memory_topk=3, memory_joint=True)
    assert not hasattr(joint.blocks[1].attn.memory, "gate_logit")
    assert "blocks.1.attn.hook_mem_gate" not in joint.hook_dict
    t = torch.randint(0, 23, (2, 8))
    assert torch.equal(joint(t), plain(t))  # empty store: the context alone
    t2 = torch.randint(0, 23, (2, 8))
    cut = ("blocks.1.attn.hook_mem_scores", lambda s, hook: torch.full_like(
        s, torch.finfo(s.dtype).min))
    with joint.memory.frozen():
        _, c = joint.run_with_cache(t2, names_filter=lambda n: n.startswith("blocks.1.attn"))
        torch.testing.assert_close(joint.run_with_hooks(t2, fwd_hooks=[cut]), plain(t2))
    mem, ctx = c["blocks.1.attn.hook_mem_pattern"], c["blocks.1.attn.hook_pattern"]
    assert mem.shape == (2, 4, 8, 3)
    torch.testing.assert_close(mem.sum(-1) + ctx.sum(-1), torch.ones(2, 4, 8))
    assert float(mem.sum(-1).min()) > 0  # the memory is read


def test_runner_equals_segment_loop_and_save_load_round_trips(tmp_path) -> None:
    cfg = ModelConfig(**BASE, memory_kind="knn", memory_topk=3)
    m = HookedTransformer(cfg).eval()
    t = torch.randint(0, 23, (2, 24))
    out = m.memory.run(t, 8)
    saved = m.memory.save(tmp_path / "mem.safetensors")
    m.memory.reset()
    loop = torch.cat([m(t[:, s:s + 8]) for s in range(0, 24, 8)], 1)
    assert torch.equal(out, loop)
    m.memory.load(saved)
    assert len(m.memory) == 24
    nxt = torch.randint(0, 23, (2, 8))
    with m.memory.frozen():
        a = m(nxt)
    m.memory.reset()
    m.memory.load(saved)
    assert torch.equal(m(nxt), a)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InterpError, match="not a memory file"):
        m.memory.load(tmp_path / "junk.safetensors")
    with pytest.raises(InterpError, match="reset"):
        m(torch.randint(0, 23, (5, 8)))  # the store holds 2 rows


@pytest.mark.parametrize(("fields", "needle"), [
    (dict(memory_kind="knn", architecture="encoder_decoder"), "architecture='encoder_decoder'"),
    (dict(memory_kind="xl", layer_types=("sliding", "global"), sliding_window=4),
     "sliding layers"),
    (dict(memory_kind="persistent", attn_kernel="linear"), "attn_kernel='linear'"),
    (dict(memory_kind="knn", memory_topk=9, memory_size=8), "memory_topk=9"),
    (dict(memory_kind="xl", memory_layers=(5,)), "memory_layers"),
    (dict(memory_kind="knn", soft_mask_penalty=2.0), "soft mask"),
    (dict(memory_kind="xl", memory_qk_norm=True), "memory_qk_norm"),
    (dict(memory_kind="persistent", memory_joint=True), "memory_joint"),
    (dict(memory_kind="xl", use_attn_in=True), "use_attn_in"),
    (dict(memory_kind="knn", memory_qk_norm=1), "memory_qk_norm must be True or False"),
])
def test_impossible_memory_settings_fail_in_one_line(fields: dict, needle: str) -> None:
    base = {k: v for k, v in BASE.items() if k not in fields}
    with pytest.raises(ValueError) as e:
        ModelConfig(**base, **fields)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_persistent_memory_generates_with_a_kv_cache_and_knn_refuses() -> None:
    m = HookedTransformer(ModelConfig(**BASE, memory_kind="persistent")).eval()
    t = torch.randint(0, 23, (1, 3))
    assert m.generate(t, max_new_tokens=3, do_sample=False, verbose=False).shape == (1, 6)
    knn = HookedTransformer(ModelConfig(**BASE, memory_kind="knn")).eval()
    with pytest.raises(InterpError, match="use_past_kv_cache=False"):
        knn.generate(t, max_new_tokens=2, do_sample=False, verbose=False)


def test_memory_config_round_trips() -> None:
    cfg = ModelConfig(**BASE, memory_kind="xl", memory_layers=[1], cmem_len=4)
    assert cfg.memory_layers == (1,)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_retrieval_order_kv_swaps_only_the_stored_pairs() -> None:
    """order='kv' draws the same documents as the default 'vk' with each stored pair written key
    first (as it is asked): both orders' tokens agree everywhere but the stored slots, where
    they are swapped; the labels (the value after each asked key) are identical."""
    from interp.train.tasks.retrieval import Retrieval

    vk, kv = Retrieval(), Retrieval(order="kv")
    a = vk.sample(16, torch.Generator().manual_seed(1))
    b = kv.sample(16, torch.Generator().manual_seed(1))
    assert torch.equal(a.labels, b.labels)
    n_keys = vk.params["n_keys"]
    is_key = b.tokens < n_keys  # keys are ids 0..n_keys-1, values the next n_values
    differ = a.tokens != b.tokens
    swapped = differ[:, :-1] & differ[:, 1:] & is_key[:, :-1]  # a stored kv pair at (i, i+1)
    fixed = b.tokens.clone()
    r, c = swapped.nonzero(as_tuple=True)
    fixed[r, c], fixed[r, c + 1] = b.tokens[r, c + 1], b.tokens[r, c]
    assert torch.equal(fixed, a.tokens)
    # per document: segment 0's n_pairs and n_local per later segment were stored
    p = vk.params
    assert swapped.sum(1).eq(p["n_pairs"] + p["n_local"] * (p["n_segments"] - 1)).all()
    asked = b.labels != -100  # every asked key is followed by its value, in both orders
    assert torch.equal(b.tokens[:, 1:][asked[:, :-1]], b.labels[asked])
    with pytest.raises(InterpError, match="order must be 'vk'") as e:
        Retrieval(order="qv")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("order", ["vk", "kv"])
def test_memory_analysis_target_is_the_entry_a_retrieving_head_reads(order: str) -> None:
    """analyses.memory's target per query: stored ``v k``, the stored key (whose state gets the
    value from a previous-token head); stored ``k v``, the value itself (the state whose previous
    token is the key). Checked on an untrained model: the targets depend on the documents only."""
    from analyses.memory import _Run
    from interp.model import build_model
    from interp.train.tasks.retrieval import Retrieval

    task = Retrieval(order=order)
    model = build_model(task.model_config({"d_model": 16}), tokenizer=task.tokenizer).eval()
    batch = task.eval_batch(8, torch.Generator().manual_seed(0))
    run = _Run(model, task, batch.tokens, batch.labels)
    rows, qpos, target = run.targets()
    model.memory.reset()
    assert bool((target < task.params["segment_len"]).all())  # in segment 0
    want = run.labels[rows, qpos] if order == "kv" else run.last[rows, qpos]  # value / key
    assert torch.equal(batch.tokens[rows, target], want)
