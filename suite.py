"""
The built-in suite: synthetic in-context tasks and generic text, so that `python train.py` runs on
a laptop with no download. Each task *instance* hides its own rule (label words re-drawn, a
secret mapping, a hidden constant), so its answers cannot be known without the demonstrations:
a model can only score well by learning in context. Held-out families share no rule with
held-in ones. Generic text (plays, songs, stories) pre-trains the small base model.

    python suite.py      # write data/suite/ (train.py and eval.py do it when needed)
"""
import os
import shutil
import zlib

import numpy as np

from data import EXAMPLE_SEPARATOR, build_sequence, encode_example, label_balanced, targets_for, write_jsonl

SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "suite")
# the suite is spelled in the vocabulary of the base model it fine-tunes: a copy of its tokenizer
BASE_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base-nano", "tokenizer.model")
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


# Vocabularies. Inputs and answers are drawn from several kinds (English words, nonce words of two
# syllable sets, digits, letters, numbers, phrases), and each split has its own: the held-out and
# dev families are spelled in words, syllables and numbers never used as labels in training, so a
# model that only learned the training suite's labels gains nothing there.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ENGLISH = {"train": ALL_WORDS,
           "dev": ("bread cheese butter honey salt sugar rice soup cake milk juice bean corn egg nut jam baker "
                   "farmer doctor nurse pilot sailor singer driver teacher writer painter hunter miner tailor").split(),
           "test": ("chair table lamp door window clock plate bowl pillow mirror carpet shelf sofa bottle happy sad "
                    "angry calm brave proud tired storm cloud rain snow wind moon star stone leaf grass flower oven "
                    "umbrella envelope orbit ink autumn engine idea").split()}
SYLLABLE_SETS = {"train": [SYLLABLES, ["mu", "ka", "po", "ti", "re", "so", "ya", "wo", "nu", "he"]],
                 "dev": [["zo", "qi", "xa", "je", "ub", "oc"]],
                 "test": [["ven", "dor", "kul", "mip", "tas", "rog"]]}


def label_words(rng, split, n):
    """n distinct answer words of one kind, the kind drawn per task instance. A third of held-in
    instances get new letter strings ("fresh"): no vocabulary of answers can be learned from them,
    only read from the context (RESULTS.md: recipes). Held-in answers run to 11 letters and 6
    digits, longer than the dev and held-out ones: a model trained on short answers only learns to
    stop copying an answer after a few letters or two digits (RESULTS.md: long answers)."""
    kinds = {"train": ["english", "nonce", "nonce", "digit", "letter", "phrase"] + ["fresh"] * 3 + ["long_number"],
             "dev": ["english", "nonce", "code"], "test": ["english", "nonce", "number"]}[split]
    kind = kinds[int(rng.integers(len(kinds)))]
    make = {"english": lambda: str(rng.choice(ENGLISH[split])),
            "nonce": lambda: "".join(rng.choice(syllables, size=int(rng.integers(2, 6 if split == "train" else 4)))),
            "digit": lambda: str(int(rng.integers(10))),
            "letter": lambda: str(rng.choice(list(LETTERS.upper()))),
            "phrase": lambda: " ".join(rng.choice(ENGLISH[split], size=2)),
            "code": lambda: str(rng.choice(list(LETTERS.upper()))) + str(int(rng.integers(10))),
            "number": lambda: str(int(rng.integers(200, 1000))),  # 3 digits from 200: no training answer is one
            "long_number": lambda: str(int(rng.integers(1000, 1000000))),  # numbers of 4-6 digits, copied whole
            "fresh": lambda: letters(rng, 3, 12)}[kind]
    syllables = SYLLABLE_SETS[split][int(rng.integers(len(SYLLABLE_SETS[split])))]
    out = list(dict.fromkeys(make() for _ in range(20 * n)))[:n]
    return out + [out[int(rng.integers(len(out)))] for _ in range(n - len(out))]  # a small kind (digits) repeats


def input_picker(rng, split, kinds=("word", "number", "letters", "phrase")):
    """A function r -> an input of one kind, the kind drawn per task instance."""
    kind = kinds[int(rng.integers(len(kinds)))]
    words = ENGLISH[split]
    return {"word": lambda r: str(r.choice(words)),
            "number": lambda r: str(int(r.integers(1000 if split != "train" else 100))),
            "letters": lambda r: "".join(r.choice(list(LETTERS), int(r.integers(3, 8)))),
            "phrase": lambda r: " ".join(r.choice(words, 2))}[kind]


def letters(r, lo=3, hi=8):
    """A fresh string of lo..hi-1 random letters: never a word, rarely drawn twice."""
    return "".join(r.choice(list(LETTERS), int(r.integers(lo, hi))))


def shared_ending_picker(rng):
    """Held-in dictionary keys that share their endings and differ at the start: `382`, `482`;
    `red foot`, `date foot`; `qxab`, `mab`. A model that matches only the last characters of a
    key recalls another key's answer; with these it has to read the whole key. The base did the
    former on the dev tables (RESULTS.md: keys that share endings)."""
    kind = int(rng.integers(3))
    if kind == 0:    # phrases: a few first words, two or three last words
        firsts = list(rng.choice(ENGLISH["train"], size=int(rng.integers(3, 6)), replace=False))
        lasts = list(rng.choice(ENGLISH["train"], size=int(rng.integers(2, 4)), replace=False))
        return lambda r: f"{r.choice(firsts)} {r.choice(lasts)}"
    if kind == 1:    # 3-digit numbers: two or three endings of two digits
        ends = [int(x) for x in rng.integers(100, size=int(rng.integers(2, 4)))]
        return lambda r: str(int(r.integers(1, 10)) * 100 + ends[int(r.integers(len(ends)))])
    ends = ["".join(rng.choice(list(LETTERS), int(rng.integers(2, 4)))) for _ in range(int(rng.integers(2, 4)))]
    return lambda r: letters(r, 1, 4) + ends[int(r.integers(len(ends)))]


def keys_and_values(rng, split, n):
    """A hidden dictionary of n keys to n answers, keys and answers each of a kind drawn per
    instance; held-in keys share their endings."""
    pick = shared_ending_picker(rng) if split == "train" else input_picker(rng, split)
    keys = list(dict.fromkeys(pick(rng) for _ in range(4 * n)))[:n]
    return keys, dict(zip(keys, label_words(rng, split, len(keys))))


def suite_instance(family, rng):
    """One task instance of `family` with its hidden rule drawn from rng. Returns
    (draw, rule, options): draw(r) picks an input, rule(input) is its answer. The family's split
    (held-in, dev, held-out) decides which vocabularies it is spelled in."""
    split = SPLIT_OF[family]
    labels = label_words(rng, split, 4)
    pick_word = input_picker(rng, split, ("word", "letters"))
    pick_number = lambda r: str(int(r.integers(100)))
    # ---- held-in: what a general in-context learner does, each instance a new rule and new labels.
    # Inputs are mostly fresh letter strings, so a query is rarely a copy of a demonstration:
    # recall of the same key does not answer it, reading the rule from the demonstrations does.
    if family == "feature_label":       # the label goes with one feature: a letter at a place, a digit, ...
        n, ch, kind = int(rng.integers(2, 4)), str(rng.choice(list(LETTERS))), int(rng.integers(7))
        group = dict(zip(LETTERS + "0123456789", (labels[i] for i in rng.integers(n, size=36))))  # hidden partition
        if kind < 3:                    # the first, second or last letter's group
            return letters, lambda x: group[x[(0, 1, -1)[kind]]], labels[:n]
        if kind == 3:                   # the last digit's group
            return lambda r: str(int(r.integers(10, 1000))), lambda x: group[x[-1]], labels[:n]
        plant = [lambda w, i: w[:i] + ch + w[i:], lambda w, i: w[:i + 1] + w[i:], lambda w, i: w + w[i]][kind - 4]
        test = [lambda x: ch in x, lambda x: any(p == q for p, q in zip(x, x[1:])), lambda x: len(x) % 2 == 0][kind - 4]
        def draw(r):                    # the feature present about half the time
            w = letters(r)
            return plant(w, int(r.integers(len(w)))) if r.random() < 0.4 else w
        return draw, lambda x: labels[int(test(x))], labels[:2]
    if family == "part_label":          # the label goes with one part of a two-part input, the other part noise
        keys, first = list(dict.fromkeys(input_picker(rng, split, ("word", "letters"))(rng) for _ in range(20)))[:int(rng.integers(3, 7))], rng.random() < 0.5
        label_of = {k: labels[i % 4] for i, k in enumerate(keys)}
        def draw(r):
            key, noise = keys[int(r.integers(len(keys)))], letters(r, 2, 5)
            return f"{key} {noise}" if first else f"{noise} {key}"
        return draw, lambda x: label_of[x.split(" ")[0 if first else 1]], labels[:min(4, len(keys))]
    if family == "edit":                # a hidden letter-level edit, or two composed
        c, p, k = str(rng.choice(list(LETTERS))), int(rng.integers(3)), int(rng.integers(1, 4))
        head = "".join(rng.choice(list(LETTERS), int(rng.integers(1, 3))))
        ops = {"reverse": lambda w: w[::-1], "insert": lambda w: w[:p] + c + w[p:], "delete": lambda w: w[:p] + w[p + 1:],
               "double": lambda w: w[:p + 1] + w[p:], "repeat": lambda w: w + w, "swap": lambda w: w[1] + w[0] + w[2:],
               "shift": lambda w: "".join(LETTERS[(LETTERS.find(x) + k) % 26] if x in LETTERS else x for x in w), "upper": str.upper,
               "prepend": lambda w: head + w, "first": lambda w: w[:p + 2], "copy": lambda w: w}
        names = list(rng.choice(sorted(ops), size=int(rng.integers(1, 3)), replace=False))
        def rule(w):
            for name in names:
                w = ops[name](w)
            return w
        return lambda r: letters(r, 4, 8) if r.random() < 0.8 else str(r.choice(ENGLISH[split])), rule, []
    if family == "number_rule":         # add a hidden constant
        c = int(rng.integers(1, 20))
        return lambda r: str(int(r.integers(100))), lambda n: str(int(n) + c), []
    if family == "table_label":         # a hidden, arbitrary label for every key: only recall solves it
        keys, _ = keys_and_values(rng, split, int(rng.integers(6, 13)))
        label_of = {k: labels[i % 4] for i, k in enumerate(keys)}  # every label used
        return lambda r: keys[int(r.integers(len(keys)))], label_of.get, labels
    if family == "lookup":              # a hidden dictionary: keys and answers of any kind
        keys, book = keys_and_values(rng, split, int(rng.integers(4, 13)))
        return lambda r: keys[int(r.integers(len(keys)))], book.get, []
    # ---- dev: chooses recipes; never trained on, never reported as the held-out result
    if family == "dev_length":          # is the word longer than a hidden length?
        t = int(rng.integers(4, 6))
        return pick_word, lambda w: labels[int(len(w) > t)], labels[:2]
    if family == "dev_table":           # a hidden table to dev-vocabulary labels
        keys, _ = keys_and_values(rng, split, int(rng.integers(6, 13)))
        label_of = {k: labels[i % 3] for i, k in enumerate(keys)}  # every label used
        return lambda r: keys[int(r.integers(len(keys)))], label_of.get, labels[:3]
    if family == "dev_lookup":
        keys, book = keys_and_values(rng, split, int(rng.integers(4, 13)))
        return lambda r: keys[int(r.integers(len(keys)))], book.get, []
    if family == "dev_last_letters":    # the last two or three letters
        n = int(rng.integers(2, 4))
        return pick_word, lambda w: w[-n:], []
    # ---- held-out: rules and vocabularies of their own
    if family == "vowel_start":         # does the word start with a vowel?
        return pick_word, lambda w: labels[int(w[0] in "aeiou")], labels[:2]
    if family == "test_table":          # a hidden table to held-out-vocabulary labels
        keys, _ = keys_and_values(rng, split, int(rng.integers(6, 13)))
        label_of = {k: labels[i % 3] for i, k in enumerate(keys)}  # every label used
        return lambda r: keys[int(r.integers(len(keys)))], label_of.get, labels[:3]
    if family == "translate":           # a hidden dictionary, held-out vocabularies
        keys, book = keys_and_values(rng, split, int(rng.integers(4, 13)))
        return lambda r: keys[int(r.integers(len(keys)))], book.get, []
    if family == "suffix":              # append a hidden suffix
        suffix = "".join(rng.choice(list(LETTERS), 2))
        return pick_word, lambda w: w + suffix, []
    raise ValueError(f"unknown suite family {family!r}")


SUITE_VERSION = "v11"  # bump when the generated suite changes, so stale copies are rewritten
HELD_IN = ["feature_label", "part_label", "edit", "number_rule", "table_label", "lookup"]
# what train.py draws from: every held-in family, the two recall families twice (RESULTS.md)
TRAIN_MIX = ["feature_label", "part_label", "edit", "number_rule", "table_label", "table_label", "lookup", "lookup"]
DEV = ["dev_length", "dev_table", "dev_lookup", "dev_last_letters"]
HELD_OUT = ["vowel_start", "test_table", "translate", "suffix"]
SPLIT_OF = {**{f: "train" for f in HELD_IN}, **{f: "dev" for f in DEV}, **{f: "test" for f in HELD_OUT}}


class SuiteSampler:
    """TrainSampler's interface, but every sequence is a *fresh* instance of a suite family, its
    hidden rule drawn from (seed, step, index). Task diversity is then unlimited: a small model
    cannot memorise rules (it memorised even 400 fixed instances before learning to read its
    context), so the only way to lower the loss is in-context learning."""

    def __init__(self, tokenizer, max_len, loss_mask="all", seed=0, max_shots=None, families=TRAIN_MIX, shots="random",
                 generic_share=0.0):
        self.tok, self.max_len, self.loss_mask, self.seed, self.max_shots = tokenizer, max_len, loss_mask, seed, max_shots
        self.families, self.shots, self.generic_share = list(families), shots, generic_share

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index])
        # A share of the base model's own pre-training text, every token a target, keeps the skills it
        # learned there (recall above all) while the tasks teach the rest (RESULTS.md: recipes)
        if self.generic_share and rng.random() < self.generic_share:
            return GenericSampler(self.tok, self.max_len, self.seed).sequence(step, index)
        family = self.families[rng.integers(len(self.families))]
        draw, rule, options = suite_instance(family, rng)
        n = self.max_len // 4  # more than fit (>= 4 tokens each); with random shots, no more than max_shots
        inputs = [str(draw(rng)) for _ in range(min(n, self.max_shots or n) if self.shots == "random" else n)]
        examples = [encode_example(self.tok, dict(input=x, output=rule(x), options=options)) for x in inputs]
        return build_sequence(examples, self.tok.bos_id, self.max_len, self.loss_mask, seed=int(rng.integers(2**31)),
                              max_shots=self.max_shots, shots=self.shots)


def make_suite(out_dir=SUITE_DIR, seed=1234, instances=(50, 8), n_train=(160, 400), n_test=64):
    """Write the suite: train/{task}.jsonl (held-in), and for the dev and held-out families
    dev/{task}/ and eval/{task}/ each with train.jsonl (a demonstration pool) and test.jsonl (a
    test set, labels balanced where the task allows); generic text to score perplexity on (the
    forgetting check); and the tokenizer, the base model's own (assets/base-nano). Deterministic
    in `seed`. Many instances per held-in family, each with its own hidden rule: with few, a
    small model memorises each instance's rule instead of learning to read it from the context.
    Every file is drawn from a generator of its own, seeded by (seed, its name): a held-in family
    added, removed or changed leaves the dev and held-out files exactly as they were."""
    own_rng = lambda name: np.random.default_rng([seed, zlib.crc32(name.encode())])
    written = []
    def write_rows(name, rows):
        write_jsonl(os.path.join(out_dir, name), rows)
        written.append(name)
    for families, n_inst, n_ex, split_dir in ((HELD_IN, instances[0], n_train[0], "train"),
                                              (DEV, instances[1], n_train[1], "dev"),
                                              (HELD_OUT, instances[1], n_train[1], "eval")):
        for fam in families:
            for i in range(n_inst):
                task = f"{fam}_{i}"
                rng = own_rng(task)
                draw, rule, options = suite_instance(fam, rng)
                rows = [dict(input=x, output=rule(x), task=task, options=options)
                        for x in (str(draw(rng)) for _ in range(n_ex + (8 * n_test if split_dir != "train" else 0)))]
                if split_dir == "train":
                    write_rows(f"train/{task}.jsonl", rows)
                else:
                    write_rows(f"{split_dir}/{task}/train.jsonl", rows[:n_ex])
                    write_rows(f"{split_dir}/{task}/test.jsonl", label_balanced(rows[n_ex:], n_test))
    # generic text never trained on, to score perplexity on
    rng = own_rng("generic_test")
    docs = [generic_document(rng) for _ in range(60)]
    open(os.path.join(out_dir, "generic_test.txt"), "w").write("\n\n".join(docs) + "\n")
    shutil.copy(BASE_TOKENIZER, os.path.join(out_dir, "tokenizer.model"))
    written += ["generic_test.txt", "tokenizer.model"]
    with open(os.path.join(out_dir, "DONE"), "w") as f:  # last: the suite is complete; and what to remove later
        f.write("\n".join([f"{SUITE_VERSION} {seed}"] + written) + "\n")
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


# English words for generic text: none of them is a dev or held-out word
GENERIC_WORDS = ALL_WORDS + ("book pen paper letter word song game ball kite boat ship train car bus bike road map key "
                             "box bag hat coat shoe sock shirt ring coin gift card bell drum horn flag tent nest web "
                             "hill cave rock pond sea shore wave fire ice gold iron wood glass sound light dark night "
                             "day week year spring summer winter morning evening king queen prince child friend man "
                             "woman girl boy mother father sister brother uncle aunt cook king hero giant dragon "
                             "wizard ghost robot fast slow big small old new hot cold soft hard loud quiet good bad "
                             "one two three four five six seven eight nine ten").split()


def roster(rng, n_turns=40):
    """A roster: entries of a key on one line and its value on the next, a blank line between, each
    key always with the same value, keys returning in any order: a play whose names and lines are
    of every kind (English words, numbers, codes, letter strings, phrases, nonce words). Recall
    after a key of any spelling, in the layout of a task's examples."""
    kinds = [lambda: str(rng.choice(GENERIC_WORDS)), lambda: str(int(rng.integers(1000))), nonce_word,
             lambda: "".join(rng.choice(list(LETTERS), int(rng.integers(2, 6)))),
             lambda: " ".join(rng.choice(GENERIC_WORDS, 2)), lambda: str(rng.choice(list(LETTERS.upper()))) + str(int(rng.integers(100)))]
    key_kind, value_kind = (kinds[i] for i in rng.integers(len(kinds), size=2))
    call = lambda kind: kind(rng) if kind is nonce_word else kind()
    keys = list(dict.fromkeys(call(key_kind) for _ in range(int(rng.integers(3, 12)))))
    value = {k: call(value_kind) for k in keys}
    return "\n\n".join(f"{k}\n{value[k]}" for k in (keys[i] for i in rng.integers(len(keys), size=n_turns)))


class GenericSampler:
    """Language-model pre-training on generic text: every sequence is fresh documents (a roster
    or a play two times in three, else a song or a story), packed back to back ("\n\n" between
    them) and cut at max_len, every next token a target. Like SuiteSampler, a pure function of
    (seed, step, index)."""

    def __init__(self, tokenizer, max_len, seed=0):
        self.tok, self.max_len, self.seed = tokenizer, max_len, seed

    def sequence(self, step, index):
        rng = np.random.default_rng([self.seed, step, index, 7])
        document = lambda: ((roster(rng) if rng.random() < 0.5 else play(rng)) if rng.random() < 2 / 3 else
                            song(rng) if rng.random() < 0.5 else generic_document(rng))
        tokens = [self.tok.bos_id] + self.tok.encode(document())
        while len(tokens) < self.max_len:
            tokens += self.tok.encode_continuation(EXAMPLE_SEPARATOR + document())
        tokens = tokens[: self.max_len]
        return np.asarray(tokens, dtype=np.int64), targets_for(tokens, [], "none")


def train_tokenizer(lines, prefix, vocab_size=1024, model_type="bpe"):
    """A tiny sentencepiece model configured like Mistral's: byte fallback, digits split, no text
    normalisation, <unk>=0 <s>=1 </s>=2. model_type="char" makes every character a token (the
    vocabulary is then the characters seen, and vocab_size only an upper bound)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", hard_vocab_limit=model_type != "char",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return prefix + ".model"


def char_tokenizer(prefix, seed=0):
    """The small base model's tokenizer: one token per character (plus 256 byte pieces for any
    other), trained on generic text. Letters are tokens, so rules about spelling are visible to the
    model; a subword tokenizer hides them (a word is one token, its first letter nowhere)."""
    rng = np.random.default_rng(seed)
    docs = [make(rng) for _ in range(300) for make in (roster, play, song, generic_document)]
    lines = [line for doc in docs for line in doc.split("\n")]
    return train_tokenizer(lines + [LETTERS, LETTERS.upper(), "0123456789 .,:;!?'\"-()"], prefix, 512, "char")


def suite_is_current(out_dir):
    done = os.path.join(out_dir, "DONE")
    return os.path.isfile(done) and open(done).read().split()[:1] == [SUITE_VERSION]


def ensure_suite(out_dir=SUITE_DIR):
    """Generate the suite once; later calls reuse it (it takes a few seconds). Safe when several
    processes call it at once (torchrun's ranks, or two runs started together): one writes under a
    lock while the others wait, then all read the same files. A suite of an older version is
    written again: the files it wrote (listed in its DONE) are removed first, so none lingers,
    and anything else in the folder, such as a user's own task files, is left alone."""
    import fcntl
    if suite_is_current(out_dir):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if this process dies
        if not suite_is_current(out_dir):
            remove_suite_files(out_dir)
            make_suite(out_dir)
    return out_dir


def remove_suite_files(out_dir):
    """Remove what an older suite wrote: the files its DONE lists, then the folders left empty.
    A suite from before DONE listed its files is moved aside whole, not deleted."""
    done = os.path.join(out_dir, "DONE")
    if not os.path.isfile(done):
        return
    version, *written = open(done).read().splitlines()  # "v7 1234", then one written file a line
    if not written:
        aside = f"{out_dir.rstrip(os.sep)}-{version.split()[0]}"
        print(f"suite {version} in {out_dir} does not list its files: moved to {aside} (nothing deleted)")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out_dir, aside)
        return
    for name in written:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    for folder, _, _ in sorted(os.walk(out_dir), key=lambda w: -len(w[0])):  # deepest first
        if folder != out_dir and not os.listdir(folder):
            os.rmdir(folder)


if __name__ == "__main__":
    print("built-in suite in", ensure_suite())
