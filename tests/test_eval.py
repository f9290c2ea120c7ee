import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch

import data
import eval as ev
from data import Tokenizer, encode_example, pack, train_tokenizer
from model import ModelArgs, Transformer

WORDS = "the cat sat on a mat dog ran far away question answer yes no maybe red blue green what is it ans".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {rng.integers(1000)}." for _ in range(500)]
    return Tokenizer(train_tokenizer(lines, str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=300))


def tiny_model(tok, seed=0, max_seq_len=None):
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=tok.vocab_size, rope_theta=1e4, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    return Transformer(args).init_weights(seed)


def random_model(tok, seed=0):
    m = tiny_model(tok, seed)
    with torch.no_grad():  # larger weights than init: sharper logits, so a wrong mask shows
        for p in m.parameters():
            p.mul_(1.0 if p.dim() == 1 else 20.0)
    return m


def overfit(model, tokens, steps=150, lr=1e-2):
    x = torch.tensor(tokens)[None]
    y = torch.tensor(tokens[1:] + [data.IGNORE])[None]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def examples(n, options, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
        if options:
            out.append(dict(input=x, output=str(rng.choice(["yes", "no", "maybe so"])), options=["yes", "no", "maybe so"]))
        else:
            out.append(dict(input=x, output=" ".join(rng.choice(WORDS, int(rng.integers(1, 3)))), options=[]))
    return out


# ----------------------------------------------------------------------------- metrics

def test_rouge_l_hand_computed():
    assert ev.rouge_l("Hello, world!", "hello world") == 1.0  # punctuation and case are dropped
    assert ev.rouge_l("", "a") == ev.rouge_l("a", "") == ev.rouge_l("!!", "?") == 0.0
    assert ev.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P=1, R=1/2
    assert ev.rouge_l("a b c d", "b a d c") == pytest.approx(0.5)  # LCS 2, four ways: "a c", "a d", "b c", "b d"
    assert ev.rouge_l("a b c", "x y") == 0.0
    assert ev.rouge_l("The Cats-sat", "the cats sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    # the dynamic programme against brute force on random short token lists
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = list(rng.choice(list("abc"), rng.integers(1, 6))), list(rng.choice(list("abc"), rng.integers(1, 6)))
        brute = max(n for n in range(len(a) + 1) for s in itertools.combinations(a, n)
                    if any(list(s) == list(t) for t in itertools.combinations(b, n)))
        assert ev.lcs_length(a, b) == brute


def test_token_f1_and_macro_f1():
    assert ev.token_f1("The cat", "the cat sat") == pytest.approx(0.8)
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("", "a") == 0.0
    # a: tp 2, 3 predicted, 2 gold -> 4/5; b: 2/4; c gold once, never predicted -> 0
    assert ev.macro_f1(list("aaabb"), list("aabbc")) == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    # a class predicted but never gold counts (F1 0); one never predicted nor gold does not exist here
    assert ev.macro_f1(["a", "d"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)


# ----------------------------------------------------------------------------- prompts

def test_prompt_is_the_training_format(tok):
    demos = [dict(input="the cat sat", output="yes"), dict(input="a dog ran far", output="no"), dict(input="red", output="maybe so")]
    query = dict(input="what is it", output="ans")
    enc = [encode_example(tok, e) for e in demos]
    q = encode_example(tok, query)
    prompt = pack(enc, tok.bos_id)[0] + ev.query_input(q, len(enc)) + q.answer
    full = "the cat sat\nyes\n\n\na dog ran far\nno\n\n\nred\nmaybe so\n\n\nwhat is it\nans\n"
    assert prompt == tok.encode(full, bos=True) == pack(enc + [q], tok.bos_id)[0]
    assert pack([], tok.bos_id)[0] + ev.query_input(q, 0) + q.answer == tok.encode("what is it\nans\n", bos=True)
    # the demonstrations are the first k of the seed's permutation, in that order
    drawn, why = ev.draw_demos(enc, 2, 13, 1000, 10)
    assert why is None and drawn == [enc[i] for i in np.random.default_rng(13).permutation(3)[:2]]


def test_draw_demos_limits(tok):
    pool = [encode_example(tok, e) for e in examples(20, options=False)]
    assert ev.draw_demos(pool, 21, 0, 10_000, 5)[1] == "k=21 is larger than the demonstration pool (20 examples)"
    demos, why = ev.draw_demos(pool, 15, 0, 30, 5)
    assert demos is None and "more than seq_len=30" in why
    demos, why = ev.draw_demos(pool, "max", 0, 60, 5)
    order = np.random.default_rng(0).permutation(20)
    assert demos == [pool[i] for i in order[:len(demos)]] and 0 < len(demos) < 20
    nxt = pool[order[len(demos)]]
    assert len(pack(demos, 1)[0]) + 5 <= 60 < len(pack(demos + [nxt], 1)[0]) + 5  # as many as fit
    assert ev.draw_demos(pool, "max", 0, 10_000, 5)[0] == [pool[i] for i in order]  # the whole pool


# ----------------------------------------------------------------------------- cached scoring

@pytest.mark.parametrize("k", [0, 3])
def test_cached_scores_equal_uncached(tok, k):
    model = random_model(tok)
    pool = [encode_example(tok, e) for e in examples(5, options=False, seed=1)]
    prefix = pack(pool[:k], tok.bos_id)[0]
    queries = [encode_example(tok, dict(input=x, output="yes", options=["yes", "no", "maybe so", "the cat sat on a mat"]))
               for x in ["the cat", "a dog ran far away and on", "red", ""]]  # "" : empty input at k=0
    segments = [(ev.query_input(q, k), o) for q in queries for o in q.options]
    assert len({len(x) + len(o) for x, o in segments}) > 4  # lengths differ
    ref = ev.score_options_uncached(model, prefix, segments)
    for budget in (2048, 20):  # all in one row; several rows
        got = ev.score_options(model, prefix, segments, batch_tokens=budget)
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (budget, np.abs(np.array(got) - ref).max())
    assert np.std(ref) > 0.1  # the options really score differently


@pytest.mark.parametrize("options", [True, False])
def test_answer_loss_is_the_gold_answers_loss(tok, options):
    model = random_model(tok)
    pool = [encode_example(tok, e) for e in examples(5, options=options, seed=1)]
    queries = [(ex, encode_example(tok, ex)) for ex in examples(4, options=options, seed=2)]
    res, _ = ev.evaluate_prompt(model, ev.new_cache(model, 1024), pool[:3], queries, tok, 64, 4)
    ref = ev.score_options_uncached(model, pack(pool[:3], tok.bos_id)[0],
                                    [(ev.query_input(q, 3), q.answer) for _, q in queries])
    assert res["answer_loss"] == pytest.approx(np.mean(ref), abs=1e-4)


@pytest.mark.parametrize("options", [True, False])
def test_one_prompt_encodes_its_prefix_once(tok, options):
    """Options (or generation) and then the gold answers follow the same demonstrations: the
    prefix is encoded once, not once per pass (it dominates the cost at 32K)."""
    model = random_model(tok)
    embedded = []
    model.tok_embeddings.register_forward_hook(lambda m, inp, out: embedded.append(inp[0].numel()))
    pool = [encode_example(tok, e) for e in examples(60, options=options, seed=1)]
    queries = [(ex, encode_example(tok, ex)) for ex in examples(2, options=options, seed=2)]
    prefix = pack(pool, tok.bos_id)[0]
    _, stats = ev.evaluate_prompt(model, ev.new_cache(model, 2048), pool, queries, tok, 256, 4)
    inputs = [ev.query_input(q, len(pool)) for _, q in queries]
    gold = sum(len(x) + len(q.answer) for x, (_, q) in zip(inputs, queries))
    if options:
        segments = sum(len(x) + len(o) for x, (_, q) in zip(inputs, queries) for o in q.options)
        assert sum(embedded) == len(prefix) + segments + gold == stats["tokens_forwarded"]
    else:  # generation feeds at most 4 new tokens per query after its input
        assert len(prefix) + gold < sum(embedded) <= len(prefix) + gold + sum(map(len, inputs)) + 2 * 4


def naive_generate(model, prompt, stop_id, eos_id, max_new_tokens):
    out, newlines = [], 0
    seq = list(prompt)
    for _ in range(max_new_tokens):
        t = model(torch.tensor(seq)[None])[0, -1].argmax().item()  # full forward, no cache
        if t == eos_id or (t == stop_id and newlines == 1):
            break
        newlines += t == stop_id
        out.append(t)
        seq.append(t)
    return out


def test_cached_generation_equals_naive_greedy(tok):
    model = random_model(tok, seed=1)
    demos = [encode_example(tok, e) for e in examples(2, options=False, seed=2)]
    prefix = pack(demos, tok.bos_id)[0]
    inputs = [encode_example(tok, dict(input=x, output="a")).input for x in ["the cat", "red blue green yes", "no"]]
    # A random model seldom emits a newline, so to exercise the stop rules take as "newline" a
    # token it repeats, and as eos one it emits: the three queries end in different ways.
    free = [naive_generate(model, prefix + x, -1, -1, 10) for x in inputs]
    stop = next((t for r in free for t in r if r.count(t) > 1), free[0][0])
    eos = free[2][4]
    ref = [naive_generate(model, prefix + x, stop, eos, 10) for x in inputs]
    assert min(map(len, ref)) < 10
    for budget in (2048, 12):  # one batch; several
        assert ev.generate(model, prefix, inputs, stop, eos, 10, batch_tokens=budget) == ref


def test_generation_stops_at_the_closing_newline(tok):
    model = tiny_model(tok)
    q = encode_example(tok, dict(input="what is it", output="ans"))
    overfit(model, pack([q], tok.bos_id)[0], steps=80)  # <s> what is it ⏎ ans ⏎
    out = ev.generate(model, [tok.bos_id], [q.first_input], tok.newline_id, tok.eos_id, max_new_tokens=10)[0]
    assert tok.decode(out).strip() == "ans" and len(out) < 10
    assert out == q.answer[:-1]  # the opening newline and the answer; the closing one ended it


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_memorised_and_random(tok):
    ids = tok.encode("the cat sat on a mat and the dog ran far away, question: what is it? answer: maybe so.")
    L = len(ids) + 1  # one window: <s> + the whole text
    model = tiny_model(tok)
    overfit(model, [tok.bos_id] + ids, steps=100)
    r = ev.perplexity(model, ids, L, tok.bos_id)
    assert r["windows"] == 1 and r["tokens"] == len(ids) and r["ppl"] < 1.5
    r = ev.perplexity(tiny_model(tok, seed=3), ids * 5, 11, tok.bos_id)  # random: about uniform
    assert r["windows"] == len(ids) * 5 // 10 and r["tokens"] == 10 * r["windows"]
    assert abs(r["ppl"] / tok.vocab_size - 1) < 0.2
    assert r["ppl"] == pytest.approx(np.exp(r["nll"]))


# ----------------------------------------------------------------------------- end to end

def write_task(folder, name, rows):
    for split, part in (("train", rows[:10]), ("test", rows[10:])):
        data.write_jsonl(os.path.join(folder, name, f"{split}.jsonl"), part)


def fake_checkpoint(tmp_path, tok, step=2):
    out = tmp_path / "out"
    ckpt = out / f"ckpt-{step:06d}"
    tiny_model(tok, seed=5, max_seq_len=512).save_pretrained(str(ckpt))
    shutil.copy(tok.path, ckpt / "tokenizer.model")
    json.dump(dict(init="scratch", seed=5, seq_len=256, eval_data=str(tmp_path / "tasks"), tokenizer=tok.path,
                   lora_rank=0, lora_alpha=32, lora_dropout=0.0, lora_targets=["wq"]), open(ckpt / "config.json", "w"))
    (ckpt / "DONE").write_text("")
    os.makedirs(out / "ckpt-000009")  # newer but incomplete: never picked
    return out, ckpt


def test_main_end_to_end(tmp_path, tok, capsys):
    out, ckpt = fake_checkpoint(tmp_path, tok)
    write_task(str(tmp_path / "tasks"), "opt", examples(16, options=True))
    write_task(str(tmp_path / "tasks"), "free", examples(14, options=False))
    (tmp_path / "book.txt").write_text(" ".join(WORDS * 20))
    res = ev.main(["--ckpt", str(out), "--ks", "0,2,50,max", "--seeds", "1,2", "--ppl_file", str(tmp_path / "book.txt"),
                   "--ppl_lengths", "16,100,1024", "--device", "cpu", "--max_new_tokens", "4"])
    printed = capsys.readouterr().out
    assert "base mean" in printed and "trained worst" in printed and "perplexity of" in printed
    assert "k=50 is larger than the demonstration pool (10 examples): skipped" in printed
    saved = json.load(open(out / "eval.json"))
    assert saved == json.loads(json.dumps(res)) and saved["checkpoint"] == str(ckpt)
    assert set(saved["tasks"]) == {"opt", "free"}
    opt, free = saved["tasks"]["opt"], saved["tasks"]["free"]
    assert (opt["metric"], free["metric"], opt["n_test"], free["n_test"]) == ("accuracy", "rouge_l", 6, 4)
    assert set(opt["k"]) == {"0", "2", "50", "max"} and "skipped" in opt["k"]["50"]
    for k in ("0", "2", "max"):
        for name in ("base", "trained"):
            r = opt["k"][k][name]
            assert set(r["seeds"]) == {"1", "2"} and r["worst"] <= r["mean"] <= 1
            assert {"accuracy", "macro_f1", "shots"} <= set(r["seeds"]["1"])
            assert set(r["means"]) == {"accuracy", "macro_f1", "shots", "answer_loss"} and r["means"]["answer_loss"] > 0
            assert r["seeds"]["1"]["samples"][0]["prediction"] in ("yes", "no", "maybe so")
            assert {"rouge_l", "exact_match", "token_f1"} <= set(free["k"][k][name]["seeds"]["2"])
    assert opt["k"]["2"]["base"]["seeds"]["1"]["shots"] == 2 and opt["k"]["max"]["base"]["seeds"]["1"]["shots"] == 10
    assert saved["summary"]["2"]["trained"]["n_tasks"] == 2 and saved["summary"]["50"]["base"]["n_tasks"] == 0
    tasks_k2 = [saved["tasks"][t]["k"]["2"]["trained"]["means"]["answer_loss"] for t in ("opt", "free")]
    assert saved["summary"]["2"]["trained"]["answer_loss"] == pytest.approx(np.mean(tasks_k2))
    assert saved["timing"]["trained"]["token_speedup"] > 1
    ppl = saved["perplexity"]
    assert ppl["16"]["base"]["ppl"] > 1 and ppl["100"]["trained"]["windows"] >= 1
    assert "max_seq_len=512" in ppl["1024"]["skipped"]


def test_clear_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint"):
        ev.find_checkpoint(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty" / "ckpt-000100")  # no DONE: incomplete
    with pytest.raises(FileNotFoundError, match="empty: no complete checkpoint"):
        ev.find_checkpoint(str(tmp_path / "empty"))
    out, ckpt = fake_checkpoint(tmp_path, tok)
    assert ev.find_checkpoint(str(out)) == str(ckpt) == ev.find_checkpoint(str(ckpt))
    os.remove(ckpt / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model: tokenizer not found"):
        ev.load_models(str(out), "cpu", torch.float32)


def test_scratch_base_is_the_untrained_init(tmp_path, tok):
    out, _ = fake_checkpoint(tmp_path, tok)
    base, trained, _, config = ev.load_models(str(out), "cpu", torch.float32)
    x = torch.tensor([[1, 5, 9, 4]])
    ref = tiny_model(tok, seed=5, max_seq_len=512)
    assert torch.equal(base(x), Transformer(ref.args).init_weights(5)(x)) and torch.equal(trained(x), ref(x))
    assert config["seq_len"] == 256


def write_ckpt(ckpt, tok, config):
    shutil.copy(tok.path, ckpt / "tokenizer.model")
    json.dump(config, open(ckpt / "config.json", "w"))
    (ckpt / "DONE").write_text("")


def test_adapter_and_fine_tuned_checkpoints(tmp_path, tok):
    if not os.path.isfile(os.path.join(os.path.dirname(ev.__file__), "lora.py")):
        pytest.skip("lora.py not written yet")
    from lora import apply_lora, save_lora
    from model import PRESETS
    x = torch.tensor([[1, 5, 9, 4, 7]])
    base_dir = tmp_path / "base"
    base = tiny_model(tok, seed=7)
    base.save_pretrained(str(base_dir))

    def adapter(model, ckpt):
        tuned = apply_lora(model, 4, 8, targets=["wq", "w2"])
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        save_lora(tuned, str(ckpt / "lora.safetensors"))
        return tuned

    # LoRA on a pretrained base: the base is that model, the trained one has the adapter merged
    ckpt = tmp_path / "out" / "ckpt-000001"
    tuned = adapter(tiny_model(tok, seed=7), ckpt)
    config = dict(init=str(base_dir), seed=0, seq_len=64, lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["wq", "w2"])
    write_ckpt(ckpt, tok, config)
    b, t, _, _ = ev.load_models(str(tmp_path / "out"), "cpu", torch.float32)
    assert torch.equal(b(x), base(x)) and torch.allclose(t(x), tuned(x), atol=1e-5)
    json.dump(dict(config, lora_rank=8), open(ckpt / "config.json", "w"))
    with pytest.raises(ValueError, match="lora.safetensors: LoRA rank is 4 in the file but 8 in the model"):
        ev.load_models(str(ckpt), "cpu", torch.float32)

    # LoRA on a scratch model (train.py allows it): the base is the preset's init with the seed
    ckpt = tmp_path / "scratch_lora" / "ckpt-000003"
    args = ModelArgs(**{**PRESETS["tiny"], "vocab_size": tok.vocab_size})
    tuned = adapter(Transformer(args).init_weights(11), ckpt)
    write_ckpt(ckpt, tok, dict(config, init="scratch", preset="tiny", seed=11))
    b, t, _, _ = ev.load_models(str(ckpt), "cpu", torch.float32)
    assert torch.equal(b(x), Transformer(args).init_weights(11)(x)) and torch.allclose(t(x), tuned(x), atol=1e-5)

    # every weight fine-tuned from a pretrained base: full weights in the checkpoint
    ckpt = tmp_path / "full" / "ckpt-000002"
    tiny_model(tok, seed=8).save_pretrained(str(ckpt))
    write_ckpt(ckpt, tok, dict(config, lora_rank=0))
    b, t, _, _ = ev.load_models(str(ckpt), "cpu", torch.float32)
    assert torch.equal(b(x), base(x)) and torch.equal(t(x), tiny_model(tok, seed=8)(x))
    b, t, _, _ = ev.load_models(str(ckpt), "cpu", torch.float32, base=False)
    assert b is None and t is not None
