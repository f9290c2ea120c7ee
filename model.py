"""
A from-scratch Mistral / Llama-shaped decoder in plain PyTorch.

Parameter names follow Mistral's own checkpoints (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), and RoPE rotates *adjacent*
pairs of dimensions (0,1), (2,3), ... as Mistral's reference code does, so a native
`consolidated.safetensors` loads with no permutation. Reading checkpoint folders (Mistral's and
Hugging Face's layouts) lives in checkpoints.py; memory planning in memory.py; the KV cache and
the attention only inference needs in inference.py.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= arrived in 2.5


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int              # taken from the checkpoint, never dim // n_heads
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float          # 1e6 for Mistral v0.2/v0.3; no default on purpose
    max_seq_len: int | None = None        # None: the checkpoint does not say
    sliding_window: int | None = None     # None: full causal attention

    def to_dict(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


PRESETS = {
    "mistral-7b": dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                       n_kv_heads=8, norm_eps=1e-5, vocab_size=32768, rope_theta=1e6,
                       max_seq_len=32768),
    # a few M parameters: trains on a laptop CPU in minutes; vocab set by the tokenizer
    "tiny": dict(dim=192, n_layers=4, head_dim=48, hidden_dim=512, n_heads=4, n_kv_heads=2,
                 norm_eps=1e-5, vocab_size=512, rope_theta=1e4, max_seq_len=4096),
    # 0.48M parameters with the 333-character tokenizer, 3x the tokens per second of "tiny" on a
    # CPU: two layers are all that induction (copying from the context) needs, and tokens are
    # what a laptop lacks
    "nano": dict(dim=128, n_layers=2, head_dim=32, hidden_dim=384, n_heads=4, n_kv_heads=2,
                 norm_eps=1e-5, vocab_size=512, rope_theta=1e4, max_seq_len=4096),
}


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 even when the model runs in bf16
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin of shape (T, head_dim // 2) for integer positions (T,), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                              dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, T, H, head_dim). Rotates adjacent pairs (x[2i], x[2i+1]) by angle pos * f_i."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def project(x, *linears):
    """x through several linears that all read it (wq, wk, wv; w1, w3). A module class may do them
    together in a static `project_many(x, linears)`: lora.py's shares one matmul for their A's."""
    many = getattr(linears[0], "project_many", None)
    return many(x, linears) if many else [m(x) for m in linears]


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, layer_id=0, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = project(x, self.wq, self.wk, self.wv)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

        if cache is not None:  # inference: the cache stores k, v and attends over all it holds (inference.py)
            y = cache.attend(layer_id, q, k, v, attn_mask)
        else:
            y = causal_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def causal_attention(q, k, v):
    """Plain causal attention over full sequences: no mask tensor, GQA without copying K/V, so on a
    GPU in bf16 SDPA may pick its flash (or cuDNN) kernel. q (B, H, T, hd), k and v (B, Hkv, T, hd)."""
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, *repeat_kv(k, v, q.shape[1]), is_causal=True)


def repeat_kv(k, v, n_heads):
    """Each KV head serves n_heads // n_kv_heads query heads: copy it that many times."""
    rep = n_heads // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        gate, up = project(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from embeddings
        # Per block: "none", "full" (recompute the block in the backward pass) or "selective"
        # (recompute it but keep the attention outputs: attention is half the FLOPs at 32K,
        # projections are cheap). One name for all blocks, or a list (plan_checkpointing's).
        self.activation_checkpointing = "none"

    def compile_blocks(self):
        """torch.compile each block, not the whole model: fuses the fp32 norm/RoPE/SwiGLU
        element-wise work, while activation checkpointing stays eager around the compiled blocks
        (on an H100 at 32K tokens: whole model 34.4 GiB peak, per block 30.7 GiB, same speed)."""
        for layer in self.layers:
            layer.compile()
        return self

    def checkpointing_plan(self):
        """activation_checkpointing as one scheme per block (False and True mean none and full)."""
        ac = self.activation_checkpointing
        plan = list(ac) if isinstance(ac, (list, tuple)) else [ac] * len(self.layers)
        plan = [{False: "none", True: "full"}.get(s, s) for s in plan]
        if len(plan) != len(self.layers) or not set(plan) <= {"none", "selective", "full"}:
            raise ValueError(f"activation_checkpointing={ac!r}: expected none, selective, full or a list of those, one per layer")
        return plan

    def init_weights(self, seed=0):
        """Random init for training from scratch or benchmarking, in place on the model's own
        device and dtype (a 7B model can be made on the meta device, `to_empty` on the GPU,
        then initialised here without ever existing on the CPU)."""
        g = torch.Generator(self.output.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:  # GPT-2 style: N(0, 0.02), residual projections scaled down by depth
                    deep = name.endswith(("wo.weight", "w2.weight"))
                    p.normal_(0.0, 0.02 / math.sqrt(2 * self.args.n_layers) if deep else 0.02, generator=g)
        return self

    def forward(self, tokens, targets=None, cache=None, positions=None, attn_mask=None):
        """tokens (B, T). Without targets: logits (B, T, vocab). With targets (B, T), shifted so
        that targets[t] is the token after tokens[t] and negative (data.IGNORE) where unsupervised: the mean
        cross-entropy over supervised positions, computed without full-vocabulary logits.
        Inference passes inference.KVCache: the tokens follow what it holds, at `positions` (default:
        the next ones), attending to it under `attn_mask` (see KVCache.attend)."""
        B, T = tokens.shape
        start = cache.reserve(T) if cache is not None else 0  # the cache's filled length, once T more fit
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        # the longest context any token sees: its position + 1 (packed eval segments share a cache)
        self.check_length(int(positions.max()) + 1 if cache is not None else T)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)

        h = self.tok_embeddings(tokens)
        for layer, scheme in zip(self.layers, self.checkpointing_plan()):
            if scheme != "none" and torch.is_grad_enabled() and cache is None:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False,
                               **({"context_fn": keep_attention_outputs} if scheme == "selective" else {}))
            else:
                h = layer(h, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.length += T
        h = self.norm(h)

        if targets is None:
            return self.output(h).float()
        # Only supervised positions reach the output projection: in ManyICL most tokens are
        # demonstrations' inputs, and full fp32 logits at 32K tokens would be ~4 GiB.
        keep = targets.reshape(-1) >= 0
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1])[keep], self.output.weight,
                                     targets.reshape(-1)[keep])

    def check_length(self, length):
        a = self.args
        if a.sliding_window is not None and length > a.sliding_window:
            raise ValueError(f"sequence of {length} tokens exceeds the checkpoint's sliding_window="
                             f"{a.sliding_window}; this implementation attends to the full context, "
                             f"so it refuses lengths where the two would differ")
        if a.max_seq_len is not None and length > a.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds the model's max_seq_len={a.max_seq_len}")


SDPA_OPS = [getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)]


def keep_attention_outputs():
    """Selective activation checkpointing: save what SDPA returns, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    policy = lambda ctx, op, *args, **kwargs: (CheckpointPolicy.MUST_SAVE if op in SDPA_OPS
                                                else CheckpointPolicy.PREFER_RECOMPUTE)
    return create_selective_checkpoint_contexts(policy)


def chunked_cross_entropy(h, weight, targets, chunk=4096):
    """Mean CE of (N, dim) hidden states against (N,) targets. Logits are made chunk by chunk
    and recomputed in the backward pass, so even loss_mask='none' at 32K never holds (N, vocab)."""
    if h.shape[0] == 0:
        return h.sum() * 0.0  # keeps the graph (and DDP) happy when nothing is supervised
    def ce_sum(h_chunk, t_chunk):
        return F.cross_entropy((h_chunk @ weight.t()).float(), t_chunk, reduction="sum")
    total = sum(checkpoint(ce_sum, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                if torch.is_grad_enabled() else ce_sum(h[i:i + chunk], targets[i:i + chunk])
                for i in range(0, h.shape[0], chunk))
    return total / h.shape[0]
