"""
The paper's three claims on the built-in suite, with the tiny model on a CPU:

    python config/reproduce.py            # all runs, then the tables; RUNS/ holds everything
    python config/reproduce.py --report   # only the tables and plot, from finished runs
    python config/reproduce.py --steps=1000 --jobs=12  # 3.3x longer, 12 runs at a time (a GPU), in runs-1000/

1. mask-all (ManyICL) vs mask-last on the same sequences, steps and seed, plus zero-shot
   fine-tuning (one example per sequence) and few-shot fine-tuning (MetaICL: 16 demonstrations
   and a query, mask-last); held-out k-shot score over the k sweep.
2. shot scaling: the same table read along k, against the untrained model.
3. forgetting: a tiny LM pre-trained on generic text (mask none), then LoRA-fine-tuned with
   ManyICL or with few-shot fine-tuning; perplexity of held-out generic text by context length.
Every method is trained with several seeds; each evaluation uses several demonstration seeds.
Training data is train.py's default: a fresh built-in task instance (a new hidden rule) for every
sequence. Scores are the held-out accuracy / ROUGE-L and the gold answer's loss.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

option = lambda name, default: int(next((a.split("=")[1] for a in sys.argv if a.startswith(f"--{name}=")), default))
STEPS, JOBS = option("steps", 300), option("jobs", 1)
RUNS = "runs" if STEPS == 300 else f"runs-{STEPS}"
SEEDS = [1, 2, 3]
COMMON = ["--seq_len=512", f"--max_steps={STEPS}", "--lr=3e-3", "--min_lr=3e-4", "--warmup_steps=50",
          "--eval_data=", "--ckpt_interval=100000", "--log_interval=100000"]
METHODS = {  # name: train.py flags (same sampler seed -> the same tasks and shots for mask-all/last)
    "manyicl": ["--loss_mask=all"],
    "mask-last": ["--loss_mask=last"],
    "few-shot": ["--loss_mask=last", "--max_shots=17"],
    "zero-shot": ["--loss_mask=all", "--max_shots=1"],
}
EVAL = ["--ks", "0,1,4,16,64,max", "--seeds", "100,13", "--seq_len", "512"]
PPL_LENGTHS = "64,128,256,512"


def sh(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True, stdout=subprocess.DEVNULL)


def run_jobs(jobs):
    """Each job is a list of commands run in order; JOBS of them at a time."""
    with ThreadPoolExecutor(JOBS) as pool:
        list(pool.map(lambda job: [sh(*cmd) for cmd in job], jobs))


def train_and_eval():
    run_jobs([[("train.py", *COMMON, *flags, f"--seed={seed}", f"--out_dir={RUNS}/{name}-{seed}"),
               ("eval.py", "--ckpt", f"{RUNS}/{name}-{seed}", *EVAL, "--out", f"{RUNS}/{name}-{seed}/eval.json")]
              for seed in SEEDS for name, flags in METHODS.items()])
    # forgetting: pre-train a language model on generic text, then fine-tune it two ways with LoRA
    lm = f"{RUNS}/lm"
    sh("train.py", "--data=data/suite/generic", "--loss_mask=none", "--seq_len=512", f"--max_steps={STEPS}",
       "--lr=3e-3", "--min_lr=3e-4", "--warmup_steps=40", "--eval_data=", f"--out_dir={lm}", "--log_interval=100000")
    run_jobs([[("train.py", *COMMON, *METHODS[name], f"--seed={seed}", f"--init={lm}/ckpt-{STEPS:06d}",
                "--lora_rank=16", "--lr=1e-3", f"--out_dir={RUNS}/forget-{name}-{seed}"),
               ("eval.py", "--ckpt", f"{RUNS}/forget-{name}-{seed}", "--tasks", "data/suite/eval", *EVAL,
                "--ppl_file", "data/suite/generic_test.txt", "--ppl_lengths", PPL_LENGTHS,
                "--out", f"{RUNS}/forget-{name}-{seed}/eval.json")]
              for seed in SEEDS for name in ("manyicl", "few-shot")])


def mean_spread(values):
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def report():
    res = {(m, s): json.load(open(f"{RUNS}/{m}-{s}/eval.json")) for m in METHODS for s in SEEDS}
    ks = list(res[("manyicl", SEEDS[0])]["summary"])
    tables = {}
    for key, title in (("mean", "Held-out k-shot score (accuracy or ROUGE-L"),
                       ("answer_loss", "Held-out gold-answer loss (nats per answer token, lower is better")):
        print(f"\n{title}; macro-average over tasks; mean ± std over training seeds, each the mean "
              "over demonstration seeds)\n")
        print("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---" * (len(ks) + 1) + "|")
        rows = {"untrained": [[res[("manyicl", s)]["summary"][k]["base"][key] for s in SEEDS] for k in ks]}
        rows.update({m: [[res[(m, s)]["summary"][k]["trained"][key] for s in SEEDS] for k in ks] for m in METHODS})
        for m, cols in rows.items():
            print(f"| {m} | " + " | ".join(mean_spread(c) for c in cols) + " |")
        tables[key] = rows
    forget = {(m, s): json.load(open(f"{RUNS}/forget-{m}-{s}/eval.json"))["perplexity"]
              for m in ("manyicl", "few-shot") for s in SEEDS if os.path.exists(f"{RUNS}/forget-{m}-{s}/eval.json")}
    if forget:
        lengths = PPL_LENGTHS.split(",")
        print("\nPerplexity of held-out generic text by context length (mean ± std over seeds)\n")
        print("| model | " + " | ".join(f"{L} tokens" for L in lengths) + " |")
        print("|---" * (len(lengths) + 1) + "|")
        first = next(iter(forget.values()))
        print("| pre-trained LM | " + " | ".join(f"{first[L]['base']['ppl']:.3f}" for L in lengths) + " |")
        for m in ("manyicl", "few-shot"):
            print(f"| + {m} | " + " | ".join(mean_spread([forget[(m, s)][L]["trained"]["ppl"] for s in SEEDS])
                                             for L in lengths) + " |")
    plot(tables, ks)


def plot(tables, ks):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, ylabel) in zip(axes, (("mean", "held-out score (accuracy / ROUGE-L)"),
                                        ("answer_loss", "held-out gold-answer loss (nats/token)"))):
        for m, cols in tables[key].items():
            mean, std = np.mean(cols, axis=1), np.std(cols, axis=1)
            ax.errorbar(range(len(ks)), mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set_xticks(range(len(ks)), ks)
        ax.set(xlabel="k (demonstrations in the prompt)", ylabel=ylabel)
    axes[0].legend()
    fig.suptitle(f"Built-in suite, tiny model, {len(SEEDS)} training seeds x 2 demonstration seeds")
    os.makedirs("assets", exist_ok=True)
    fig.savefig("assets/shots.png" if STEPS == 300 else f"assets/shots-{STEPS}.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "--report" not in sys.argv:
        t0 = time.time()
        train_and_eval()
        print(f"all runs: {(time.time() - t0) / 60:.1f} min wall")
    report()
