"""
Use a trained ManyICL model: many demonstrations, then your own inputs, one answer each.

    python sample.py --ckpt=out --demos=tasks/t/train.jsonl --k=64 --prompt="an input"
    python sample.py --ckpt=out --demos=tasks/t/train.jsonl --k=max --queries=queries.jsonl  # one answer per line
    python sample.py --ckpt=out --demos=tasks/t/train.jsonl --k=16                          # inputs from stdin
    python sample.py ... --cache=t.prefix.safetensors     # encode the demonstrations once, ever

The first k examples of --demos (MetaICL JSONL: input, output) are packed exactly as training packs
them (data.pack) and encoded once into a KV cache; every query follows them. A query with options
({"input": ..., "options": [...]}) is answered with the option whose answer span scores best, as
eval.py scores them; any other by generation up to the answer's closing newline (greedy, or
sampled with --temperature/--top_k), streamed as it comes. Answers go to stdout beside their
inputs (input, tab, answer: one line each); notes go to stderr. --k=max takes as many as fit in
the context the model was trained at (--seq_len), leaving --room tokens for a query and its answer.

--cache=PATH keeps the encoded demonstrations (every layer's keys and values for the prefix, as
safetensors) with what identifies them: the model's weights, the tokenizer, the prefix tokens and
the dtype. Later calls read them instead of encoding the prefix again (a 32K-token prompt is
encoded once per task, ever); a cache made for anything else is refused.

This file is also where KV-cache inference lives, for eval.py and bench.py: a shared prefix is
encoded once (`prefill`), then many segments (queries, options) are packed after it in one row
(`extend`), each attending to the prefix and to its own tokens only, at its own positions.
Rewinding cache.length to the prefix discards them (`score_options`, `generate`).
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
from checkpoints import load_models
from configurator import dtype_named
from model import KVCache

# ----------------------------------------------------------------------------- KV-cache inference


# cuDNN's attention builds an execution plan for every new shape (~50 ms each on an H100, measured),
# and here every prompt has a new length: use the other kernels.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def new_cache(model, max_len):
    a, w = model.args, model.tok_embeddings.weight
    return KVCache(a, 1, max_len, w.device, w.dtype)


def prefill(model, cache, prefix):
    """Encode the shared prefix into an emptied cache, unless the cache already holds exactly this
    prefix (options, then gold answers, after one set of demonstrations; or one read from a file).
    Returns the logits after its last token (they predict a segment's first token when its input
    is empty). One causal forward with no mask; all-IGNORE targets skip the output layer, so no
    (P, vocab) logits."""
    if len(prefix) + 1 > cache.max_len:
        raise ValueError(f"prefix of {len(prefix)} tokens leaves no room in a cache of {cache.max_len}")
    if getattr(cache, "prefix", None) == prefix:  # still encoded: segments only ever write after it
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
    the keys after the prefix only: model.py attends to the prefix without one (cached_attention)."""
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


# ----------------------------------------------------------------------------- the command line


def choose_demos(pool, k, seq_len, room):
    """The first k examples, or (k='max') as many as fit leaving room tokens of the context free.
    The pool may be a generator: examples past those are never tokenized."""
    if k == "max":
        return data.fill(pool, seq_len - room)
    wanted = list(itertools.islice(pool, k))
    if len(wanted) < k:
        raise ValueError(f"k={k}: there are only {len(wanted)} demonstrations")
    demos = data.fill(wanted, seq_len - 1)  # a given k: whatever room is left, each query is checked as it comes
    if len(demos) < k:
        raise ValueError(f"k={k} demonstrations do not fit in seq_len={seq_len}")
    return demos


def read_queries(a):
    """--prompt, or the lines of --queries (JSON objects: input and maybe options), or of stdin."""
    if a.prompt is not None:
        yield dict(input=a.prompt)
    elif a.queries:
        with open(a.queries, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        q = json.loads(line)
                    except json.JSONDecodeError:
                        q = None
                    options = (q.get("options") or []) if isinstance(q, dict) else None
                    if not (isinstance(q, dict) and isinstance(q.get("input"), str) and isinstance(options, list)
                            and all(isinstance(o, str) for o in options)):
                        raise ValueError(f"{a.queries}:{n}: expected a JSON object with an 'input' string "
                                         f"and maybe 'options', a list of strings")
                    yield q
    else:
        if sys.stdin.isatty():
            print("one input per line (Ctrl-D to end)", file=sys.stderr)
        for line in sys.stdin:
            yield dict(input=line.rstrip("\n"))


def answer(model, cache, prefix, tok, query, n_demos, a):
    """Print the query's input, a tab and its answer: the best option, or a generation streamed."""
    options = query.get("options") or []
    enc = data.encode_example(tok, dict(input=query["input"], output="", options=options))
    x = enc.input if n_demos else enc.first_input  # as pack() places it after the demonstrations
    print(query["input"].replace("\n", " ") + "\t", end="", flush=True)
    if options:
        losses = score_options(model, prefix, [(x, o) for o in enc.options], cache=cache, reduction=a.reduction)
        print(options[min(range(len(options)), key=losses.__getitem__)], flush=True)
        return
    ids, shown = [], ""
    def stream(_, token):  # print what the decoded answer settles to (a piece may still change)
        nonlocal shown
        ids.append(token)
        text = tok.decode(ids).strip().replace("\n", " ")
        if text.startswith(shown):
            print(text[len(shown):], end="", flush=True)
            shown = text
    generate(model, prefix, [x], tok.newline_id, tok.eos_id, a.max_new_tokens, cache=cache,
             temperature=a.temperature, top_k=a.top_k, seed=a.seed, on_token=stream)
    print(flush=True)


def main(argv=None):
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="an out_dir (its newest complete checkpoint) or a ckpt-* folder")
    p.add_argument("--demos", required=True, help="demonstrations: a JSONL task file (input, output), in order")
    p.add_argument("--k", default="max", type=lambda v: v if v == "max" else int(v), help="how many (default: max)")
    p.add_argument("--prompt", help="one input (else --queries, else stdin)")
    p.add_argument("--queries", help="JSONL: one query per line, {\"input\": ...} with \"options\" if any")
    p.add_argument("--cache", help="prefix cache file: written on the first call, read on later ones")
    p.add_argument("--seq_len", type=int, help="context (default: the checkpoint's training seq_len)")
    p.add_argument("--room", type=int, default=256, help="tokens --k=max leaves for a query and its answer")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, help="sample from the top_k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="for sampling")
    p.add_argument("--reduction", choices=["sum", "mean"], default="sum",
                   help="an option's score: its answer span's summed loss (its probability; eval.py's default), or per token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    a = p.parse_args(argv)
    for name, value, least in (("k", a.k, 0), ("temperature", a.temperature, 0), ("top_k", a.top_k, 1),
                               ("max_new_tokens", a.max_new_tokens, 1), ("room", a.room, 1)):
        if value is not None and value != "max" and value < least:
            p.error(f"--{name}={value}: must be at least {least}")
    dtype = dtype_named(a.dtype, a.device)
    note = lambda *m: print(*m, file=sys.stderr, flush=True)

    _, model, tok, config = load_models(a.ckpt, a.device, dtype, base=False)
    seq_len = a.seq_len or config["seq_len"]
    model.check_length(seq_len)  # the model's max_seq_len
    pool = (data.encode_example(tok, ex) for ex in data.read_examples(a.demos))
    demos = choose_demos(pool, a.k, seq_len, a.room)
    prefix = data.pack(demos, tok.bos_id)[0]  # the same function as training
    cache = new_cache(model, seq_len)
    t0 = time.perf_counter()
    if a.cache and os.path.exists(a.cache):
        load_prefix(cache, a.cache, identity(model, tok, config), prefix)
        how = f"read from {a.cache}"
    else:
        with torch.inference_mode():
            prefill(model, cache, prefix)
        how = "encoded"
        if a.cache:
            save_prefix(cache, a.cache, identity(model, tok, config))
            how += f" and written to {a.cache}"
    note(f"{config['checkpoint']}: {len(demos)} demonstrations from {a.demos}, {len(prefix)} tokens, "
         f"{how} in {time.perf_counter() - t0:.2f} s")
    for n, query in enumerate(read_queries(a)):
        try:
            answer(model, cache, prefix, tok, query, len(demos), a)
        except ValueError as e:  # one query too long for the room left: say so, go on with the next
            print(flush=True)
            note(f"error: {e}")
        if n == 0:
            note(f"first answer {time.perf_counter() - t_start:.2f} s after start")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        raise SystemExit(f"error: {e}")
