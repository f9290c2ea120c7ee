"""Values against rules written here: data.py and suite.py as a train.py run uses them (the
sequences its samplers made: max_shots, seq_len, seed, suite families, generic text, stratified
shots, size**(1/T) task sampling), the seed's scratch init, and the exact layouts of packing
(targets_for, fill, pack, build_sequence, shot_order). The run and its spies are
test_values_train.py's."""
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import suite
from data import IGNORE, Encoded, encode_example, pack, targets_for
from model import PRESETS, ModelArgs, Transformer
from test_values_train import WORDS, answers_of, env, layout_targets, n_shots, rows, spy  # noqa: F401 (fixtures)

# ----------------------------------------------------------------------------- what a setting does to the data of a run


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
    costs = [len(e.input_after_separator) + len(e.answer) for exs in data.encode_tasks(
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


def test_suite_families_mask_shots_and_seed(env, spy, tmp_path):
    """data=suite: only the families named are drawn (the held-in ones by default), every sequence
    with the loss mask, max_shots and seed asked for; a generic_share of the sequences is the base
    model's pre-training text, every token a target."""
    tok = env["tok"]
    spy.run(str(tmp_path / "a"), env, data="suite", families="feature_label,edit", generic_share=0, loss_mask="last", max_shots=3,
            batch_size=8, seq_len=96, seed=11)
    assert set(spy.families) == {"feature_label", "edit"} and len(spy.families) == 8
    drawn = spy.sequences(suite.SuiteSampler)
    assert len(drawn) == 8 and {d.sampler.seed for d in drawn} == {11}
    for d in drawn:
        assert n_shots(d.tokens, tok.newline_id) == 3
        assert d.targets.tolist() == layout_targets(d.tokens, "last", tok.newline_id)
    spy.run(str(tmp_path / "b"), env, data="suite", batch_size=16, seq_len=128, generic_share=0.5)
    assert set(spy.families) <= set(suite.HELD_IN) and len(set(spy.families)) >= 3
    generic = {(d.step, d.index) for d in spy.sequences(suite.GenericSampler)}
    drawn = spy.sequences(suite.SuiteSampler)
    assert len(drawn) == 16 and 0 < len(generic) < 16 and len(spy.families) + len(generic) == 16  # both kinds
    for d in drawn:
        if (d.step, d.index) in generic:  # filled with text, every next token a target
            assert len(d.tokens) == 128 and d.targets.tolist() == d.tokens[1:].tolist() + [IGNORE]
            continue
        assert d.targets.tolist() == layout_targets(d.tokens, "all", tok.newline_id)
        assert n_shots(d.tokens, tok.newline_id) > 3
        nl = [t for t, v in enumerate(d.tokens.tolist()) if v == tok.newline_id]
        longest = max(b - a for a, b in zip([0] + nl[1::4], nl[1::4]))  # one example with its separator
        assert 128 - 2 * longest < len(d.tokens) <= 128  # filled: no room for another example of its kind


def test_generic_data_is_language_modelling(env, spy, tmp_path):
    spy.run(str(tmp_path / "g"), env, data="generic", loss_mask="none", batch_size=2, seq_len=48, seed=12)
    drawn = spy.sequences(suite.GenericSampler)
    assert len(drawn) == 2 and {d.sampler.seed for d in drawn} == {12}
    for d in drawn:
        assert len(d.tokens) == 48 and d.tokens[0] == env["tok"].bos_id
        assert d.targets.tolist() == d.tokens[1:].tolist() + [IGNORE]


def balanced_rounds(answers, labels):
    """Rounds of the stratified order: while every label has examples left, each run of
    len(labels) shots holds every label (two labels: each pair holds both)."""
    n = len(labels)
    return all(set(answers[n * r:n * r + n]) == set(labels) for r in range(len(answers) // n))


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
        balanced = [balanced_rounds(a[:8], ["yes", "no"]) for a in answers]
        assert all(balanced) if shots == "stratified" else not any(balanced), (shots, answers)
    # the suite: labels of one instance in rounds too (feature_label: two or three labels), three rounds
    spy.run(str(tmp_path / "suite"), env, data="suite", families="feature_label", generic_share=0, shots="stratified",
            batch_size=4, seq_len=192)
    drawn = spy.sequences(suite.SuiteSampler)
    assert len(drawn) == 4
    for d in drawn:
        answers = answers_of(env["tok"], d.tokens)
        labels = sorted(set(answers))
        assert len(labels) >= 2 and len(answers) >= 3 * len(labels), answers
        assert balanced_rounds(answers[:3 * len(labels)], labels), answers


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
    """<s> costs 1, the first example len(input_after_bos) + len(answer), every later one
    len(input_after_separator) + len(answer): a sequence exactly max_len long is filled, one token
    more is not; max_shots caps."""
    ex = [Encoded([10 + i] * 2, [20 + i] * 4, [30 + i] * 3, []) for i in range(5)]  # 5 tokens first, 7 after
    assert data.fill(ex, 1 + 5 + 7 + 7) == ex[:3]
    assert data.fill(ex, 1 + 5 + 7 + 7 - 1) == ex[:2]
    assert data.fill(ex, 5) == [] and data.fill(ex, 6) == ex[:1]
    assert data.fill(ex, 1000, max_shots=2) == ex[:2] and data.fill(ex, 1000) == ex
    assert data.fill(iter(ex), 1 + 5 + 7) == ex[:2]  # a generator
    tokens, spans = pack(ex[:3], 1)
    assert tokens == [1, 10, 10, 30, 30, 30, 21, 21, 21, 21, 31, 31, 31, 22, 22, 22, 22, 32, 32, 32]
    assert spans == [(3, 6), (10, 13), (17, 20)]
    tokens, targets = data.build_sequence(ex, 1, 1 + 5 + 7, "last", seed=4)
    order = np.random.default_rng(4).permutation(5)  # the shots: the seed's permutation, in order
    first, second = ex[order[0]], ex[order[1]]
    assert tokens.tolist() == [1] + first.input_after_bos + first.answer + second.input_after_separator + second.answer
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


def test_stratified_needs_every_shot_to_have_options(env):
    """Stratified order is for option tasks: a pool with one free-form example keeps the seed's
    permutation; a pool of option examples does not."""
    raw = [dict(input=str(i), output="a" if i % 4 else "b", options=["a", "b"]) for i in range(20)]
    pool = [encode_example(env["tok"], ex) for ex in raw]
    rng = np.random.default_rng
    assert data.shot_order(pool, rng(3), "stratified").tolist() != rng(3).permutation(20).tolist()
    mixed = pool[:-1] + [encode_example(env["tok"], dict(input="19", output="c", options=[]))]
    assert data.shot_order(mixed, rng(3), "stratified").tolist() == rng(3).permutation(20).tolist()
