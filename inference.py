"""
Using a trained model, for eval.py, sample.py and bench.py: loading it beside its base
(`load_models`), and inference with a KV cache. A shared prefix (the demonstrations) is encoded
once (`prefill`), then many segments (queries, options) are packed after it in one row
(`extend`), each attending to the prefix and to its own tokens only, at its own positions.
Rewinding cache.length to the prefix discards them (`score_options`, `generate`). An encoded
prefix can be written to a file and read back (`save_prefix`, `load_prefix`).

model.py knows nothing of this: its attention hands the keys and values of new tokens to the
cache (`KVCache.attend`), which stores them and attends over all it holds, the prefix without a
mask and the packed segments under one (`cached_attention`).
"""
import copy
import hashlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
from checkpoints import find_checkpoint, initial_args, initial_model, initial_path, load_model, read_json, unreadable
from lora import apply_lora, load_lora, merge_lora
from model import causal_attention, repeat_kv

# ----------------------------------------------------------------------------- the cache


class KVCache:
    """Preallocated keys and values for every layer. `length` is how many positions are filled;
    setting it back (e.g. to a shared prefix's length) discards what came after."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0
        self.max_len = max_len
        self.prefix = None         # the tokens prefill encoded (or load_prefix read) into the first positions
        self.prefix_logits = None  # the logits after the prefix's last token

    def reserve(self, T):
        """Where T new positions start (the filled length), once it is sure they fit. The model
        calls it before its layers, and adds T to `length` after them."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} filled + {T} new do not fit")
        return self.length

    def attend(self, layer_id, q, k, v, attn_mask=None):
        """One layer's attention for T new tokens (model.Attention calls it): their keys and values
        k, v (B, Hkv, T, hd) are written at `length`, then q (B, H, T, hd) attends. With keys before
        them, to all filled positions; `attn_mask` (T, M) covers the last M of them, so that eval
        packs several queries after one prefix, each seeing the prefix and its own tokens."""
        B, T, start = q.shape[0], q.shape[2], self.length
        self.k[layer_id][:B, :, start:start + T] = k
        self.v[layer_id][:B, :, start:start + T] = v
        if start == 0 and attn_mask is None:  # a cache's first tokens: plain causal attention, as in training
            return causal_attention(q, k, v)
        if attn_mask is None and T > 1:  # causal among the new tokens, all earlier ones visible
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return cached_attention(q, self.k[layer_id][:B, :, :start + T], self.v[layer_id][:B, :, :start + T], attn_mask)


def cached_attention(q, k, v, attn_mask=None):
    """q (B, H, T, hd) against cached k, v (B, Hkv, S, hd); attn_mask (T, M) covers the last M keys and
    every query sees all S - M keys before them (a shared prefix; None: M = 0). A dense
    (T, S) mask would drop SDPA off its fast kernels and cost, at a 32K prefix, more than the
    prefix's own attention, so the two parts are attended separately: the prefix with no mask
    (the H // Hkv query heads of a KV head stacked as rows: GQA without copying K/V), the masked
    rest by masked_attention_lse, and the two merged by their log-sum-exps, which is exactly
    softmax attention over the union."""
    B, H, T, D = q.shape
    S, M = k.shape[2], 0 if attn_mask is None else attn_mask.shape[-1]
    parts = []
    if S > M:
        y, lse = attention_lse(q.reshape(B, k.shape[1], -1, D), k[:, :, :S - M], v[:, :, :S - M])
        parts.append((y.reshape(B, H, T, D).float(), lse.reshape(B, H, T, 1).float()))
    if M:
        parts.append(masked_attention_lse(q, k[:, :, S - M:], v[:, :, S - M:], attn_mask))
    if len(parts) == 1:
        return parts[0][0].type_as(q)
    (y1, lse1), (y2, lse2) = parts
    total = torch.logaddexp(lse1, lse2)
    return (y1 * (lse1 - total).exp() + y2 * (lse2 - total).exp()).type_as(q)


def masked_attention_lse(q, k, v, attn_mask, rows=256):
    """Attention of q (B, H, T, hd) to k, v (B, Hkv, M, hd) under a (T, M) mask, with its
    log-sum-exp (B, H, T, 1), in fp32: a block of rows at a time, against only the span of columns
    that block's mask touches. Queries packed after a prefix see a few keys of their own segment,
    so this is a small part of the dense (T, M) scores (1/16 for 64-token segments in 2048)."""
    B, H, T, D = q.shape
    M = attn_mask.shape[-1]
    k, v = repeat_kv(k.float(), v.float(), H)
    seen = torch.cat([attn_mask, attn_mask.new_zeros(-T % rows, M)]).view(-1, rows, M).any(1)  # (blocks, M)
    spans = torch.stack([seen.int().argmax(-1), M - seen.flip(-1).int().argmax(-1)], 1).tolist()
    ys, lses = [], []
    for r, (a, b) in zip(range(0, T, rows), spans):
        s = q[:, :, r:r + rows].float() @ k[:, :, a:b].transpose(-1, -2) * D ** -0.5
        s.masked_fill_(~attn_mask[r:r + rows, a:b], float("-inf"))
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


# ----------------------------------------------------------------------------- prefill, extend, score, generate


# cuDNN's attention builds an execution plan for every new shape (~50 ms each on an H100, measured),
# and here every prompt has a new length: use the other kernels.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def new_cache(model, max_len):
    w = model.tok_embeddings.weight
    return KVCache(model.args, 1, max_len, w.device, w.dtype)


def prefill(model, cache, prefix):
    """Encode the shared prefix into an emptied cache, unless the cache already holds exactly this
    prefix (options, then gold answers, after one set of demonstrations; or one read from a file).
    Returns the logits after its last token (they predict a segment's first token when its input
    is empty). One causal forward with no mask; all-IGNORE targets skip the output layer, so no
    (P, vocab) logits."""
    if len(prefix) + 1 > cache.max_len:
        raise ValueError(f"prefix of {len(prefix)} tokens leaves no room in a cache of {cache.max_len}")
    if cache.prefix == prefix:  # still encoded: segments only ever write after it
        cache.length = len(prefix)
        return cache.prefix_logits
    cache.length, cache.prefix = 0, None
    ids = torch.tensor(prefix, device=cache.k[0].device)[None]
    with sdpa_kernel(NO_CUDNN):
        if len(prefix) > 1:
            model(ids[:, :-1], targets=torch.full_like(ids[:, :-1], data.IGNORE), cache=cache)
        cache.prefix_logits = model(ids[:, -1:], cache=cache)[0, -1]
    cache.prefix = list(prefix)
    return cache.prefix_logits


def extend(model, cache, prefix_len, tokens, seg, pos, slot_seg):
    """Append one row of tokens to the cache and return their logits (T, vocab). Token i belongs
    to segment seg[i] at position pos[i]: it attends to the whole prefix, to the cache slots of its
    own segment (slot prefix_len + j belongs to slot_seg[j]) and to its segment's tokens up to
    itself in this row; never to another segment. slot_seg is extended with seg. The attention mask covers
    the keys after the prefix only: the prefix is attended to without one (cached_attention)."""
    assert cache.length == prefix_len + len(slot_seg)
    dev = cache.k[0].device
    s = torch.tensor(seg, device=dev)
    attn_mask = torch.cat([s[:, None] == torch.tensor(slot_seg, dtype=torch.long, device=dev)[None, :],
                           (s[:, None] == s[None, :]).tril()], dim=1)  # segments are contiguous, in order
    logits = model(torch.tensor(tokens, device=dev)[None], cache=cache,
                   positions=torch.tensor(pos, device=dev), attn_mask=attn_mask)[0]
    slot_seg += seg
    return logits


def batches(sizes, budget):
    """Consecutive groups of indices whose sizes sum to at most budget (a bigger item goes alone)."""
    group, used = [], 0
    for i, n in enumerate(sizes):
        if group and used + n > budget:
            yield group
            group, used = [], 0
        group.append(i)
        used += n
    if group:
        yield group


@torch.inference_mode()
def score_options(model, prefix_tokens, segments, batch_tokens=2048, cache=None, reduction="sum"):
    """Loss of each segment's answer, every segment (input tokens, answer tokens) following the
    shared prefix: its summed NLL, the negative log-probability of the whole span ("sum", how
    options are ranked by default), or the per-token mean over the span ("mean", MetaICL's rule). The prefix is encoded once; segments are packed into
    rows of about batch_tokens tokens."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    sizes = [len(x) + len(y) for x, y in segments]
    cache = cache or new_cache(model, len(prefix_tokens) + max(batch_tokens, max(sizes)))
    last = prefill(model, cache, prefix_tokens)
    P = cache.length
    if max(sizes) > cache.max_len - P:
        raise ValueError(f"a segment of {max(sizes)} tokens does not fit after a prefix of {P} (cache of {cache.max_len})")
    losses = []
    for group in batches(sizes, min(batch_tokens, cache.max_len - P)):
        cache.length = P  # drop the previous batch's segments
        tokens, seg, pos, rows, targets, owner = [], [], [], [], [], []
        for n, j in enumerate(group):
            x, y = segments[j]
            assert y, "an answer span is never empty ('⏎ y ⏎')"
            start = len(tokens)
            tokens += x + y
            seg += [j] * (len(x) + len(y))
            pos += range(P, P + len(x) + len(y))
            # logits at t predict token t+1; an empty input's first answer token is predicted by the
            # prefix's last logits, appended as row -1 below
            rows += [start + len(x) + t - 1 if len(x) + t > 0 else -1 for t in range(len(y))]
            targets += y
            owner += [n] * len(y)
        logits = torch.cat([extend(model, cache, P, tokens, seg, pos, []), last[None]])
        dev = logits.device
        nll = F.cross_entropy(logits[torch.tensor(rows, device=dev)], torch.tensor(targets, device=dev), reduction="none")
        owner = torch.tensor(owner, device=dev)
        sums = torch.zeros(len(group), device=dev).index_add_(0, owner, nll)
        losses += (sums if reduction == "sum" else sums / torch.bincount(owner, minlength=len(group))).tolist()
    cache.length = P
    return losses


@torch.inference_mode()
def score_options_uncached(model, prefix_tokens, segments, reduction="sum"):
    """The reference: each prompt re-encoded from scratch with a plain causal forward, the loss on
    its answer span exactly as training computes it (targets_for, loss_mask 'last'). For tests and bench."""
    dev = model.tok_embeddings.weight.device
    losses = []
    for x, y in segments:
        tokens = prefix_tokens + x + y
        targets = data.targets_for(tokens, [(len(tokens) - len(y), len(tokens))], "last")
        loss = model(torch.tensor(tokens, device=dev)[None], torch.as_tensor(targets, device=dev)[None]).item()
        losses.append(loss * len(y) if reduction == "sum" else loss)
    return losses


def pick(logits, temperature=0.0, top_k=None, generator=None):
    """Next tokens from (n, vocab) logits: the most likely (temperature 0), else a sample from the
    top_k most likely at that temperature."""
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0].tolist()


@torch.inference_mode()
def generate(model, prefix_tokens, inputs, stop_id, eos_id, max_new_tokens=32, batch_tokens=2048, cache=None,
             temperature=0.0, top_k=None, seed=0, on_token=None):
    """Continuations of every input after the shared prefix (greedy unless temperature > 0). An
    answer span is '⏎ y ⏎', so the model first emits the opening newline; a continuation ends at
    the second stop_id (the closing newline), at eos, or after max_new_tokens (the stopping token
    counts, and is not returned). Several inputs decode together, one row per step, each token at
    its own position. on_token(i, token) sees each token of input i as it comes (streaming)."""
    cache = cache or new_cache(model, len(prefix_tokens) + max(batch_tokens, max(map(len, inputs)) + max_new_tokens))
    last = prefill(model, cache, prefix_tokens)
    P = cache.length
    caps = [min(max_new_tokens, cache.max_len - P - len(x)) for x in inputs]  # never past the cache
    if min(caps) < 1:
        raise ValueError(f"an input of {max(map(len, inputs))} tokens leaves no room after a prefix of {P} (cache of {cache.max_len})")
    g = torch.Generator(last.device).manual_seed(seed) if temperature > 0 else None
    out = [[] for _ in inputs]
    for group in batches([len(x) + c for x, c in zip(inputs, caps)], min(batch_tokens, cache.max_len - P)):
        cache.length, slot_seg = P, []
        # all inputs in one row; the logits at each one's last token give its first new token
        tokens, seg, pos, ends = [], [], [], []
        for j in group:
            tokens += inputs[j]
            seg += [j] * len(inputs[j])
            pos += range(P, P + len(inputs[j]))
            ends.append(len(tokens) - 1 if inputs[j] else -1)  # -1: the prefix's last logits
        logits = extend(model, cache, P, tokens, seg, pos, slot_seg) if tokens else last[None][:0]  # (0, vocab)
        next_ids = pick(torch.cat([logits, last[None]])[torch.tensor(ends, device=last.device)], temperature, top_k, g)
        active, newlines = group, dict.fromkeys(group, 0)
        while True:
            feed = []
            for j, t in zip(active, next_ids):
                if t == eos_id or (t == stop_id and newlines[j] == 1):
                    continue  # the answer's closing newline (or eos): done
                newlines[j] += t == stop_id
                out[j].append(t)
                if on_token:
                    on_token(j, t)
                if len(out[j]) < caps[j]:
                    feed.append(j)
            if not feed:
                break
            active = feed
            logits = extend(model, cache, P, [out[j][-1] for j in active], active,
                            [P + len(inputs[j]) + len(out[j]) - 1 for j in active], slot_seg)
            next_ids = pick(logits, temperature, top_k, g)
    cache.length = P
    return out


# ----------------------------------------------------------------------------- a trained checkpoint, for use

def load_models(path, device, dtype, base=True):
    """(base, trained, tokenizer, config) from a checkpoint or an out_dir (its newest checkpoint).
    The base is what training started from: the random init of init='scratch' (same seed, same
    shape), else the model in `init`. base=False skips it (None)."""
    ckpt = find_checkpoint(path)
    why = unreadable(ckpt, ("consolidated.safetensors", "lora.safetensors", "config.json"))
    if why:
        raise ValueError(f"{why}\n  checkpoint {ckpt} cannot be read; pass an older ckpt-* folder to use that one")
    config = dict(read_json(os.path.join(ckpt, "config.json")), checkpoint=ckpt)
    tok_path = os.path.join(ckpt, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path}: tokenizer not found (train.py copies it into every checkpoint)")
    tok = data.Tokenizer(tok_path)

    def initial(args):  # as train.py makes it
        if config["init"] == "scratch" and args is None:
            args = initial_args("scratch", config["preset"], tok.vocab_size)
        init = config["init"] if config["init"] == "scratch" else initial_path(config)
        return initial_model(init, args, config["seed"], device, dtype)

    if config.get("lora_rank"):  # an adapter on top of the initial model
        adapter = os.path.join(ckpt, "lora.safetensors")
        if not os.path.isfile(adapter):
            raise FileNotFoundError(f"{adapter}: adapter not found (config lora_rank={config['lora_rank']})")
        base_model = initial(None)
        trained = copy.deepcopy(base_model) if base else base_model
        apply_lora(trained, config["lora_rank"], config["lora_alpha"], targets=config["lora_targets"])
        load_lora(trained, adapter)  # its errors name the file and the mismatching key or setting
        merge_lora(trained)          # W + BA folded once: eval runs at the base model's speed
        base_model = base_model if base else None
    else:  # every weight trained: the checkpoint holds them all
        trained = load_model(ckpt, device, dtype)
        base_model = initial(trained.args) if base else None
    if tok.vocab_size > trained.args.vocab_size:
        raise ValueError(f"{tok_path}: {tok.vocab_size} tokens, the model has only {trained.args.vocab_size}")
    for m in (base_model, trained):
        if m is not None:
            m.eval()
    return base_model, trained, tok, config


# ----------------------------------------------------------------------------- the prefix cache file

def identity(model, tok, config):
    """What a cached prefix was made from. The model is a hash of 64 values sampled from every
    weight as loaded: the same for one checkpoint wherever it lies, in either layout, and
    different for any other weights (fine-tuning or a merged adapter moves every element)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(name.encode() + flat[::max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    with open(tok.path, "rb") as f:
        tokenizer = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(format="manyicl-prefix-cache-1", model=h.hexdigest()[:16], tokenizer=tokenizer,
                dtype=str(model.tok_embeddings.weight.dtype), checkpoint=config["checkpoint"])


def save_prefix(cache, path, ident):
    """The encoded prefix (keys and values of every layer, the logits after it) and its identity."""
    from safetensors.torch import save_file
    P, tensors = cache.length, {"tokens": torch.tensor(cache.prefix), "logits": cache.prefix_logits.float().cpu()}
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):
        tensors[f"k.{i}"], tensors[f"v.{i}"] = k[0, :, :P].contiguous().cpu(), v[0, :, :P].contiguous().cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=ident)
    os.replace(path + ".tmp", path)  # never a half-written cache under the name


def load_prefix(cache, path, ident, prefix):
    """Fill an emptied cache from a file save_prefix wrote for this very model, tokenizer, dtype
    and prefix; refuse any other, naming the file."""
    from safetensors import SafetensorError, safe_open
    try:
        f = safe_open(path, "pt", device=str(cache.k[0].device))
    except SafetensorError as e:
        raise ValueError(f"{path}: cannot read this prefix cache ({e}); delete it to make a new one") from None
    with f:
        meta = f.metadata() or {}
        for key, what in (("format", "something else"), ("model", "another model"),
                          ("tokenizer", "another tokenizer"), ("dtype", "another dtype")):
            if meta.get(key) != ident[key]:
                raise ValueError(f"{path}: a prefix cache made for {what} ({key} {meta.get(key)}, made from "
                                 f"{meta.get('checkpoint')}; now {ident[key]}): pass another --cache, or delete it")
        tokens = f.get_tensor("tokens").tolist()
        if tokens != prefix:
            raise ValueError(f"{path}: a prefix cache made for other demonstrations ({len(tokens)} tokens; these "
                             f"pack to {len(prefix)}{', and differ' if len(tokens) == len(prefix) else ''}): "
                             f"pass another --cache, or delete it")
        if len(prefix) + 1 > cache.max_len:
            raise ValueError(f"{path}: a prefix of {len(prefix)} tokens leaves no room in a context of {cache.max_len}")
        for i in range(len(cache.k)):
            cache.k[i][0, :, :len(prefix)] = f.get_tensor(f"k.{i}")
            cache.v[i][0, :, :len(prefix)] = f.get_tensor(f"v.{i}")
        cache.prefix_logits = f.get_tensor("logits")
    cache.length, cache.prefix = len(prefix), list(prefix)
