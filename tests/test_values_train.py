"""Values against rules written here, not one run of the code against another run of it: train.py.

Each test computes what a setting must give from its documented rule (the learning-rate formula,
AdamW with clipping and decoupled weight decay by hand, the token layout of a packed sequence) and
compares train.py's values with it. train.py runs in this process (train.main) with spies that
record the sequences each sampler made and, around every optimizer step, the weights, the gradients
the optimizer was handed and the weights it left: so a step is replayed by hand from what it saw.
test_values_data.py (packing, sampling, a run's data options) and test_values_eval.py (eval.py,
sample.py, metrics, LoRA as loaded) use this file's fixtures and helpers.
"""
import json
import math
import os
import signal
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import data
import suite
import train
from checkpoints import load_model, save_model
from data import IGNORE, Tokenizer
from model import ModelArgs, Transformer
from test_method import rows as method_rows

WORDS = ("the cat sat on a mat dog ran far away red blue green big small old new fast slow happy sad yes no maybe "
         "what is it").split()


def rows(rng, n, tag, options=None, answer_words=(1, 3)):
    """n examples whose inputs start with `tag` (which task a sequence came from is then legible)."""
    return method_rows(rng, n, answer_words, options, tag=tag, words=WORDS)


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
    suite, generic), the model train.py starts from, and around each optimizer step the trainable
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
        for name in ("initial_model", "load_model"):  # a fresh start, or a resume
            def load(*a, made=getattr(train, name), **kw):
                model = made(*a, **kw)
                self.models.append(model)
                return model
            monkeypatch.setattr(train, name, load)
        def instance(family, rng, made=suite.suite_instance, **options):
            self.families.append(family)
            return made(family, rng, **options)
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


def test_dropout_rng_is_seeded_from_seed_step_and_rank(env, spy, tmp_path, monkeypatch):
    """LoRA dropout draws from the generator train.py seeds each step with seed * SEED_STRIDE +
    step * STEP_STRIDE + rank (nothing draws before the first dropout of a step), so every step has
    masks of its own, and a resumed run draws a straight one's."""
    states, real = [], F.dropout
    def recording(x, p=0.5, training=True, inplace=False):
        states.append(torch.random.get_rng_state())
        return real(x, p, training, inplace)
    monkeypatch.setattr(F, "dropout", recording)
    spy.run(tmp_path / "run", env, max_steps=3, lora_rank=2, lora_dropout=0.5)
    for step in range(3):
        torch.manual_seed(3 * train.SEED_STRIDE + step * train.STEP_STRIDE + 0)  # seed=3, rank 0
        assert any(torch.equal(s, torch.random.get_rng_state()) for s in states), f"step {step}"
