"""
The paper's three claims on the built-in suite, every arm fine-tuned from the same base model:

    python config/reproduce.py                 # CPU route: from assets/base-nano, about 30 min on 2 cores
    python config/reproduce.py --report        # only the tables, verdicts and plots, from finished runs
    python config/reproduce.py --gpu           # GPU route: the full size, many runs at a time on one GPU (unmeasured)
    python config/reproduce.py --recall CKPT...  # a base model's recall in the task layout, by kind of key
    python config/reproduce.py --long_answers DIR  # dev-vocabulary lookups with long answers

Arms (train.py's default recipe at a reduced number of steps; only the flags below differ):
  untrained     the base model itself
  zero-shot     one example per sequence, loss on its answer
  few-shot      MetaICL: 16 demonstrations and a query, loss on the last answer only
  mask-last     ManyICL's long sequences, loss on the last answer only (the paper's ablation)
  manyicl       ManyICL: as many shots as fit, a loss on every answer
  stratified    manyicl with label-balanced shots (--shots=stratified), training and evaluation
  dedicated     one model per held-out task, trained on that task's own pool (one example per
                sequence), evaluated at k=0: the paper's upper bound
Every multi-task arm sees the same number of training *tokens*: a zero-shot sequence holds ~14
tokens and a few-shot one ~230 against ManyICL's ~506, so those arms take proportionally more
sequences per step (batch sizes measured from the sampler, printed, and the tokens each run
really saw are read back from its log). The same sampler seed gives mask-all and mask-last the
very same sequences. The arms train on the held-in task families only: the generic text of the
default mix is not a task, so zero-shot, few-shot and mask-last would not apply to it.
Each arm is trained with 3 seeds and evaluated with 2 demonstration seeds on the held-out
families at k in {0,1,4,16,max}; the forgetting check (perplexity of held-out generic text by
context length) and the many-shot curve (answer loss and accuracy by shot index in long sequences
of fresh held-out instances) come from the same checkpoints.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = "--gpu" in sys.argv
option = lambda name, default: type(default)(next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default))
# CPU route: a reduced size, measured on 2 cores, from the committed base (assets/base-nano, a
# character-level language model that copies and recalls from its context). GPU route: the size at
# which in-context learning showed on one H100 (3,000 steps of 32 sequences of 512 tokens, lr 1e-3;
# RESULTS.md at 84ada9a), from a `tiny` language model it pre-trains first.
SIZE = ["--seq_len=512", "--grad_accum=1", "--lr=1e-3", "--min_lr=1e-4", "--warmup_steps=100", "--workers=2"] if GPU else \
       ["--seq_len=512", "--grad_accum=1", "--warmup_steps=20"]  # lr: train.py's default, chosen on the dev families
BATCH = 32 if GPU else 16                            # ManyICL's sequences per step; other arms: the same tokens
LM_STEPS = option("lm_steps", 2000)                  # GPU route: language-model pre-training of the base
STEPS = option("steps", 3000 if GPU else 200)        # every fine-tuning arm
JOBS = option("jobs", 14 if GPU else 2)
RUNS = option("runs", "runs-gpu" if GPU else "runs")
SEEDS = [1, 2, 3]
FAMILIES = "--families=feature_label,part_label,edit,number_rule,table_label,lookup"  # suite.HELD_IN
ARM_DATA = [FAMILIES, "--generic_share=0"]  # the task families alone: the default's generic text is not a task
COMMON = [*SIZE, "--eval_data=", "--log_interval=100000"]
ARMS = {  # name: train.py flags; the same sampler seed gives mask-all and mask-last the very same sequences
    "zero-shot": ["--loss_mask=all", "--max_shots=1"],
    "few-shot": ["--loss_mask=last", "--max_shots=17"],
    "mask-last": ["--loss_mask=last"],
    "manyicl": ["--loss_mask=all"],
    "stratified": ["--loss_mask=all", "--shots=stratified"],
}
TASKS = "data/suite/eval"
KS = "0,1,4,16,max"  # k=64 never fits 512 character tokens
PPL = ["--ppl_file", "data/suite/generic_test.txt", "--ppl_lengths", "32,128,512"]
EVAL = ["--ks", KS, "--seeds", "100,13", "--max_test", "32", "--no_base", *PPL]
LM = f"{RUNS}/lm"
CURVE_SEQUENCES = 32
SAMPLE = 256  # sequences drawn to measure an arm's tokens and answers per sequence


def sh(*cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # JOBS processes share the cores
    p = subprocess.run([sys.executable, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")


def run_jobs(jobs):
    """Each job: (output file, commands to run in order); skipped when its output exists."""
    def run(job):
        done, cmds = job
        if not os.path.exists(done):
            for cmd in cmds:
                sh(*cmd)
            print(f"done: {done}", flush=True)
    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(run, jobs))


def dedicated_tasks():
    return sorted(os.listdir(os.path.join(ROOT, TASKS)))


def arm_shape(base, flags):
    """An arm's sequences, measured on SAMPLE of them from its sampler: mean (tokens, answers)
    per sequence. Answers are the supervised spans; mask-last supervises one per sequence."""
    from data import IGNORE, Tokenizer
    from suite import SuiteSampler
    value = lambda name, default: next((f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")), default)
    sampler = SuiteSampler(Tokenizer(os.path.join(base, "tokenizer.model")), 512, value("loss_mask", "all"), 0,
                           int(value("max_shots", 0)) or None, FAMILIES.split("=")[1].split(","), value("shots", "random"))
    tokens, answers = [], []
    for i in range(SAMPLE):
        x, y = sampler.sequence(0, i)
        target = np.append(y != IGNORE, False)
        tokens.append(len(x))
        answers.append(int((target[1:] & ~target[:-1]).sum()))  # the ends of supervised spans
    return float(np.mean(tokens)), float(np.mean(answers))


def arm_batches(base):
    """Sequences per step of each arm, so that every arm sees ManyICL's tokens per step."""
    shapes = {name: arm_shape(base, flags) for name, flags in ARMS.items()}
    per_step = BATCH * shapes["manyicl"][0]
    batches = {name: max(1, round(per_step / tokens)) for name, (tokens, _) in shapes.items()}
    os.makedirs(RUNS, exist_ok=True)
    json.dump({name: dict(batch_size=batches[name], tokens_per_sequence=t, answers_per_sequence=a)
               for name, (t, a) in shapes.items()}, open(f"{RUNS}/arms.json", "w"), indent=1)
    for name, (t, a) in shapes.items():
        print(f"{name:>11}: {t:6.1f} tokens and {a:5.1f} answers a sequence -> batch_size {batches[name]}")
    return batches


def train_and_eval():
    # the base: a language model pre-trained on generic text (every token a target)
    if GPU:
        base = f"{LM}/ckpt-{LM_STEPS:06d}"
        pretrain = [("train.py", *COMMON, "--init=scratch", "--preset=tiny", "--data=generic", "--loss_mask=none",
                     f"--batch_size={BATCH}", f"--max_steps={LM_STEPS}", f"--ckpt_interval={LM_STEPS}", f"--out_dir={LM}")]
    else:
        base, pretrain = "assets/base-nano", []
    run_jobs([(f"{LM}/eval.json", [*pretrain, ("eval.py", "--ckpt", base, "--tasks", TASKS, *EVAL, "--out", f"{LM}/eval.json"),
                                   ("config/reproduce.py", "--curve", base, LM)])])
    batches = arm_batches(base)
    jobs = []
    for seed in SEEDS:
        for name, flags in ARMS.items():
            out = f"{RUNS}/{name}-{seed}"
            shots = ["--shots", "stratified"] if name == "stratified" else []
            jobs.append((f"{out}/curve.json", [
                ("train.py", *COMMON, *ARM_DATA, *flags, f"--batch_size={batches[name]}", f"--init={base}",
                 f"--max_steps={STEPS}", f"--ckpt_interval={STEPS}", f"--seed={seed}", f"--out_dir={out}"),
                ("eval.py", "--ckpt", out, "--tasks", TASKS, *EVAL, *shots, "--out", f"{out}/eval.json"),
                ("config/reproduce.py", "--curve", out)]))
        for task in dedicated_tasks():  # the upper bound: one model per task, on the task's own pool
            out = f"{RUNS}/dedicated-{task}-{seed}"
            jobs.append((f"{out}/eval.json", [
                ("train.py", *COMMON, f"--data={TASKS}/{task}", "--loss_mask=all", "--max_shots=1", f"--batch_size={BATCH}",
                 f"--init={base}", f"--max_steps={STEPS}", f"--ckpt_interval={STEPS}", f"--seed={seed}", f"--out_dir={out}"),
                ("eval.py", "--ckpt", out, "--tasks", f"{TASKS}/{task}", "--ks", "0", "--seeds", "100", "--max_test", "32",
                 "--no_base", "--out", f"{out}/eval.json")]))
    run_jobs(jobs)


def curve(out, dest):
    """Many-shot curve: per shot index, the gold answer's loss (nats per token, teacher-forced) and
    whether every answer token is the model's top choice, in long sequences of fresh instances of
    the held-out families (the same sequences for every model)."""
    import torch
    from data import IGNORE
    from inference import load_models
    from suite import HELD_OUT, SuiteSampler
    _, model, tok, config = load_models(out, "cpu", torch.float32, base=False)
    sampler = SuiteSampler(tok, config["seq_len"], "all", seed=424242, families=HELD_OUT)
    loss, correct = {}, {}
    for i in range(CURVE_SEQUENCES):
        tokens, targets = sampler.sequence(0, i)
        with torch.no_grad():
            logits = model(torch.as_tensor(tokens)[None])[0]
        nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets), reduction="none", ignore_index=IGNORE)
        hit = logits.argmax(-1).numpy() == targets
        supervised = np.flatnonzero(targets != IGNORE)
        for shot, span in enumerate(np.split(supervised, np.flatnonzero(np.diff(supervised) > 1) + 1)):
            loss.setdefault(shot, []).append(float(nll[span].mean()))
            correct.setdefault(shot, []).append(float(hit[span].all()))
    json.dump({s: dict(loss=float(np.mean(loss[s])), accuracy=float(np.mean(correct[s])), n=len(loss[s])) for s in loss},
              open(f"{dest}/curve.json", "w"), indent=1)


def recall(ckpts, n_seq=12):
    """Recall in the task layout, by the kind of key: 10 key-answer pairs, then the same keys again
    in a new order; top-1 on the first token of a repeated key's answer (answers: held-out English
    words or numbers, n_seq sequences per kind). Prints one line per checkpoint."""
    import torch
    import data
    import suite
    from checkpoints import load_model
    for ckpt in ckpts:
        tok, model, rng = data.Tokenizer(os.path.join(ckpt, "tokenizer.model")), load_model(ckpt).eval(), np.random.default_rng(0)
        kinds = {"nonce": lambda: suite.nonce_word(rng), "english": lambda: str(rng.choice(suite.ALL_WORDS)),
                 "held-out english": lambda: str(rng.choice(suite.ENGLISH["test"])),
                 "number": lambda: str(int(rng.integers(1000))),
                 "held-out phrase": lambda: " ".join(rng.choice(suite.ENGLISH["test"], 2))}
        line = []
        for name, key in kinds.items():
            hits = []
            for s in range(n_seq):
                keys = list(dict.fromkeys(key() for _ in range(30)))[:10]
                answers = [str(rng.choice(suite.ENGLISH["test"])) if s % 2 else str(int(rng.integers(200, 1000))) for _ in keys]
                order = list(range(len(keys))) + list(rng.permutation(len(keys)))
                tokens, spans = data.pack([data.encode_example(tok, dict(input=keys[i], output=answers[i])) for i in order],
                                          tok.bos_id)
                with torch.no_grad():
                    logits = model(torch.tensor(tokens)[None])[0]
                hits += [int(logits[a].argmax()) == tokens[a + 1] for a, _ in spans[len(keys):]]  # a: the opening newline
            line.append(f"{name} {np.mean(hits):.2f}")
        print(f"{ckpt}: recall top-1 by key kind: " + ", ".join(line), flush=True)


def long_answers(out_dir, instances=8):
    """Lookup tasks in the dev vocabularies whose answers are longer than any dev family's: 3-5 dev
    syllables or two dev words run together (6-14 letters), or numbers of 2-5 digits. A model that
    learned to stop an answer after a few letters or digits, because its training answers were
    short, fails them (RESULTS.md: long answers). Score with eval.py --tasks out_dir; like the dev
    families, never trained on."""
    import zlib
    import data
    import suite
    def number(r):  # 2-5 digits, the count drawn first
        digits = int(r.integers(2, 6))
        return str(int(r.integers(10 ** (digits - 1), 10 ** digits)))
    makes = {  # task name -> (seed, answer from rng)
        "devlong_nonce": (99, lambda r: "".join(r.choice(suite.SYLLABLE_SETS["dev"][0], size=int(r.integers(3, 6))))),
        "devlong_compound": (99, lambda r: "".join(r.choice(suite.ENGLISH["dev"], size=2))),
        "devnum": (98, number),
    }
    for name, (seed, make) in makes.items():
        for i in range(instances):
            task = f"{name}_{i}"
            rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
            pick = suite.input_picker(rng, "dev")
            keys = list(dict.fromkeys(pick(rng) for _ in range(60)))[:int(rng.integers(4, 13))]
            book = dict(zip(keys, list(dict.fromkeys(make(rng) for _ in range(100)))))
            rows = [dict(input=k, output=book[k], task=task, options=[]) for k in (keys[int(rng.integers(len(keys)))] for _ in range(464))]
            data.write_jsonl(os.path.join(out_dir, task, "train.jsonl"), rows[:400])
            data.write_jsonl(os.path.join(out_dir, task, "test.jsonl"), rows[400:])
    print(f"wrote {len(makes) * instances} tasks into {out_dir}")


def by_family(tasks, score):
    """{family: the mean of score(task) over the family's instances}; a task is named {family}_{i}."""
    families = {}
    for t in tasks:
        families.setdefault(t.rsplit("_", 1)[0], []).append(score(t))
    return {f: float(np.mean(v)) for f, v in sorted(families.items())}


def mean_spread(values):
    v = np.array([x for x in values if x is not None], dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"


def table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def margin(a, b, better="higher"):
    """a's lead over b (mean difference, signed so that positive favours a) and that lead in units
    of the seeds' spread (the two arms' standard deviations pooled; a single value has none)."""
    lead = (np.mean(a) - np.mean(b)) * (1 if better == "higher" else -1)
    spread = np.sqrt((np.var(a) + np.var(b)) / 2)
    return lead, lead / spread if spread > 0 else (np.sign(lead) * np.inf if lead else 0.0)


def logged(run):
    """(tokens, target tokens) a finished run trained on, read back from its log."""
    steps = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    return (sum(round(e["tokens_per_s"] * e["ms"] / 1000) for e in steps),
            sum(round(e["target_tokens_per_s"] * e["ms"] / 1000) for e in steps))


def report():
    load = lambda run: json.load(open(f"{run}/eval.json"))
    lm = load(LM)
    res = {(a, s): load(f"{RUNS}/{a}-{s}") for a in ARMS for s in SEEDS if os.path.exists(f"{RUNS}/{a}-{s}/eval.json")}
    arms = [a for a in ARMS if all((a, s) in res for s in SEEDS)]
    shapes = json.load(open(f"{RUNS}/arms.json"))
    rows = {}
    for a in arms:
        tokens, targets = np.mean([logged(f"{RUNS}/{a}-{s}") for s in SEEDS], axis=0)
        b = shapes[a]["batch_size"]
        rows[a] = [str(b), f"{tokens / 1e6:.2f}M", f"{targets / 1e6:.2f}M",
                   f"{shapes[a]['answers_per_sequence'] * b * STEPS / 1e3:.1f}K"]
    table(f"Training per arm ({STEPS} steps; tokens and target tokens read from the logs, mean over seeds; "
          f"answers = supervised answer spans, from {SAMPLE} sampled sequences)",
          ["arm", "sequences a step", "tokens", "target tokens", "answers"], rows)
    ks = KS.split(",")
    head = ["method"] + [f"k={k}" for k in ks]
    cols = {}  # (metric, arm) -> per k, the values over seeds
    for key, title in (("mean", "Held-out k-shot score (accuracy with options ranked by summed span loss, or ROUGE-L)"),
                       ("answer_loss", "Held-out gold-answer loss (nats per answer token, lower is better)")):
        cols[key, "untrained"] = [[lm["summary"][k]["trained"][key]] for k in ks]
        for a in arms:
            cols[key, a] = [[res[(a, s)]["summary"][k]["trained"][key] for s in SEEDS] for k in ks]
        table(f"{title}; macro-average over the {len(dedicated_tasks())} held-out tasks; mean ± std over {len(SEEDS)} training seeds, "
              "each the mean over 2 demonstration seeds", head,
              {a: [mean_spread(c) for c in cols[key, a]] for a in ["untrained", *arms]})
    tasks = dedicated_tasks()
    dedicated = {t: [load(f"{RUNS}/dedicated-{t}-{s}")["summary"]["0"]["trained"]["mean"] for s in SEEDS
                     if os.path.exists(f"{RUNS}/dedicated-{t}-{s}/eval.json")] for t in tasks}
    at_max = lambda result: lambda t: result["tasks"][t]["k"]["max"]["trained"]["mean"]
    families = list(by_family(tasks, at_max(lm)))
    def cells(scores):  # a row of the table: each family's mean ± std over the scores (seeds)
        columns = [by_family(tasks, score) for score in scores]
        return [mean_spread([c[f] for c in columns]) for f in families]
    per_family = {"untrained": cells([at_max(lm)]), **{a: cells([at_max(res[(a, s)]) for s in SEEDS]) for a in arms}}
    complete = all(len(dedicated[t]) == len(SEEDS) for t in tasks)
    per_family["dedicated (k=0)"] = (cells([lambda t, i=i: dedicated[t][i] for i in range(len(SEEDS))]) if complete
                                     else ["–"] * len(families))
    table("Per held-out family at k=max (mean over its instances); dedicated fine-tuning is one model per task, "
          "evaluated at k=0", ["method"] + families, per_family)
    lengths = PPL[-1].split(",")
    ppl = {"untrained": [[lm["perplexity"][L]["trained"]["ppl"]] for L in lengths]}
    ppl.update({a: [[res[(a, s)]["perplexity"][L]["trained"]["ppl"] for s in SEEDS] for L in lengths] for a in arms})
    table("Perplexity of held-out generic text by context length (forgetting; the arms never train on generic text)",
          ["model"] + [f"{L} tokens" for L in lengths], {a: [mean_spread(c) for c in v] for a, v in ppl.items()})
    if {"manyicl", "mask-last", "few-shot"} <= set(arms) and all(dedicated.values()):
        verdicts(cols, ks, ppl, lengths, dedicated, lm, res, arms)
    curves = {"untrained": [json.load(open(f"{LM}/curve.json"))]}
    curves.update({a: [json.load(open(f"{RUNS}/{a}-{s}/curve.json")) for s in SEEDS] for a in arms})
    plot({key: {a: c for (k2, a), c in cols.items() if k2 == key} for key in ("mean", "answer_loss")}, ks, curves)


def verdicts(cols, ks, ppl, lengths, dedicated, lm, res, arms):
    """The three claims, each with its margins in units of the training seeds' spread (σ) and a
    plain verdict: held only if every margin it names is positive and larger than 1σ."""
    print("\n## The claims\n")
    shots = [i for i, k in enumerate(ks) if k != "0"]
    lines, held = [], True
    for other in ("mask-last", "few-shot"):
        for key, better in (("mean", "higher"), ("answer_loss", "lower")):
            ms = [margin(cols[key, "manyicl"][i], cols[key, other][i], better) for i in shots]
            held &= all(z > 1 for _, z in ms)
            lines.append(f"   - over {other}, {'score' if key == 'mean' else 'answer loss'}: " +
                         ", ".join(f"k={ks[i]} {lead:+.3f} ({z:+.1f}σ)" for i, (lead, z) in zip(shots, ms)))
    print(f"1. Mask-all beats mask-last and few-shot fine-tuning on held-out tasks, k = 1 … max: "
          f"**{'held' if held else 'not held'}**")
    print("\n".join(lines))
    tasks = sorted(dedicated)
    base = np.mean([lm["tasks"][t]["k"]["max"]["trained"]["mean"] for t in tasks])
    many = [np.mean([res[("manyicl", s)]["tasks"][t]["k"]["max"]["trained"]["mean"] for t in tasks]) for s in SEEDS]
    bound = [np.mean([dedicated[t][i] for t in tasks]) for i in range(len(SEEDS))]
    lead, z = margin(many, [base])
    fraction = (np.mean(many) - base) / (np.mean(bound) - base)
    print(f"2. ManyICL at k=max closes part of the gap between the base and dedicated fine-tuning: "
          f"**{'held' if z > 1 and 0 < fraction else 'not held'}**\n"
          f"   - base {base:.3f}, manyicl {np.mean(many):.3f} ± {np.std(many):.3f}, dedicated (k=0) "
          f"{np.mean(bound):.3f} ± {np.std(bound):.3f}: manyicl − base {lead:+.3f} ({z:+.1f}σ), "
          f"fraction of the gap closed {fraction:+.2f}")
    rise = {a: [np.array(ppl[a][j]) / ppl["untrained"][j][0] - 1 for j in range(len(lengths))] for a in arms}
    others = [a for a in arms if a not in ("manyicl", "stratified")]
    ms = {a: [margin(rise[a][j], rise["manyicl"][j]) for j in range(len(lengths))] for a in others}
    held = all(z > 1 for m in ms.values() for _, z in m)
    print(f"3. ManyICL forgets least (perplexity of held-out generic text against the base, by context length): "
          f"**{'held' if held else 'not held'}**")
    for a in ["manyicl", *others]:
        cells = ", ".join(f"{L} tokens {np.mean(rise[a][j]):+.1%}" + (f" (manyicl lower by {ms[a][j][1]:+.1f}σ)" if a in ms else "")
                          for j, L in enumerate(lengths))
        print(f"   - {a}: {cells}")


def plot(tables, ks, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots)")
        return
    tag = "" if RUNS == "runs" else "-" + RUNS.split("-", 1)[-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, ylabel) in zip(axes, (("mean", "held-out score (accuracy / ROUGE-L)"),
                                        ("answer_loss", "held-out gold-answer loss (nats/token)"))):
        for a, cols in tables[key].items():
            ax.errorbar(range(len(ks)), np.mean(cols, axis=1), yerr=np.std(cols, axis=1), marker="o", capsize=3,
                        label=a.split(" (")[0])
        ax.set_xticks(range(len(ks)), ks)
        ax.set(xlabel="k (demonstrations in the prompt)", ylabel=ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Built-in suite, held-out tasks, {len(SEEDS)} training seeds x 2 demonstration seeds ({STEPS} steps)")
    fig.savefig(f"{ROOT}/assets/shots{tag}.png", dpi=120, bbox_inches="tight")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in zip(("loss", "accuracy"), axes):
        for a, runs in curves.items():
            shots = sorted(int(s) for s in runs[0] if runs[0][s]["n"] >= CURVE_SEQUENCES // 2)
            ax.plot([s + 1 for s in shots], [np.mean([r[str(s)][key] for r in runs]) for s in shots], label=a)
        ax.set(xlabel="shot index in the sequence", xscale="log",
               ylabel="answer loss (nats/token)" if key == "loss" else "whole answer span correct (teacher-forced)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Many-shot curve: {CURVE_SEQUENCES} sequences of fresh held-out-family instances, mean over seeds")
    fig.savefig(f"{ROOT}/assets/many_shot{tag}.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    if "--recall" in sys.argv:
        recall(sys.argv[sys.argv.index("--recall") + 1:])  # the checkpoints to probe
        sys.exit()
    if "--long_answers" in sys.argv:
        long_answers(sys.argv[sys.argv.index("--long_answers") + 1])
        sys.exit()
    if "--curve" in sys.argv:
        i = sys.argv.index("--curve")
        curve(sys.argv[i + 1], (sys.argv[i + 2:] or [sys.argv[i + 1]])[0])  # read a checkpoint, write dest/curve.json
        sys.exit()
    if "--report" not in sys.argv:
        t0 = time.time()
        train_and_eval()
        print(f"all runs: {(time.time() - t0) / 60:.1f} min wall on {JOBS} jobs")
    report()
