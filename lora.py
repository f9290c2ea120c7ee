"""
LoRA for model.Transformer: a transformation applied after loading, so model.py stays the plain
architecture. Each targeted nn.Linear becomes a LoRALinear, W x + (alpha / rank) * B A x, with W
frozen and only A (rank, in) and B (out, rank) trained.

Files: `save_lora` writes Mistral's names (layers.N.attention.wq.lora_A.weight, ...), the layout
mistral-finetune writes and mistral-inference's `load_lora` merges (with scaling 2.0, i.e.
rank 16 / alpha 32). checkpoints.export_peft writes the same adapter under Hugging Face PEFT's names.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ATTENTION = ("wq", "wk", "wv", "wo")  # the rest live in feed_forward


class LoRALinear(nn.Module):
    """A frozen bias-free nn.Linear plus a trainable low-rank update. The base weight stays at
    `self.weight`, so its state-dict key is unchanged (layers.N.attention.wq.weight)."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear expects a bias-free nn.Linear (Mistral has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.fused = False  # see project_many
        # LoRA weights are fp32 whatever the base dtype: they are the master copies AdamW updates.
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default
        nn.init.zeros_(self.lora_B.weight)  # B = 0: a fresh adapter changes nothing

    def forward(self, x):
        # Mixed precision: the LoRA matmuls run in the activations' dtype (bf16 for a bf16 base),
        # the fp32 weights cast down on the fly, exactly as torch.autocast would do on a GPU;
        # autograd casts the gradients back up, so AdamW sees fp32 grads on fp32 weights.
        # Computing in x's dtype also lets wq/wk/wv's adapters share one saved copy of x for
        # backward, instead of each keeping its own fp32 upcast.
        if self.fused and not self.dropout.p:
            return LoRALinear.project_many(x, [self])[0]
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return F.linear(x, self.weight) + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    @staticmethod
    def project_many(x, linears):
        """Linears that all read x (model.project: wq/wk/wv, w1/w3, or one alone). Fused (apply_lora's
        fused=True, no dropout): their A's in one matmul, so x is read once, not three times, forward
        and backward; and each B matmul adds its scaled update to the base output inside the GEMM
        (addmm), where plain LoRA spends two more passes over a (tokens, out) tensor on `* scale`
        and `+`. Same maths, and still one A per linear in the parameters and the files."""
        if not all(isinstance(m, LoRALinear) and m.fused and not m.dropout.p for m in linears):
            return [m(x) for m in linears]
        x2 = x.reshape(-1, x.shape[-1])
        a = torch.cat([m.lora_A.weight for m in linears]).to(x.dtype)
        ax = F.linear(x2, a).split([m.lora_A.out_features for m in linears], dim=-1)
        return [torch.addmm(F.linear(x2, m.weight), ax_m, m.lora_B.weight.to(x.dtype).t(), alpha=m.scale)
                .view(*x.shape[:-1], m.out_features) for m, ax_m in zip(linears, ax)]

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.out_features}, scale={self.scale}"


def block_of(target):
    return "attention" if target in ATTENTION else "feed_forward"


def require_lora(model, who):
    if not hasattr(model, "lora_config"):
        raise ValueError(f"{who}: the model has no LoRA adapters; call apply_lora first")
    return model.lora_config


def apply_lora(model, rank, alpha, dropout=0.0, targets=ALL_TARGETS, fused=False):
    """Wrap `targets` in every block with LoRALinear and freeze every other parameter. Call it
    after the base weights are loaded: the LoRA weights go on the base weight's device. fused:
    LoRALinear.project_many's path (without dropout only; bench.py times it against the plain one)."""
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {targets!r}: choose one or more of {ALL_TARGETS}")
    if hasattr(model, "lora_config"):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    targets = tuple(t for t in ALL_TARGETS if t in targets)  # canonical order
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for t in targets:
            parent = getattr(layer, block_of(t))
            setattr(parent, t, LoRALinear(getattr(parent, t), rank, alpha, dropout))
            getattr(parent, t).fused = fused
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return model


def lora_state_dict(model):
    """The adapter tensors under Mistral's names: layers.N.attention.wq.lora_A.weight, ..."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def lora_parameters(model):
    """The trainable parameters, for the optimizer."""
    return [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def save_lora(model, path, dtype=None):
    """Write only the adapter (fp32 as stored, unless `dtype` says otherwise: mistral-inference
    wants the model's dtype, usually bf16), with rank/alpha/dropout/targets as metadata."""
    from safetensors.torch import save_file
    cfg = require_lora(model, "save_lora")
    tensors = {k: v.to(dtype or v.dtype).contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {"rank": str(cfg["rank"]), "alpha": str(cfg["alpha"]),
                "dropout": str(cfg["dropout"]), "targets": ",".join(cfg["targets"])}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def load_lora(model, path):
    """Load an adapter file into a model that went through apply_lora with the same settings."""
    from safetensors import safe_open
    cfg = require_lora(model, "load_lora")
    with safe_open(path, "pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}

    ours = dict(rank=cfg["rank"], alpha=float(cfg["alpha"]), targets=sorted(cfg["targets"]))
    if {"rank", "alpha", "targets"} <= meta.keys():
        theirs = dict(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=sorted(meta["targets"].split(",")))
    else:
        # No metadata (e.g. mistral-finetune's lora.safetensors): rank and targets follow from the
        # keys and shapes, but alpha is unknown. Such files are merged with scaling 2.0 (what
        # mistral-inference's load_lora assumes), so the model's alpha / rank must be 2.0.
        if ours["alpha"] / ours["rank"] != 2.0:
            raise ValueError(f"{path}: no LoRA metadata, so alpha is unknown; files without it (mistral-finetune's) "
                             f"imply scaling alpha/rank = 2.0, but the model has alpha={ours['alpha']}, rank={ours['rank']}")
        ranks = sorted({v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")})
        theirs = dict(rank=ranks[0] if len(ranks) == 1 else ranks, alpha=ours["alpha"],
                      targets=sorted({k.split(".")[-3] for k in state}))  # layers.N.attention.wq.lora_A.weight
    # dropout is not compared: it only matters while training, and may well differ on purpose.
    for field in ("rank", "alpha", "targets"):
        if theirs[field] != ours[field]:
            raise ValueError(f"{path}: LoRA {field} is {theirs[field]} in the file but {ours[field]} in the model")

    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{path}: missing key(s) {missing[:5]}, unexpected key(s) {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)  # into the fp32 weights on the model's device, whatever the file's dtype
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear modules back, so the model
    is a plain Transformer again (same state-dict keys; checkpoints.save_model writes it as such)."""
    require_lora(model, "merge_lora")
    for layer in model.layers:
        for t in ALL_TARGETS:
            parent = getattr(layer, block_of(t))
            m = getattr(parent, t)
            if not isinstance(m, LoRALinear):
                continue
            with torch.no_grad():  # in fp32, then rounded once to the base dtype
                w = m.weight.float() + (m.lora_B.weight @ m.lora_A.weight) * m.scale
            plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")  # no random init
            plain.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
            setattr(parent, t, plain)
    del model.lora_config
    return model
