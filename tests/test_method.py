"""The method's arithmetic, end to end through train.py, against references computed here by hand.

One optimizer step of train.py (single process, and 2-process gloo DDP) must give: the logged loss
= the sum of cross-entropies over every supervised token of the whole global batch / their count;
the logged grad_norm = the norm of that loss's gradient; weights = one AdamW step on it; the logged
val_loss = the token-weighted loss of the held-out sequences. Micro-batches hold different numbers
of targets, so a mean of micro-batch means, a missing DDP factor or a val_loss left un-reduced all
show. Targets are found here from the packed tokens themselves (⏎ y ⏎ between newline tokens),
not with data.targets_for, for each loss mask.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from checkpoints import load_model, save_model
from data import IGNORE, Tokenizer, TrainSampler, encode_tasks
from suite import train_tokenizer
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat dog ran far away red blue green big small old new fast slow happy sad yes no".split()


def rows(rng, n, answer_words, options=None, tag="", words=WORDS):
    """n examples of random words; inputs start with `tag` where one is given (which task a sequence
    came from is then legible)."""
    out = []
    for _ in range(n):
        x = " ".join(([tag] if tag else []) + list(rng.choice(words, int(rng.integers(1, 4)))))
        if options:
            out.append(dict(input=x, output=str(rng.choice(options)), options=list(options)))
        else:
            out.append(dict(input=x, output=" ".join(rng.choice(words, int(rng.integers(*answer_words)))), options=[]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """MetaICL-named training tasks with underscores in their names and every split (only train's
    must be trained on), a held-out task, a tokenizer and a tiny base model."""
    root = tmp_path_factory.mktemp("method")
    rng = np.random.default_rng(0)
    tasks = {"ag_news": rows(rng, 40, None, ["yes", "no"]),  # one-token answers ...
             "long_answers": rows(rng, 40, (3, 7))}             # ... and 3-6 word answers: uneven targets
    for name, examples in tasks.items():
        for split, part in (("train", examples), ("dev", rows(rng, 5, (8, 9))), ("test", rows(rng, 5, (8, 9)))):
            data.write_jsonl(str(root / "tasks" / f"{name}_16_100_{split}.jsonl"), part)
    held = rows(rng, 30, (1, 3))
    data.write_jsonl(str(root / "eval" / "held" / "train.jsonl"), held)
    data.write_jsonl(str(root / "eval" / "held" / "test.jsonl"), rows(rng, 5, (1, 3)))
    lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
    tok = Tokenizer(train_tokenizer(lines, str(root / "sp"), vocab_size=320))
    args = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=tok.vocab_size, rope_theta=1e4, max_seq_len=256)
    torch.manual_seed(0)
    save_model(Transformer(args).init_weights(11), str(root / "base"))
    return dict(root=root, tasks=tasks, held=held, tok=tok)


# train.py run by a wrapper that records every TrainSampler.sequence(step, index) call of each rank
RECORDING = """
import json, os, runpy, sys
sys.path[0] = os.getcwd()  # the repository, as for train.py itself
import data
made = data.TrainSampler.sequence
def sequence(self, step, index):
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps([self.seed, step, index]) + "\\n")
    return made(self, step, index)
data.TrainSampler.sequence = sequence
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def train(setup, out, nproc=1, record=None, **kw):
    """train.py's log, its process, and with `record` (a folder) the sequences each rank drew:
    {rank: [(sampler seed, step, index), ...]}."""
    root = setup["root"]
    cfg = dict(init=root / "base", tokenizer=setup["tok"].path, data=root / "tasks", eval_data=root / "eval",
               out_dir=out, seq_len=64, batch_size=2, grad_accum=2, max_steps=1, warmup_steps=1, lr=1e-2,
               eval_interval=1, eval_sequences=3, log_interval=1, ckpt_interval=100, seed=5, device="cpu")
    cfg.update(kw)
    script = "train.py"
    if record:
        os.makedirs(record)
        script = os.path.join(record, "record_train.py")
        open(script, "w").write(RECORDING)
    cmd = [sys.executable, script] if nproc == 1 else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    p = subprocess.run(cmd + [f"--{k}={v}" for k, v in cfg.items()], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "RECORD_DIR": str(record or "")})
    assert p.returncode == 0, f"train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    drawn = {r: [tuple(json.loads(l)) for l in open(os.path.join(record, f"rank{r}.jsonl"))] for r in range(nproc)} if record else None
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))], p, drawn


def reference_targets(tokens, mask, newline):
    """targets[t] = tokens[t+1] on the supervised positions, found from the layout alone:
    <s> x1 ⏎ y1 ⏎ ⏎ ⏎ x2 ⏎ y2 ⏎ ... (no newline inside x or y), so newlines come four per
    example, the answer span "⏎ y ⏎" running from the first to the second of them."""
    tokens = list(tokens)
    nl = [t for t, v in enumerate(tokens) if v == newline]
    assert len(nl) % 4 == 2 and tokens[-1] == newline, "unexpected layout"
    spans = [(nl[i], nl[i + 1] + 1) for i in range(0, len(nl), 4)]
    targets = [IGNORE] * len(tokens)
    if mask == "none":
        return tokens[1:] + [IGNORE]
    for start, end in spans if mask == "all" else spans[-1:]:
        for t in range(start, end):
            targets[t - 1] = tokens[t]
    return targets


def ce_sum(model, tokens, targets):
    """Summed cross-entropy of one sequence from full logits, and its number of targets."""
    logp = F.log_softmax(model(torch.tensor(tokens)[None])[0].double(), dim=-1)
    pos = [t for t, y in enumerate(targets) if y != IGNORE]
    return -sum(logp[t, targets[t]] for t in pos), len(pos)


def reference_step(setup, mask, global_batch, seed=5, lr=1e-2, grad_clip=1.0):
    """(loss, grad norm, weights after one AdamW step, per-sequence target counts) of train.py's
    first step: the global batch is sampler.sequence(0, i) for i < global_batch, whatever the world size."""
    tok = setup["tok"]
    encoded, _ = encode_tasks(setup["tasks"], tok, 64)
    sampler = TrainSampler(encoded, tok.bos_id, 64, mask, seed)
    model = load_model(str(setup["root"] / "base"))
    total, count, counts = 0.0, 0, []
    for i in range(global_batch):
        tokens, targets = sampler.sequence(0, i)
        ref = reference_targets(tokens, mask, tok.newline_id)
        assert targets.tolist() == ref  # the sampler's mask is the layout's
        s, n = ce_sum(model, tokens.tolist(), ref)
        total, count = total + s, count + n
        counts.append(n)
    loss = total / count
    loss.backward()
    params = list(model.parameters())
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    for p in params:
        p.grad.mul_(min(1.0, grad_clip / (norm + 1e-6)))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)  # warmup_steps=1: full lr at step 0
    opt.step()
    return loss.item(), norm, {k: v.detach() for k, v in model.state_dict().items()}, counts


def reference_val_loss(setup, ckpt, mask, n, seed=5):
    tok = setup["tok"]
    encoded, _ = encode_tasks({"held": setup["held"]}, tok, 64)
    sampler = TrainSampler(encoded, tok.bos_id, 64, mask, seed + 1)
    model = load_model(ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            tokens, _ = sampler.sequence(0, i)
            s, c = ce_sum(model, tokens.tolist(), reference_targets(tokens, mask, tok.newline_id))
            total, count = total + float(s), count + c
    return total / count


@pytest.mark.parametrize("nproc,mask,batch_size,grad_accum", [
    (1, "all", 2, 2), (1, "last", 2, 2), (1, "none", 2, 2),
    (2, "all", 1, 4),  # DDP: 2 micro-steps per rank, gradients synchronised on the last only
])
def test_step_is_the_token_weighted_mean_over_the_global_batch(setup, tmp_path, nproc, mask, batch_size, grad_accum):
    out = str(tmp_path / "out")
    log, p, drawn = train(setup, out, nproc, str(tmp_path / "drawn"), loss_mask=mask, batch_size=batch_size,
                          grad_accum=grad_accum)
    assert f"world size {nproc}, {grad_accum // nproc} micro-steps x {batch_size} sequences per rank" in p.stdout
    # the global batch is split over ranks: each sequence of it drawn once, by one rank, whatever the
    # world size; the held-out sequences too (train seed 5, validation seed 6)
    for seed, n in ((5, batch_size * grad_accum), (6, 3)):
        mine = {r: sorted(i for s, step, i in d if s == seed and step == 0) for r, d in drawn.items()}
        assert sorted(sum(mine.values(), [])) == list(range(n)), mine
        if seed == 5:
            assert all(len(m) == n // nproc for m in mine.values()), mine
    loss, norm, weights, counts = reference_step(setup, mask, batch_size * grad_accum)
    if mask != "none":  # micro-batches of uneven target counts: a mean of micro-batch means would differ
        per_micro = [sum(counts[m * batch_size:(m + 1) * batch_size]) for m in range(grad_accum)]
        assert len(set(per_micro)) > 1, per_micro
    assert len(log) == 1 and log[0]["step"] == 1
    assert log[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert log[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 1.0  # clipping is exercised (it rescales the whole gradient: Adam's first step does not see it)
    got = load_file(os.path.join(out, "ckpt-000001", "consolidated.safetensors"))
    assert got.keys() == weights.keys()
    worst = max((got[k] - weights[k]).abs().max().item() for k in got)
    print(f"loss {loss:.5f} grad_norm {norm:.4f} worst weight diff {worst:.2e} targets {counts}")
    assert worst < 1e-3, worst  # AdamW's first step moves each weight by ~lr=1e-2 times its gradient's sign
    val = reference_val_loss(setup, os.path.join(out, "ckpt-000001"), mask, 3)
    assert log[0]["val_loss"] == pytest.approx(val, rel=1e-5)
