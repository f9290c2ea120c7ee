"""
Task files -> tokens -> ManyICL training sequences with their loss masks.

A training sequence is one task's examples packed until the context is full, in MetaICL's
direct format:

    <s> x1 ⏎ y1 ⏎ ⏎⏎ x2 ⏎ y2 ⏎ ⏎⏎ x3 ⏎ y3 ⏎
           [answer]      [answer]      [answer]

An answer span is "⏎ y ⏎": the newline that introduces it (MetaICL) and the newline that
closes it (our choice: it teaches the model where an answer ends, so generation stops there).
The remaining "⏎⏎" separates examples. ManyICL puts the loss on every answer span
(mask="all"); MetaICL on the last one only (mask="last"); mask="none" is plain language
modelling. See `targets_for`.
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


# An example, tokenized once: its input as the first thing after <s>, its input after an example
# separator, and its answer span. Options (if any) are answer spans of their own.
Encoded = namedtuple("Encoded", "first_input input answer options")


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
        keep = [e for e in enc if 1 + len(e.first_input) + len(e.answer) <= max_len]
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
        tokens += ex.first_input if i == 0 else ex.input
        spans.append((len(tokens), len(tokens) + len(ex.answer)))
        tokens += ex.answer
    return tokens, spans


def targets_for(tokens, spans, mask):
    """The paper's one idea. targets[t] is the token the model must predict at position t
    (tokens[t+1]) wherever that token is supervised, else IGNORE."""
    tokens = np.asarray(tokens, dtype=np.int64)
    targets = np.full_like(tokens, IGNORE)
    if mask == "none":                           # language modelling: every next token
        targets[:-1] = tokens[1:]
        return targets
    supervised = {"all": spans,                  # ManyICL: every answer is a target
                  "last": spans[-1:]}[mask]      # MetaICL: only the final answer
    for start, end in supervised:
        targets[start - 1:end - 1] = tokens[start:end]  # shifted: position t predicts t+1
    return targets


def shot_order(examples, rng, shots="random"):
    """The order in which a task's examples become shots. "random": a permutation. "stratified"
    (option tasks): round-robin over the labels, so every stretch of shots shows each label
    about equally often, whatever their frequency in the pool; free-form tasks stay random."""
    order = rng.permutation(len(examples))
    if shots == "random":
        return order
    if shots != "stratified":
        raise ValueError(f"shots must be 'random' or 'stratified', got {shots!r}")
    answer = lambda ex: tuple(ex.answer) if isinstance(ex, Encoded) else ex["output"]
    has_options = lambda ex: bool(ex.options if isinstance(ex, Encoded) else ex.get("options"))
    if not all(has_options(examples[i]) for i in order):
        return order
    by_label = {}
    for i in order:  # each label's examples, in the permutation's order
        by_label.setdefault(answer(examples[i]), []).append(i)
    queues, out = list(by_label.values()), []
    for r in range(max(map(len, queues))):  # one round: one example of each label, in a fresh order,
        out += [queues[j][r] for j in rng.permutation(len(queues)) if r < len(queues[j])]  # so no period to learn
    return np.array(out, dtype=np.int64)


def build_sequence(examples, tokenizer, max_len, mask="all", seed=0, max_shots=None, bos_id=None, shots="random"):
    """One task's examples (raw dicts or `Encoded`), ordered by `seed` (see shot_order), packed
    until the next one would not fit in `max_len` (at most `max_shots`). No example is split or
    repeated. Returns (tokens, targets): equal-length int64 arrays, targets shifted (targets_for)."""
    if mask not in ("all", "last", "none"):
        raise ValueError(f"mask must be 'all', 'last' or 'none', got {mask!r}")
    bos_id = tokenizer.bos_id if bos_id is None else bos_id
    chosen, length = [], 1
    for i in shot_order(examples, np.random.default_rng(seed), shots):
        ex = examples[i] if isinstance(examples[i], Encoded) else encode_example(tokenizer, examples[i])
        cost = len(ex.first_input if not chosen else ex.input) + len(ex.answer)
        if length + cost > max_len or (max_shots is not None and len(chosen) == max_shots):
            break
        chosen.append(ex)
        length += cost
    if not chosen:
        raise ValueError(f"the first example drawn does not fit in max_len={max_len}")
    tokens, spans = pack(chosen, bos_id)
    return np.asarray(tokens, dtype=np.int64), targets_for(tokens, spans, mask)


class TrainSampler:
    """The sequences of training step `step` depend only on (seed, step, index in the global
    batch): never on world size or rank. 8 GPUs, 2, or 1 with more accumulation see the same
    data, and resuming at step s needs nothing but s.

    Tasks are drawn with probability proportional to size**(1/temperature): temperature=inf is
    uniform over tasks (the default), 1 proportional to size."""

    def __init__(self, encoded_tasks, bos_id, max_len, mask="all", seed=0, temperature=float("inf"), max_shots=None,
                 shots="random"):
        self.tasks, self.names, self.shots = encoded_tasks, sorted(encoded_tasks), shots
        sizes = np.array([len(encoded_tasks[n]) for n in self.names], dtype=np.float64)
        weights = sizes ** (0.0 if temperature == float("inf") else 1.0 / temperature)
        self.probs = weights / weights.sum()
        self.bos_id, self.max_len, self.mask, self.seed, self.max_shots = bos_id, max_len, mask, seed, max_shots

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index])
        task = self.names[rng.choice(len(self.names), p=self.probs)]
        return build_sequence(self.tasks[task], None, self.max_len, self.mask, seed=int(rng.integers(2**31)),
                              max_shots=self.max_shots, bos_id=self.bos_id, shots=self.shots)


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


# ----------------------------------------------------------------------------- built-in suite
# Synthetic in-context tasks for laptops. Each task *instance* hides its own rule (label words
# re-drawn, a secret mapping, a hidden constant), so its answers cannot be known without the
# demonstrations: a model can only score well by learning in context. Held-out families share
# no rule with held-in ones.

SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "suite")
WORDS = {
    "animal": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox deer duck owl frog".split(),
    "fruit": "apple pear plum grape lemon lime mango peach melon cherry berry fig kiwi date".split(),
    "color": "red blue green yellow purple orange black white brown pink gray gold silver".split(),
    "tool": "hammer saw drill wrench knife spoon brush rope shovel needle axe ladder".split(),
    "body": "hand foot head knee elbow ear nose eye mouth neck arm leg finger toe".split(),
    "place": "city river forest desert island valley mountain lake village beach field road".split(),
}
ALL_WORDS = sorted({w for ws in WORDS.values() for w in ws})


SYLLABLES = ["ba", "ko", "ri", "zu", "me", "ta", "lo", "pi", "ne", "gu", "sa", "vo", "fe", "di"]


def nonce_word(rng):
    return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))


def song_line(rng):
    return " ".join(nonce_word(rng) for _ in range(int(rng.integers(4, 9))))


def song(rng, n_lines=40):
    """A song: a few lines of nonce words, sung over and over in any order. After its first
    verses, only copying from the context predicts it: generic text that rewards long context."""
    verses = [song_line(rng) for _ in range(int(rng.integers(3, 7)))]
    return "\n".join(verses[i] for i in rng.integers(len(verses), size=n_lines))


def play(rng, n_turns=40):
    """A play's script: a speaker's name on a line of its own, then what they say, a blank line
    between turns, and every speaker always says their own refrain. After a speaker's first
    turn, only recalling what followed their name earlier predicts the line: associative recall,
    in the layout of a task's examples (input, newline, answer). Songs and stories alone never
    taught that layout to our base model (README: "The base model")."""
    cast = list(dict.fromkeys(nonce_word(rng) for _ in range(int(rng.integers(3, 9)))))
    refrain = {name: song_line(rng) for name in cast}
    turns = (cast[i] for i in rng.integers(len(cast), size=n_turns))
    return "\n\n".join(f"{name}\n{refrain[name]}" for name in turns)


def suite_instance(family, rng):
    """One task instance of `family` with its hidden rule drawn from rng. Returns
    (draw, rule, options): draw(r) picks an input, rule(input) is its answer."""
    labels = list(dict.fromkeys(nonce_word(rng) for _ in range(12)))[:4]  # per-instance label words
    letters = "abcdefghijklmnopqrstuvwxyz"
    pick_word = lambda r: r.choice(ALL_WORDS)
    pick_number = lambda r: str(int(r.integers(100)))
    if family == "category_label":      # which category, named by label words
        cats = list(rng.choice(sorted(WORDS), size=3, replace=False))
        label_of = {w: labels[i] for i, c in enumerate(cats) for w in WORDS[c]}
        return lambda r: r.choice(WORDS[r.choice(cats)]), label_of.get, labels[:3]
    if family == "word_label":          # a hidden, arbitrary label for every word: only recall solves it
        words = list(rng.choice(ALL_WORDS, size=12, replace=False))
        label_of = {w: labels[int(rng.integers(4))] for w in words}
        return lambda r: r.choice(words), label_of.get, labels
    if family == "contains_letter":     # does the word contain a hidden letter?
        ch = rng.choice(list("aeiort"))
        return pick_word, lambda w: labels[int(ch in w)], labels[:2]
    if family == "parity":              # even or odd, named by label words
        return pick_number, lambda n: labels[int(n) % 2], labels[:2]
    if family == "compare":             # is a > b, direction hidden (not in HELD_IN: never learned, even on a GPU)
        flip = int(rng.integers(2))
        def rule(pair):
            a, b = map(int, pair.split())
            return labels[(a > b) ^ flip]
        return lambda r: f"{int(r.integers(100))} {int(r.integers(100))}", rule, labels[:2]
    if family == "caesar":              # shift letters by a hidden k
        k = int(rng.integers(1, 6))
        return (lambda r: "".join(r.choice(list(letters), 4)),
                lambda w: "".join(letters[(letters.index(c) + k) % 26] for c in w), [])
    if family == "string_op":           # one hidden transformation
        op = rng.choice(["reverse", "upper", "double", "first3"])
        return pick_word, {"reverse": lambda w: w[::-1], "upper": str.upper,
                           "double": lambda w: w + w, "first3": lambda w: w[:3]}[op], []
    if family == "lookup":              # a hidden code book: 3-letter codes -> nonce words
        codes = list(dict.fromkeys("".join(rng.choice(list(letters), 3)) for _ in range(8)))
        book = {c: nonce_word(rng) for c in codes}  # English-word answers were never learned (measured)
        return lambda r: codes[int(r.integers(len(codes)))], book.get, []
    if family == "number_name":         # a hidden dictionary from numbers to nonce words
        numbers = [str(n) for n in rng.choice(100, size=8, replace=False)]
        names = {n: nonce_word(rng) for n in numbers}
        return lambda r: numbers[int(r.integers(len(numbers)))], names.get, []
    if family == "add_const":           # add a hidden constant
        c = int(rng.integers(1, 20))
        return pick_number, lambda n: str(int(n) + c), []
    # held-out families
    if family == "length_threshold":    # is the word longer than a hidden length?
        t = int(rng.integers(4, 6))
        return pick_word, lambda w: labels[int(len(w) > t)], labels[:2]
    if family == "first_letter":        # hidden map from first-letter group to one of 3 labels
        groups = rng.permutation(3)
        return pick_word, lambda w: labels[groups[(letters.index(w[0]) * 3) // 26]], labels[:3]
    if family == "translate":           # a hidden dictionary from words to nonce words
        src = list(rng.choice(ALL_WORDS, size=10, replace=False))
        dictionary = {w: nonce_word(rng) for w in src}
        return lambda r: src[int(r.integers(10))], dictionary.get, []
    if family == "suffix":              # append a hidden suffix
        s = "".join(rng.choice(list(letters), 2))
        return pick_word, lambda w: w + s, []
    raise ValueError(f"unknown suite family {family!r}")


SUITE_VERSION = "v4"  # bump when the generated suite changes, so stale copies are rewritten
HELD_IN = ["category_label", "word_label", "contains_letter", "parity", "caesar", "string_op", "lookup", "add_const",
           "number_name"]
HELD_OUT = ["length_threshold", "first_letter", "translate", "suffix"]


class SuiteSampler:
    """TrainSampler's interface, but every sequence is a *fresh* instance of a suite family, its
    hidden rule drawn from (seed, step, index). Task diversity is then unlimited: a small model
    cannot memorise rules (it memorised even 400 fixed instances before learning to read its
    context), so the only way to lower the loss is in-context learning."""

    def __init__(self, tokenizer, max_len, mask="all", seed=0, max_shots=None, families=HELD_IN, shots="random"):
        self.tok, self.max_len, self.mask, self.seed, self.max_shots = tokenizer, max_len, mask, seed, max_shots
        self.families, self.shots = list(families), shots

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index])
        draw, rule, options = suite_instance(self.families[rng.integers(len(self.families))], rng)
        inputs = [str(draw(rng)) for _ in range(self.max_len // 4)]  # more than fit: >= 4 tokens each
        examples = [dict(input=x, output=rule(x), options=options) for x in inputs]
        return build_sequence(examples, self.tok, self.max_len, self.mask, seed=int(rng.integers(2**31)),
                              max_shots=self.max_shots, shots=self.shots)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def make_suite(out_dir=SUITE_DIR, seed=1234, instances=(50, 2), n_train=(160, 400), n_test=64):
    """Write the suite: train/{task}.jsonl (held-in) and eval/{task}/{train,test}.jsonl
    (held-out: a demonstration pool and a test set), a generic-text corpus for the forgetting
    experiment, and a small sentencepiece model trained on all of it. Deterministic in `seed`.
    Many instances per held-in family, each with its own hidden rule: with few, a small model
    memorises each instance's rule instead of learning to read it from the context."""
    rng = np.random.default_rng(seed)
    text = []
    for families, n_inst, n_ex, split_dir in ((HELD_IN, instances[0], n_train[0], "train"),
                                              (HELD_OUT, instances[1], n_train[1], "eval")):
        for fam in families:
            for i in range(n_inst):
                draw, rule, options = suite_instance(fam, rng)
                task = f"{fam}_{i}"
                n_rows = n_ex + (n_test if split_dir == "eval" else 0)
                inputs = [str(draw(rng)) for _ in range(n_rows)]
                rows = [dict(input=x, output=rule(x), task=task, options=options) for x in inputs]
                text += [r["input"] + "\n" + r["output"] for r in rows[:20]]
                if split_dir == "train":
                    write_jsonl(os.path.join(out_dir, "train", f"{task}.jsonl"), rows)
                else:
                    write_jsonl(os.path.join(out_dir, "eval", task, "train.jsonl"), rows[:n_ex])
                    write_jsonl(os.path.join(out_dir, "eval", task, "test.jsonl"), rows[n_ex:])
    # generic text: a file to score perplexity on (stories never trained on), and stories as a
    # "task" of (first half, second half) pairs for pre-training from files with mask="none"
    for name, n in (("generic_test.txt", 60), ("generic_train.txt", 400)):
        docs = [generic_document(rng) for _ in range(n)]
        text += [song(rng) for _ in range(40)]
        open(os.path.join(out_dir, name), "w").write("\n\n".join(docs) + "\n")
        text += docs[:40]
    halves = [d.split("\n") for d in docs]
    write_jsonl(os.path.join(out_dir, "generic", "train.jsonl"),
                [dict(task="generic", input="\n".join(h[:20]), output="\n".join(h[20:]), options=[]) for h in halves])
    train_tokenizer(text, os.path.join(out_dir, "tokenizer"))
    open(os.path.join(out_dir, "DONE"), "w").write(f"{SUITE_VERSION} {seed}")
    return out_dir


def generic_document(rng, n_lines=40):
    """'Generic text' for language-model pre-training and the forgetting check: a short story
    about a few characters with nonce names. Who is which animal, of which colour, from where, is
    said once; then the story's events recur in any order, as refrains do in children's stories.
    Much of a story is thus predictable only from earlier in it, so perplexity can fall with
    context length (and a model that copies from its context is rewarded for it)."""
    cast = [dict(name=nonce_word(rng), animal=a, color=rng.choice(WORDS["color"]), home=rng.choice(WORDS["place"]),
                 thing=rng.choice(WORDS["fruit"] + WORDS["tool"]))
            for a in rng.choice(WORDS["animal"], size=int(rng.integers(3, 6)), replace=False)]
    intro = [f"{c['name']} is a {c['color']} {c['animal']} from the {c['home']}." for c in cast]
    verbs = ["found", "ate", "saw", "carried", "dropped", "wanted", "hid", "gave", "took", "liked"]
    pick = lambda key: rng.choice(WORDS[key])
    events = []
    for _ in range(int(rng.integers(4, 8))):  # each event recurs several times, in any order
        c, d = (cast[i] for i in rng.choice(len(cast), size=2, replace=False))
        events.append([f"the {c['animal']} {c['name']} {rng.choice(verbs)} the {pick('color')} {pick('tool')} near the {pick('place')}.",
                       f"{c['name']} the {c['color']} {c['animal']} went home to the {c['home']} with a {pick('fruit')}.",
                       f"then {c['name']} met {d['name']} the {d['animal']} near the {pick('place')}.",
                       f"{d['name']} gave {c['name']} a {pick('color')} {pick('fruit')} and a {pick('tool')}."][int(rng.integers(4))])
    for c in cast[:2]:  # a chant is pure chance the first time it is sung and a copy every time after
        events.append(f"{c['name']} sang: " + song_line(rng) + ".")
    return "\n".join(intro + [events[i] for i in rng.integers(len(events), size=n_lines - len(intro))])


class GenericSampler:
    """Language-model pre-training on generic text: every sequence is fresh documents (a play two
    times in three, else a song or a story), packed back to back ("\n\n" between them) and cut
    at max_len, every next token a target. Like SuiteSampler, a pure function of (seed, step,
    index)."""

    def __init__(self, tokenizer, max_len, seed=0):
        self.tok, self.max_len, self.seed = tokenizer, max_len, seed

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index, 7])
        document = lambda: (play(rng) if rng.random() < 2 / 3 else
                            song(rng) if rng.random() < 0.5 else generic_document(rng))
        tokens = [self.tok.bos_id] + self.tok.encode(document())
        while len(tokens) < self.max_len:
            tokens += self.tok.encode_continuation(EXAMPLE_SEPARATOR + document())
        tokens = tokens[: self.max_len]
        return np.asarray(tokens, dtype=np.int64), targets_for(tokens, [], "none")


def train_tokenizer(lines, prefix, vocab_size=1024):
    """A tiny sentencepiece model configured like Mistral's: BPE, byte fallback, digits split,
    no text normalisation, <unk>=0 <s>=1 </s>=2."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return prefix + ".model"


def ensure_suite(out_dir=SUITE_DIR):
    """Generate the suite once; later calls reuse it (it takes a few seconds). A suite written
    by an older version of this file is written again."""
    done = os.path.join(out_dir, "DONE")
    if not os.path.isfile(done) or open(done).read().split()[0] != SUITE_VERSION:
        make_suite(out_dir)
    return out_dir


if __name__ == "__main__":
    print("built-in suite written to", make_suite())
