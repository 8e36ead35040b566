"""An independent oracle for every number `iclgd_lens.compare()` writes into its table.

Everything here is computed from plain HuggingFace `LlamaForCausalLM` forward passes (forward
hooks on the HF modules) and `torch.optim.SGD` on a deep copy of the HF model. Nothing of
iclgd_lens is used beyond `iclgd_lens.tasks.encode_prompts` (token ids, segments, read
positions) and `Task.render_demo` (GD's training texts): no TransformerLens, no project hooks,
metrics, GD or baselines code. Every metric is computed in float64 from the activations.

Precision: the tests pass a float64 copy of the fp32 weights, so the reference (GD included:
an fp32 deep copy stores W + dW rounded to fp32, which alone moves dW by up to 6e-5 relative)
is float64 except where HF itself computes in float32 whatever the model's dtype: RMSNorm's
normalisation, the eager attention softmax and RoPE's angles (~1e-7 relative).

Definitions (docs/metrics.md, docs/science.md, and the metric fixes being landed):

    ZSL  = the query alone;  ICL = demonstrations + query;  GD = the ZSL prompt on a deep copy
    of the model fine-tuned on the episode's demonstrations (SGD, momentum 0, batch 1, one
    epoch, prompt order, causal-LM loss of each demonstration run alone with BOS).
    Read position = the query's last token (`read_pos` of encode_prompts).
    h = self_attn output (after o_proj, before the residual add) at the read position;
    z = o_proj's input at the read position, [n_heads, d_head].

Shapes: L layers, H query heads, G kv heads (GQA: query head h reads kv head h // (H / G)),
D d_head, P positions of one prompt, d d_model, V vocabulary.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import iclgd_lens
from iclgd_lens.tasks import encode_prompts

MODEL_FOLDER = Path(iclgd_lens.__file__).parent / "models" / "tiny-llama-icl"
"""Where load_model() finds the shipped model (iclgd_lens/models/__init__.py: embedded_model_path)."""

QUERY_SEGMENT = -1  # segment id of the query's own tokens (encode_prompts' convention)
TOP_K = 10  # Shen et al.'s K for token overlap / overlap cosine
KEYS = ["metric", "comparison", "layer", "head", "episode", "query"]

# ICL updates of a score map smaller than this (max |m_ICL - m_ZSL| over the query's slots) are
# float rounding, not an update: layer 0 under RoPE, where the query's scores cannot depend on
# the demonstrations. Measured on tiny-llama-icl (k=4, float64 copy): <= 7.4e-7 at layer 0
# (HF computes RoPE's angles in float32 even in a float64 model), >= 0.27 at layers 1-3.
NO_UPDATE = 1e-4
COND_CAP = 1e4  # the largest conditioning number a row may claim (see update_cond)


def load_hf_model(folder: Path = MODEL_FOLDER) -> LlamaForCausalLM:
    """The shipped model as a plain HF LlamaForCausalLM, eager attention, fp32, eval mode."""
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path = MODEL_FOLDER):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id, (
        "oracle expects the tokenizer to prepend BOS"
    )
    return tokenizer


# ---- prompts ------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One unpadded prompt."""

    ids: list[int]  # [P]
    segments: torch.Tensor  # [P] i+1 demo i, -1 query tokens, 0 BOS / separators
    read_pos: int


def prompts(tokenizer, task, demos: Sequence, queries: Sequence, label_words: Sequence[str]) -> list[Prompt]:
    """One prompt per query, all with the same demonstrations (empty: the ZSL prompt)."""
    n = len(queries)
    enc = encode_prompts(tokenizer, task, [tuple(demos)] * n, list(queries), [tuple(label_words)] * n)
    out = []
    for b in range(n):
        length = int(enc.attention_mask[b].sum())
        out.append(
            Prompt(enc.input_ids[b, :length].tolist(), enc.segments[b, :length].clone(), int(enc.read_pos[b]))
        )
    return out


def permuted(demos: tuple, seed: int) -> tuple:
    """The other demonstration order of the icl~icl_perm baseline: random.Random(seed).shuffle
    repeated until the order differs from the prompt order (compare() uses seed = seed + 1000 + episode)."""
    rng = random.Random(seed)
    order = list(range(len(demos)))
    while order == list(range(len(demos))):
        rng.shuffle(order)
    return tuple(demos[i] for i in order)


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """First token of " " + word for every label word."""
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in label_words]


# ---- one HF forward pass --------------------------------------------------------------------------
@dataclass
class Pass:
    """What one prompt's forward pass shows, read from the HF modules (float32 as computed)."""

    prompt: Prompt
    h: torch.Tensor  # [L, d]      self_attn output[0] (after o_proj) at the read position
    z: torch.Tensor  # [L, H, D]   o_proj input at the read position, per head
    resid: torch.Tensor  # [L, d]  decoder layer output (residual stream after the block) at the read position
    q: torch.Tensor  # [L, P, H, D]  q_proj output (pre-rotary)
    q_rot: torch.Tensor  # [L, P, H, D]  post-rotary query
    k_rot: torch.Tensor  # [L, P, G, D]  post-rotary key
    v: torch.Tensor  # [L, P, G, D]  v_proj output
    probs_hf: torch.Tensor  # [L, H, P]  HF's own attention weights of the read position (self-check)
    logits: torch.Tensor  # [V] at the read position

    @property
    def read(self) -> int:
        return self.prompt.read_pos


def _dims(model) -> tuple[int, int, int, int]:
    cfg = model.config
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, d_head


def _register(model) -> tuple[dict, list]:
    """Forward hooks on every layer's modules, keeping batch row 0 of each output."""
    store: dict[str, dict[int, torch.Tensor]] = {
        n: {} for n in ("h", "probs", "o_in", "q", "k", "v", "resid")
    }
    handles = []

    def keep(name: str, layer: int, pick):
        def hook(module, args, output):
            store[name][layer] = pick(args, output).detach()

        return hook

    for l, block in enumerate(model.model.layers):
        attn = block.self_attn
        handles += [
            attn.register_forward_hook(keep("h", l, lambda a, o: o[0][0])),  # [P, d]
            attn.register_forward_hook(keep("probs", l, lambda a, o: o[1][0])),  # [H, P, P]
            attn.o_proj.register_forward_hook(keep("o_in", l, lambda a, o: a[0][0])),  # [P, H*D]
            attn.q_proj.register_forward_hook(keep("q", l, lambda a, o: o[0])),  # [P, H*D]
            attn.k_proj.register_forward_hook(keep("k", l, lambda a, o: o[0])),  # [P, G*D]
            attn.v_proj.register_forward_hook(keep("v", l, lambda a, o: o[0])),  # [P, G*D]
            block.register_forward_hook(
                keep("resid", l, lambda a, o: (o[0] if isinstance(o, tuple) else o)[0])
            ),  # [P, d]
        ]
    return store, handles


def rotary(model, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-rotary q [P, H, D] and k [P, G, D] at positions 0..P-1 (HF's own RoPE)."""
    positions = torch.arange(q.shape[0])[None]  # [1, P]
    cos, sin = model.model.rotary_emb(q, positions)  # [1, P, D]
    q_rot, k_rot = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )  # [1, H|G, P, D]
    return q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1)


@torch.no_grad()
def run_pass(model, prompt: Prompt) -> Pass:
    """The prompt alone (batch 1, no padding) through the HF model."""
    L, H, G, D = _dims(model)
    store, handles = _register(model)
    try:
        ids = torch.tensor(prompt.ids)[None]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]  # [P, V]
    finally:
        for handle in handles:
            handle.remove()
    P, r = len(prompt.ids), prompt.read_pos
    q = torch.stack([store["q"][l].view(P, H, D) for l in range(L)])
    k = torch.stack([store["k"][l].view(P, G, D) for l in range(L)])
    rot = [rotary(model, q[l], k[l]) for l in range(L)]
    return Pass(
        prompt=prompt,
        h=torch.stack([store["h"][l][r] for l in range(L)]),
        z=torch.stack([store["o_in"][l][r].view(H, D) for l in range(L)]),
        resid=torch.stack([store["resid"][l][r] for l in range(L)]),
        q=q,
        q_rot=torch.stack([qr for qr, _ in rot]),
        k_rot=torch.stack([kr for _, kr in rot]),
        v=torch.stack([store["v"][l].view(P, G, D) for l in range(L)]),
        probs_hf=torch.stack([store["probs"][l][:, r] for l in range(L)]),
        logits=logits[r].detach(),
    )


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., G, D] -> [..., H, D]: query head h reads kv head h // (H / G)."""
    return x.repeat_interleave(n_heads // x.shape[-2], dim=-2)


def read_scores(p: Pass) -> torch.Tensor:
    """Pre-softmax scores q_rot . k_rot / sqrt(D) of the read position over every key: [L, H, P] float64."""
    D = p.q.shape[-1]
    q = p.q_rot[:, p.read].double()  # [L, H, D]
    k = repeat_kv(
        p.k_rot[:, : p.read + 1].double(), q.shape[1]
    )  # [L, P', H, D] (causal: keys up to the read position)
    return torch.einsum("lhd,lphd->lhp", q, k) / math.sqrt(D)


# ---- GD: torch.optim on a deep copy ---------------------------------------------------------------
@dataclass
class GDRun:
    """A fine-tuned deep copy and what fine-tuning saw."""

    model: LlamaForCausalLM
    train_q: list[
        torch.Tensor
    ]  # per demonstration (in training order): [L, n_tokens (BOS excluded), H*D] q_proj outputs
    losses: list[float]  # per step, before the step's update
    texts: list[str]


def train_gd(hf_model, tokenizer, task, episode, projections: Sequence[str], lr: float) -> GDRun:
    """SGD (momentum 0) on the `projections` weights (e.g. ("k_proj", "v_proj")) of every
    layer: one epoch, batch 1, demonstrations in prompt order, each rendered alone with BOS,
    loss = HF's causal-LM loss (labels = input_ids: mean over the predicted tokens).
    The pre-rotary queries of every training token are recorded during the step's own forward
    pass (the weights of that moment)."""
    model = copy.deepcopy(hf_model).eval()  # dropout is 0: eval == train numerically
    model.requires_grad_(False)
    params = []
    for block in model.model.layers:
        for name in projections:
            weight = getattr(block.self_attn, name).weight
            weight.requires_grad_(True)
            params.append(weight)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0)
    L = model.config.num_hidden_layers
    train_q, losses, texts = [], [], []
    for demo in episode.demos:
        text = task.render_demo(demo, episode.label_words)
        ids = torch.tensor(tokenizer(text)["input_ids"])[None]  # [1, P], BOS first
        recorded: dict[int, torch.Tensor] = {}
        handles = [
            block.self_attn.q_proj.register_forward_hook(
                lambda m, a, o, l=l: recorded.__setitem__(l, o[0].detach().clone())
            )
            for l, block in enumerate(model.model.layers)
        ]
        try:
            loss = model(input_ids=ids, labels=ids).loss
        finally:
            for handle in handles:
                handle.remove()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_q.append(torch.stack([recorded[l][1:] for l in range(L)]))  # BOS excluded
        losses.append(float(loss.detach()))
        texts.append(text)
    model.requires_grad_(False)
    return GDRun(model, train_q, losses, texts)


# ---- metrics (float64) ------------------------------------------------------------------------------
def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last dim; 0 where either vector is zero (the project's convention)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    norm = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(
        norm > 0, dot / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(dot)
    )


def unit(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.norm(dim=-1, keepdim=True)


def simaou(h_icl, h_other, h_zsl) -> torch.Tensor:
    """cos(h_ICL - h_ZSL, h_X - h_ZSL)."""
    return cos(h_icl.double() - h_zsl.double(), h_other.double() - h_zsl.double())


def simaou_norm(h_icl, h_other, h_zsl) -> torch.Tensor:
    """cos(unit(h_ICL) - unit(h_ZSL), unit(h_X) - unit(h_ZSL)) (Dai's code)."""
    return cos(unit(h_icl) - unit(h_zsl), unit(h_other) - unit(h_zsl))


def simaou_random(h_icl, h_zsl, r) -> torch.Tensor:
    """Dai's random baseline: cos(h_ICL - h_ZSL, r)."""
    return cos(h_icl.double() - h_zsl.double(), r)


def simaou_norm_random(h_icl, h_zsl, r) -> torch.Tensor:
    """Dai's random baseline of SimAOU_norm: the normalised ICL update vs r itself."""
    return cos(unit(h_icl) - unit(h_zsl), r)


def random_update_vector(shape: Sequence[int], seed: int) -> torch.Tensor:
    """r ~ U[0, 1) from torch.Generator().manual_seed(seed), float32 as drawn, returned as float64."""
    return torch.rand(
        tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32
    ).double()


def query_map(p: Pass) -> torch.Tensor:
    """Pre-softmax scores of the read position over the query's own tokens, in order:
    [L, H, n_query_tokens]."""
    keys = (p.prompt.segments[: p.read + 1] == QUERY_SEGMENT).nonzero().squeeze(-1)
    return read_scores(p)[..., keys]


def score_scale(p: Pass) -> torch.Tensor:
    """The Cauchy-Schwarz bound |q_rot| max_j |k_rot_j| / sqrt(D) of every score of the read
    position, per query head: [L, H]. A float32 pass gets each score right to ~1e-7..1e-6 of it."""
    D = p.q.shape[-1]
    q = p.q_rot[:, p.read].double().norm(dim=-1)  # [L, H]
    k = repeat_kv(p.k_rot[:, : p.read + 1].double(), q.shape[1]).norm(dim=-1).amax(1)  # [L, H]
    return q * k / math.sqrt(D)


def map_cond(scale: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
    """Conditioning of a cosine of score maps (or of their differences) [L, H, slots]: scale / |map|, >= 1."""
    out = torch.ones_like(scale)
    for m in maps:
        out = torch.maximum(
            out, (scale / m.double().norm(dim=-1)).nan_to_num(COND_CAP, COND_CAP).clamp(1.0, COND_CAP)
        )
    return out


def moved(m_icl: torch.Tensor, m_zsl: torch.Tensor) -> torch.Tensor:
    """Whether ICL changed the map beyond float rounding: [..., slots] -> bool [...]."""
    return (m_icl - m_zsl).abs().amax(-1) > NO_UPDATE


def simam_delta(m_icl, m_other, m_zsl) -> torch.Tensor:
    """cos(m_ICL - m_ZSL, m_X - m_ZSL) per head, NaN where ICL did not move the map."""
    value = cos(m_icl - m_zsl, m_other - m_zsl)
    return torch.where(moved(m_icl, m_zsl), value, torch.full_like(value, float("nan")))


def dw_icl(p: Pass, p_zsl: Pass) -> torch.Tensor:
    """Dai's dual form of the ICL update: sum of v k_rot^T over X', the tokens the ICL prompt adds
    to the ZSL prompt (BOS + query): [L, G, D(v), D(k)]. X' is found from the two prompts' token
    ids alone: the ICL prompt is BOS, X', then the ZSL prompt's query tokens."""
    icl_ids, zsl_ids = p.prompt.ids, p_zsl.prompt.ids
    n_query = len(zsl_ids) - 1  # the ZSL prompt is BOS + the query's tokens
    assert icl_ids[0] == zsl_ids[0] and icl_ids[-n_query:] == zsl_ids[1:], "ICL prompt is not BOS, X', query"
    added = slice(1, len(icl_ids) - n_query)
    return torch.einsum("lpgv,lpgk->lgvk", p.v[:, added].double(), p.k_rot[:, added].double())


def kv_context(p: Pass) -> torch.Tensor:
    """sum of v k_rot^T over the prompt's tokens up to the read position: [L, G, D, D]."""
    n = p.read + 1
    return torch.einsum("lpgv,lpgk->lgvk", p.v[:, :n].double(), p.k_rot[:, :n].double())


def dw_gd(p_gd: Pass, p_zsl: Pass) -> torch.Tensor:
    """The GD update in the same space: sum v^GD k^GD^T - sum v k^T over the ZSL prompt's tokens:
    [L, G, D, D]."""
    return kv_context(p_gd) - kv_context(p_zsl)


def matrix_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius cosine of the last two dims."""
    return cos(a.flatten(-2), b.flatten(-2))


def act(dw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dW q per query head: dw [L, G, D, D], q [L, H, D] -> [L, H, D]."""
    return torch.einsum(
        "lhvk,lhk->lhv", dw.double().repeat_interleave(q.shape[1] // dw.shape[1], dim=1), q.double()
    )


def update_cond(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """How badly a cosine of differences is conditioned: max over the (x, ref) pairs of
    |ref| / |x - ref| along the last dim, capped at COND_CAP. A float32 forward pass gets x and
    ref each right only to ~1e-7..1e-6 |ref| (relative), so x - ref, and any cosine of it, only to
    that times this number (an update that is 0.4% of |h| turns 1e-6 into 2.5e-4)."""
    out = None
    for x, ref in pairs:
        x, ref = x.double(), ref.double()
        c = (ref.norm(dim=-1) / (x - ref).norm(dim=-1)).nan_to_num(COND_CAP, COND_CAP).clamp(1.0, COND_CAP)
        out = c if out is None else torch.maximum(out, c)
    return out


def kendall_icl_side(p_icl: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """(a): the ICL read position's pre-softmax scores over the demonstration tokens (prompt
    order), summed over query heads, softmaxed over those tokens: ([L, n] float64, demo id per token [n])."""
    seg = p_icl.prompt.segments[: p_icl.read + 1]
    demo = (seg > 0).nonzero().squeeze(-1)
    summed = read_scores(p_icl)[..., demo].sum(1)  # [L, n]
    return torch.softmax(summed, -1), seg[demo] - 1


def kendall_gd_side(p_gd: Pass, gd: GDRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(b): the GD model's pre-rotary query at the ZSL read position (heads concatenated, / sqrt(D))
    dotted with the training tokens' pre-rotary queries (/ sqrt(D)), softmaxed over those tokens:
    ([L, n] float64, demo id per token [n])."""
    L, P, H, D = p_gd.q.shape
    q_read = p_gd.q[:, p_gd.read].reshape(L, H * D).double() / math.sqrt(D)  # [L, H*D]
    q_train = torch.cat(gd.train_q, 1).double() / math.sqrt(D)  # [L, n, H*D]
    ids = torch.cat([torch.full((t.shape[1],), i) for i, t in enumerate(gd.train_q)])
    p = torch.softmax(torch.einsum("le,lne->ln", q_read, q_train), -1)
    return torch.stack([same_rows_same_value(p[layer], q_train[layer]) for layer in range(L)]), ids


def same_rows_same_value(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values [..., n] computed from rows [n, x]: where two rows are the same vector (the same token at
    layer 0) their values are equal by definition, so each takes the first such row's value. The
    oracle's float64 passes can round the same token's rows apart in their last bits (each
    demonstration is its own pass), so "the same" is within 1e-12 of the row's size, far below any
    real difference (a GD step moves a query by ~1e-3), far above float64's rounding (~1e-16)."""

    def same(i: int, j: int) -> bool:
        return bool((rows[i] - rows[j]).abs().max() <= 1e-12 * rows[j].abs().max())

    first = [next(i for i in range(j + 1) if same(i, j)) for j in range(len(rows))]
    return values[..., first]


def kendall_per_head_sides(p_icl: Pass, p_gd: Pass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-head variant (not Dai's): per query head, ICL's post-softmax attention of the read
    position on the demonstration tokens, and the raw dot products of the GD model's pre-rotary
    query at the ZSL read position with the pre-rotary queries of the same demonstration tokens
    in the ICL pass. -> (attention [L, H, n], dots [L, H, n], demo id per token [n])."""
    seg = p_icl.prompt.segments[: p_icl.read + 1]
    demo = (seg > 0).nonzero().squeeze(-1)
    attention = torch.softmax(read_scores(p_icl), -1)[..., demo]  # [L, H, n]
    q_demo = p_icl.q[:, demo].double()  # [L, n, H, D]
    dots = torch.einsum("lhd,lnhd->lhn", p_gd.q[:, p_gd.read].double(), q_demo)
    dots = torch.stack(
        [
            torch.stack([same_rows_same_value(dots[l, h], q_demo[l, :, h]) for h in range(dots.shape[1])])
            for l in range(dots.shape[0])
        ]
    )
    return attention, dots, seg[demo] - 1


def kendalltau(a, b) -> float:
    """Kendall's tau-b (scipy's variant) from its definition, pair by pair: sum sgn(a_i - a_j)
    sgn(b_i - b_j) / sqrt(untied pairs of a x untied pairs of b), exact ties; NaN where either
    side has no untied pair (tests/test_oracle.py checks it against scipy)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")

    def sign(x, i, j) -> int:
        d = x[i] - x[j]
        return 0 if d == 0 else (1 if d > 0 else -1)

    con = untied_a = untied_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            sa, sb = sign(a, i, j), sign(b, i, j)
            con += sa * sb
            untied_a += sa != 0
            untied_b += sb != 0
    return con / math.sqrt(untied_a * untied_b) if untied_a and untied_b else float("nan")


def per_demo_sums(values: torch.Tensor, ids: torch.Tensor, n_demos: int) -> torch.Tensor:
    """[n] values, [n] demo ids -> [n_demos] sums."""
    return torch.zeros(n_demos, dtype=values.dtype).index_add_(0, ids, values)


def top_k_set(p: torch.Tensor, k: int = TOP_K) -> set[int]:
    return set(torch.topk(p, k).indices.tolist())


def token_overlap(p1, p2, k: int = TOP_K) -> float:
    return len(top_k_set(p1, k) & top_k_set(p2, k)) / k


def overlap_cosine(p1, p2, k: int = TOP_K) -> float:
    """cos(p1[S], p2[S]), S = top-K(p1) ∩ top-K(p2); 0 when S is empty."""
    s = sorted(top_k_set(p1, k) & top_k_set(p2, k))
    return float(cos(p1[s], p2[s])) if s else 0.0


def kl(logp, logq) -> float:
    """KL(p || q) in nats from log-probabilities (float64)."""
    p = logp.exp()
    return float(torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum())


def js(logp, logq) -> float:
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)


def rec2ftp(zsl: Sequence[bool], icl: Sequence[bool], gd: Sequence[bool]) -> float:
    fixed_by_gd = [(not z) and g for z, g in zip(zsl, gd)]
    if not any(fixed_by_gd):
        return float("nan")
    return 100.0 * sum(f and i for f, i in zip(fixed_by_gd, icl)) / sum(fixed_by_gd)


# ---- the table --------------------------------------------------------------------------------------
@dataclass
class EpisodePasses:
    """Every condition of one episode, one Pass per query."""

    zsl: list[Pass]
    icl: list[Pass]
    gd: list[Pass]
    perm: list[Pass] | None
    gd_run: GDRun


def episode_passes(
    hf_model, tokenizer, task, episode, e: int, *, projections, lr, seed, with_perm
) -> EpisodePasses:
    words = episode.label_words
    zsl_prompts = prompts(tokenizer, task, (), episode.queries, words)
    icl_prompts = prompts(tokenizer, task, episode.demos, episode.queries, words)
    gd_run = train_gd(hf_model, tokenizer, task, episode, projections, lr)
    perm = None
    if with_perm:
        perm = [
            run_pass(hf_model, p)
            for p in prompts(
                tokenizer, task, permuted(episode.demos, seed + 1000 + e), episode.queries, words
            )
        ]
    return EpisodePasses(
        zsl=[run_pass(hf_model, p) for p in zsl_prompts],
        icl=[run_pass(hf_model, p) for p in icl_prompts],
        gd=[run_pass(gd_run.model, p) for p in zsl_prompts],
        perm=perm,
        gd_run=gd_run,
    )


@dataclass
class _Rows:
    """Tidy rows; `cond` is the row's conditioning (see `update_cond`), 1 where nothing is a difference."""

    rows: list[tuple] = field(default_factory=list)

    def add(self, metric, comparison, layer, head, episode, query, value, cond=1.0) -> None:
        self.rows.append(
            (metric, comparison, int(layer), int(head), int(episode), int(query), float(value), float(cond))
        )

    def heads(
        self,
        metric,
        comparison,
        e,
        q,
        values: torch.Tensor,
        cond: torch.Tensor | None = None,
        mean: bool = True,
    ) -> None:
        """values [L, heads]: one row per (layer, head) and, with `mean`, head -1 = nanmean over heads."""
        cond = torch.ones_like(values, dtype=torch.float64) if cond is None else cond
        for l in range(values.shape[0]):
            for h in range(values.shape[1]):
                self.add(metric, comparison, l, h, e, q, values[l, h], cond[l, h])
            if mean:
                row = values[l].double()
                real = ~row.isnan()
                self.add(
                    metric,
                    comparison,
                    l,
                    -1,
                    e,
                    q,
                    row[real].mean() if real.any() else float("nan"),
                    cond[l][real].double().mean() if real.any() else 1.0,
                )  # |error of a mean| <= mean of the errors

    def layers(
        self, metric, comparison, e, q, values: torch.Tensor, cond: torch.Tensor | None = None
    ) -> None:
        """values [L]: one row per layer, head -1."""
        for l in range(values.shape[0]):
            self.add(metric, comparison, l, -1, e, q, values[l], 1.0 if cond is None else cond[l])

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=[*KEYS, "value", "cond"])


def oracle_table(
    hf_model,
    tokenizer,
    task,
    episodes,
    *,
    projections=("k_proj", "v_proj"),
    lr: float,
    seed: int = 0,
    with_perm: bool = True,
    with_random: bool = True,
) -> tuple[pd.DataFrame, list[EpisodePasses]]:
    """Every metric of compare()'s table that the oracle knows, as tidy rows (KEYS, value, cond),
    and the passes. Not computed: the random-weight baselines (icl~random_update) and Kendall's
    icl~random. Pass a float64 copy of the model for a reference free of float32 rounding."""
    out = _Rows()
    all_passes = []
    for e, episode in enumerate(episodes):
        ep = episode_passes(
            hf_model,
            tokenizer,
            task,
            episode,
            e,
            projections=projections,
            lr=lr,
            seed=seed,
            with_perm=with_perm,
        )
        all_passes.append(ep)
        others = {"icl~gd": ep.gd, **({"icl~icl_perm": ep.perm} if ep.perm is not None else {})}
        n_q = len(episode.queries)
        L, d = ep.zsl[0].h.shape
        _, H, D = ep.zsl[0].z.shape
        r_h = random_update_vector(
            (L, n_q, d), seed + e
        )  # Dai's r for attn_out (and resid_out: same shape, same seed)
        r_z = random_update_vector((L, n_q, H, D), seed + e)  # and for head_out
        dwi = dw_icl(ep.icl[0], ep.zsl[0])  # the same demonstrations for every query of the episode
        labels = [q.label for q in episode.queries]
        label_ids = label_token_ids(tokenizer, episode.label_words)
        correct = {c: [] for c in ("zsl", "icl", "gd")}
        for q in range(n_q):
            zsl, icl, gd = ep.zsl[q], ep.icl[q], ep.gd[q]
            # SimAOU, SimAOU_norm: layer level from h (head -1), per head from z; heads not averaged
            for comparison, passes in others.items():
                x = passes[q]
                out.layers(
                    "simaou",
                    comparison,
                    e,
                    q,
                    simaou(icl.h, x.h, zsl.h),
                    update_cond((icl.h, zsl.h), (x.h, zsl.h)),
                )
                out.heads(
                    "simaou",
                    comparison,
                    e,
                    q,
                    simaou(icl.z, x.z, zsl.z),
                    update_cond((icl.z, zsl.z), (x.z, zsl.z)),
                    mean=False,
                )
                out.layers(
                    "simaou_norm",
                    comparison,
                    e,
                    q,
                    simaou_norm(icl.h, x.h, zsl.h),
                    update_cond((unit(icl.h), unit(zsl.h)), (unit(x.h), unit(zsl.h))),
                )
                out.heads(
                    "simaou_norm",
                    comparison,
                    e,
                    q,
                    simaou_norm(icl.z, x.z, zsl.z),
                    update_cond((unit(icl.z), unit(zsl.z)), (unit(x.z), unit(zsl.z))),
                    mean=False,
                )
                out.layers(
                    "probe:resid_out",
                    comparison,
                    e,
                    q,
                    simaou(icl.resid, x.resid, zsl.resid),
                    update_cond((icl.resid, zsl.resid), (x.resid, zsl.resid)),
                )
            if with_random:
                out.layers(
                    "simaou",
                    "icl~random",
                    e,
                    q,
                    simaou_random(icl.h, zsl.h, r_h[:, q]),
                    update_cond((icl.h, zsl.h)),
                )
                out.heads(
                    "simaou",
                    "icl~random",
                    e,
                    q,
                    simaou_random(icl.z, zsl.z, r_z[:, q]),
                    update_cond((icl.z, zsl.z)),
                    mean=False,
                )
                out.layers(
                    "simaou_norm",
                    "icl~random",
                    e,
                    q,
                    simaou_norm_random(icl.h, zsl.h, r_h[:, q]),
                    update_cond((unit(icl.h), unit(zsl.h))),
                )
                out.heads(
                    "simaou_norm",
                    "icl~random",
                    e,
                    q,
                    simaou_norm_random(icl.z, zsl.z, r_z[:, q]),
                    update_cond((unit(icl.z), unit(zsl.z))),
                    mean=False,
                )
                out.layers(
                    "probe:resid_out",
                    "icl~random",
                    e,
                    q,
                    simaou_random(icl.resid, zsl.resid, r_h[:, q]),
                    update_cond((icl.resid, zsl.resid)),
                )

            # SimAM before / after / delta over the query's own tokens
            m_zsl, m_icl, m_gd = query_map(zsl), query_map(icl), query_map(gd)
            scale = torch.maximum(
                torch.maximum(score_scale(zsl), score_scale(icl)), score_scale(gd)
            )  # [L, H]
            out.heads("simam_before", "icl~zsl", e, q, cos(m_icl, m_zsl), map_cond(scale, m_icl, m_zsl))
            out.heads("simam_after", "icl~gd", e, q, cos(m_icl, m_gd), map_cond(scale, m_icl, m_gd))
            out.heads(
                "simam_delta",
                "icl~gd",
                e,
                q,
                simam_delta(m_icl, m_gd, m_zsl),
                map_cond(scale, m_icl - m_zsl, m_gd - m_zsl),
            )
            if ep.perm is not None:
                m_perm = query_map(ep.perm[q])
                scale_perm = torch.maximum(scale, score_scale(ep.perm[q]))
                out.heads(
                    "simam_delta",
                    "icl~icl_perm",
                    e,
                    q,
                    simam_delta(m_icl, m_perm, m_zsl),
                    map_cond(scale_perm, m_icl - m_zsl, m_perm - m_zsl),
                )

            # implicit weights: dW_ICL vs dW_GD per kv head, their action on ICL's query per query head
            dwg, kv_zsl = dw_gd(gd, zsl), kv_context(zsl)
            out.heads(
                "dw_cos",
                "icl~gd",
                e,
                q,
                matrix_cos(dwi, dwg),
                update_cond((kv_zsl.flatten(-2) + dwg.flatten(-2), kv_zsl.flatten(-2))),
            )
            q_rot = icl.q_rot[:, icl.read]  # [L, H, D]
            out.heads(
                "dw_action_cos",
                "icl~gd",
                e,
                q,
                cos(act(dwi, q_rot), act(dwg, q_rot)),
                update_cond((act(kv_zsl + dwg, q_rot), act(kv_zsl, q_rot))),
            )
            dual = cos(act(dwi, q_rot), icl.z.double() - zsl.z.double())
            dual_cond = update_cond((icl.z, zsl.z))
            out.heads("dual_form_cos", "icl~dual_form", e, q, dual, dual_cond)
            out.heads(
                "dual_form_rel_err",
                "icl~dual_form",
                e,
                q,
                torch.sqrt(torch.clamp(1 - dual**2, min=0)),
                dual_cond,
            )

            # Kendall (Dai, LMOps understand_icl): token and example level, head -1
            a, a_ids = kendall_icl_side(icl)
            b, b_ids = kendall_gd_side(gd, ep.gd_run)
            k = len(episode.demos)
            same_layout = torch.equal(torch.bincount(a_ids, minlength=k), torch.bincount(b_ids, minlength=k))
            for l in range(L):
                out.add(
                    "kendall_token",
                    "icl~gd",
                    l,
                    -1,
                    e,
                    q,
                    kendalltau(a[l], b[l]) if same_layout else float("nan"),
                )
                out.add(
                    "kendall_example",
                    "icl~gd",
                    l,
                    -1,
                    e,
                    q,
                    kendalltau(per_demo_sums(a[l], a_ids, k), per_demo_sums(b[l], b_ids, k)),
                )
            att, dots, ids = kendall_per_head_sides(icl, gd)
            tau_token = torch.tensor(
                [[kendalltau(att[l, h], dots[l, h]) for h in range(H)] for l in range(L)]
            )
            tau_example = torch.tensor(
                [
                    [
                        kendalltau(per_demo_sums(att[l, h], ids, k), per_demo_sums(dots[l, h], ids, k))
                        for h in range(H)
                    ]
                    for l in range(L)
                ]
            )
            out.heads("kendall_token_per_head", "icl~gd", e, q, tau_token)
            out.heads("kendall_example_per_head", "icl~gd", e, q, tau_example)

            # output distributions at the read position
            for c, p in (("zsl", zsl), ("icl", icl), ("gd", gd)):
                ok = int(torch.argmax(p.logits[label_ids])) == labels[q]
                correct[c].append(ok)
                out.add("accuracy", c, -1, -1, e, q, float(ok))
                out.add(
                    "accuracy_vocab",
                    c,
                    -1,
                    -1,
                    e,
                    q,
                    float(int(torch.argmax(p.logits)) == label_ids[labels[q]]),
                )
            logits = {
                "zsl": zsl.logits,
                "icl": icl.logits,
                "gd": gd.logits,
                **({"icl_perm": ep.perm[q].logits} if ep.perm is not None else {}),
            }
            logp = {c: torch.log_softmax(z.double(), -1) for c, z in logits.items()}
            for comparison, (x, y) in {
                "icl~gd": ("icl", "gd"),
                "icl~icl_perm": ("icl", "icl_perm"),
                "gd~zsl": ("gd", "zsl"),
                "icl~zsl": ("icl", "zsl"),
            }.items():
                if x in logp and y in logp:
                    p1, p2 = logp[x].exp(), logp[y].exp()
                    out.add("token_overlap", comparison, -1, -1, e, q, token_overlap(p1, p2))
                    out.add("overlap_cosine", comparison, -1, -1, e, q, overlap_cosine(p1, p2))
                    # |d KL| <= |d log p|_inf + |d log q|_inf <= 2 (|d z_p|_inf + |d z_q|_inf):
                    # fp32 logits err ~1e-6 |z|_inf
                    kl_cond = 4 * max(float(logits[x].abs().max()), float(logits[y].abs().max()))
                    out.add("kl", comparison, -1, -1, e, q, kl(logp[x], logp[y]), kl_cond)
                    out.add("js", comparison, -1, -1, e, q, js(logp[x], logp[y]), kl_cond)
        out.add("rec2ftp", "icl~gd", -1, -1, e, -1, rec2ftp(correct["zsl"], correct["icl"], correct["gd"]))
    return out.frame(), all_passes
