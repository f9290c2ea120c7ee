"""
Build the small base model, assets/base-nano, from nothing: its tokenizer, then language-model
pre-training on generic text (rosters, plays, songs, stories: train.py --data=generic), then a
recall probe at every saved step, then a copy of the last checkpoint into assets/.

    python config/base_nano.py          # ~1 hour on 2 CPU cores; rerun the same command to resume

The tokenizer has one token per character (suite.char_tokenizer): rules about spelling are then
visible to a small model. The model is train.py's `nano` preset (2 layers, dim 128), the size at
which the default fine-tuning run fits in minutes on a laptop.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "base-nano")
STEPS = 8000
PRETRAIN = ["--init=scratch", "--preset=nano", "--data=generic", "--loss_mask=none", "--eval_data=",
            "--seq_len=512", "--batch_size=16", f"--max_steps={STEPS}", "--lr=2e-3", "--min_lr=2e-4",
            "--warmup_steps=200", "--seed=1", "--ckpt_interval=1000", "--keep_last=100", "--log_interval=100"]
KEEP = ["consolidated.safetensors", "params.json", "config.json", "tokenizer.model", "DONE"]  # not the optimizer state

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from suite import char_tokenizer
    os.makedirs(OUT, exist_ok=True)
    tokenizer = os.path.join(OUT, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        char_tokenizer(os.path.join(OUT, "tokenizer"))
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    run("train.py", *PRETRAIN, f"--tokenizer={tokenizer}", f"--out_dir={OUT}")
    ckpts = sorted(d for d in os.listdir(OUT) if d.startswith("ckpt-"))
    run("config/reproduce.py", "--recall", *(os.path.join(OUT, c) for c in ckpts))  # recall by kind against steps
    dest = os.path.join(ROOT, "assets", "base-nano")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in KEEP:
        shutil.copy(os.path.join(OUT, ckpts[-1], name), dest)
    print(f"{dest}: written from {ckpts[-1]}")
