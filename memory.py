"""
What a training step costs and how it runs: FLOPs per token (for MFU), the bytes a block keeps
for the backward pass, the activation-checkpointing plan that fits a memory budget, and the SDPA
kernel. Figures quoted here are the ones RESULTS.md reports (bench.py on one H100).
"""
import torch

from model import Transformer


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
    gradients): the factor the H100 figures in RESULTS.md imply (1.2-1.5 for full and selective
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




def checkpointing_mode(name, model=None, cfg=None, dtype=torch.float32):
    """model.activation_checkpointing for a config name. "auto" (given the model): the per-block
    plan that recomputes least while its estimated peak (estimate_peak above) fits
    cfg.memory_budget_gib, or with none set 90% of the GPU memory this process holds or could take
    (the estimate is rough: the 10% is its margin). On the CPU with no budget "auto" is "none":
    torch cannot see host memory, and CPU runs are small."""
    if name not in ("none", "full", "selective", "auto"):
        raise ValueError(f"activation_checkpointing must be none, full, selective or auto; got '{name}'")
    if name != "auto" or model is None:
        return name
    device = next(model.parameters()).device
    if cfg.memory_budget_gib:
        budget = cfg.memory_budget_gib * 2**30
    elif device.type == "cuda":
        budget = 0.9 * (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device))
    else:
        return "none"
    fixed, estimate = training_memory(model, dtype)
    return plan_checkpointing(model.args, cfg.seq_len, cfg.batch_size, budget, fixed, **estimate)


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


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU. None when unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("4090", 165e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None

