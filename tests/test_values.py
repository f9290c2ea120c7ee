"""Values against rules written here, not one run of the code against another run of it.

Each test computes what a setting must give from its documented rule (the learning-rate formula,
AdamW with clipping and decoupled weight decay by hand, the token layout of a packed sequence,
size**(1/T) task sampling, hand-counted metrics) and compares train.py's, data.py's, eval.py's and
sample.py's values with it. train.py runs in this process (train.main) with spies that record the
sequences each sampler made and, around every optimizer step, the weights, the gradients the
optimizer was handed and the weights it left: so a step is replayed by hand from what it saw.
"""
import json
import math
import os
import shutil
import signal
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import data
import eval as ev
import sample
import suite
import train
from checkpoints import load_model, load_models, save_model
from data import IGNORE, Encoded, Tokenizer, encode_example, pack, targets_for
from lora import apply_lora
from model import PRESETS, ModelArgs, Transformer

WORDS = ("the cat sat on a mat dog ran far away red blue green big small old new fast slow happy sad yes no maybe "
         "what is it").split()


def rows(rng, n, tag, options=None, answer_words=(1, 3)):
    """n examples whose inputs start with `tag` (which task a sequence came from is then legible)."""
    out = []
    for _ in range(n):
        x = f"{tag} " + " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        if options:
            out.append(dict(input=x, output=str(rng.choice(options)), options=list(options)))
        else:
            out.append(dict(input=x, output=" ".join(rng.choice(WORDS, int(rng.integers(*answer_words)))), options=[]))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a tiny base model, training tasks (one-token labels beside answers of up to 6
    words: uneven target counts) and a held-out task, as plain {task}.jsonl files."""
    root = tmp_path_factory.mktemp("values")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {rng.integers(1000)}" for _ in range(400)]
    tok = Tokenizer(suite.train_tokenizer(lines, str(root / "sp"), vocab_size=300))
    args = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=tok.vocab_size, rope_theta=1e4, max_seq_len=512)
    save_model(Transformer(args).init_weights(7), str(root / "base"))
    tasks = {"labels": rows(rng, 40, "lab", ["yes", "no"]), "long": rows(rng, 40, "lng", answer_words=(3, 7))}
    for name, examples in tasks.items():
        data.write_jsonl(str(root / "tasks" / f"{name}.jsonl"), examples)
    data.write_jsonl(str(root / "held" / "held.jsonl"), rows(rng, 20, "hld"))
    return dict(root=root, tok=tok, args=args, base=str(root / "base"), tasks=tasks)


# ----------------------------------------------------------------------------- the learning rate, by hand

def lr_rule(i, lr, min_lr, warmup, decay_end):
    """Step i (0-based): linear warm-up to lr over `warmup` steps, cosine from lr to min_lr ending at
    decay_end, then min_lr."""
    if i < warmup:
        return lr * (i + 1) / warmup
    if i >= decay_end:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (decay_end - warmup)))


def lr_cfg(**kw):
    return train.TrainConfig(**{"lr": 1.0, "min_lr": 0.1, "warmup_steps": 2, "max_steps": 10, "lr_decay_steps": 6, **kw})


def test_lr_at_hand_values():
    """Numbers worked out on paper: warm-up 2, cosine to min_lr 0.1 at step 6 of 10, then flat."""
    cos45 = math.cos(math.pi / 4)
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + cos45), 0.55, 0.1 + 0.45 * (1 - cos45), 0.1, 0.1, 0.1, 0.1]
    assert [train.lr_at(i, lr_cfg()) for i in range(10)] == pytest.approx(want, abs=1e-12)
    # lr_decay_steps=0: the cosine runs to max_steps; no warm-up: the first step at the full lr
    cfg = lr_cfg(warmup_steps=0, lr_decay_steps=0, max_steps=4)
    assert [train.lr_at(i, cfg) for i in range(5)] == pytest.approx([1.0, 0.1 + 0.45 * (1 + cos45), 0.55,
                                                                     0.1 + 0.45 * (1 - cos45), 0.1], abs=1e-12)


@pytest.mark.parametrize("lr,min_lr,warmup,max_steps,decay", [
    (3e-4, 3e-5, 5, 40, 0), (1e-2, 0.0, 1, 12, 7), (2.0, 0.5, 10, 30, 18), (1e-4, 1e-5, 0, 9, 0), (1.0, 0.2, 3, 20, 3)])
def test_lr_at_every_step_against_the_rule(lr, min_lr, warmup, max_steps, decay):
    cfg = lr_cfg(lr=lr, min_lr=min_lr, warmup_steps=warmup, max_steps=max_steps, lr_decay_steps=decay)
    end = decay or max_steps
    for i in range(max_steps + 5):
        assert train.lr_at(i, cfg) == pytest.approx(lr_rule(i, lr, min_lr, warmup, end), rel=1e-12, abs=1e-15), i
    if warmup:  # the warm-up's last step reaches lr exactly, and the cosine starts there
        assert train.lr_at(warmup - 1, cfg) == pytest.approx(lr) and train.lr_at(0, cfg) == pytest.approx(lr / warmup)
    if end > warmup + 1:
        assert train.lr_at(warmup, cfg) == pytest.approx(lr)
    assert train.lr_at(end, cfg) == pytest.approx(min_lr) and train.lr_at(max_steps + 100, cfg) == pytest.approx(min_lr)


# ----------------------------------------------------------------------------- train.py in this process, with spies

@dataclass
class Drawn:
    sampler: object
    step: int
    index: int
    tokens: np.ndarray
    targets: np.ndarray


class Spy:
    """Records, while train.main runs here: every sequence a sampler makes (train, validation,
    suite, generic), the model train.py loads, and around each optimizer step the trainable
    weights, their gradients, the param groups' lr / weight_decay, and the weights after."""

    def __init__(self, monkeypatch, capsys):
        self.capsys, self.drawn, self.steps, self.models, self.families = capsys, [], [], [], []
        for cls in (data.TrainSampler, suite.SuiteSampler, suite.GenericSampler):
            def sequence(sampler, step, index, made=cls.sequence):
                made_ = made(sampler, step, index)
                if isinstance(made_, tuple):  # not a stand-in's (draw_tasks)
                    self.drawn.append(Drawn(sampler, step, index, *made_))
                return made_
            monkeypatch.setattr(cls, "sequence", sequence)
        def load(*a, made=train.load_model, **kw):
            model = made(*a, **kw)
            self.models.append(model)
            return model
        monkeypatch.setattr(train, "load_model", load)
        def instance(family, rng, made=suite.suite_instance):
            self.families.append(family)
            return made(family, rng)
        monkeypatch.setattr(suite, "suite_instance", instance)
        monkeypatch.setattr(train, "ensure_suite", lambda *a: None)  # the suite's files are not needed here
        self.hooks = [register_optimizer_step_pre_hook(self.before), register_optimizer_step_post_hook(self.after)]

    def named(self, opt):
        names = {id(p): n for n, p in self.models[-1].named_parameters()} if self.models else {}
        return [(names.get(id(p), f"group{g}.{i}"), g, p) for g, group in enumerate(opt.param_groups)
                for i, p in enumerate(group["params"])]

    def before(self, opt, args, kwargs):
        params = self.named(opt)
        self.steps.append(dict(
            groups=[dict(lr=g["lr"], weight_decay=g["weight_decay"], betas=g["betas"], eps=g["eps"]) for g in opt.param_groups],
            group_of={n: g for n, g, _ in params},
            weights={n: p.detach().clone() for n, _, p in params},
            grads={n: p.grad.detach().clone() for n, _, p in params if p.grad is not None}))

    def after(self, opt, args, kwargs):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, _, p in self.named(opt)}

    def run(self, out, env, **kw):
        """train.main with tiny defaults and `kw`; returns the log's entries (and clears the records)."""
        self.drawn.clear(), self.steps.clear(), self.models.clear(), self.families.clear()
        cfg = dict(init=env["base"], tokenizer=env["tok"].path, data=env["root"] / "tasks", eval_data="", out_dir=out,
                   seq_len=64, batch_size=1, grad_accum=1, max_steps=1, warmup_steps=1, lr=1e-2, min_lr=1e-3,
                   log_interval=1, ckpt_interval=1000, eval_interval=1000, eval_sequences=2, seed=3, device="cpu")
        cfg.update(kw)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            train.main([f"--{k}={v}" for k, v in cfg.items()])
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        self.stdout = self.capsys.readouterr().out
        return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]

    def sequences(self, kind=data.TrainSampler, seed=None, step=None):
        return [d for d in self.drawn if isinstance(d.sampler, kind) and (seed is None or d.sampler.seed == seed)
                and (step is None or d.step == step)]


@pytest.fixture
def spy(monkeypatch, capsys):
    s = Spy(monkeypatch, capsys)
    yield s
    for h in s.hooks:
        h.remove()


def layout_targets(tokens, mask, newline):
    """targets[t] = tokens[t+1] where supervised, found from the layout alone: <s> x ⏎ y ⏎ ⏎ ⏎ x ⏎ y ⏎ ...
    (no newline inside x or y): four newlines per example, the answer span "⏎ y ⏎" from the first to
    the second of them, inclusive."""
    tokens = [int(t) for t in tokens]
    if mask == "none":
        return tokens[1:] + [IGNORE]
    nl = [t for t, v in enumerate(tokens) if v == newline]
    assert len(nl) % 4 == 2 and tokens[-1] == newline, "unexpected layout"
    spans = [(nl[i], nl[i + 1] + 1) for i in range(0, len(nl), 4)]
    targets = [IGNORE] * len(tokens)
    for start, end in spans if mask == "all" else spans[-1:]:
        for t in range(start, end):
            targets[t - 1] = tokens[t]
    return targets


def n_shots(tokens, newline):
    return (sum(int(t) == newline for t in tokens) + 2) // 4


def answers_of(tok, tokens):
    """The answers of a packed sequence, in order."""
    return tok.decode([int(t) for t in tokens]).split("\n")[1::4]


# ----------------------------------------------------------------------------- one optimizer step replayed by hand

def hand_loss(model, weights, sequences, mask, newline):
    """Sum of cross-entropies over every supervised token of all the sequences, over their count
    (from full logits in float64), and the count of each sequence. `weights` replace the plain
    model's own (torch.func.functional_call), so they may be tensors computed from others."""
    total, counts = 0.0, []
    for d in sequences:
        targets = layout_targets(d.tokens, mask, newline)
        assert d.targets.tolist() == targets  # what the sampler made is the layout's mask
        logits = torch.func.functional_call(model, weights, (torch.as_tensor(d.tokens)[None],))
        logp = F.log_softmax(logits[0].double(), dim=-1)
        pos = [t for t, y in enumerate(targets) if y != IGNORE]
        total = total - logp[pos, [targets[t] for t in pos]].sum()
        counts.append(len(pos))
    return total / sum(counts), counts


def lora_weights(base, leaves, scale):
    """The plain model's weights with each adapted W replaced by W + scale * B A (by hand)."""
    out = dict(base)
    for name in leaves:
        if name.endswith(".lora_A.weight"):
            stem = name[: -len(".lora_A.weight")]
            out[stem + ".weight"] = base[stem + ".weight"] + scale * leaves[stem + ".lora_B.weight"] @ leaves[name]
    return out


def adamw_by_hand(step, t, state, lr, wd, betas=(0.9, 0.95), eps=1e-8):
    """Weights after AdamW step t (1-based) from the weights and gradients the optimizer was handed,
    in float64: decoupled decay on matrices only (never norms), bias-corrected moments."""
    out = {}
    for name, w in step["weights"].items():
        w = w.double()
        if name not in step["grads"]:
            out[name] = w
            continue
        g = step["grads"][name].double()
        if w.dim() >= 2:
            w = w * (1 - lr * wd)
        m, v = state.get(name, (torch.zeros_like(w), torch.zeros_like(w)))
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        state[name] = (m, v)
        out[name] = w - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


REPLAYS = {
    # every weight trained, mask all, 2 x 2 sequences per step, clipping and weight decay on
    "full": dict(loss_mask="all", batch_size=2, grad_accum=2, grad_clip=0.3, weight_decay=0.5, lr=0.05, min_lr=0.01,
                 warmup_steps=2, max_steps=3, lr_decay_steps=3),
    # mask last: one sequence per micro-step, very different target counts; no clipping, no decay
    "last": dict(loss_mask="last", batch_size=1, grad_accum=3, grad_clip=0.0, weight_decay=0.0, lr=0.02, min_lr=0.02,
                 warmup_steps=1, max_steps=2),
    # mask none (language modelling on the packed text): every next token a target
    "none": dict(loss_mask="none", batch_size=2, grad_accum=1, grad_clip=0.0, weight_decay=0.0, lr=0.02, min_lr=0.02,
                 warmup_steps=1, max_steps=1),
    # LoRA on wv and w1 only, alpha/rank = 3: the adapter's gradient carries the scale
    "lora": dict(loss_mask="all", batch_size=1, grad_accum=2, grad_clip=0.0, weight_decay=0.1, lr=0.05, min_lr=0.05,
                 warmup_steps=1, max_steps=2, lora_rank=2, lora_alpha=6.0, lora_targets="wv,w1"),
}


@pytest.mark.parametrize("setting", list(REPLAYS))
def test_every_step_replayed_by_hand(env, spy, tmp_path, setting):
    """Each step of a real run against a hand reference: the logged loss is the token-weighted mean
    over the global batch; the logged grad_norm that loss's gradient norm (before clipping); the
    gradients AdamW is handed are those gradients scaled by min(1, clip / norm) when grad_clip > 0;
    every param group's lr is the schedule's; the weights after are AdamW's, by hand, with weight
    decay on matrices only. For LoRA: only the adapter of the chosen targets is trained, the base
    stays as loaded, and the gradients are those of W x + (alpha / rank) B A x."""
    cfg = REPLAYS[setting]
    tok = env["tok"]
    log = spy.run(str(tmp_path / "out"), env, **cfg)
    assert [e["step"] for e in log] == list(range(1, cfg["max_steps"] + 1)) and len(spy.steps) == cfg["max_steps"]
    reference = load_model(env["base"])  # a plain Transformer: LoRA is written out by hand below
    base = {k: v.detach() for k, v in reference.state_dict().items()}
    if cfg.get("lora_rank"):
        trainable = {f"layers.{i}.{block}.{t}.lora_{ab}.weight" for i in range(env["args"].n_layers)
                     for block, t in (("attention", "wv"), ("feed_forward", "w1")) for ab in "AB"}
        model = spy.models[-1]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # the base never moved
    else:
        trainable = set(base)
    state, per_micro = {}, []
    for t, step in enumerate(spy.steps, 1):
        assert set(step["weights"]) == trainable  # what the optimizer holds: every weight, or the adapter alone
        want_lr = lr_rule(t - 1, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg.get("lr_decay_steps") or cfg["max_steps"])
        assert log[t - 1]["lr"] == pytest.approx(want_lr, rel=1e-12)
        assert [g["lr"] for g in step["groups"]] == pytest.approx([want_lr] * len(step["groups"]), rel=1e-12)
        decayed = {n for n, g in step["group_of"].items() if step["groups"][g]["weight_decay"] == cfg["weight_decay"]}
        if cfg["weight_decay"]:
            assert decayed == {n for n, w in step["weights"].items() if w.dim() >= 2}  # never the norms
        # the loss and its gradient, by hand, at the weights this step started from
        leaves = {n: w.clone().requires_grad_(True) for n, w in step["weights"].items()}
        weights = lora_weights(base, leaves, cfg["lora_alpha"] / cfg["lora_rank"]) if cfg.get("lora_rank") else leaves
        batch = spy.sequences(seed=cfg.get("seed", 3), step=t - 1)
        assert sorted(d.index for d in batch) == list(range(cfg["batch_size"] * cfg["grad_accum"]))
        batch.sort(key=lambda d: d.index)
        loss, counts = hand_loss(reference, weights, batch, cfg["loss_mask"], tok.newline_id)
        per_micro += [sum(counts[m * cfg["batch_size"]:(m + 1) * cfg["batch_size"]]) for m in range(cfg["grad_accum"])]
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        assert log[t - 1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert log[t - 1]["grad_norm"] == pytest.approx(norm, rel=1e-4)
        scale = min(1.0, cfg["grad_clip"] / (norm + 1e-6)) if cfg["grad_clip"] > 0 else 1.0
        if cfg["grad_clip"] > 0:
            assert scale < 0.9, norm  # clipping is really exercised
        got = torch.cat([step["grads"][n].flatten() for n in sorted(grads)])
        want = torch.cat([grads[n].flatten() * scale for n in sorted(grads)])
        assert rel_err(got, want) < 1e-4, (t, rel_err(got, want))
        # AdamW by hand on the gradients it was handed
        after = adamw_by_hand(step, t, state, want_lr, cfg["weight_decay"])
        worst = max((step["after"][n].double() - after[n]).abs().max().item() for n in after)
        assert worst < 2e-6, (t, worst)
    if cfg["loss_mask"] != "none":
        assert len(set(per_micro)) > 1, per_micro  # micro-batches of uneven target counts: a mean of means would differ


# ----------------------------------------------------------------------------- what each setting does to a run

def checkpoints_in(out):
    return sorted(int(d[len("ckpt-"):]) for d in os.listdir(out) if d.startswith("ckpt-"))


def printed_steps(stdout):
    return [int(line.split(" | ")[0].split()[1]) for line in stdout.splitlines() if line.startswith("step ")]


def test_schedule_intervals_and_batch_of_a_run(env, spy, tmp_path):
    """7 steps, warm-up 2, cosine to min_lr at step 5 then flat: the logged lr of every step and the
    lr AdamW held in each checkpoint; validation at every 3rd step and the last; a printed line every
    2nd step, the last and those with a validation loss; checkpoints every 3rd step and the last;
    6 sequences (batch 2 x 3 micro-steps) a step, their tokens and targets counted in the log."""
    out = str(tmp_path / "out")
    cfg = dict(max_steps=7, warmup_steps=2, lr_decay_steps=5, lr=0.01, min_lr=0.002, eval_interval=3, log_interval=2,
               ckpt_interval=3, keep_last=10, batch_size=2, grad_accum=3, eval_data=env["root"] / "held", eval_sequences=3)
    log = spy.run(out, env, **cfg)
    want = [lr_rule(i, 0.01, 0.002, 2, 5) for i in range(7)]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6, 7]
    assert [e["lr"] for e in log] == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx([0.005, 0.01, 0.01, 0.008, 0.004, 0.002, 0.002])  # on paper: cos(pi/3) = 1/2
    assert [s for s, e in enumerate(log, 1) if "val_loss" in e] == [3, 6, 7]
    assert sorted(set(printed_steps(spy.stdout))) == [2, 3, 4, 6, 7]
    assert checkpoints_in(out) == [3, 6, 7]
    for s in (3, 6, 7):
        state = torch.load(os.path.join(out, f"ckpt-{s:06d}", "state.pt"), weights_only=True)
        assert state["step"] == s and json.load(open(os.path.join(out, f"ckpt-{s:06d}", "config.json")))["step"] == s
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([want[s - 1]] * 2, rel=1e-12)
    for s, e in enumerate(log, 1):
        batch = spy.sequences(seed=3, step=s - 1)
        assert sorted(d.index for d in batch) == list(range(6))
        tokens, targets = sum(len(d.tokens) for d in batch), sum(int((d.targets != IGNORE).sum()) for d in batch)
        assert e["tokens_per_s"] * e["ms"] / 1000 == pytest.approx(tokens, rel=1e-6)
        assert e["target_tokens_per_s"] * e["ms"] / 1000 == pytest.approx(targets, rel=1e-6)
    val = spy.sequences(seed=4)  # the validation sequences: seed + 1, the same fixed ones at each evaluation
    assert [(d.step, d.index) for d in val] == [(0, i) for i in range(3)] * 3


@pytest.mark.parametrize("max_steps,interval,keep,want", [(5, 2, 2, [4, 5]), (6, 2, 1, [6]), (5, 10, 3, [5]),
                                                         (4, 1, 3, [2, 3, 4])])
def test_checkpoints_kept(env, spy, tmp_path, max_steps, interval, keep, want):
    out = str(tmp_path / "out")
    spy.run(out, env, max_steps=max_steps, ckpt_interval=interval, keep_last=keep, seq_len=32)
    assert checkpoints_in(out) == want


def test_max_shots_seq_len_and_skipped_examples(env, spy, tmp_path):
    """max_shots: every training and validation sequence holds exactly that many examples (more would
    fit). Without it, a sequence is as long as seq_len allows: the next example would not fit.
    An example longer than seq_len on its own is skipped and counted."""
    huge = [dict(input="big " * 80, output="no", options=[]), dict(input="huge a", output="yes", options=[]),
            dict(input="huge b", output="no", options=[])]
    data.write_jsonl(str(tmp_path / "huge" / "huge.jsonl"), huge)
    tok = env["tok"]
    files = f"{env['root'] / 'tasks'},{tmp_path / 'huge'}"
    spy.run(str(tmp_path / "a"), env, data=files, max_shots=2, batch_size=4, seq_len=96, eval_data=env["root"] / "held",
            eval_interval=1, eval_sequences=3)
    assert "3 training tasks, 82 examples (1 skipped: longer than seq_len=96)" in spy.stdout
    for seed in (3, 4):  # training and validation
        drawn = spy.sequences(seed=seed)
        assert drawn and all(n_shots(d.tokens, tok.newline_id) == 2 for d in drawn), seed
    spy.run(str(tmp_path / "b"), env, data=files, batch_size=4, seq_len=96)
    costs = [len(e.input) + len(e.answer) for exs in data.encode_tasks(
        {t: ex for t, ex in env["tasks"].items()}, tok, 96)[0].values() for e in exs]
    drawn = spy.sequences(seed=3)
    for d in drawn:
        assert len(d.tokens) == len(d.targets) <= 96
        if tok.decode(d.tokens.tolist()).startswith("huge"):  # the task's whole pool: both examples, once each
            assert sorted(answers_of(tok, d.tokens)) == ["no", "yes"]
        else:
            assert 96 - max(costs) < len(d.tokens) and n_shots(d.tokens, tok.newline_id) > 2
    assert any(not tok.decode(d.tokens.tolist()).startswith("huge") for d in drawn)


def test_seed_sets_the_data(env, spy, tmp_path):
    """The seed decides which sequences are drawn: training from seed, validation from seed + 1."""
    got = {}
    for seed in (3, 8):
        spy.run(str(tmp_path / f"s{seed}"), env, seed=seed, batch_size=3, eval_data=env["root"] / "held", eval_interval=1)
        assert {d.sampler.seed for d in spy.sequences()} == {seed, seed + 1}
        got[seed] = [d.tokens.tolist() for d in spy.sequences(seed=seed)]
        assert len(got[seed]) == 3
    assert all(a != b for a, b in zip(got[3], got[8]))


def test_scratch_model_is_the_seeds_init_of_the_preset(env, spy, tmp_path):
    """init=scratch: the preset's shape, weights init_weights(seed), what eval rebuilds as the base
    (lr 0 keeps them); the checkpoint carries the tokenizer it was given."""
    out = str(tmp_path / "out")
    spy.run(out, env, init="scratch", preset="nano", lr=0.0, min_lr=0.0, seed=5, seq_len=32)
    got = load_file(os.path.join(out, "ckpt-000001", "consolidated.safetensors"))
    want = Transformer(ModelArgs(**{**PRESETS["nano"], "vocab_size": env["tok"].vocab_size})).init_weights(5).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    other = Transformer(ModelArgs(**{**PRESETS["nano"], "vocab_size": env["tok"].vocab_size})).init_weights(6).state_dict()
    assert not torch.equal(got["output.weight"], other["output.weight"])
    assert open(os.path.join(out, "ckpt-000001", "tokenizer.model"), "rb").read() == open(env["tok"].path, "rb").read()



def test_scratch_init_scales():
    """init_weights: norms at 1, every other weight N(0, 0.02), the residual projections (wo, w2)
    N(0, 0.02 / sqrt(2 * n_layers))."""
    args = ModelArgs(**{**PRESETS["nano"], "vocab_size": 512})
    model = Transformer(args).init_weights(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
        else:
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.05) and abs(p.mean().item()) < 0.1 * std, name

def test_lora_settings_reach_the_adapter(env, spy, tmp_path):
    """rank, alpha, dropout and targets as given: the adapter's keys and shapes, its metadata, the
    modules' dropout, AdamW's state (the adapter alone), and A as drawn from the seed (B = 0 at the
    start, so A's first gradient is zero and it is still its init after one step). eval.py and
    sample.py load it as the base plus (alpha / rank) B A on the targets alone."""
    out = str(tmp_path / "out")
    spy.run(out, env, lora_rank=3, lora_alpha=9.0, lora_dropout=0.25, lora_targets="w1,wv", seed=9)
    a = env["args"]
    path = os.path.join(out, "ckpt-000001", "lora.safetensors")
    adapter = load_file(path)
    shapes = {"attention.wv": (a.n_kv_heads * a.head_dim, a.dim), "feed_forward.w1": (a.hidden_dim, a.dim)}
    want = {f"layers.{i}.{m}.lora_{ab}.weight": ((3, inp) if ab == "A" else (out_, 3))
            for i in range(a.n_layers) for m, (out_, inp) in shapes.items() for ab in "AB"}
    assert {k: tuple(v.shape) for k, v in adapter.items()} == want
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"rank": "3", "alpha": "9.0", "dropout": "0.25", "targets": "wv,w1"}
    model = spy.models[-1]
    assert {m.dropout.p for m in model.modules() if hasattr(m, "lora_A")} == {0.25}
    state = torch.load(os.path.join(out, "ckpt-000001", "state.pt"), weights_only=True)["optimizer"]["state"]
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == sorted(want.values())
    torch.manual_seed(9)
    fresh = apply_lora(load_model(env["base"]), 3, 9.0, 0.25, ("wv", "w1"))
    init = {k: v for k, v in fresh.state_dict().items() if ".lora_A." in k}
    assert all(torch.equal(adapter[k], v) for k, v in init.items())
    assert all(adapter[k].abs().max() > 0 for k in adapter if ".lora_B." in k)
    # what eval and sample load: the base as it was, and W + (alpha / rank) B A for each target
    base, trained, _, _ = load_models(out, "cpu", torch.float32)
    plain = load_file(os.path.join(env["base"], "consolidated.safetensors"))
    trained, base = trained.state_dict(), base.state_dict()
    assert trained.keys() == base.keys() == plain.keys() and all(torch.equal(base[k], plain[k]) for k in plain)
    for k in plain:
        stem = k[: -len(".weight")]
        if stem + ".lora_A.weight" in adapter:
            want = plain[k] + 3.0 * adapter[stem + ".lora_B.weight"] @ adapter[stem + ".lora_A.weight"]
            torch.testing.assert_close(trained[k], want)
            assert not torch.allclose(trained[k], plain[k])
        else:
            assert torch.equal(trained[k], plain[k]), k


def test_suite_families_mask_shots_and_seed(env, spy, tmp_path):
    """data=suite: only the families named are drawn (the held-in ones by default), every sequence
    with the loss mask, max_shots and seed asked for."""
    tok = env["tok"]
    spy.run(str(tmp_path / "a"), env, data="suite", families="parity,caesar", loss_mask="last", max_shots=3,
            batch_size=8, seq_len=96, seed=11)
    assert set(spy.families) == {"parity", "caesar"} and len(spy.families) == 8
    drawn = spy.sequences(suite.SuiteSampler)
    assert len(drawn) == 8 and {d.sampler.seed for d in drawn} == {11}
    for d in drawn:
        assert n_shots(d.tokens, tok.newline_id) == 3
        assert d.targets.tolist() == layout_targets(d.tokens, "last", tok.newline_id)
    spy.run(str(tmp_path / "b"), env, data="suite", batch_size=8, seq_len=96)
    assert set(spy.families) <= set(suite.HELD_IN) and len(set(spy.families)) >= 4
    for d in spy.sequences(suite.SuiteSampler):
        assert d.targets.tolist() == layout_targets(d.tokens, "all", tok.newline_id)
        assert n_shots(d.tokens, tok.newline_id) > 3
        nl = [t for t, v in enumerate(d.tokens.tolist()) if v == tok.newline_id]
        longest = max(b - a for a, b in zip([0] + nl[1::4], nl[1::4]))  # one example with its separator
        assert 96 - 2 * longest < len(d.tokens) <= 96  # filled: no room for another example of its kind


def test_generic_data_is_language_modelling(env, spy, tmp_path):
    spy.run(str(tmp_path / "g"), env, data="generic", batch_size=2, seq_len=48, seed=12)
    drawn = spy.sequences(suite.GenericSampler)
    assert len(drawn) == 2 and {d.sampler.seed for d in drawn} == {12}
    for d in drawn:
        assert len(d.tokens) == 48 and d.tokens[0] == env["tok"].bos_id
        assert d.targets.tolist() == d.tokens[1:].tolist() + [IGNORE]


def balanced_pairs(answers, labels):
    """Rounds of the stratified order: while every label has examples left, each pair of shots holds
    both labels."""
    return all(set(answers[2 * r:2 * r + 2]) == set(labels) for r in range(len(answers) // 2))


def test_stratified_shots_in_training_sequences(env, spy, tmp_path):
    """shots=stratified: round-robin over the labels, so a pool of 36 "yes" and 4 "no" gives
    yes/no pairs in every sequence until the "no"s run out; with random shots it does not."""
    rng = np.random.default_rng(1)
    skew = [dict(input=f"skw {w}", output="no" if i < 4 else "yes", options=["yes", "no"])
            for i, w in enumerate(rng.choice(WORDS, 40))]
    data.write_jsonl(str(tmp_path / "skew" / "skew.jsonl"), skew)
    for shots in ("stratified", "random"):
        spy.run(str(tmp_path / shots), env, data=tmp_path / "skew", shots=shots, batch_size=4, seq_len=128)
        answers = [answers_of(env["tok"], d.tokens) for d in spy.sequences()]
        assert all(len(a) >= 8 for a in answers)
        balanced = [balanced_pairs(a[:8], ["yes", "no"]) for a in answers]
        assert all(balanced) if shots == "stratified" else not any(balanced), (shots, answers)
    # the suite: labels of one instance in pairs too (parity: two labels)
    spy.run(str(tmp_path / "suite"), env, data="suite", families="parity", shots="stratified", batch_size=4, seq_len=128)
    for d in spy.sequences(suite.SuiteSampler):
        answers = answers_of(env["tok"], d.tokens)
        assert balanced_pairs(answers[:6], sorted(set(answers)))


def draw_tasks(sampler, monkeypatch, n):
    """Which task each of n sequences is drawn from (build_sequence is told the task's examples)."""
    names = {id(v): k for k, v in sampler.tasks.items()}
    monkeypatch.setattr(data, "build_sequence", lambda examples, *a, **kw: names[id(examples)])
    return Counter(sampler.sequence(step, i) for step in range(n // 100) for i in range(100))


def assert_frequencies(counts, sizes, temperature):
    """Counts within 5 binomial standard deviations of n * size**(1/T) / sum."""
    w = {t: (1.0 if temperature == math.inf else s ** (1 / temperature)) for t, s in sizes.items()}
    n = sum(counts.values())
    for t, s in sizes.items():
        p = w[t] / sum(w.values())
        assert abs(counts[t] - n * p) < 5 * math.sqrt(n * p * (1 - p)), (temperature, t, counts[t], n * p)


def test_task_temperature_sampling(env, spy, tmp_path, monkeypatch):
    """MetaICL-style task files of 10, 30 and 90 examples: tasks are drawn with probability
    proportional to size**(1/T): T=1 by size, T=inf uniform; the run's --task_temperature reaches it."""
    sizes = {"small": 10, "mid": 30, "large": 90}
    for name, n in sizes.items():
        data.write_jsonl(str(tmp_path / "tasks" / f"{name}_16_100_train.jsonl"), rows(np.random.default_rng(n), n, name))
    spy.run(str(tmp_path / "out"), env, data=tmp_path / "tasks", task_temperature=2.0)
    sampler = spy.sequences()[0].sampler
    encoded = sampler.tasks
    assert {t: len(v) for t, v in encoded.items()} == sizes
    assert_frequencies(draw_tasks(sampler, monkeypatch, 4000), sizes, 2.0)
    for T in (1.0, 0.5, math.inf):
        s = data.TrainSampler(encoded, env["tok"].bos_id, 64, temperature=T, seed=2)
        assert_frequencies(draw_tasks(s, monkeypatch, 4000), sizes, T)


# ----------------------------------------------------------------------------- data: exact layouts

def test_targets_for_random_spans_against_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        cuts = sorted(rng.choice(np.arange(1, n + 1), size=2 * int(rng.integers(1, (n + 1) // 2)), replace=False).tolist())
        spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
        tokens = rng.integers(3, 100, n).tolist()
        for mask in ("all", "last", "none"):
            want = [IGNORE] * n
            for t in range(n - 1):  # position t predicts token t + 1, where that token is supervised
                if mask == "none" or any(s <= t + 1 < e for s, e in (spans if mask == "all" else spans[-1:])):
                    want[t] = tokens[t + 1]
            assert targets_for(tokens, spans, mask).tolist() == want, (mask, spans)


def test_fill_and_pack_boundaries():
    """<s> costs 1, the first example len(first_input) + len(answer), every later one len(input) +
    len(answer): a sequence exactly max_len long is filled, one token more is not; max_shots caps."""
    ex = [Encoded([10 + i] * 2, [20 + i] * 4, [30 + i] * 3, []) for i in range(5)]  # 5 tokens first, 7 after
    assert data.fill(ex, 1 + 5 + 7 + 7) == ex[:3]
    assert data.fill(ex, 1 + 5 + 7 + 7 - 1) == ex[:2]
    assert data.fill(ex, 5) == [] and data.fill(ex, 6) == ex[:1]
    assert data.fill(ex, 1000, max_shots=2) == ex[:2] and data.fill(ex, 1000) == ex
    assert data.fill(iter(ex), 1 + 5 + 7) == ex[:2]  # a generator
    tokens, spans = pack(ex[:3], 1)
    assert tokens == [1, 10, 10, 30, 30, 30, 21, 21, 21, 21, 31, 31, 31, 22, 22, 22, 22, 32, 32, 32]
    assert spans == [(3, 6), (10, 13), (17, 20)]
    tokens, targets = data.build_sequence(ex, None, 1 + 5 + 7, "last", seed=4, bos_id=1)
    order = np.random.default_rng(4).permutation(5)  # the shots: the seed's permutation, in order
    first, second = ex[order[0]], ex[order[1]]
    assert tokens.tolist() == [1] + first.first_input + first.answer + second.input + second.answer
    assert targets.tolist() == [IGNORE] * 9 + second.answer + [IGNORE]


def test_encode_tasks_keeps_an_example_that_exactly_fits(env):
    tok = env["tok"]
    ex = dict(input="the cat sat on a mat", output="yes", options=[])
    n = 1 + len(tok.encode(ex["input"])) + len(tok.encode_continuation("\nyes\n"))
    assert len(data.encode_tasks({"t": [ex, ex]}, tok, n)[0]["t"]) == 2
    with pytest.raises(ValueError, match="longer than seq_len"):
        data.encode_tasks({"t": [ex]}, tok, n - 1)


def test_shot_order_is_a_function_of_seed_step_and_index(env):
    """One task: sequences differ from step to step, index to index and seed to seed (a new order
    of the same examples), and repeat for the same (seed, step, index)."""
    tok = env["tok"]
    enc, _ = data.encode_tasks({"t": env["tasks"]["long"]}, tok, 200)
    make = lambda seed, step, index: data.TrainSampler(enc, tok.bos_id, 200, seed=seed).sequence(step, index)[0].tolist()
    seqs = [make(*k) for k in ((1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0))]
    assert all(a != b for i, a in enumerate(seqs) for b in seqs[i + 1:])
    assert make(1, 1, 0) == seqs[2]
    orders = {tuple(tok.decode(s).split("\n")[0::4][:3]) for s in seqs}
    assert len(orders) == 4  # the first three inputs differ: another order, not only another cut



def test_stratified_needs_every_shot_to_have_options():
    """Stratified order is for option tasks: a pool with one free-form example keeps the seed's
    permutation; a pool of option examples does not."""
    pool = [dict(input=str(i), output="a" if i % 4 else "b", options=["a", "b"]) for i in range(20)]
    rng = np.random.default_rng
    assert data.shot_order(pool, rng(3), "stratified").tolist() != rng(3).permutation(20).tolist()
    mixed = pool[:-1] + [dict(input="19", output="c", options=[])]
    assert data.shot_order(mixed, rng(3), "stratified").tolist() == rng(3).permutation(20).tolist()

# ----------------------------------------------------------------------------- eval and sample: training's prompts

def sharp_model(env, seed=0):
    args = ModelArgs(**{**env["args"].__dict__, "dim": 48, "head_dim": 12, "hidden_dim": 96})
    torch.manual_seed(seed)
    m = Transformer(args).init_weights(seed)
    with torch.no_grad():  # larger weights than init: sharp logits, so a token out of place shows
        for p in m.parameters():
            p.mul_(1.0 if p.dim() == 1 else 20.0)
    return m.eval()


def eval_rows(n, options, seed):
    rng = np.random.default_rng(seed)
    return rows(rng, n, "q", ["yes", "no", "maybe so"] if options else None, answer_words=(1, 3))


def training_sequence(tok, examples, loss_mask="last"):
    """The training sequence of these examples in this order (data.pack + targets_for): what
    build_sequence makes once it has shuffled them."""
    tokens, spans = pack([encode_example(tok, e) for e in examples], tok.bos_id)
    return tokens, spans, targets_for(tokens, spans, loss_mask)


@torch.no_grad()
def span_loss(model, tok, demos, query, output, reduction="sum"):
    tokens, spans, targets = training_sequence(tok, demos + [dict(query, output=output)])
    mean = model(torch.tensor(tokens)[None], torch.as_tensor(targets)[None]).item()
    return mean * (spans[-1][1] - spans[-1][0]) if reduction == "sum" else mean


@torch.no_grad()
def greedy(model, prompt, newline, eos, n):
    """Greedy decoding with full forwards: stops at the second newline (the answer's closing one) or eos."""
    out = []
    for _ in range(n):
        t = model(torch.tensor(prompt + out)[None])[0, -1].argmax().item()
        if t == eos or (t == newline and out.count(newline) == 1):
            break
        out.append(t)
    return out


def training_prompt(tok, demos, x):
    """A training sequence of demos + the query, cut before the query's answer span."""
    tokens, spans, _ = training_sequence(tok, demos + [dict(input=x, output="", options=[])])
    return tokens[:spans[-1][0]]


@pytest.mark.parametrize("k", [0, 3])
def test_eval_scores_the_training_sequence(env, k):
    """k=0 and k=3: each option's score is the summed loss of its answer span in the training sequence
    of demos + (query, option) with mask last; the prediction its argmin; answer_loss the gold's mean
    loss there; a free-form answer is greedy decoding after that sequence's prefix."""
    tok, model = env["tok"], sharp_model(env)
    demos = eval_rows(3, True, 1)[:k]
    raw = eval_rows(3, True, 2)
    queries = [(ex, encode_example(tok, ex)) for ex in raw]
    res, _ = ev.evaluate_prompt(model, sample.new_cache(model, 512), [encode_example(tok, d) for d in demos], queries,
                                tok, 64, 4, option_score="sum")
    preds = [ex["options"][int(np.argmin([span_loss(model, tok, demos, ex, o) for o in ex["options"]]))] for ex in raw]
    assert [s["prediction"] for s in res["samples"]] == preds
    assert res["accuracy"] == pytest.approx(np.mean([p == ex["output"] for p, ex in zip(preds, raw)]))
    gold = [span_loss(model, tok, demos, ex, ex["output"], "mean") for ex in raw]
    assert res["answer_loss"] == pytest.approx(np.mean(gold), rel=1e-4)
    assert res["shots"] == k and res["prefix_tokens"] == (len(training_sequence(tok, demos)[0]) if k else 1)
    free = eval_rows(3, False, 3)
    res, _ = ev.evaluate_prompt(model, sample.new_cache(model, 512), [encode_example(tok, d) for d in demos],
                                [(ex, encode_example(tok, ex)) for ex in free], tok, 64, 5)
    want = [tok.decode(greedy(model, training_prompt(tok, demos, ex["input"]), tok.newline_id, tok.eos_id, 5)).strip()
            for ex in free]
    assert [s["prediction"] for s in res["samples"]] == want


def write_checkpoint_dir(env, model, path, seq_len=160):
    os.makedirs(path, exist_ok=True)
    save_model(model, path)
    shutil.copy(env["tok"].path, os.path.join(path, "tokenizer.model"))
    json.dump(dict(init="scratch", preset="nano", seed=0, seq_len=seq_len, lora_rank=0), open(os.path.join(path, "config.json"), "w"))
    open(os.path.join(path, "DONE"), "w").write("1")
    return path


@pytest.mark.parametrize("k", ["0", "2", "max"])
def test_sample_answers_after_the_training_sequence(env, tmp_path, capsys, k):
    """sample.py: the first k demonstrations of the file (max: as many as pack into seq_len - room),
    then each query as a training sequence would hold it: options by the lowest summed span loss,
    free-form by greedy decoding."""
    tok, model = env["tok"], sharp_model(env, seed=1)
    ckpt = write_checkpoint_dir(env, model, str(tmp_path / "ckpt"))
    demos = eval_rows(12, False, 4)
    data.write_jsonl(str(tmp_path / "demos.jsonl"), demos)
    queries = eval_rows(2, True, 5) + eval_rows(2, False, 6)
    data.write_jsonl(str(tmp_path / "q.jsonl"), [dict(input=q["input"], options=q["options"]) for q in queries])
    sample.main(["--ckpt", ckpt, "--demos", str(tmp_path / "demos.jsonl"), "--k", k, "--queries", str(tmp_path / "q.jsonl"),
                 "--room", "40", "--max_new_tokens", "4", "--device", "cpu"])
    captured = capsys.readouterr()
    if k == "max":  # the longest run of the file's first examples whose text fits 160 - 40 tokens
        text = lambda n: "\n\n".join(f"{d['input']}\n{d['output']}\n" for d in demos[:n])
        n = max(n for n in range(len(demos) + 1) if len(tok.encode(text(n), bos=True)) <= 160 - 40)
        assert 0 < n < len(demos) and f": {n} demonstrations from" in captured.err
    else:
        n = int(k)
    got = [line.split("\t") for line in captured.out.split("\n")[:-1]]
    want = []
    for q in queries:
        if q["options"]:
            want.append(q["options"][int(np.argmin([span_loss(model, tok, demos[:n], q, o) for o in q["options"]]))])
        else:
            ids = greedy(model, training_prompt(tok, demos[:n], q["input"]), tok.newline_id, tok.eos_id, 4)
            want.append(tok.decode(ids).strip().replace("\n", " "))
    assert got == [[q["input"], w] for q, w in zip(queries, want)]


def test_eval_sweep_values_by_hand(env):
    """k=max: as many of the seed's order of the pool as fit in seq_len with room for the longest test
    query and its longest option (counted on the text); mean and worst over seeds per task; the summary
    their mean over tasks; macro-F1 over the option tasks only."""
    tok, model = env["tok"], sharp_model(env, seed=2)
    tasks, raw = {}, {}
    for name, options in (("opt", True), ("free", False)):
        pool, test = eval_rows(30, options, 7), eval_rows(6, options, 8)
        raw[name] = (pool, test)
        tasks[name] = ([encode_example(tok, e) for e in pool], [(ex, encode_example(tok, ex)) for ex in test])
    seeds, seq_len = [1, 2, 3], 120
    res = ev.evaluate({"m": model}, tok, tasks, [0, 2, "max"], seeds, seq_len, batch_tokens=256, max_new_tokens=3)
    spread = []
    for name, (pool, test) in raw.items():
        room = max(len(tok.encode_continuation("\n\n" + q["input"])) +
                   max(len(tok.encode_continuation("\n" + o + "\n")) for o in (q["options"] or [q["output"]])) for q in test)
        entry = res["tasks"][name]
        for s in seeds:
            order = np.random.default_rng(s).permutation(len(pool))
            text = lambda n: "\n\n".join(f"{pool[i]['input']}\n{pool[i]['output']}\n" for i in order[:n])
            n = max(n for n in range(len(pool) + 1) if len(tok.encode(text(n), bos=True)) + room <= seq_len)
            assert entry["k"]["max"]["m"]["seeds"][str(s)]["shots"] == n and 2 < n < len(pool), (name, s)
        for k in ("0", "2", "max"):
            r = entry["k"][k]["m"]
            main = [r["seeds"][str(s)][entry["metric"]] for s in seeds]
            assert r["mean"] == pytest.approx(np.mean(main)) and r["worst"] == pytest.approx(min(main))
            spread.append(max(main) - min(main))
    for k in ("0", "2", "max"):
        per = [res["tasks"][t]["k"][k]["m"] for t in ("opt", "free")]
        summary = res["summary"][k]["m"]
        assert summary["mean"] == pytest.approx(np.mean([p["mean"] for p in per]))
        assert summary["worst"] == pytest.approx(np.mean([p["worst"] for p in per]))
        assert summary["answer_loss"] == pytest.approx(np.mean([p["means"]["answer_loss"] for p in per]))
        assert summary["macro_f1"] == pytest.approx(per[0]["means"]["macro_f1"]) and summary["n_tasks"] == 2
    assert any(x > 0 for x in spread), spread  # seeds that score differently: worst is not mean


def test_k_equal_to_the_pool_is_the_whole_pool(env):
    """k may be as large as the pool (the seed's order of all of it); one more is skipped, never capped."""
    tok = env["tok"]
    pool = [encode_example(tok, e) for e in eval_rows(6, True, 4)]
    demos, why = ev.draw_demos(pool, 6, 5, 10_000, 8)
    assert why is None and demos == [pool[i] for i in np.random.default_rng(5).permutation(6)]
    assert ev.draw_demos(pool, 7, 5, 10_000, 8) == (None, "k=7 is larger than the demonstration pool (6 examples)")

def test_a_file_without_a_split_never_lends_test_rows(env, tmp_path):
    """{task}.jsonl alone would be both demonstration pool and test set: refused. Split files give the
    pool from train and the queries from test, never one for the other."""
    tok = env["tok"]
    data.write_jsonl(str(tmp_path / "plain" / "copa.jsonl"), eval_rows(10, True, 1))
    with pytest.raises(ValueError, match="copa.*the same examples would be demonstrations and test set"):
        ev.load_eval_tasks([str(tmp_path / "plain")], tok, 256)
    pool = [dict(r, input=f"pool {i}") for i, r in enumerate(eval_rows(6, True, 2))]
    test = [dict(r, input=f"test {i}") for i, r in enumerate(eval_rows(4, True, 3))]
    for layout in ("rte/{split}.jsonl", "sst2_16_100_{split}.jsonl"):
        for split, part in (("train", pool), ("test", test)):
            data.write_jsonl(str(tmp_path / "split" / layout.format(split=split)), part)
    tasks = ev.load_eval_tasks([str(tmp_path / "split")], tok, 256)
    assert set(tasks) == {"rte", "sst2"}
    for demos, queries in tasks.values():
        assert [tok.decode(d.first_input) for d in demos] == [r["input"] for r in pool]
        assert [ex["input"] for ex, _ in queries] == [r["input"] for r in test]


def test_free_form_metrics_by_hand(env, monkeypatch):
    """Predictions are the decoded generation, stripped; exact match, ROUGE-L and token F1 are their
    means over queries (values worked out on paper)."""
    tok, model = env["tok"], sharp_model(env)
    golds = ["red cat", "the big dog", "yes"]
    said = ["red cat", "The Dog!", "ye"]
    monkeypatch.setattr(ev, "generate", lambda *a, **kw: [tok.encode_continuation("\n" + s) for s in said])
    queries = [(ex, encode_example(tok, ex)) for ex in (dict(input=f"q {i}", output=g, options=[]) for i, g in enumerate(golds))]
    res, _ = ev.evaluate_prompt(model, sample.new_cache(model, 512), [], queries, tok, 64, 4)
    assert [s["prediction"] for s in res["samples"]] == said
    assert res["exact_match"] == pytest.approx(1 / 3)               # "ye" is not "yes", though inside it
    assert res["rouge_l"] == pytest.approx((1 + 0.8 + 0) / 3)      # "the dog" in "the big dog": P 1, R 2/3
    assert res["token_f1"] == pytest.approx((1 + 0.4 + 0) / 3)     # "dog!" is not "dog": 1 common of 2 + 3


def test_metric_values_by_hand():
    assert ev.token_f1("a a", "a a b") == pytest.approx(0.8)          # bags: both "a"s count
    assert ev.token_f1("the the cat", "the cat cat") == pytest.approx(2 / 3)
    assert ev.token_f1("a", "b") == 0.0
    assert ev.rouge_l("x a y b", "a b z") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert ev.macro_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert ev.macro_f1(["a", "a"], ["a", "a"]) == 1.0


def test_lora_dropout_drops_the_adapters_input_only():
    """LoRA's output is W x + (alpha / rank) B A dropout(x) while training (the base path never
    dropped), W x + (alpha / rank) B A x in eval mode."""
    from lora import LoRALinear
    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(6, 5, bias=False), rank=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        m.lora_B.weight.normal_()
    W, A, B, x = m.weight, m.lora_A.weight, m.lora_B.weight, torch.randn(3, 6)
    torch.manual_seed(1)
    got = m(x)
    torch.manual_seed(1)
    keep = F.dropout(torch.ones_like(x), 0.5, training=True)  # the same draw: 0 or 1 / (1 - p)
    assert (keep == 0).any() and (keep != 0).any()
    torch.testing.assert_close(got, x @ W.T + 2.0 * ((x * keep) @ A.T @ B.T))
    m.eval()
    torch.testing.assert_close(m(x), x @ W.T + 2.0 * (x @ A.T @ B.T))


def test_eval_main_passes_shots_and_option_score(env, tmp_path, monkeypatch, capsys):
    """eval.py --shots=stratified draws demonstrations with labels balanced (2 of each of 4 from a pool
    of 18 "yes" and 2 "no"); --option_score=mean ranks options by their mean span loss; --max_test
    keeps the first queries of the test file."""
    ckpt = write_checkpoint_dir(env, sharp_model(env, seed=3), str(tmp_path / "ckpt"))
    pool = [dict(input=f"pool {w}", output="no" if i in (5, 11) else "yes", options=["yes", "no"])
            for i, w in enumerate(WORDS[:20])]
    test = [dict(input=f"test {w}", output="yes", options=["yes", "no", "the big red dog ran far"]) for w in WORDS[:6]]
    data.write_jsonl(str(tmp_path / "tasks" / "t" / "train.jsonl"), pool)
    data.write_jsonl(str(tmp_path / "tasks" / "t" / "test.jsonl"), test)
    seen, real = [], ev.evaluate_prompt
    def spy(model, cache, demos, queries, *a, **kw):
        seen.append(([tuple(d.answer) for d in demos], [ex["input"] for ex, _ in queries], a, kw))
        return real(model, cache, demos, queries, *a, **kw)
    monkeypatch.setattr(ev, "evaluate_prompt", spy)
    yes, no = (tuple(env["tok"].encode_continuation(f"\n{y}\n")) for y in ("yes", "no"))
    for shots, score in (("stratified", "mean"), ("random", "sum")):
        seen.clear()
        res = ev.main(["--ckpt", ckpt, "--tasks", str(tmp_path / "tasks"), "--ks", "4", "--seeds", "1,2,3", "--no_base",
                       "--shots", shots, "--option_score", score, "--max_test", "4", "--device", "cpu",
                       "--out", str(tmp_path / "eval.json")])
        capsys.readouterr()
        counts = [Counter(labels) for labels, _, _, _ in seen]
        assert len(counts) == 3 and all(sum(c.values()) == 4 for c in counts)
        if shots == "stratified":
            assert all(c[no] == 2 and c[yes] == 2 for c in counts), counts
        else:
            assert not all(c[no] == 2 for c in counts), counts
        assert all(queries == [t["input"] for t in test[:4]] for _, queries, _, _ in seen)
        for r in res["tasks"]["t"]["k"]["4"]["trained"]["seeds"].values():
            assert r["accuracy"] == r[f"accuracy_{score}"] and r["n"] == 4
        assert res["settings"]["shots"] == shots and res["settings"]["option_score"] == score


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sample_reduction_ranks_options(env, tmp_path, capsys, reduction):
    """sample.py --reduction: the option with the lowest summed (or per-token mean) loss of its answer
    span, on options of 1 and 9 words where the two rules disagree."""
    tok, model = env["tok"], sharp_model(env, seed=4)
    ckpt = write_checkpoint_dir(env, model, str(tmp_path / "ckpt"))
    demos = eval_rows(4, False, 9)
    data.write_jsonl(str(tmp_path / "demos.jsonl"), demos)
    options = ["no", "the big red dog ran far away on a mat", "maybe so"]
    queries = [dict(input=f"q {' '.join(WORDS[i:i + 2])}", options=options) for i in range(0, 24, 2)]
    data.write_jsonl(str(tmp_path / "q.jsonl"), queries)
    sample.main(["--ckpt", ckpt, "--demos", str(tmp_path / "demos.jsonl"), "--k", "2", "--queries", str(tmp_path / "q.jsonl"),
                 "--reduction", reduction, "--device", "cpu"])
    got = [line.split("\t")[1] for line in capsys.readouterr().out.split("\n")[:-1]]
    want = {r: [options[int(np.argmin([span_loss(model, tok, demos[:2], q, o, r) for o in options]))] for q in queries]
            for r in ("sum", "mean")}
    assert got == want[reduction]
    assert want["sum"] != want["mean"]  # the rules disagree on some queries here


def test_sampling_frequencies_follow_temperature_and_top_k():
    """sample.pick: greedy at temperature 0; else softmax(logits / T) over the top_k logits only."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    assert sample.pick(logits) == [0]
    n = 20000
    g = torch.Generator().manual_seed(0)
    for T, top_k in ((0.5, 3), (2.0, None), (1.0, 2)):
        drawn = Counter(sample.pick(logits.expand(n, -1), T, top_k, g))
        keep = torch.ones(5, dtype=torch.bool) if top_k is None else logits[0] >= logits[0].sort(descending=True).values[top_k - 1]
        p = torch.where(keep, (logits[0].double() / T).exp(), torch.zeros(5, dtype=torch.float64))
        p = (p / p.sum()).tolist()
        for i in range(5):
            assert abs(drawn[i] - n * p[i]) <= 5 * math.sqrt(n * p[i] * (1 - p[i])) + (0 if p[i] else 0.5), (T, top_k, i, drawn, p)


def test_activation_checkpointing_recomputes_blocks(env, spy, tmp_path, monkeypatch):
    """activation_checkpointing=full runs every block again in the backward pass; none does not."""
    from model import TransformerBlock
    calls, real = [], TransformerBlock.forward
    def forward(block, *a, **kw):
        calls.append(block.layer_id)
        return real(block, *a, **kw)
    monkeypatch.setattr(TransformerBlock, "forward", forward)
    for mode, times in (("none", 1), ("full", 2)):
        calls.clear()
        spy.run(str(tmp_path / mode), env, activation_checkpointing=mode, grad_accum=2, seq_len=32)
        assert Counter(calls) == {i: 2 * times for i in range(env["args"].n_layers)}, mode  # 2 micro-steps
