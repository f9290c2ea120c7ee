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

The KV-cache inference it runs (prefill, score_options, generate, the prefix cache file) lives in
inference.py, which eval.py uses too; this file is the command line alone.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

import data
from configurator import dtype_named
from inference import generate, identity, load_models, load_prefix, new_cache, prefill, save_prefix, score_options


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
    x = enc.input_after(n_demos)  # as pack() places it after the demonstrations
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
