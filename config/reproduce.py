"""
The paper's claims on the built-in suite, every arm from the same base model:

    python config/reproduce.py                 # CPU route (reduced size, from assets/base-nano; 26 min on 2 cores
                                               # with the earlier subword base, not yet rerun on this one)
    python config/reproduce.py --report        # only the tables and plots, from finished runs
    python config/reproduce.py --gpu           # GPU route: the full size, many runs at a time on one GPU
    python config/reproduce.py --recall CKPT...  # a base model's recall in the task layout, by kind of key

Arms (train.py's default recipe; only the flags below differ). Every arm runs the same steps of
the same number of sequences, and the sampler seed gives mask-all and mask-last the very same
sequences. What is *not* equal: a zero-shot sequence holds one example and a few-shot one 17, so
those arms process far fewer tokens per step than the arms that fill 512 tokens.
  untrained     the base model itself (eval.py's "base" column)
  zero-shot     one example per sequence, loss on its answer
  few-shot      MetaICL: 16 demonstrations and a query, loss on the last answer only
  mask-last     ManyICL's long sequences, loss on the last answer only (the paper's ablation)
  manyicl       ManyICL: as many shots as fit, a loss on every answer
  stratified    manyicl with label-balanced shots (--shots=stratified), training and evaluation
  dedicated     one model per held-out task, trained on that task's own pool (one example per
                sequence), evaluated at k=0: the paper's upper bound
Forgetting is also checked as the paper fine-tunes: zero-shot, few-shot and manyicl again with
LoRA (r16, lr 1e-3). Every multi-task arm is trained with 3 seeds and evaluated with 2 demonstration seeds on the
held-out tasks at k in {0,1,4,16,64,max}; the forgetting check (perplexity of held-out generic
stories by context length) and the many-shot curve (answer loss and accuracy by shot index in
long sequences of fresh held-out instances) come from the same checkpoints.
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
# language model that copies and recalls from its context). GPU route: the size at which in-context
# learning showed on one H100 (3,000 steps of 32 sequences of 512 tokens, lr 1e-3; RESULTS.md at 84ada9a),
# from a `tiny` language model it pre-trains first.
SIZE = ["--seq_len=512", "--batch_size=32", "--grad_accum=1", "--lr=1e-3", "--min_lr=1e-4", "--warmup_steps=100",
        "--workers=2"] if GPU else ["--seq_len=512", "--batch_size=16", "--grad_accum=1", "--lr=1.5e-4", "--min_lr=1.5e-5",
                                    "--warmup_steps=20"]
LM_STEPS = option("lm_steps", 2000)                  # GPU route: language-model pre-training of the base
STEPS = option("steps", 3000 if GPU else 200)        # every fine-tuning arm
JOBS = option("jobs", 14 if GPU else 2)
RUNS = option("runs", "runs-gpu" if GPU else "runs")
SEEDS = [1, 2, 3]
COMMON = [*SIZE, "--eval_data=", "--log_interval=100000"]
ARMS = {  # name: train.py flags; the same sampler seed gives mask-all and mask-last the very same sequences
    "zero-shot": ["--loss_mask=all", "--max_shots=1"],
    "few-shot": ["--loss_mask=last", "--max_shots=17"],
    "mask-last": ["--loss_mask=last"],
    "manyicl": ["--loss_mask=all"],
    "stratified": ["--loss_mask=all", "--shots=stratified"],
}
LORA = {name: ARMS[name] + ["--lora_rank=16", "--lr=1e-3", "--min_lr=1e-4"]  # forgetting as the paper fine-tunes:
        for name in ("zero-shot", "few-shot", "manyicl")}                      # LoRA at a small learning rate
TASKS = "data/suite/eval"
KS = "0,1,4,16,64,max"
PPL = ["--ppl_file", "data/suite/generic_test.txt", "--ppl_lengths", "32,128,512"]
EVAL = ["--ks", KS, "--seeds", "100,13", "--max_test", "32", "--no_base", *PPL]
LM = f"{RUNS}/lm"
CURVE_SEQUENCES = 32


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


def train_and_eval():
    # the base: a language model pre-trained on generic stories, songs and plays (every token a target)
    if GPU:
        base = f"{LM}/ckpt-{LM_STEPS:06d}"
        pretrain = [("train.py", *COMMON, "--init=scratch", "--preset=tiny", "--data=generic", "--loss_mask=none",
                     f"--max_steps={LM_STEPS}", f"--ckpt_interval={LM_STEPS}", f"--out_dir={LM}")]
    else:
        base, pretrain = "assets/base-nano", []
    run_jobs([(f"{LM}/eval.json", [*pretrain, ("eval.py", "--ckpt", base, "--tasks", TASKS, *EVAL, "--out", f"{LM}/eval.json"),
                                   ("config/reproduce.py", "--curve", base, LM)])])
    jobs = []
    for seed in SEEDS:
        for name, flags in ARMS.items():
            out = f"{RUNS}/{name}-{seed}"
            shots = ["--shots", "stratified"] if name == "stratified" else []
            jobs.append((f"{out}/curve.json", [
                ("train.py", *COMMON, *flags, f"--init={base}", f"--max_steps={STEPS}", f"--ckpt_interval={STEPS}",
                 f"--seed={seed}", f"--out_dir={out}"),
                ("eval.py", "--ckpt", out, "--tasks", TASKS, *EVAL, *shots, "--out", f"{out}/eval.json"),
                ("config/reproduce.py", "--curve", out)]))
        for task in dedicated_tasks():  # the upper bound: one model per task, on the task's own pool
            out = f"{RUNS}/dedicated-{task}-{seed}"
            jobs.append((f"{out}/eval.json", [
                ("train.py", *COMMON, f"--data={TASKS}/{task}", "--loss_mask=all", "--max_shots=1", f"--init={base}",
                 f"--max_steps={STEPS}", f"--ckpt_interval={STEPS}", f"--seed={seed}", f"--out_dir={out}"),
                ("eval.py", "--ckpt", out, "--tasks", f"{TASKS}/{task}", "--ks", "0", "--seeds", "100", "--max_test", "32",
                 "--no_base", "--out", f"{out}/eval.json")]))
        for name, flags in LORA.items():
            out = f"{RUNS}/lora-{name}-{seed}"
            jobs.append((f"{out}/eval.json", [
                ("train.py", *COMMON, *flags, f"--init={base}", f"--max_steps={STEPS}", f"--ckpt_interval={STEPS}",
                 f"--seed={seed}", f"--out_dir={out}"),
                ("eval.py", "--ckpt", out, "--tasks", TASKS, "--ks", "0,16", "--seeds", "100,13", "--max_test", "32",
                 "--no_base", *PPL, "--out", f"{out}/eval.json")]))
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


def mean_spread(values):
    v = np.array([x for x in values if x is not None], dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"


def table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def report():
    load = lambda run: json.load(open(f"{run}/eval.json"))
    lm = load(LM)
    res = {(a, s): load(f"{RUNS}/{a}-{s}") for a in ARMS for s in SEEDS if os.path.exists(f"{RUNS}/{a}-{s}/eval.json")}
    arms = [a for a in ARMS if all((a, s) in res for s in SEEDS)]
    ks = [k for k in KS.split(",") if lm["summary"][k]["trained"]["n_tasks"]]  # k=64 fits only some prompts of 512 tokens
    head = ["method"] + [f"k={k}" for k in ks]
    tables = {}
    for key, title in (("mean", "Held-out k-shot score (accuracy with options ranked by summed span loss, or ROUGE-L)"),
                       ("mean_mean", "The same score, options ranked by mean per-token span loss (MetaICL)"),
                       ("answer_loss", "Held-out gold-answer loss (nats per answer token, lower is better)")):
        rows = {"untrained (the pre-trained LM)": [[lm["summary"][k]["trained"][key]] for k in ks]}
        rows.update({a: [[res[(a, s)]["summary"][k]["trained"][key] for s in SEEDS] for k in ks] for a in arms})
        tables[key] = rows
        table(f"{title}; macro-average over the 8 held-out tasks; mean ± std over {len(SEEDS)} training seeds, "
              "each the mean over 2 demonstration seeds", head, {a: [mean_spread(c) for c in cols] for a, cols in rows.items()})
    tasks = dedicated_tasks()
    per_task = {"untrained": [mean_spread([lm["tasks"][t]["k"]["max"]["trained"]["mean"]]) for t in tasks]}
    per_task.update({a: [mean_spread([res[(a, s)]["tasks"][t]["k"]["max"]["trained"]["mean"] for s in SEEDS])
                         for t in tasks] for a in arms})
    per_task["dedicated (k=0)"] = [mean_spread([load(f"{RUNS}/dedicated-{t}-{s}")["summary"]["0"]["trained"]["mean"]
                                                for s in SEEDS if os.path.exists(f"{RUNS}/dedicated-{t}-{s}/eval.json")])
                                   for t in tasks]
    table("Per held-out task at k=max; dedicated fine-tuning is one model per task, evaluated at k=0",
          ["method"] + tasks, per_task)
    lengths = PPL[-1].split(",")
    ppl = {"pre-trained LM": [mean_spread([lm["perplexity"][L]["trained"]["ppl"]]) for L in lengths]}
    ppl.update({f"+ {a}": [mean_spread([res[(a, s)]["perplexity"][L]["trained"]["ppl"] for s in SEEDS]) for L in lengths]
                for a in arms})
    table("Perplexity of held-out generic stories by context length (forgetting)",
          ["model"] + [f"{L} tokens" for L in lengths], ppl)
    lora = {a: [load(f"{RUNS}/lora-{a}-{s}") for s in SEEDS] for a in LORA
            if all(os.path.exists(f"{RUNS}/lora-{a}-{s}/eval.json") for s in SEEDS)}
    if lora:
        rows = {"pre-trained LM": [mean_spread([lm["perplexity"][L]["trained"]["ppl"]]) for L in lengths] +
                                  [mean_spread([lm["summary"][k]["trained"]["answer_loss"]]) for k in ("0", "16")]}
        rows.update({f"+ {a} (LoRA r16, lr 1e-3)": [mean_spread([r["perplexity"][L]["trained"]["ppl"] for r in runs])
                                                    for L in lengths] +
                     [mean_spread([r["summary"][k]["trained"]["answer_loss"] for r in runs]) for k in ("0", "16")]
                     for a, runs in lora.items()})
        table("Forgetting with LoRA, as the paper fine-tunes: perplexity by context length, and held-out answer loss",
              ["model"] + [f"{L} tokens" for L in lengths] + ["answer loss k=0", "answer loss k=16"], rows)
    curves = {"untrained": [json.load(open(f"{LM}/curve.json"))]}
    curves.update({a: [json.load(open(f"{RUNS}/{a}-{s}/curve.json")) for s in SEEDS] for a in arms})
    plot(tables, ks, curves)


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
    if "--curve" in sys.argv:
        i = sys.argv.index("--curve")
        curve(sys.argv[i + 1], (sys.argv[i + 2:] or [sys.argv[i + 1]])[0])  # read a checkpoint, write dest/curve.json
        sys.exit()
    if "--report" not in sys.argv:
        t0 = time.time()
        train_and_eval()
        print(f"all runs: {(time.time() - t0) / 60:.1f} min wall on {JOBS} jobs")
    report()
