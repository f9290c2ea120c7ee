"""
Three sets of in-context tasks written outside the suite, by an author who never read suite.py or
its files: a check of what fine-tuning on the suite carries over to rules and vocabularies it was
never shaped around (RESULTS.md: "Tasks written outside the suite"). Never trained on.

    python config/outside_tasks.py out/outside           # writes out/outside/set1, set2, set3
    python eval.py --tasks out/outside/set3 --ks 0,max   # each set scored on its own

set1: letter-string features to made-up labels; string rules (copy, reverse, parts of a string).
set2: English-word features to English or digit labels; string rules; a hidden dictionary (recall).
set3: no test input occurs in its pool, so recalling the same key cannot answer: copies and
      affixes of fresh strings, a label carried by one part of a two-part input, fresh features.
Each task: train.jsonl (a 200-example pool) and test.jsonl (32 queries), the suite's layout.
Standard library only; every task drawn from random.Random("set/family/i"), so the files are the
same on every machine.
"""
import json
import os
import random
import sys


NPOOL, NTEST = 200, 32
L = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("cat dog horse sheep goat mouse rabbit tiger lion zebra camel otter beaver "
         "badger eagle falcon pigeon parrot salmon trout shark whale dolphin frog toad "
         "snake lizard turtle spider beetle table chair lamp spoon fork knife cup bottle "
         "window door pencil paper book clock mirror basket bucket hammer ladder pillow "
         "blanket candle wallet jacket helmet button rope wheel kettle brush run jump swim "
         "climb throw catch write read sing dance cook bake paint draw build carry push "
         "pull sleep laugh whisper shout listen wander borrow follow gather travel wash "
         "fold apple pear grape lemon mango cherry peach plum melon olive").split()
ADJ = ("red blue green yellow purple orange brown black white gray happy sad quick "
       "slow tall short warm cold soft loud bright quiet heavy light").split()
ONS = "b bl br d dr f fl g gr k kl l m n p pl r s sk st t tr v z sn".split()
VOW = "a e i o u ai ee oo ou".split()
COD = ["", "", "k", "m", "n", "r", "s", "t", "v", "sh"]


def nonce(r, used):
    while True:
        w = "".join(r.choice(ONS) + r.choice(VOW) + r.choice(COD) for _ in range(r.choice([1, 2])))
        if 3 <= len(w) <= 8 and w not in used and w not in WORDS and w not in ADJ:
            used.add(w)
            return w


def labels_of(r, kind, k):
    if kind == "nonce":
        used = set()
        return [nonce(r, used) for _ in range(k)]
    if kind == "english":
        return r.sample(ADJ, k)
    return r.sample("0123456789", k)  # digit labels


def rand_src(lo, hi):
    return lambda r: "".join(r.choice(L) for _ in range(r.randint(lo, hi)))


def word_src(r):
    return r.choice(WORDS)


def feat_rule(r, kind, sample):
    """Hidden feature rule: returns (fn word->label index, number of labels)."""
    while True:
        if kind == "letter":
            c, k = r.choice(L), 2
            fn = lambda w, c=c: int(c in w)
        elif kind == "len":
            t, k = r.randint(3, 7), 2
            fn = lambda w, t=t: int(len(w) > t)
        else:  # "first" / "last": letter belongs to a hidden group
            k, al = r.choice([2, 3, 4]), list(L)
            r.shuffle(al)
            grp, p = {ch: j % k for j, ch in enumerate(al)}, (0 if kind == "first" else -1)
            fn = lambda w, g=grp, p=p: g[w[p]]
        counts = [0] * k
        for w in sample:
            counts[fn(w)] += 1
        if min(counts) >= 0.08 * len(sample):
            return fn, k


def gen_cls(r, src, fn, labels, n, balanced, avoid=None):
    out = []
    for j in range(n):
        y = j % len(labels) if balanced else r.randrange(len(labels))
        for _ in range(100000):
            x = src(r)
            if fn(x) == y and (avoid is None or x not in avoid):
                break
        else:
            raise RuntimeError("could not sample label %d" % y)
        if avoid is not None:
            avoid.add(x)  # set3: no test input in pool, no repeats within test
        out.append({"input": x, "output": labels[y], "options": list(labels)})
    r.shuffle(out)
    return out


def gen_str(r, src, f, n, avoid=None):
    out = []
    while len(out) < n:
        x = src(r)
        if avoid is not None:
            if x in avoid:
                continue
            avoid.add(x)
        out.append({"input": x, "output": f(x), "options": []})
    return out


def feat_task(r, src, kind, lab_kind, fresh=False):
    sample = WORDS if src is word_src else [src(r) for _ in range(500)]
    fn, k = feat_rule(r, kind, sample)
    labels = labels_of(r, lab_kind, k)
    pool = gen_cls(r, src, fn, labels, NPOOL, False)
    avoid = {e["input"] for e in pool} if fresh else None
    return pool, gen_cls(r, src, fn, labels, NTEST, True, avoid)


def str_task(r, src, f, fresh=False):
    pool = gen_str(r, src, f, NPOOL)
    avoid = {e["input"] for e in pool} if fresh else None
    return pool, gen_str(r, src, f, NTEST, avoid)


RULES = {"copy": lambda w: w, "rev": lambda w: w[::-1], "first2": lambda w: w[:2],
         "droplast": lambda w: w[:-1], "dbl1": lambda w: w[0] + w, "last2": lambda w: w[-2:],
         "firstlast": lambda w: w[0] + w[-1], "repeat": lambda w: w + w,
         "swap12": lambda w: w[1] + w[0] + w[2:]}


def recall_task(r, i):
    if i == 1:  # 2-4 digit numbers -> numbers
        keys = [str(x) for x in r.sample(range(10, 10000), 25)]
    else:       # english words -> english words or numbers
        keys = r.sample(WORDS, 25)
    vals = {k: (r.choice(ADJ) if i == 0 else str(r.randrange(1000))) for k in keys}
    pool = [{"input": k, "output": vals[k], "options": []} for k in (r.choice(keys) for _ in range(NPOOL))]
    seen = sorted({e["input"] for e in pool})
    test = [{"input": k, "output": vals[k], "options": []} for k in (r.choice(seen) for _ in range(NTEST))]
    return pool, test


def part_task(r, i):
    keys, nl = r.sample(WORDS, r.randint(4, 6)), r.choice([2, 3])
    labels = labels_of(r, ["english", "nonce", "digit"][i], nl)
    ids = [j % nl for j in range(len(keys))]
    r.shuffle(ids)
    mp, pos = dict(zip(keys, ids)), r.choice([0, 1])
    noise = rand_src(3, 6)

    def src(rr):
        parts = [rr.choice(keys), noise(rr)]
        return " ".join(parts if pos == 0 else parts[::-1])
    fn = lambda x: mp[x.split()[pos]]
    pool = gen_cls(r, src, fn, labels, NPOOL, False)
    return pool, gen_cls(r, src, fn, labels, NTEST, True, {e["input"] for e in pool})


def affix_task(r, i):
    c, suf = r.choice(L), r.choice(L) + r.choice(L)
    f = [lambda w: c + w, lambda w: w + suf, lambda w: c + w + c][i]
    return str_task(r, rand_src(4, 8), f, fresh=True)


SETS = {
    "set1": {
        "haslet": lambda r, i: feat_task(r, rand_src(3, 9), "letter", "nonce"),
        "lenthr": lambda r, i: feat_task(r, rand_src(3, 9), "len", "nonce"),
        "firstgrp": lambda r, i: feat_task(r, rand_src(3, 9), "first", "nonce"),
        "strform": lambda r, i: str_task(r, rand_src(3, 7), RULES[["copy", "rev", "dbl1"][i]]),
        "strpart": lambda r, i: str_task(r, rand_src(3, 9), RULES[["first2", "droplast", "last2"][i]]),
    },
    "set2": {
        "haslet": lambda r, i: feat_task(r, word_src, "letter", "english"),
        "lenthr": lambda r, i: feat_task(r, word_src, "len", "digit"),
        "lastgrp": lambda r, i: feat_task(r, word_src, "last", ["english", "digit", "english"][i]),
        "strrule": lambda r, i: str_task(r, word_src, RULES[["rev", "firstlast", "droplast"][i]]),
        "recall": recall_task,
    },
    "set3": {
        "copyrep": lambda r, i: str_task(r, rand_src(3, 7), RULES[["copy", "repeat", "swap12"][i]], fresh=True),
        "affix": affix_task,
        "partlab": part_task,
        "feat": lambda r, i: feat_task(r, rand_src(3, 9), ["letter", "len", "first"][i],
                                       ["nonce", "digit", "english"][i], fresh=True),
    },
}


def ok(s, maxlen):
    return 0 < len(s) <= maxlen and all(ch in L + "0123456789 " for ch in s) \
        and s.strip() == s and "  " not in s


def main(out_dir):
    for sname, fams in SETS.items():
        print("==", sname)
        for fam, build in fams.items():
            for i in range(3):
                r = random.Random("%s/%s/%d" % (sname, fam, i))
                pool, test = build(r, i)
                for e in pool + test:
                    assert ok(e["input"], 20) and ok(e["output"], 14), e
                    assert not e["options"] or e["output"] in e["options"], e
                if sname == "set3":
                    assert not {e["input"] for e in test} & {e["input"] for e in pool}
                task = "%s_%d" % (fam, i)
                d = os.path.join(out_dir, sname, task)
                os.makedirs(d, exist_ok=True)
                for fn, rows in (("train.jsonl", pool), ("test.jsonl", test)):
                    with open(os.path.join(d, fn), "w") as fh:
                        fh.writelines(json.dumps(e) + "\n" for e in rows)
                print("  %-11s %s" % (task, json.dumps(test[0])))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python config/outside_tasks.py OUT_DIR")
    main(sys.argv[1])
