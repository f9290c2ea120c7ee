"""
k-shot evaluation of a ManyICL checkpoint on held-out tasks, base model vs trained, and the
forgetting check (perplexity of a long text at several context lengths).

    python eval.py                                     # newest checkpoint in out/, built-in suite
    python eval.py --ckpt out/ckpt-000300 --tasks my_tasks/ --ks 0,16,max --seeds 100,13
    python eval.py --ppl_file book.txt --ppl_lengths 1024,4096,16384,32768

Held-out tasks (--tasks: files and/or folders, read by data.load_tasks) each need a demonstration
pool (split "train") and a test set (split "test"):
    {task}/train.jsonl + {task}/test.jsonl           the built-in suite: data/suite/eval/ (suite.ensure_suite)
    {task}_{k}_{seed}_train.jsonl + ..._test.jsonl   MetaICL's files; pass one seed's pair per task

MetaICL's settings (--setting=config/{setting}.json, --tasks=its data folder): the "test" tasks,
for seed s the test set {task}_16_{s}_test.jsonl and the pool the largest {task}_{k}_{s}_train.jsonl.

For each k and seed the demonstrations are the first k of np.random.default_rng(seed).permutation
of the pool ("max": as many as fit in seq_len, leaving room for the task's longest test query and
answer), the same for every query of the task (MetaICL), packed by data.pack: the function that
builds training sequences, so prompts are token-identical to them. Scores are the mean and the
worst over seeds of each task's main metric, then macro-averaged over tasks.
  options:   each option's answer span "⏎ option ⏎" (exactly what training supervises) is scored by
             its summed loss (the option's probability; --option_score=mean: per token, MetaICL's
             rule), lowest wins; accuracy (main metric) and macro-F1.
  free-form: greedy generation until the answer's closing newline; ROUGE-L (main), exact match, token F1.

Shared prefix: every query of a task at one (k, seed) follows the same demonstrations, so they are
encoded once into a KV cache; then many queries (x options) are packed *after* it in one row, each
attending to the prefix and to its own tokens only, at its own positions (inference.py holds this
KV-cache inference: prefill, extend, score_options, generate). Perplexity: see `perplexity`.
"""
import argparse
import json
import math
import os
import re
import time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import data
from configurator import dtype_named
from metaicl import setting_eval_files
from inference import generate, load_models, new_cache, score_options
from suite import SUITE_DIR, ensure_suite

# ----------------------------------------------------------------------------- metrics

def rouge_tokens(text):
    # the rouge-score package's default tokenizer: lowercase, non-alphanumeric runs -> space, no stemming
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F-measure (beta=1): longest common subsequence of tokens; empty -> 0.0."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(p, r) if p and r else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction, reference):
    """SQuAD-style F1 over bags of lowercase whitespace tokens."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def macro_f1(predictions, golds):
    """Mean F1 over the classes gold or predicted at least once (sklearn's 'macro'): a gold class
    never predicted scores 0; a class neither predicted nor gold does not count."""
    scores = []
    for c in sorted(set(golds) | set(predictions)):
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        scores.append(2 * tp / (predictions.count(c) + golds.count(c)))  # 2tp / (2tp + fp + fn)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- prompts

def answer_room(queries, n_demos):
    """Tokens the longest test query plus its longest answer (or option) needs after the prefix."""
    return max(len(q.input_after(n_demos)) + max(map(len, q.options or [q.answer])) for q in queries)


def draw_demos(pool, k, seed, seq_len, room, shots="random"):
    """The first k of the seed's order of the pool (k='max': as many as fit, in that order): a
    permutation, or labels balanced round-robin with shots="stratified" (data.shot_order).
    Returns (demos, None), or (None, why not) when they cannot be drawn or do not fit."""
    order = data.shot_order(pool, np.random.default_rng(seed), shots)
    if k == "max":
        return data.fill((pool[i] for i in order), seq_len - room), None
    if k > len(pool):
        return None, f"k={k} is larger than the demonstration pool ({len(pool)} examples)"
    demos = [pool[i] for i in order[:k]]
    length = len(data.pack(demos, 0)[0])
    if length + room > seq_len:
        return None, (f"k={k} demonstrations (seed {seed}) take {length} tokens, plus {room} for the "
                      f"longest test query and answer: more than seq_len={seq_len}")
    return demos, None


# ----------------------------------------------------------------------------- evaluation

def evaluate_prompt(model, cache, demos, queries, tok, batch_tokens, max_new_tokens, option_score="sum"):
    """Metrics of every query (raw example, Encoded) after one set of demonstrations, and how many
    tokens were forwarded with the shared prefix versus re-encoding every prompt from scratch."""
    prefix = data.pack(demos, tok.bos_id)[0]  # the same function as training; [<s>] for k=0
    inputs = [q.input_after(len(demos)) for _, q in queries]
    golds = [ex["output"] for ex, _ in queries]
    if queries[0][0]["options"]:
        segments = [(x, o) for x, (_, q) in zip(inputs, queries) for o in q.options]
        summed = np.array(score_options(model, prefix, segments, batch_tokens, cache, reduction="sum"))
        # two ways to rank options: the summed loss of the span "⏎ option ⏎" (the option's own
        # probability, as the usual harnesses' accuracy) or its mean per token (MetaICL)
        by = {"sum": summed, "mean": summed / np.array([len(y) for _, y in segments])}
        ends = np.cumsum([0] + [len(q.options) for _, q in queries])
        pick = lambda scores: [ex["options"][int(np.argmin(scores[a:b]))] for (ex, _), a, b in zip(queries, ends, ends[1:])]
        preds = pick(by[option_score])
        metrics = dict(accuracy=float(np.mean([p == g for p, g in zip(preds, golds)])), macro_f1=macro_f1(preds, golds),
                       **{f"accuracy_{rule}": float(np.mean([p == g for p, g in zip(pick(by[rule]), golds)])) for rule in by})
        lengths = [len(x) + len(y) for x, y in segments]
    else:
        gens = generate(model, prefix, inputs, tok.newline_id, tok.eos_id, max_new_tokens, batch_tokens, cache)
        preds = [tok.decode(g).strip() for g in gens]
        metrics = dict(rouge_l=float(np.mean([rouge_l(p, g) for p, g in zip(preds, golds)])),
                       exact_match=float(np.mean([p == g.strip() for p, g in zip(preds, golds)])),
                       token_f1=float(np.mean([token_f1(p, g) for p, g in zip(preds, golds)])))
        lengths = [len(x) + len(g) for x, g in zip(inputs, gens)]
    # the gold answer's loss (mean over its span, as training measures it): a smooth measure that
    # moves with the demonstrations before accuracy does, and exists for free-form tasks too
    gold = [(x, q.answer) for x, (_, q) in zip(inputs, queries)]
    metrics["answer_loss"] = float(np.mean(score_options(model, prefix, gold, batch_tokens, cache, reduction="mean")))
    lengths += [len(x) + len(y) for x, y in gold]
    stats = dict(tokens_forwarded=len(prefix) + sum(lengths), tokens_uncached=sum(len(prefix) + n for n in lengths))
    samples = [dict(input=ex["input"], prediction=p, gold=g) for (ex, _), p, g in zip(queries[:3], preds, golds)]
    return dict(metrics, shots=len(demos), prefix_tokens=len(prefix), n=len(queries), samples=samples), stats


def encode_eval_task(name, pool, examples, tok, seq_len, max_test=None):
    """(pool of Encoded, test queries as (example, Encoded)). Queries too long for seq_len even
    with no demonstrations are dropped, with a note."""
    if pool == examples:  # a file without a split would serve as both
        raise ValueError(f"task '{name}': the same examples would be demonstrations and test set; give it train and test files")
    if len({bool(ex["options"]) for ex in examples}) > 1:
        raise ValueError(f"task '{name}': some test examples have options and some do not")
    queries = [(ex, data.encode_example(tok, ex)) for ex in data.label_balanced(examples, max_test)]
    fits = [(ex, q) for ex, q in queries if 1 + answer_room([q], 0) <= seq_len and 1 + answer_room([q], 1) <= seq_len]
    if len(fits) < len(queries):
        print(f"note: task '{name}': {len(queries) - len(fits)} test queries longer than seq_len={seq_len} left out")
    if not fits:
        raise ValueError(f"task '{name}': no test query fits in seq_len={seq_len}")
    return [data.encode_example(tok, ex) for ex in pool], fits


def load_eval_tasks(paths, tok, seq_len, seeds, max_test=None):
    """task -> seed -> (pool, test queries, None): one pool and one test set per task, for every seed."""
    pools, tests = data.load_tasks(paths, split="train"), data.load_tasks(paths, split="test")
    for name in sorted(set(pools) - set(tests)):
        print(f"note: task '{name}' has demonstrations but no test split: left out")
    encoded = {name: encode_eval_task(name, pools.get(name, []), examples, tok, seq_len, max_test)
               for name, examples in tests.items()}
    return {name: {s: (pool, queries, None) for s in seeds} for name, (pool, queries) in encoded.items()}


def evaluate(models, tok, tasks, ks, seeds, seq_len, batch_tokens=2048, max_new_tokens=32, shots="random",
             option_score="sum"):
    """The k sweep for every task, model, k and seed; returns the results (see main) as a dict.
    tasks: task -> seed -> (pool, test queries, the pool's file or None), as load_eval_tasks returns."""
    caches = {name: new_cache(m, seq_len + batch_tokens) for name, m in models.items()}
    timing = {name: dict(seconds=0.0, tokens_forwarded=0, tokens_uncached=0) for name in models}
    results, bar = {}, tqdm(total=len(tasks) * len(ks) * len(seeds) * len(models), desc="eval", unit="prompt")
    for task, by_seed in tasks.items():
        options = bool(by_seed[seeds[0]][1][0][0]["options"])
        sizes = [{str(s): len(v[i]) for s, v in by_seed.items()} for i in (0, 1)]  # one number if the seeds agree
        n_pool, n_test = (next(iter(c.values())) if len(set(c.values())) == 1 else c for c in sizes)
        entry = results[task] = dict(kind="options" if options else "free-form", metric="accuracy" if options else "rouge_l",
                                     n_pool=n_pool, n_test=n_test, k={})
        for k in ks:
            draws = {s: draw_demos(pool, k, s, seq_len, answer_room([q for _, q in queries], k), shots)
                     for s, (pool, queries, _) in by_seed.items()}
            why = next((why + (f" ({by_seed[s][2]})" if by_seed[s][2] else "") for s, (_, why) in draws.items() if why), None)
            if why:  # every seed or none, so mean and worst are over the same seeds for every k
                tqdm.write(f"note: task '{task}': {why}: skipped")
                entry["k"][str(k)] = dict(skipped=why)
                bar.update(len(seeds) * len(models))
                continue
            entry["k"][str(k)] = {}
            for name, model in models.items():
                runs = {}
                for s in seeds:
                    t0 = time.perf_counter()
                    runs[str(s)], stats = evaluate_prompt(model, caches[name], draws[s][0], by_seed[s][1], tok, batch_tokens,
                                                          max_new_tokens, option_score)
                    timing[name]["seconds"] += time.perf_counter() - t0
                    for key in stats:
                        timing[name][key] += stats[key]
                    bar.update()
                main = [r[entry["metric"]] for r in runs.values()]
                entry["k"][str(k)][name] = dict(mean=float(np.mean(main)), worst=float(min(main)), seeds=runs,
                                                means={m: float(np.mean([r[m] for r in runs.values()]))
                                                       for m in runs[str(seeds[0])] if m not in ("n", "prefix_tokens", "samples")})
    bar.close()
    summary = {}
    for k in map(str, ks):
        done = [e["k"][k] for e in results.values() if "skipped" not in e["k"][k]]
        summary[k] = {name: dict(mean=float(np.mean([d[name]["mean"] for d in done])) if done else None,
                                 worst=float(np.mean([d[name]["worst"] for d in done])) if done else None,
                                 answer_loss=float(np.mean([d[name]["means"]["answer_loss"] for d in done])) if done else None,
                                 # option tasks only: naming one label for every query scores its share in
                                 # accuracy but little here
                                 macro_f1=float(np.mean(f1)) if (f1 := [d[name]["means"]["macro_f1"] for d in done
                                                                       if "macro_f1" in d[name]["means"]]) else None,
                                 # the same macro score with options ranked by the other rule too
                                 **{f"mean_{rule}": float(np.mean([d[name]["means"].get(f"accuracy_{rule}", d[name]["mean"])
                                                                   for d in done])) if done else None for rule in ("sum", "mean")},
                                 n_tasks=len(done)) for name in models}
    for t in timing.values():  # what re-encoding every prompt would forward, over what was forwarded
        t["token_speedup"] = t["tokens_uncached"] / max(t["tokens_forwarded"], 1)
    return dict(tasks=results, summary=summary, timing=timing)


# ----------------------------------------------------------------------------- forgetting

@torch.inference_mode()
def perplexity(model, ids, length, bos_id):
    """Perplexity of a tokenized text in non-overlapping windows of `length` tokens: <s> then the
    next length-1 tokens of the text, every one of them scored (the first from <s> alone). A window
    is then exactly `length` long, what a model with max_seq_len=length takes. A tail shorter than a
    window is left out. ppl = exp(total NLL / total tokens): windows weighted by their tokens."""
    n, dev = length - 1, model.tok_embeddings.weight.device
    nll, count, windows = 0.0, 0, 0
    for i in range(0, len(ids) - n + 1, n):
        x = torch.tensor([bos_id] + ids[i:i + n], device=dev)[None]
        y = torch.tensor(ids[i:i + n] + [data.IGNORE], device=dev)[None]  # targets[t] = tokens[t+1]
        nll += model(x, y).item() * n  # model() returns the mean CE over the n targets
        count, windows = count + n, windows + 1
    return dict(ppl=math.exp(nll / count), nll=nll / count, tokens=count, windows=windows)


def forgetting(models, tok, path, lengths):
    with open(path, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    out = {}
    for L in lengths:
        max_len = next(iter(models.values())).args.max_seq_len
        if max_len is not None and L > max_len:
            out[str(L)] = dict(skipped=f"length {L} is above the model's max_seq_len={max_len}")
        elif len(ids) < L - 1:
            out[str(L)] = dict(skipped=f"{path} has only {len(ids)} tokens, fewer than a window of {L}")
        else:
            out[str(L)] = {name: perplexity(m, ids, L, tok.bos_id) for name, m in models.items()}
            continue
        print(f"note: perplexity at {L}: {out[str(L)]['skipped']}: skipped")
    return out


# ----------------------------------------------------------------------------- report

def print_tables(results, names):
    print("\nk-shot on held-out tasks: macro-average over tasks of the main metric (accuracy for "
          "option tasks, ROUGE-L for free-form), mean and worst over seeds")
    print("and of the gold answer's loss (mean over seeds; lower is better)")
    print("and macro-F1 over the option tasks alone (f1): one label named for every query scores little there")
    cols = ("mean", "worst", "answer_loss", "macro_f1")
    print(f"{'k':>6} {'tasks':>5}" + "".join(f" {n + ' ' + c.replace('answer_', 'ans ').replace('macro_', ''):>14}" for n in names for c in cols))
    for k, row in results["summary"].items():
        # three decimals: a fourth differs between CPUs (float sums in another order), and the
        # README's table is meant to be printed exactly on any machine
        fmt = lambda v: f"{v:14.3f}" if v is not None else f"{'-':>14}"
        print(f"{k:>6} {row[names[0]]['n_tasks']:>5}" + "".join(f" {fmt(row[n][c])}" for n in names for c in cols))
    print("".join(f"  task '{t}', k={k}: skipped: {r['skipped']}\n" for t, e in results["tasks"].items()  # never silent
                  for k, r in e["k"].items() if "skipped" in r), end="")
    if results.get("perplexity"):
        print(f"\nperplexity of {results['settings']['ppl_file']}")
        print(f"{'length':>7} {'windows':>7} {'tokens':>9}" + "".join(f" {n + ' ppl':>12}" for n in names))
        for L, row in results["perplexity"].items():
            if "skipped" not in row:
                r0 = row[names[0]]
                print(f"{L:>7} {r0['windows']:>7} {r0['tokens']:>9}" + "".join(f" {row[n]['ppl']:12.4f}" for n in names))


def parse_ks(text):
    return [k if k == "max" else int(k) for k in text.split(",")]


def parse_ints(text):
    return [int(v) for v in text.split(",")]


def default_out(path, ckpt):
    """Beside a training run's checkpoints; never inside a model folder that training did not write
    (the committed base, a download): out/eval-{name}.json there."""
    if re.fullmatch(r"ckpt-\d+", os.path.basename(os.path.normpath(ckpt))):  # train.py's name for its checkpoints
        return os.path.join(path, "eval.json")
    return os.path.join("out", f"eval-{os.path.basename(os.path.normpath(ckpt))}.json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="an out_dir (its newest complete checkpoint) or a ckpt-* folder")
    p.add_argument("--tasks", nargs="+", help="held-out task files/folders (default: the config's eval_data); "
                   "with --setting, the MetaICL data folder (default: the config's data)")
    p.add_argument("--setting", help="MetaICL's config/{setting}.json: score its \"test\" tasks with their per-seed files")
    p.add_argument("--ks", type=parse_ks, help="k sweep, e.g. 0,1,4,16,64,256,max (default: that; 0,1,4,16,max for the built-in suite)")
    p.add_argument("--seeds", type=parse_ints, help="demonstration seeds (default: 100,13,21,42,87; 100,13,21 for the built-in suite)")
    p.add_argument("--seq_len", type=int, help="context for prompts (default: the config's seq_len)")
    p.add_argument("--max_test", type=int, help="at most this many test queries per task (label-balanced with options)")
    p.add_argument("--batch_tokens", type=int, default=2048, help="tokens of queries packed after the prefix per forward")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--ppl_file", help="a long UTF-8 text for the forgetting check (e.g. a PG-19 book)")
    p.add_argument("--ppl_lengths", type=parse_ints, default="1024,4096,16384,32768")
    p.add_argument("--out", help="JSON results (default: {ckpt}/eval.json for train.py's output, else out/eval-{name}.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--no_base", action="store_true", help="evaluate the trained model only")
    p.add_argument("--shots", choices=["random", "stratified"], default="random",
                   help="demonstrations: the seed's permutation, or labels balanced round-robin (data.shot_order)")
    p.add_argument("--option_score", choices=["sum", "mean"], default="sum",
                   help="rank options by the summed loss of their answer span (their probability) or its mean per token")
    a = p.parse_args(argv)
    dtype_name = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    dtype = dtype_named(dtype_name, a.device)

    base, trained, tok, config = load_models(a.ckpt, a.device, dtype, base=not a.no_base)
    models = {"base": base, "trained": trained} if base is not None else {"trained": trained}
    names = list(models)
    seq_len = a.seq_len or config["seq_len"]
    if trained.args.max_seq_len is not None and seq_len > trained.args.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is above the model's max_seq_len={trained.args.max_seq_len}")
    # a run on the built-in suite is scored on its held-out families; with --setting on the data
    # folder it trained on; any other on the config's eval_data
    suite_run = config.get("data") in ("suite", "generic")
    task_paths = a.tasks or ([os.path.join(SUITE_DIR, "eval")] if suite_run and not a.setting else
                             ((config.get("data") if a.setting else config.get("eval_data")) or os.path.join(SUITE_DIR, "eval")).split(","))
    if a.setting and len(task_paths) != 1:
        raise ValueError(f"--setting takes one MetaICL data folder in --tasks, got {len(task_paths)}: {' '.join(task_paths)}")
    builtin = any((os.path.abspath(t) + os.sep).startswith(SUITE_DIR + os.sep) for t in task_paths)
    if builtin:
        ensure_suite()
    ks = a.ks or parse_ks("0,1,4,16,max" if builtin else "0,1,4,16,64,256,max")
    seeds = a.seeds or parse_ints("100,13,21" if builtin else "100,13,21,42,87")
    if a.ppl_file and not os.path.isfile(a.ppl_file):  # before the sweep, not after it
        raise FileNotFoundError(f"{a.ppl_file}: no such text file for --ppl_file")
    print(f"evaluating {config['checkpoint']} on {', '.join(task_paths)}{' setting ' + a.setting if a.setting else ''}: "
          f"k={ks}, seeds={seeds}, seq_len={seq_len}")

    if a.setting:  # each seed its own pool and test set: task -> seed -> (pool, queries, pool file)
        read = lambda name, pool, test: encode_eval_task(name, data.read_examples(pool), data.read_examples(test), tok,
                                                         seq_len, a.max_test)
        tasks = {name: {s: (*read(name, pool, test), pool) for s, (pool, test) in files.items()}
                 for name, files in setting_eval_files(task_paths[0], a.setting, seeds).items()}
    else:
        tasks = load_eval_tasks(task_paths, tok, seq_len, seeds, a.max_test)
    results = dict(checkpoint=config["checkpoint"], config=config,
                   settings=dict(tasks=task_paths, setting=a.setting, ks=[str(k) for k in ks], seeds=seeds, seq_len=seq_len,
                                 max_test=a.max_test, batch_tokens=a.batch_tokens, max_new_tokens=a.max_new_tokens,
                                 device=a.device, dtype=dtype_name, ppl_file=a.ppl_file, shots=a.shots,
                                 option_score=a.option_score),
                   **evaluate(models, tok, tasks, ks, seeds, seq_len, a.batch_tokens, a.max_new_tokens, a.shots,
                             a.option_score))
    if a.ppl_file:
        results["perplexity"] = forgetting(models, tok, a.ppl_file, a.ppl_lengths)
    print_tables(results, names)

    out = a.out or default_out(a.ckpt, config["checkpoint"])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        raise SystemExit(f"error: {e}")
