"""
Task files -> tokens -> ManyICL training sequences with their loss masks.

A training sequence is one task's examples packed until the context is full, in MetaICL's
direct format:

    <s> x1 ⏎ y1 ⏎ ⏎⏎ x2 ⏎ y2 ⏎ ⏎⏎ x3 ⏎ y3 ⏎
           [answer]      [answer]      [answer]

An answer span is "⏎ y ⏎": the newline that introduces it (MetaICL) and the newline that
closes it (our choice: it teaches the model where an answer ends, so generation stops there).
The remaining "⏎⏎" separates examples. ManyICL puts the loss on every answer span
(loss_mask="all"); MetaICL on the last one only (loss_mask="last"); loss_mask="none" is plain
language modelling. See `targets_for`. (The built-in synthetic tasks live in suite.py.)
"""
import json
import os
import re
from collections import namedtuple

import numpy as np

ANSWER_PREFIX, ANSWER_SUFFIX, EXAMPLE_SEPARATOR = "\n", "\n", "\n\n"  # the template, in one place
IGNORE = -100  # targets value for positions without loss

# ----------------------------------------------------------------------------- task files

METAICL_NAME = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>train|dev|test)\.jsonl$")


def task_and_split(path):
    """MetaICL's {task}_{k}_{seed}_{split}.jsonl, a folder per task holding {split}.jsonl,
    or a plain {task}.jsonl (no split)."""
    name = os.path.basename(path)
    m = METAICL_NAME.match(name)
    if m:
        return m["task"], m["split"]
    stem = name[: -len(".jsonl")]
    if stem in ("train", "dev", "test"):
        return os.path.basename(os.path.dirname(os.path.abspath(path))), stem
    return stem, None


def jsonl_files(paths):
    files = []
    for p in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".jsonl"))
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no .jsonl task files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such task file or folder")
    return files


def read_examples(path):
    """One MetaICL example per line; every problem is reported with its file and line."""
    examples = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read task file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(ex, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
        for key in ("input", "output"):
            if key not in ex:
                raise ValueError(f"{where}: missing '{key}'")
            if not isinstance(ex[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {type(ex[key]).__name__}")
        options = ex.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: 'options' must be a list of strings")
        if options and ex["output"] not in options:
            raise ValueError(f"{where}: output {ex['output']!r} is not one of its options")
        examples.append({"input": ex["input"], "output": ex["output"], "options": options})
    if not examples:
        raise ValueError(f"{path}: task file is empty")
    return examples


def load_tasks(paths, split=None):
    """dict task name -> list of examples, from files and/or folders. With `split`, files that
    name another split are left out (files with no split always count)."""
    tasks, source = {}, {}
    for f in jsonl_files(paths):
        task, file_split = task_and_split(f)
        if split is not None and file_split is not None and file_split != split:
            continue
        if task in source:  # e.g. two seeds of one MetaICL task: silently merging would duplicate
            raise ValueError(f"task '{task}' comes from two files: {source[task]} and {f}; pass one")
        tasks[task], source[task] = read_examples(f), f
    if not tasks:
        raise ValueError(f"no task files{' for split ' + split if split else ''} in {paths}")
    return tasks


def write_jsonl(path, rows):
    """A task file, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def label_balanced(rows, n):
    """At most n rows, in file order; with options, every label as often as the rows allow (one
    round of labels after another). A file's first n rows can be mostly one label, and would then
    reward a model that names that label every time. The suite's test sets and eval.py --max_test."""
    if n is None or n >= len(rows) or not rows[0]["options"]:
        return rows[:n]
    by_label = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["output"], []).append(i)
    rounds = range(max(map(len, by_label.values())))
    taken = [rows_of[r] for r in rounds for rows_of in by_label.values() if r < len(rows_of)][:n]
    return [rows[i] for i in sorted(taken)]


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """sentencepiece, with one fix for packing: `encode` prepends a dummy-prefix '▁' on every
    call, so segments encoded separately and concatenated would each start with junk.
    `encode_continuation` returns a segment's tokens as they appear in the middle of a text,
    just after a newline, which is where every segment but the first one sits."""

    def __init__(self, model_path):
        import sentencepiece as spm
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.path = model_path
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.get_piece_size()
        self._newline_prefix = self.sp.encode("\n")  # e.g. ['▁', '<0x0A>'] for Mistral's v3
        self.newline_id = self._newline_prefix[-1]

    def __reduce__(self):  # pickled as its file (for Prefetcher's worker processes)
        return Tokenizer, (self.path,)

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_continuation(self, text):
        ids = self.sp.encode("\n" + text)
        if ids[: len(self._newline_prefix)] != self._newline_prefix:
            raise ValueError(f"{self.path}: newline merges with the text after it; "
                             "this tokenizer cannot pack segments exactly")
        return ids[len(self._newline_prefix):]

    def decode(self, ids):
        return self.sp.decode(list(ids))


class Encoded(namedtuple("Encoded", "input_after_bos input_after_separator answer options")):
    """An example, tokenized once: its input as the first thing after <s>, its input after an
    example separator (the separator's tokens included), and its answer span. Options (if any) are
    answer spans of their own."""
    __slots__ = ()

    def input_after(self, n_shots):
        """The input's tokens where pack() puts it after n_shots examples."""
        return self.input_after_bos if n_shots == 0 else self.input_after_separator


def encode_example(tok, ex):
    answer = lambda y: tok.encode_continuation(ANSWER_PREFIX + y + ANSWER_SUFFIX)
    return Encoded(tok.encode(ex["input"]), tok.encode_continuation(EXAMPLE_SEPARATOR + ex["input"]),
                   answer(ex["output"]), [answer(o) for o in ex.get("options") or []])


def encode_tasks(tasks, tok, max_len):
    """Tokenize every example once. An example too long to fit a sequence on its own is
    skipped and counted; a task left with none is an error. Returns (encoded, n_skipped)."""
    encoded, skipped = {}, 0
    for name, examples in tasks.items():
        enc = [encode_example(tok, ex) for ex in examples]
        keep = [e for e in enc if 1 + len(e.input_after_bos) + len(e.answer) <= max_len]
        skipped += len(enc) - len(keep)
        if not keep:
            raise ValueError(f"task '{name}': all {len(enc)} examples are longer than seq_len={max_len}")
        encoded[name] = keep
    return encoded, skipped


# ----------------------------------------------------------------------------- sequences

def pack(encoded, bos_id):
    """<s> x1 ⏎y1⏎ ⏎⏎x2 ⏎y2⏎ ... -> (tokens, answer spans as [start, end) token ranges).
    Used for training sequences *and* evaluation prompts, so the two never drift apart."""
    tokens, spans = [bos_id], []
    for i, ex in enumerate(encoded):
        tokens += ex.input_after(i)
        spans.append((len(tokens), len(tokens) + len(ex.answer)))
        tokens += ex.answer
    return tokens, spans


def targets_for(tokens, spans, loss_mask):
    """The paper's one idea. targets[t] is the token the model must predict at position t
    (tokens[t+1]) wherever that token is supervised, else IGNORE."""
    tokens = np.asarray(tokens, dtype=np.int64)
    targets = np.full_like(tokens, IGNORE)
    if loss_mask == "none":                      # language modelling: every next token
        targets[:-1] = tokens[1:]
        return targets
    supervised = {"all": spans,                  # ManyICL: every answer is a target
                  "last": spans[-1:]}[loss_mask] # MetaICL: only the final answer
    for start, end in supervised:
        targets[start - 1:end - 1] = tokens[start:end]  # shifted: position t predicts t+1
    return targets


def check_shots(shots):  # train.py calls it too, before anything heavy
    if shots not in ("random", "stratified"):
        raise ValueError(f"shots must be random or stratified; got '{shots}'")


def shot_order(examples, rng, shots="random"):
    """The order in which a task's examples (Encoded) become shots. "random": a permutation.
    "stratified" (option tasks): round-robin over the labels, so every stretch of shots shows each
    label about equally often, whatever their frequency in the pool; free-form tasks stay random."""
    check_shots(shots)
    order = rng.permutation(len(examples))
    if shots == "random" or not all(examples[i].options for i in order):
        return order
    by_label = {}
    for i in order:  # each label's examples (by the answer's tokens), in the permutation's order
        by_label.setdefault(tuple(examples[i].answer), []).append(i)
    queues, out = list(by_label.values()), []
    for r in range(max(map(len, queues))):  # one round: one example of each label, in a fresh order,
        out += [queues[j][r] for j in rng.permutation(len(queues)) if r < len(queues[j])]  # so no period to learn
    return np.array(out, dtype=np.int64)


def fill(examples, max_len, max_shots=None):
    """The longest run of `examples` (Encoded, in order; may be a generator) that packs into
    max_len tokens with pack(), at most max_shots of them. No example is split or repeated.
    Training sequences and the k='max' prompts of eval.py and sample.py are filled by this; an
    integer k takes the first k examples of the same order (eval.draw_demos)."""
    chosen, length = [], 1  # <s>
    for ex in examples:
        cost = len(ex.input_after(len(chosen))) + len(ex.answer)
        if length + cost > max_len or (max_shots is not None and len(chosen) == max_shots):
            break
        chosen.append(ex)
        length += cost
    return chosen


def build_sequence(encoded, bos_id, max_len, loss_mask="all", seed=0, max_shots=None, shots="random"):
    """One task's examples (Encoded), ordered by `seed` (see shot_order), packed until the next
    one would not fit in `max_len` (at most `max_shots`). Returns (tokens, targets): equal-length
    int64 arrays, targets shifted (targets_for)."""
    order = shot_order(encoded, np.random.default_rng(seed), shots)
    chosen = fill((encoded[i] for i in order), max_len, max_shots)
    if not chosen:
        raise ValueError(f"the first example drawn does not fit in max_len={max_len}")
    tokens, spans = pack(chosen, bos_id)
    return np.asarray(tokens, dtype=np.int64), targets_for(tokens, spans, loss_mask)


class TrainSampler:
    """The sequences of training step `step` depend only on (seed, step, index in the global
    batch): never on world size or rank. 8 GPUs, 2, or 1 with more accumulation see the same
    data, and resuming at step s needs nothing but s.

    Tasks are drawn with probability proportional to size**(1/temperature): temperature=inf is
    uniform over tasks (the default), 1 proportional to size."""

    def __init__(self, encoded_tasks, bos_id, max_len, loss_mask="all", seed=0, temperature=float("inf"), max_shots=None,
                 shots="random"):
        self.tasks, self.names, self.shots = encoded_tasks, sorted(encoded_tasks), shots
        sizes = np.array([len(encoded_tasks[n]) for n in self.names], dtype=np.float64)
        weights = sizes ** (0.0 if temperature == float("inf") else 1.0 / temperature)
        self.probs = weights / weights.sum()
        self.bos_id, self.max_len, self.loss_mask, self.seed, self.max_shots = bos_id, max_len, loss_mask, seed, max_shots

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index])
        task = self.names[rng.choice(len(self.names), p=self.probs)]
        return build_sequence(self.tasks[task], self.bos_id, self.max_len, self.loss_mask, seed=int(rng.integers(2**31)),
                              max_shots=self.max_shots, shots=self.shots)


def collate(sequences, pad_to=None):
    """Right-pad a list of (tokens, targets) to one (B, T) pair (T = pad_to, or the longest).
    Padding is never a target, and causal attention keeps real tokens from seeing it."""
    import torch
    T = pad_to or max(len(t) for t, _ in sequences)
    tokens = torch.zeros(len(sequences), T, dtype=torch.long)
    targets = torch.full((len(sequences), T), IGNORE, dtype=torch.long)
    for i, (tok, tgt) in enumerate(sequences):
        tokens[i, : len(tok)], targets[i, : len(tgt)] = torch.as_tensor(tok), torch.as_tensor(tgt)
    return tokens, targets


class Prefetcher:
    """Makes the sequences of the coming steps in background processes while the model trains
    (generating suite tasks in the loop stalls a GPU). Each sequence is still
    sampler.sequence(step, index): a pure function of (seed, step, index), so a resumed or
    multi-GPU run sees exactly the data of a straight single-process one. workers=0: no
    processes, sequences made on demand."""

    def __init__(self, sampler, workers=0, ahead=2):
        self.sampler, self.ahead, self.pending = sampler, ahead, {}
        self.pool = None
        if workers > 0:  # "spawn": safe beside CUDA; the sampler is pickled once per worker
            import concurrent.futures, multiprocessing
            self.pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                               initializer=_set_worker_sampler, initargs=(sampler,))

    def get(self, step, indices):
        """The sequences (step, i) for i in indices; queues the same indices of the next steps."""
        if self.pool is None:
            return [self.sampler.sequence(step, i) for i in indices]
        for s in range(step, step + self.ahead + 1):
            if s not in self.pending:
                self.pending[s] = [self.pool.submit(_worker_sequence, s, i) for i in indices]
        for s in [s for s in self.pending if s < step]:  # not asked for (e.g. an earlier stop)
            del self.pending[s]
        return [f.result() for f in self.pending.pop(step)]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _set_worker_sampler(sampler):
    global _worker_sampler
    _worker_sampler = sampler


def _worker_sequence(step, index):
    return _worker_sampler.sequence(step, index)
