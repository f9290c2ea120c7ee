import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import data
import eval as ev
import inference
from checkpoints import save_model
from data import Tokenizer, encode_example, pack
from model import ModelArgs, Transformer
from suite import train_tokenizer

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


def test_ks_and_seeds_read_in_the_order_given():
    """--ks and --seeds keep the user's order: the k-sweep table's rows and the seeds' columns."""
    assert ev.parse_ks("0,1,4,16,max") == [0, 1, 4, 16, "max"] and ev.parse_ks("32,2") == [32, 2]
    assert ev.parse_ints("100,13,21") == [100, 13, 21]


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
    prompt = pack(enc, tok.bos_id)[0] + q.input_after(len(enc)) + q.answer
    full = "the cat sat\nyes\n\n\na dog ran far\nno\n\n\nred\nmaybe so\n\n\nwhat is it\nans\n"
    assert prompt == tok.encode(full, bos=True) == pack(enc + [q], tok.bos_id)[0]
    assert pack([], tok.bos_id)[0] + q.input_after(0) + q.answer == tok.encode("what is it\nans\n", bos=True)
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


def test_option_rules_rank_by_summed_or_mean_span_loss(tok):
    """accuracy ranks options by the summed loss of "⏎ option ⏎" (the option's probability);
    accuracy_mean by its mean per token (MetaICL). Options of 1-2 words differ in token counts, so
    the two can disagree; both must equal an argmin over the uncached reference."""
    model = random_model(tok, seed=3)
    pool = [encode_example(tok, e) for e in examples(8, options=True, seed=1)]
    raw = examples(12, options=True, seed=2)
    queries = [(ex, encode_example(tok, ex)) for ex in raw]
    prefix = pack(pool[:4], tok.bos_id)[0]
    want = {}
    for rule in ("sum", "mean"):
        preds = []
        for ex, q in queries:
            losses = inference.score_options_uncached(model, prefix, [(q.input_after(4), o) for o in q.options], reduction=rule)
            preds.append(ex["options"][int(np.argmin(losses))])
        want[rule] = np.mean([p == ex["output"] for p, (ex, _) in zip(preds, queries)])
    assert len({len(o) for _, q in queries for o in q.options}) > 1  # spans of different lengths
    for rule in ("sum", "mean"):
        res, _ = ev.evaluate_prompt(model, inference.new_cache(model, 1024), pool[:4], queries, tok, 64, 4, option_score=rule)
        assert res["accuracy_sum"] == pytest.approx(want["sum"]) and res["accuracy_mean"] == pytest.approx(want["mean"])
        assert res["accuracy"] == res[f"accuracy_{rule}"]


def span_nll(model, prompt, answer):
    """Summed NLL of `answer` after `prompt`, by hand: one plain forward, log_softmax, a loop."""
    logp = torch.log_softmax(model(torch.tensor(prompt + answer)[None])[0].double(), dim=-1)
    return -sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(answer))


def test_option_rules_pick_per_query_where_they_disagree(tok):
    """Options of one token and of many: their summed loss favours the short one, their mean per
    token need not. Each query's prediction under each rule must be the argmin of a hand-computed
    summed (or per-token mean) NLL of "⏎ option ⏎"; the data are chosen so the rules disagree."""
    model = random_model(tok, seed=4)
    options = ["no", "the big red dog ran far away on a mat", "maybe so"]
    pool = [encode_example(tok, e) for e in examples(6, options=True, seed=1)]
    raw = [dict(ex, options=options, output=options[i % 3]) for i, ex in enumerate(examples(10, options=True, seed=5))]
    queries = [(ex, encode_example(tok, ex)) for ex in raw]
    prefix = pack(pool[:3], tok.bos_id)[0]
    cache, disagree = inference.new_cache(model, 1024), 0
    for ex, q in queries:
        spans = [q.options[i] for i in range(len(options))]
        nll = np.array([span_nll(model, prefix + q.input_after(3), y) for y in spans])
        want = {"sum": options[int(np.argmin(nll))], "mean": options[int(np.argmin(nll / [len(y) for y in spans]))]}
        disagree += want["sum"] != want["mean"]
        for rule in ("sum", "mean"):
            res, _ = ev.evaluate_prompt(model, cache, pool[:3], [(ex, q)], tok, 64, 4, option_score=rule)
            assert res["samples"][0]["prediction"] == want[rule], (ex["input"], rule)
            assert res["accuracy"] == float(want[rule] == ex["output"])
            assert res["accuracy_sum"] == float(want["sum"] == ex["output"])
            assert res["accuracy_mean"] == float(want["mean"] == ex["output"])
    assert 2 <= disagree <= len(queries) - 2, disagree  # the two rules differ on some queries, not all


def test_stratified_demonstrations(tok):
    pool = [encode_example(tok, dict(input=str(i), output="yes" if i % 5 else "no", options=["yes", "no"])) for i in range(40)]
    demos, _ = ev.draw_demos(pool, 8, 13, 10_000, 5, shots="stratified")
    assert sum(d.answer == pool[0].answer for d in demos) == 4  # 4 "no" of 8 although the pool holds 8 in 40
    assert ev.draw_demos(pool, 8, 13, 10_000, 5)[0] == [pool[i] for i in np.random.default_rng(13).permutation(40)[:8]]


# ----------------------------------------------------------------------------- cached scoring

@pytest.mark.parametrize("options", [True, False])
def test_answer_loss_is_the_gold_answers_loss(tok, options):
    model = random_model(tok)
    pool = [encode_example(tok, e) for e in examples(5, options=options, seed=1)]
    queries = [(ex, encode_example(tok, ex)) for ex in examples(4, options=options, seed=2)]
    res, _ = ev.evaluate_prompt(model, inference.new_cache(model, 1024), pool[:3], queries, tok, 64, 4)
    ref = inference.score_options_uncached(model, pack(pool[:3], tok.bos_id)[0],
                                    [(q.input_after(3), q.answer) for _, q in queries], reduction="mean")
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
    _, stats = ev.evaluate_prompt(model, inference.new_cache(model, 2048), pool, queries, tok, 256, 4)
    inputs = [q.input_after(len(pool)) for _, q in queries]
    gold = sum(len(x) + len(q.answer) for x, (_, q) in zip(inputs, queries))
    if options:
        segments = sum(len(x) + len(o) for x, (_, q) in zip(inputs, queries) for o in q.options)
        assert sum(embedded) == len(prefix) + segments + gold == stats["tokens_forwarded"]
    else:  # generation feeds at most 4 new tokens per query after its input
        assert len(prefix) + gold < sum(embedded) <= len(prefix) + gold + sum(map(len, inputs)) + 2 * 4


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
    # against a hand loop: each window <s> + 10 tokens of the text, every token scored from full
    # logits; the tail shorter than a window left out
    text = ids * 5
    windows = torch.tensor([[tok.bos_id] + text[w * 10:(w + 1) * 10] for w in range(len(text) // 10)])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(tok, seed=3)(windows).double(), dim=-1)  # (windows, 11, vocab)
    nll = -sum(logp[w, t, windows[w, t + 1]].item() for w in range(len(windows)) for t in range(10))
    n = 10 * len(windows)
    assert r["tokens"] == n and r["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    trained = tiny_model(tok)
    overfit(trained, [tok.bos_id] + ids[:20], steps=30)  # far from uniform: a wrong position or window shows
    r = ev.perplexity(trained, ids * 2, 21, tok.bos_id)
    windows = [[tok.bos_id] + (ids * 2)[w * 20:(w + 1) * 20] for w in range(len(ids) * 2 // 20)]
    with torch.no_grad():
        nll = [-torch.log_softmax(trained(torch.tensor(x)[None])[0].double(), -1)[range(20), x[1:]].sum().item() for x in windows]
    assert r["windows"] == len(windows) and r["nll"] == pytest.approx(sum(nll) / (20 * len(windows)), rel=1e-5)


def test_forgetting_scores_a_text_of_exactly_one_window(tok, tmp_path, capsys):
    """A text of L-1 tokens is one window of length L (<s> first); one token fewer is skipped with a
    note, as is a length above the model's max_seq_len."""
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on a mat and the dog ran far away")
    n, model = len(tok.encode(path.read_text())), tiny_model(tok, max_seq_len=64)
    out = ev.forgetting({"base": model}, tok, str(path), [n + 1, n + 2, 128])
    assert out[str(n + 1)]["base"] == ev.perplexity(model, tok.encode(path.read_text()), n + 1, tok.bos_id)
    assert out[str(n + 1)]["base"]["windows"] == 1
    assert out[str(n + 2)] == dict(skipped=f"{path} has only {n} tokens, fewer than a window of {n + 2}")
    assert out["128"] == dict(skipped="length 128 is above the model's max_seq_len=64")
    assert "skipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end

def write_task(folder, name, rows):
    for split, part in (("train", rows[:10]), ("test", rows[10:])):
        data.write_jsonl(os.path.join(folder, name, f"{split}.jsonl"), part)


def fake_checkpoint(tmp_path, tok, step=2):
    out = tmp_path / "out"
    ckpt = out / f"ckpt-{step:06d}"
    save_model(tiny_model(tok, seed=5, max_seq_len=512), str(ckpt))
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
            assert set(r["means"]) == {"accuracy", "accuracy_sum", "accuracy_mean", "macro_f1", "shots", "answer_loss"}
            assert r["means"]["answer_loss"] > 0 and r["means"]["accuracy"] == r["means"]["accuracy_sum"]  # the default
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


def test_bad_eval_inputs_are_named_before_any_scoring(tmp_path, tok, capsys):
    """A task whose test rows mix option and free-form answers; a --ppl_file that is not there and
    a --seq_len past the model's max_seq_len (refused before the k sweep, not after it); a checkpoint
    whose tokenizer has more pieces than the model has embeddings. Each is a message naming the
    task, the file or the setting."""
    rows = examples(4, options=True) + examples(4, options=False, seed=1)
    with pytest.raises(ValueError, match="task 'mixed': some test examples have options and some do not"):
        ev.encode_eval_task("mixed", examples(6, options=True, seed=2), rows, tok, 256)
    out, ckpt = fake_checkpoint(tmp_path, tok)
    write_task(str(tmp_path / "tasks"), "opt", examples(16, options=True))
    missing = str(tmp_path / "no_book.txt")
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such text file for --ppl_file"):
        ev.main(["--ckpt", str(out), "--ks", "0", "--seeds", "1", "--ppl_file", missing, "--device", "cpu"])
    assert "evaluating" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="seq_len=1024 is above the model's max_seq_len=512"):
        ev.main(["--ckpt", str(out), "--ks", "0", "--seeds", "1", "--seq_len", "1024", "--device", "cpu"])
    assert "evaluating" not in capsys.readouterr().out
    small = ModelArgs(**{**tiny_model(tok).args.__dict__, "vocab_size": tok.vocab_size - 10})
    save_model(Transformer(small).init_weights(0), str(ckpt))
    with pytest.raises(ValueError, match=f"{ckpt}/tokenizer.model: {tok.vocab_size} tokens, the model has only {tok.vocab_size - 10}"):
        inference.load_models(str(out), "cpu", torch.float32, base=False)


def test_a_query_that_fits_only_with_no_demonstrations_is_left_out(tok, capsys):
    """After demonstrations a query's input follows the separator, a token or more longer than
    after <s>: a query that fills seq_len at k=0 cannot be scored at k>=1, and is left out with a note."""
    rows = examples(3, options=False, seed=4)
    queries = [encode_example(tok, ex) for ex in rows]
    assert all(ev.answer_room([q], 1) > ev.answer_room([q], 0) for q in queries)
    longest = max(queries, key=lambda q: ev.answer_room([q], 1))
    seq_len = 1 + ev.answer_room([longest], 0)
    kept = [q for q in queries if 1 + ev.answer_room([q], 1) <= seq_len]
    assert 0 < len(kept) < len(queries)
    _, fits = ev.encode_eval_task("t", examples(6, options=False, seed=5), rows, tok, seq_len)
    assert [q for _, q in fits] == kept
    assert f"note: task 't': {len(queries) - len(kept)} test queries longer than seq_len={seq_len} left out" in capsys.readouterr().out


def test_table_has_three_decimals(capsys):
    # a loss of 2.58745 +- 1e-8 (float sums in another order on another CPU) prints the same, so a
    # fresh clone anywhere prints the README's table exactly
    row = lambda loss: dict(n_tasks=1, mean=0.5, worst=0.25, answer_loss=loss, macro_f1=None)
    printed = []
    for loss in (2.58744999, 2.58745001):
        ev.print_tables(dict(summary={"max": dict(base=row(loss))}, tasks={}), ["base"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "2.587" in printed[0] and "0.500" in printed[0] and "-" in printed[0].splitlines()[-1]
