"""
Speed and memory of the real training step: the same model, LoRA, loss, activation
checkpointing, dtype and SDPA settings as train.py, on random weights (no download).

    python bench.py                                        # tiny preset on the CPU
    python bench.py --preset=mistral-7b --seq_len=32768    # one GPU, Mistral-7B-v0.3 shapes
    python bench.py --preset=mistral-7b --seq_len=8192 --sweep=True     # ablations, one run
    python bench.py --preset=mistral-7b --seq_len=32768 --sweep=True --compile=True   # the same, compiled
    python bench.py --preset=mistral-7b --seq_len=32768 --compile=True --activation_checkpointing=auto --memory_budget_gib=38
    python bench.py --preset=mistral-7b --prefix=32000 --steps=0        # eval shared-prefix cache
    python bench.py --init=checkpoints/Mistral-7B-v0.3 --seq_len=32768  # a downloaded folder's shapes
    python bench.py --data=True --steps=0                  # tokenize + pack throughput, one core

FLOPs per token (N = matmul weights, d = n_heads * head_dim, L layers, T = seq_len; causal
attention counted once, flash's backward recomputing the scores once more):
  model FLOPs (MFU), LoRA on a frozen base   4N + 6 L d T
  hardware FLOPs (HFU), full checkpointing    6N + 9 L d T   (selective: 6N + 7 L d T, none: 4N + 7 L d T;
                                              a per-layer plan: each block's share of these)
"""
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import model as model_module
from checkpoints import model_args
from configurator import parse_config
from data import IGNORE
from lora import LoRALinear, apply_lora, merge_lora
from memory import checkpointing_mode, estimate_peak, flops_per_token, peak_flops, sdpa_backend, training_memory
from model import PRESETS, ModelArgs, Transformer


@dataclass
class BenchConfig:
    preset: str = "tiny"
    init: str = ""                       # a model folder of either layout: its shapes (weights random), else preset's
    seq_len: int = 1024
    batch_size: int = 1
    lora_rank: int = 16                  # LoRA r16 on all seven linears, as the paper's setup
    lora_alpha: float = 32.0
    activation_checkpointing: str = "full"   # none | full | selective | auto (per block, fits memory_budget_gib)
    memory_budget_gib: float = 0.0       # peak memory "auto" plans for; 0 = 90% of the GPU's
    fused_lora: bool = False             # lora.py's fused path: one A matmul for wq/wk/wv and w1/w3, addmm
    sdpa_backend: str = "auto"
    compile: bool = False
    target_every: int = 40               # one supervised token in 40 (ManyICL answers are short)
    loss: str = "targets"                # targets (model.py's) | full_logits (the plain alternative)
    steps: int = 5                       # timed steps (median reported)
    warmup: int = 2
    sweep: bool = False                  # ablations: each optimisation against its plain alternative
    prefix: int = 0                      # >0: eval shared-prefix benchmark with this prefix length
    queries: int = 32
    data: bool = False                   # tokenize + pack throughput
    device: str = "auto"


def make_model(cfg, device, dtype):
    """Random weights straight on the device: meta -> to_empty -> init in place."""
    args = model_args(cfg.init) if cfg.init else ModelArgs(**PRESETS[cfg.preset])
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype).init_weights(0)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model


def which_sdpa(model, device, dtype, backend):
    """The aten SDPA op the attention of block 0 dispatches to, read off the profiler."""
    x = torch.randn(1, 256, model.args.dim, device=device, dtype=dtype)
    cos, sin = model_module.rope_cos_sin(torch.arange(256, device=device), model.args.head_dim, model.args.rope_theta)
    with torch.profiler.profile() as prof, sdpa_backend(backend), torch.no_grad():
        model.layers[0].attention(x, cos, sin)
    names = {e.name for e in prof.events() if "scaled_dot_product" in e.name and e.name.startswith("aten::_")}
    return ",".join(sorted(n.replace("aten::_scaled_dot_product_", "") for n in names)) or "?"


def time_training(cfg, model, device, dtype, checkpointing=None, backend=None, full_logits=None, gqa=True, fused=None):
    """Median step time of forward + backward + AdamW on a (batch, seq_len) ManyICL-like batch.
    A model without trainable weights (the base without LoRA) still runs the whole backward pass:
    the embeddings' output asks for a gradient, so every block computes its input gradients."""
    checkpointing = checkpointing or cfg.activation_checkpointing
    backend = backend or cfg.sdpa_backend
    full_logits = cfg.loss == "full_logits" if full_logits is None else full_logits
    model.activation_checkpointing = checkpointing_mode(checkpointing, model, cfg, dtype)
    plan = model.checkpointing_plan()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fused = cfg.fused_lora if fused is None else fused
    has_gqa = model_module.SDPA_HAS_GQA
    model_module.SDPA_HAS_GQA = gqa and has_gqa  # False: the repeated-K/V fallback
    params = [p for p in model.parameters() if p.requires_grad]
    fixed, estimate = training_memory(model, dtype)
    est_peak = estimate_peak(model.args, cfg.seq_len, cfg.batch_size, plan, fixed, **estimate)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") if params else None
    hook = None if params else model.tok_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
    forward = model.compile_blocks() if cfg.compile else model  # as train.py
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.args.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(device)
    y = torch.full_like(x, IGNORE)
    y[:, ::cfg.target_every] = x[:, 1::cfg.target_every][:, : y[:, ::cfg.target_every].shape[1]]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        with sdpa_backend(backend):
            with autocast:
                if full_logits:  # the plain alternative: (B, T, vocab) fp32 logits, then CE
                    logits = forward(x)
                    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
                else:
                    loss = forward(x, y)
            loss.backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    model_module.SDPA_HAS_GQA = has_gqa
    if hook:
        hook.remove()
    dt = statistics.median(times)
    tokens = cfg.batch_size * cfg.seq_len
    a = model.args
    n = flops_per_token(a, cfg.seq_len, lora=True) - 6 * a.n_layers * a.n_heads * a.head_dim * cfg.seq_len
    attn = a.n_layers * a.n_heads * a.head_dim * cfg.seq_len
    share = lambda *schemes: sum(s in schemes for s in plan) / len(plan)  # of the blocks
    hw = n + 7 * attn + share("selective", "full") * n / 2 + share("full") * 2 * attn  # recomputed forward
    peak = peak_flops(device)
    return {"ms": dt * 1000, "tokens_per_s": tokens / dt,
            "mfu": flops_per_token(a, cfg.seq_len, lora=True) * tokens / dt / peak if peak else None,
            "hfu": hw * tokens / dt / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "est_gib": est_peak / 2**30, "plan": plan}


def row(name, r):
    if isinstance(r, str):
        return f"{name:<42} {r}"
    fmt = lambda v, f: "-" if v is None else f.format(v)
    plan = r["plan"]
    mixed = "" if len(set(plan)) == 1 else "  plan: " + ", ".join(f"{plan.count(s)} {s}" for s in ("full", "selective", "none"))
    return (f"{name:<42} {r['ms']:>9.0f} ms {r['tokens_per_s']:>9.0f} tok/s  MFU {fmt(r['mfu'], '{:.1%}'):>6}"
            f"  HFU {fmt(r['hfu'], '{:.1%}'):>6}  peak {fmt(r['peak_mem_gib'], '{:.1f}'):>5} GiB (est. {r['est_gib']:.1f}){mixed}")


def attempt(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except Exception as e:  # a variant this torch/GPU cannot run is a row, not a crash
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


def bench_prefix(cfg, model, device, dtype):
    """Eval's shared prefix: P demonstration tokens, Q queries of ~64 tokens with 2 options each.
    Cached (prefill once, pack the queries after it) against re-encoding the prefix per option."""
    from inference import score_options, score_options_uncached
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, model.args.vocab_size, (cfg.prefix,), generator=g).tolist()
    segments = []
    for q in range(cfg.queries):
        query = torch.randint(3, model.args.vocab_size, (60,), generator=g).tolist()
        for option in range(2):
            segments.append((query, torch.randint(3, model.args.vocab_size, (4,), generator=g).tolist()))
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        score_options(model, prefix, segments[:2]); sync()
        t0 = time.perf_counter(); cached = score_options(model, prefix, segments); sync(); t_cached = time.perf_counter() - t0
        n_uncached = min(len(segments), 8)  # re-encoding is slow: time a few, scale up
        t0 = time.perf_counter(); plain = score_options_uncached(model, prefix, segments[:n_uncached]); sync()
        t_plain = (time.perf_counter() - t0) * len(segments) / n_uncached
    diff = max(abs(a - b) for a, b in zip(cached, plain))
    print(f"eval prefix {cfg.prefix} tokens, {cfg.queries} queries x 2 options: cached {t_cached:.2f} s, "
          f"re-encoded {t_plain:.2f} s (est.), speedup {t_plain / t_cached:.1f}x, max score diff {diff:.2e}")
    # sample.py --cache: the encoded prefix written once, then read instead of encoded
    import os, tempfile
    from inference import load_prefix, new_cache, prefill, save_prefix
    ident = dict(format="manyicl-prefix-cache-1", model="bench", tokenizer="-", dtype=str(dtype), checkpoint="bench")
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"), \
            tempfile.TemporaryDirectory() as d:
        cache, path = new_cache(model, len(prefix) + 1), os.path.join(d, "prefix.safetensors")
        t0 = time.perf_counter(); prefill(model, cache, prefix); sync(); t_encode = time.perf_counter() - t0
        save_prefix(cache, path, ident)
        cache.prefix = None
        t0 = time.perf_counter(); load_prefix(cache, path, ident, prefix); sync(); t_read = time.perf_counter() - t0
        size = os.path.getsize(path)
    print(f"prefix cache file ({size / 2**30:.2f} GiB): read in {t_read:.2f} s (just written: from the page cache), "
          f"encoding the prefix {t_encode:.2f} s")


def bench_data(cfg):
    """Tokenize + pack throughput on one core, with a 32768-piece BPE like Mistral's."""
    import os, tempfile
    from data import TrainSampler, Tokenizer, encode_tasks
    from suite import nonce_word, train_tokenizer
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    lexicon = list({nonce_word(rng) + nonce_word(rng) for _ in range(60000)})
    sentence = lambda n: " ".join(rng.choice(lexicon, n))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = train_tokenizer([sentence(12) for _ in range(60000)], os.path.join(d, "sp"), vocab_size=32768)
        tok = Tokenizer(path)
        print(f"trained a {tok.vocab_size}-piece tokenizer in {time.perf_counter() - t0:.0f} s")
    tasks = {f"t{i}": [{"input": sentence(30), "output": sentence(3)} for _ in range(2000)] for i in range(4)}
    t0 = time.perf_counter()
    encoded, _ = encode_tasks(tasks, tok, cfg.seq_len)
    t_enc = time.perf_counter() - t0
    n_tok = sum(len(e.input_after_separator) + len(e.answer) for v in encoded.values() for e in v)
    sampler = TrainSampler(encoded, tok.bos_id, cfg.seq_len)
    t0 = time.perf_counter()
    packed = sum(len(sampler.sequence(0, i)[0]) for i in range(50))
    t_pack = time.perf_counter() - t0
    print(f"tokenize: {n_tok / t_enc:,.0f} tokens/s/core; pack (seq_len={cfg.seq_len}): {packed / t_pack:,.0f} tokens/s/core")


def main(argv):
    cfg = parse_config(argv, BenchConfig)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if use_cuda else 'CPU'}, "
          f"{'init ' + cfg.init if cfg.init else 'preset ' + cfg.preset}, seq_len {cfg.seq_len}, batch {cfg.batch_size}, LoRA r{cfg.lora_rank}")
    if cfg.data:
        bench_data(cfg)
    if not cfg.steps and not cfg.prefix:
        return
    model = make_model(cfg, device, dtype)
    if cfg.prefix:
        bench_prefix(cfg, model, device, dtype)
    if not cfg.steps:
        return
    print(f"SDPA kernel ({cfg.sdpa_backend}): {which_sdpa(model, device, dtype, cfg.sdpa_backend)}")
    name = f"train step ({cfg.activation_checkpointing} ckpt, {cfg.sdpa_backend}, loss {cfg.loss})"
    print(row(name, attempt(time_training, cfg, model, device, dtype)))
    if cfg.sweep:
        variants = [("ckpt full", dict(checkpointing="full")), ("ckpt selective", dict(checkpointing="selective")),
                    ("ckpt none", dict(checkpointing="none")), ("ckpt auto (per block, fits the budget)", dict(checkpointing="auto")),
                    ("repeated K/V instead of enable_gqa", dict(gqa=False)), ("full-vocabulary logits loss", dict(full_logits=True))]
        if cfg.lora_rank:
            variants += [("LoRA plain" if cfg.fused_lora else "LoRA fused (shared A, addmm)",
                          dict(fused=not cfg.fused_lora))]
        if use_cuda:
            variants += [(f"sdpa {b}", dict(backend=b)) for b in ("flash", "cudnn", "efficient")]
        for name, kw in variants:
            print(row(name, attempt(time_training, cfg, model, device, dtype, **kw)))
        if cfg.lora_rank:  # what the adapters cost: the same step on the frozen base, then fresh adapters again
            merge_lora(model)
            print(row("base model, no LoRA (input gradients only)", attempt(time_training, cfg, model, device, dtype)))
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        if not cfg.compile:
            cfg.compile = True
            print(row("torch.compile", attempt(time_training, cfg, model, device, dtype)))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, KeyError) as e:  # a bad --init folder: a message, not a traceback
        sys.exit(f"error: {e}")
