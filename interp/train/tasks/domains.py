"""The ``domains`` task: token domains mixed in one stream, labelled for MoE analyses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InterpError
from interp.tokenizers import WordTokenizer
from interp.train.tasks.base import Batch, Task, float_param, int_param, next_token_labels

__all__ = ["Domains"]

_DOMAIN_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Domains(Task):
    """Several token domains mixed in one stream, for mixture-of-experts models.

    Domain d has its own ``domain_vocab`` tokens (``a0``, ``a1``, ... for domain 0, ``b0``...
    for domain 1) and its own first-order Markov grammar over them plus ``n_shared`` shared
    tokens (``s0``...), which every domain uses but with domain-specific successors. Domains
    differ in how predictable they are: domain d's tokens have ``1 + d`` likely successors
    (domain 0 is nearly deterministic, later ones branch more). A sequence is ``[BOS]`` then
    segments of ``min_segment``..``max_segment`` tokens, each from a domain different from
    the previous one. The per-token domain label (:attr:`Batch.domain_ids`, -1 for BOS) is
    the ground truth for expert-specialisation analyses (expert x domain mutual information;
    Fedus et al. 2021; Jiang et al. 2024, "Mixtral of Experts"). Grammars come from
    ``data_seed``.
    """

    name = "domains"
    mechanism = ("MoE experts may specialise by domain; per-token domain labels are the ground "
                 "truth (Fedus et al. 2021)")
    defaults = {"n_domains": 4, "domain_vocab": 24, "n_shared": 8, "seq_len": 64, "min_segment": 8,
                "max_segment": 24, "shared_prob": 0.15, "data_seed": 0}
    model_defaults = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_experts": 8,
                      "experts_per_token": 2, "positional": "learned"}
    train_defaults = {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100,
                      "weight_decay": 0.01}

    def _validate(self) -> None:
        p = self.params
        int_param("n_domains", p["n_domains"], 2, len(_DOMAIN_LETTERS))
        int_param("domain_vocab", p["domain_vocab"], 2, 1000)
        int_param("n_shared", p["n_shared"], 0, 1000)
        int_param("seq_len", p["seq_len"], 4)
        int_param("min_segment", p["min_segment"], 1)
        int_param("max_segment", p["max_segment"], p["min_segment"])
        float_param("shared_prob", p["shared_prob"], 0.0, 0.9)
        int_param("data_seed", p["data_seed"], 0)
        if p["n_shared"] == 0 and p["shared_prob"] > 0:
            raise InterpError("Task parameter shared_prob > 0 needs n_shared > 0 shared tokens.")

    def _build_tokenizer(self) -> WordTokenizer:
        p = self.params
        words = ["<bos>"] + [f"s{i}" for i in range(p["n_shared"])]
        for d in range(p["n_domains"]):
            words += [f"{_DOMAIN_LETTERS[d]}{i}" for i in range(p["domain_vocab"])]
        tok = WordTokenizer(words)
        self._build_grammars(len(words))
        return tok

    def domain_token_ids(self, domain: int) -> list[int]:
        """Token ids of one domain's own sub-vocabulary."""
        p = self.params
        start = 1 + p["n_shared"] + domain * p["domain_vocab"]
        return list(range(start, start + p["domain_vocab"]))

    def shared_token_ids(self) -> list[int]:
        return list(range(1, 1 + self.params["n_shared"]))

    def _build_grammars(self, V: int) -> None:
        """transitions[d] [V, V]: row = current token, a distribution over the next token."""
        p = self.params
        g = torch.Generator().manual_seed(p["data_seed"])
        shared = self.shared_token_ids()
        trans = torch.zeros(p["n_domains"], V, V)
        for d in range(p["n_domains"]):
            own = self.domain_token_ids(d)
            k = min(1 + d, len(own))  # domain d: 1 + d likely successors
            for cur in own + shared:
                succ = torch.randperm(len(own), generator=g)[:k]
                w = torch.rand(k, generator=g) + 0.5
                row = torch.zeros(V)
                row[torch.tensor(own)[succ]] = w / w.sum() * (1 - p["shared_prob"])
                if shared and p["shared_prob"] > 0:
                    j = shared[int(torch.randint(len(shared), (1,), generator=g))]
                    row[j] = p["shared_prob"]
                row = 0.95 * row / row.sum()
                # a little noise: every own token reachable
                row[torch.tensor(own)] += 0.05 / len(own)
                trans[d, cur] = row
        self.transitions = trans
        self._cdf = trans.cumsum(-1)

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        p = self.params
        B, T, D = batch_size, p["seq_len"], p["n_domains"]
        # domain schedule: segment lengths, each segment's domain different from the previous
        n_seg = (T - 1) // p["min_segment"] + 1
        lengths = torch.randint(p["min_segment"], p["max_segment"] + 1, (B, n_seg),
                                generator=generator)
        shifts = torch.randint(1, D, (B, n_seg), generator=generator)
        shifts[:, 0] = torch.randint(D, (B,), generator=generator)
        seg_dom = shifts.cumsum(1) % D  # [batch, segment]
        ends = lengths.cumsum(1)  # segment s covers stream positions ends[s-1] .. ends[s]-1
        pos = torch.arange(T - 1).expand(B, -1).contiguous()
        seg = torch.searchsorted(ends, pos, right=True)  # [batch, T-1]
        dom = torch.cat([torch.full((B, 1), -1), seg_dom.gather(1, seg)], 1)
        starts = torch.zeros(B, T, dtype=torch.bool)
        starts[:, 1:] = torch.cat(
            [torch.ones(B, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)
        # tokens: a segment starts on a uniform token of its domain, then follows its grammar
        first = torch.tensor([self.domain_token_ids(d)[0] for d in range(D)])
        fresh = first[dom.clamp(min=0)] + torch.randint(p["domain_vocab"], (B, T),
                                                        generator=generator)
        u = torch.rand(B, T, generator=generator)
        cdf = self._cdf  # [domain, V, V] cumulative transition probabilities
        tokens = torch.zeros(B, T, dtype=torch.long)
        for t in range(1, T):
            row = cdf[dom[:, t], tokens[:, t - 1]]  # [batch, V]
            nxt = (row < u[:, t, None] * row[:, -1:]).sum(-1).clamp(max=row.shape[-1] - 1)
            tokens[:, t] = torch.where(starts[:, t], fresh[:, t], nxt)
        return Batch(tokens, next_token_labels(tokens), dom)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 64,
                 n_batches: int = 4) -> dict[str, float]:
        """Loss per domain and, for MoE models, expert load and its coefficient of variation.

        Load = fraction of top-k routing slots each expert receives (BOS excluded), per MoE
        layer; ``load_cv`` is the worst layer's std/mean over experts (0 = perfectly
        balanced, the Switch auxiliary loss pushes towards it; Fedus et al. 2021).
        """
        gen = torch.Generator().manual_seed(seed)
        dev = model.embed.W_E.device
        D = self.params["n_domains"]
        loss_sum, loss_n = torch.zeros(D), torch.zeros(D)
        cfg = model.cfg
        layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        counts = {i: torch.zeros(cfg.n_experts) for i in layers}
        names = [f"blocks.{i}.mlp.hook_expert_indices" for i in layers]
        for _ in range(n_batches):
            b = self.sample(batch_size, gen)
            if names:
                logits, cache = model.run_with_cache(b.tokens.to(dev),
                                                     names_filter=lambda n: n in names)
            else:
                logits, cache = model(b.tokens.to(dev)), None
            nll = F.cross_entropy(logits.float().transpose(1, 2), b.labels.to(dev).clamp(min=0),
                                  reduction="none").cpu()
            valid = (b.labels != -100) & (b.domain_ids >= 0)
            for d in range(D):
                m = valid & (b.domain_ids == d)
                loss_sum[d] += nll[m].sum()
                loss_n[d] += m.sum()
            for i in layers:
                idx = cache[f"blocks.{i}.mlp.hook_expert_indices"].cpu()[:, 1:]  # drop BOS
                counts[i] += torch.bincount(idx.reshape(-1), minlength=cfg.n_experts).float()
        out: dict[str, float] = {"loss": float(loss_sum.sum() / loss_n.sum())}
        for d in range(D):
            out[f"loss_domain_{_DOMAIN_LETTERS[d]}"] = float(loss_sum[d] / loss_n[d].clamp(min=1))
        if layers:
            cvs = []
            for i in layers:
                load = counts[i] / counts[i].sum()
                cv = float(load.std(unbiased=False) / load.mean())
                cvs.append(cv)
                out[f"load_cv_l{i}"] = cv
                out[f"load_max_l{i}"] = float(load.max())
            out["load_cv"] = max(cvs)
        return out
