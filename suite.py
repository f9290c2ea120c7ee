"""
The built-in suite: synthetic in-context tasks and generic text, so that `python train.py` runs on
a laptop with no download. Each task *instance* hides its own rule (label words re-drawn, a
secret mapping, a hidden constant), so its answers cannot be known without the demonstrations:
a model can only score well by learning in context. Held-out families share no rule with
held-in ones. Generic text (plays, songs, stories) pre-trains the small base model.

    python suite.py      # write data/suite/ (train.py and eval.py do it when needed)
"""
import json
import os

import numpy as np

from data import EXAMPLE_SEPARATOR, build_sequence, targets_for

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
    taught that layout to our base model (RESULTS.md: "The base model")."""
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

    def __init__(self, tokenizer, max_len, loss_mask="all", seed=0, max_shots=None, families=HELD_IN, shots="random"):
        self.tok, self.max_len, self.loss_mask, self.seed, self.max_shots = tokenizer, max_len, loss_mask, seed, max_shots
        self.families, self.shots = list(families), shots

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index])
        draw, rule, options = suite_instance(self.families[rng.integers(len(self.families))], rng)
        inputs = [str(draw(rng)) for _ in range(self.max_len // 4)]  # more than fit: >= 4 tokens each
        examples = [dict(input=x, output=rule(x), options=options) for x in inputs]
        return build_sequence(examples, self.tok, self.max_len, self.loss_mask, seed=int(rng.integers(2**31)),
                              max_shots=self.max_shots, shots=self.shots)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def make_suite(out_dir=SUITE_DIR, seed=1234, instances=(50, 2), n_train=(160, 400), n_test=64):
    """Write the suite: train/{task}.jsonl (held-in) and eval/{task}/{train,test}.jsonl
    (held-out: a demonstration pool and a test set), generic text to score perplexity on (the
    forgetting check), and a small sentencepiece model trained on all of it. Deterministic in `seed`.
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
    # "task" of (first half, second half) pairs for pre-training from files with loss_mask="none"
    for name, n in (("generic_test.txt", 60), (None, 400)):
        docs = [generic_document(rng) for _ in range(n)]
        text += [song(rng) for _ in range(40)]
        if name:
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
