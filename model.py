"""
A from-scratch Mistral / Llama-shaped decoder in plain PyTorch.

Parameter names follow Mistral's own checkpoints (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), and RoPE rotates *adjacent*
pairs of dimensions (0,1), (2,3), ... as Mistral's reference code does, so a native
`consolidated.safetensors` loads with no permutation. Hugging Face checkpoints store q/k rows
permuted for the "rotate-half" convention; `from_pretrained` undoes that at load time.
"""
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields

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
    # 0.66M parameters, 3x the tokens per second of "tiny" on a CPU: two layers are all that
    # induction (copying from the context) needs, and tokens are what a laptop lacks
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


class KVCache:
    """Preallocated keys/values for every layer. `length` is how many positions are filled;
    setting it back (e.g. to a shared prefix's length) discards what came after."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0
        self.max_len = max_len


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

    def forward(self, x, cos, sin, cache=None, layer_id=0, mask=None):
        B, T, _ = x.shape
        q, k, v = project(x, self.wq, self.wk, self.wv)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

        if cache is not None:
            # Inference path: write the new keys/values at cache.length. With keys before them,
            # attend to all filled positions; `mask` (T, M) covers the last M of them, so that eval
            # packs several queries after one prefix, each seeing the prefix and its own tokens.
            start = cache.length
            cache.k[layer_id][:B, :, start:start + T] = k
            cache.v[layer_id][:B, :, start:start + T] = v
            if start > 0 or mask is not None:
                if mask is None and T > 1:  # causal among the new tokens, all earlier ones visible
                    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                k, v = cache.k[layer_id][:B, :, :start + T], cache.v[layer_id][:B, :, :start + T]
                return self.wo(cached_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        # Training path (and a cache's first tokens): plain causal attention, no mask tensor, GQA
        # without copying K/V, so on a GPU in bf16 SDPA may pick its flash (or cuDNN) kernel.
        if SDPA_HAS_GQA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, *repeat_kv(k, v, self.n_heads), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def sdpa_backend(name):
    """Context manager pinning SDPA to one kernel ("flash", "cudnn", "efficient", "math"), or
    leaving PyTorch's choice ("auto"). Wrap forward *and* backward: activation checkpointing
    re-runs attention during the backward pass and must pick the same kernel again."""
    import contextlib
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in kernels:
        raise ValueError(f"sdpa_backend must be auto or one of {sorted(kernels)}, got '{name}'")
    return sdpa_kernel([kernels[name]])


def repeat_kv(k, v, n_heads):
    """Each KV head serves n_heads // n_kv_heads query heads: copy it that many times."""
    rep = n_heads // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def cached_attention(q, k, v, mask=None):
    """q (B, H, T, hd) against cached k, v (B, Hkv, S, hd); mask (T, M) covers the last M keys and
    every query sees all S - M keys before them (a shared prefix; mask None: M = 0). A dense
    (T, S) mask would drop SDPA off its fast kernels and cost, at a 32K prefix, more than the
    prefix's own attention, so the two parts are attended separately: the prefix with no mask
    (the H // Hkv query heads of a KV head stacked as rows: GQA without copying K/V), the masked
    rest by masked_attention_lse, and the two merged by their log-sum-exps, which is exactly
    softmax attention over the union."""
    B, H, T, D = q.shape
    S, M = k.shape[2], 0 if mask is None else mask.shape[-1]
    parts = []
    if S > M:
        y, lse = attention_lse(q.reshape(B, k.shape[1], -1, D), k[:, :, :S - M], v[:, :, :S - M])
        parts.append((y.reshape(B, H, T, D).float(), lse.reshape(B, H, T, 1).float()))
    if M:
        parts.append(masked_attention_lse(q, k[:, :, S - M:], v[:, :, S - M:], mask))
    if len(parts) == 1:
        return parts[0][0].type_as(q)
    (y1, lse1), (y2, lse2) = parts
    total = torch.logaddexp(lse1, lse2)
    return (y1 * (lse1 - total).exp() + y2 * (lse2 - total).exp()).type_as(q)


def masked_attention_lse(q, k, v, mask, rows=256):
    """Attention of q (B, H, T, hd) to k, v (B, Hkv, M, hd) under a (T, M) mask, with its
    log-sum-exp (B, H, T, 1), in fp32: a block of rows at a time, against only the span of columns
    that block's mask touches. Queries packed after a prefix see a few keys of their own segment,
    so this is a small part of the dense (T, M) scores (1/16 for 64-token segments in 2048)."""
    B, H, T, D = q.shape
    M = mask.shape[-1]
    k, v = repeat_kv(k.float(), v.float(), H)
    seen = torch.cat([mask, mask.new_zeros(-T % rows, M)]).view(-1, rows, M).any(1)  # (blocks, M)
    spans = torch.stack([seen.int().argmax(-1), M - seen.flip(-1).int().argmax(-1)], 1).tolist()
    ys, lses = [], []
    for r, (a, b) in zip(range(0, T, rows), spans):
        s = q[:, :, r:r + rows].float() @ k[:, :, a:b].transpose(-1, -2) * D ** -0.5
        s.masked_fill_(~mask[r:r + rows, a:b], float("-inf"))
        top = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)  # a row all masked: no nan
        p = (s - top).exp_()
        total = p.sum(-1, keepdim=True)
        ys.append(p @ v[:, :, a:b] / total.clamp_min(1e-30))
        lses.append(top + total.log())
    return torch.cat(ys, 2), torch.cat(lses, 2)


def attention_lse(q, k, v):
    """Unmasked attention and the log-sum-exp of each query's scores (B, H, T), which is needed to
    merge it with attention over other keys. F.scaled_dot_product_attention does not return it;
    its fused kernels' own ops do (flash on CPU and, in bf16/fp16, on CUDA; mem-efficient else)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    if q.device.type == "cuda":
        y, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return y, lse[..., :q.shape[2]]  # the kernel pads its lse rows to a multiple of 32
    s = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # other devices: plain
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ v.float()).type_as(q), lse


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

    def forward(self, x, cos, sin, cache=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id, mask)
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

    def forward(self, tokens, targets=None, cache=None, positions=None, mask=None):
        """tokens (B, T). Without targets: logits (B, T, vocab). With targets (B, T), shifted so
        that targets[t] is the token after tokens[t] and -100 where unsupervised: the mean
        cross-entropy over supervised positions, computed without full-vocabulary logits."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} filled + {T} new do not fit")
        # the longest context any token sees: its position + 1 (packed eval segments share a cache)
        self.check_length(int(positions.max()) + 1 if cache is not None else T)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)

        h = self.tok_embeddings(tokens)
        for layer, scheme in zip(self.layers, self.checkpointing_plan()):
            if scheme != "none" and torch.is_grad_enabled() and cache is None:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False,
                               **({"context_fn": keep_attention_outputs} if scheme == "selective" else {}))
            else:
                h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        h = self.norm(h)

        if targets is None:
            return self.output(h).float()
        # Only supervised positions reach the output projection: in ManyICL most tokens are
        # demonstrations' inputs, and full fp32 logits at 32K tokens would be ~4 GiB.
        keep = targets.reshape(-1) != -100
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

    # ------------------------------------------------------------------------- loading / saving

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load a directory in Mistral's layout (params.json + consolidated.safetensors) or Hugging
        Face's (config.json + model.safetensors or model-0000x-of-0000y.safetensors shards)."""
        device = torch.device(device or "cpu")
        if os.path.isfile(os.path.join(path, "params.json")) and os.path.isfile(os.path.join(path, "consolidated.safetensors")):
            args = read_params_json(os.path.join(path, "params.json"))
            state = read_safetensors([os.path.join(path, "consolidated.safetensors")], device, dtype)
        elif os.path.isfile(os.path.join(path, "config.json")):
            files = hf_weight_files(path)
            args = read_hf_config(os.path.join(path, "config.json"), files)
            state = hf_to_native(read_safetensors(files, device, dtype), args, files)
        else:
            raise FileNotFoundError(f"{path}: expected params.json + consolidated.safetensors "
                                    f"(Mistral layout) or config.json + model*.safetensors (HF layout)")
        with torch.device("meta"):  # no random weights are ever materialised
            model = cls(args)
        check_state_dict(model, state, path)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, path):
        """Write Mistral's layout: params.json + consolidated.safetensors."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, "consolidated.safetensors"))
        with open(os.path.join(path, "params.json"), "w") as f:
            json.dump(self.args.to_dict(), f, indent=2)


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
    and recomputed in the backward pass, so even mask='none' at 32K never holds (N, vocab)."""
    if h.shape[0] == 0:
        return h.sum() * 0.0  # keeps the graph (and DDP) happy when nothing is supervised
    def ce_sum(h_chunk, t_chunk):
        return F.cross_entropy((h_chunk @ weight.t()).float(), t_chunk, reduction="sum")
    total = sum(checkpoint(ce_sum, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                if torch.is_grad_enabled() else ce_sum(h[i:i + chunk], targets[i:i + chunk])
                for i in range(0, h.shape[0], chunk))
    return total / h.shape[0]


def flops_per_token(args, seq_len, lora=True):
    """Training FLOPs per token. N counts the matmul weights (embedding lookup excluded). Forward
    is 2N; the backward's input gradients another 2N; weight gradients 2N more, skipped when the
    base is frozen (LoRA). Causal attention (QK^T and AV) is counted once: 6*L*d_attn*T fwd+bwd."""
    with torch.device("meta"):  # count shapes without allocating 7B parameters
        n = sum(p.numel() for name, p in Transformer(args).named_parameters()
                if p.dim() == 2 and "tok_embeddings" not in name)
    attn = 6 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return (4 if lora else 6) * n + attn


# ----------------------------------------------------------------------------- activation memory

def activation_bytes(args, tokens, dtype_bytes=2, lora_rank=0, lora_targets=(), train_base=False):
    """Bytes one block keeps for the backward pass over `tokens` (batch * seq_len), per scheme,
    counted from the eager block's saved tensors (tests/test_model.py checks them on the CPU
    allocator). none: each RMSNorm's fp32 input and rsqrt, q and k after RoPE, v, SDPA's output
    and fp32 log-sum-exp, SwiGLU's gate, up and silu(gate), the input of each linear whose weight
    or LoRA A trains (a frozen linear keeps only its weight), LoRA's rank-r intermediates.
    selective: the block's input, SDPA's output and log-sum-exp. full: the block's input.
    Left out: LoRA weights cast to bf16, 2 * r * (in + out) bytes per linear (2.6 MB a 7B block)."""
    a, e = args, dtype_bytes
    hq, hkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    trains = lambda *names: train_base or (lora_rank > 0 and any(t in lora_targets for t in names))
    sdpa = e * hq + 4 * a.n_heads
    none = (2 * (4 * a.dim + 4) + e * (hq + 2 * hkv) + sdpa + 3 * e * a.hidden_dim + e * lora_rank * len(lora_targets)
            + e * a.dim * (trains("wq", "wk", "wv") + trains("w1", "w3") + 2 * train_base)  # 2: trained norm weights
            + e * a.hidden_dim * trains("w2"))
    return {"none": tokens * none, "selective": tokens * (e * a.dim + sdpa), "full": tokens * e * a.dim}


def estimate_peak(args, seq_len, batch, plan, fixed_bytes, **estimate):
    """fixed_bytes (weights, gradients, optimizer state) + what each block keeps under `plan` +
    a working set of 1.5 blocks' activations (one block recomputed and backpropagated, with its
    gradients): the factor the README's H100 figures imply (1.2-1.5 for full and selective
    checkpointing at 8K and 32K, eager or compiled per block)."""
    act = activation_bytes(args, seq_len * batch, **estimate)
    return fixed_bytes + sum(act[s] for s in plan) + 1.5 * act["none"]


def plan_checkpointing(args, seq_len, batch, budget_bytes, fixed_bytes, **estimate):
    """The per-block schemes that recompute the least forward work while estimate_peak fits the
    budget: a full block recomputes its matmuls and attention, a selective one its matmuls, none
    nothing. Blocks are alike, so only the counts matter, and every split is tried. Full blocks
    come first, none last: the backward pass frees the last blocks' activations first, before it
    needs memory to recompute the earlier ones."""
    d, hq, hkv, L = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_layers
    matmul = 2 * d * (2 * hq + 2 * hkv + 3 * args.hidden_dim)  # forward FLOPs per token
    recompute = {"none": 0, "selective": matmul, "full": matmul + 2 * hq * seq_len}  # + causal QK^T and AV
    peak = lambda plan: estimate_peak(args, seq_len, batch, plan, fixed_bytes, **estimate)
    plans = [["full"] * (L - s - n) + ["selective"] * s + ["none"] * n for n in range(L + 1) for s in range(L + 1 - n)]
    fits = [p for p in plans if peak(p) <= budget_bytes]
    if not fits:
        raise ValueError(f"activation checkpointing: even 'full' in every block needs ~{peak(['full'] * L) / 2**30:.2f} GiB "
                         f"(estimated), more than the budget of {budget_bytes / 2**30:.2f} GiB")
    return min(fits, key=lambda p: (sum(recompute[s] for s in p), peak(p)))


def training_memory(model, dtype):
    """What estimate_peak needs to know of a model about to train with activations in `dtype`:
    the bytes held all run (weights; gradients and AdamW's two fp32 moments of the trainable
    ones) and activation_bytes' keywords (LoRA's as apply_lora recorded them)."""
    named = list(model.named_parameters())
    fixed = sum(p.nbytes + (p.nbytes + 8 * p.numel()) * p.requires_grad for _, p in named)
    lora = getattr(model, "lora_config", {})
    return fixed, dict(dtype_bytes=dtype.itemsize, lora_rank=lora.get("rank", 0), lora_targets=lora.get("targets", ()),
                       train_base=any(p.requires_grad and ".lora_" not in n for n, p in named))


# ----------------------------------------------------------------------------- checkpoint files

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def require(cfg, key, path):
    if cfg.get(key) is None:
        raise KeyError(f"{path}: missing required field '{key}'")
    return cfg[key]


def read_params_json(path):
    cfg = read_json(path)
    for f in fields(ModelArgs):
        if f.default is MISSING:
            require(cfg, f.name, path)  # rope_theta included: a wrong theta silently ruins a model
    return ModelArgs(**{f.name: cfg.get(f.name) for f in fields(ModelArgs)})


def hf_weight_files(path):
    """The HF weight files, from the shard index when there is one. Never a blind glob: the
    official Mistral repo ships consolidated.safetensors beside the HF shards."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(require(read_json(index), "weight_map", index).values()))
        files = [os.path.join(path, n) for n in names]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: weight file not found")
    return files


def read_hf_config(path, files):
    cfg = read_json(path)
    theta = cfg.get("rope_theta")
    if theta is None:
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        raise KeyError(f"{path}: missing required field 'rope_theta' (or 'rope_parameters.rope_theta')")
    n_heads = require(cfg, "num_attention_heads", path)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        # Older HF configs (Mistral-7B-v0.3's included) omit head_dim; read it from the q_proj
        # weight's shape rather than assume dim // n_heads.
        from safetensors import safe_open
        for f in files:
            with safe_open(f, "pt") as sf:
                if "model.layers.0.self_attn.q_proj.weight" in sf.keys():
                    head_dim = sf.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()[0] // n_heads
        if head_dim is None:
            raise KeyError(f"{path}: no 'head_dim' and no model.layers.0.self_attn.q_proj.weight to infer it from")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{path}: tie_word_embeddings=true is not a Mistral-shaped model (output head must be untied)")
    return ModelArgs(dim=require(cfg, "hidden_size", path), n_layers=require(cfg, "num_hidden_layers", path),
                     head_dim=head_dim, hidden_dim=require(cfg, "intermediate_size", path), n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads, norm_eps=require(cfg, "rms_norm_eps", path),
                     vocab_size=require(cfg, "vocab_size", path), rope_theta=float(theta),
                     max_seq_len=cfg.get("max_position_embeddings"), sliding_window=cfg.get("sliding_window"))


def read_safetensors(files, device, dtype):
    """Tensors straight to the target device and dtype, one at a time (no full fp32 copy)."""
    from safetensors import SafetensorError, safe_open
    state = {}
    for f in files:
        try:  # a truncated file (full disk, bad copy) fails here, on its header: say which file
            sf = safe_open(f, "pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{f}: cannot read weights ({e})") from None
        with sf:
            for key in sf.keys():
                if key in state:
                    raise ValueError(f"{f}: key '{key}' appears in more than one weight file")
                state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
    return state


HF_TO_NATIVE = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                "post_attention_layernorm": "ffn_norm"}


def hf_rows_to_native(w, n_heads):
    """Undo HF's q/k row permutation. Per head, HF stores the rotate-half order
    [x0, x2, x4, ..., x1, x3, x5, ...]; Mistral stores adjacent pairs [x0, x1, x2, x3, ...]."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def native_rows_to_hf(w, n_heads):
    """The inverse: the permutation HF's conversion script applies to Mistral's q/k."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_native(state, args, files):
    out = {}
    for key, w in state.items():
        if key == "model.embed_tokens.weight":
            name = "tok_embeddings.weight"
        elif key == "model.norm.weight":
            name = "norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        elif key.startswith("model.layers.") and key.endswith(".weight"):
            layer, module = key[len("model.layers."):-len(".weight")].split(".", 1)
            if module not in HF_TO_NATIVE:
                raise KeyError(f"{', '.join(files)}: unexpected key '{key}'")
            name = f"layers.{layer}.{HF_TO_NATIVE[module]}.weight"
            if module == "self_attn.q_proj":
                w = hf_rows_to_native(w, args.n_heads)
            elif module == "self_attn.k_proj":
                w = hf_rows_to_native(w, args.n_kv_heads)  # k uses the KV head count
        else:
            raise KeyError(f"{', '.join(files)}: unexpected key '{key}'")
        out[name] = w
    return out


def check_state_dict(model, state, path):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise KeyError(f"{path}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(state[k].shape)}, the config implies {tuple(shape)}")
