"""Values against rules written here: eval.py and sample.py score and answer exactly the training
sequence (options by their answer span's loss, free-form by greedy decoding), k=max fills as
data.fill does, metrics and the sweep's mean / worst are hand-counted, sampling follows the
temperature, and a LoRA checkpoint loads as W + (alpha / rank) B A. sample.py is a command line,
run with runpy (no file imports it). The fixtures are test_values_train.py's."""
import json
import math
import os
import runpy
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import data
import eval as ev
from checkpoints import load_model, save_model
from data import encode_example, pack, targets_for
from inference import load_models, new_cache, pick
from lora import apply_lora
from model import ModelArgs, Transformer
from test_values_train import WORDS, env, rows, spy  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_main(argv):
    """sample.py's main, from running the file as it stands."""
    return runpy.run_path(os.path.join(ROOT, "sample.py"))["main"](argv)


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
    res, _ = ev.evaluate_prompt(model, new_cache(model, 512), [encode_example(tok, d) for d in demos], queries,
                                tok, 64, 4, option_score="sum")
    preds = [ex["options"][int(np.argmin([span_loss(model, tok, demos, ex, o) for o in ex["options"]]))] for ex in raw]
    assert [s["prediction"] for s in res["samples"]] == preds
    assert res["accuracy"] == pytest.approx(np.mean([p == ex["output"] for p, ex in zip(preds, raw)]))
    gold = [span_loss(model, tok, demos, ex, ex["output"], "mean") for ex in raw]
    assert res["answer_loss"] == pytest.approx(np.mean(gold), rel=1e-4)
    assert res["shots"] == k and res["prefix_tokens"] == (len(training_sequence(tok, demos)[0]) if k else 1)
    free = eval_rows(3, False, 3)
    res, _ = ev.evaluate_prompt(model, new_cache(model, 512), [encode_example(tok, d) for d in demos],
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
    sample_main(["--ckpt", ckpt, "--demos", str(tmp_path / "demos.jsonl"), "--k", k, "--queries", str(tmp_path / "q.jsonl"),
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
    seeds, seq_len = [1, 2, 3], 120
    for name, options in (("opt", True), ("free", False)):
        pool, test = eval_rows(30, options, 7), eval_rows(6, options, 8)
        raw[name] = (pool, test)
        tasks[name] = {s: ([encode_example(tok, e) for e in pool], [(ex, encode_example(tok, ex)) for ex in test], None)
                       for s in seeds}
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


def test_k_demonstrations_that_exactly_fill_the_context_are_kept(env):
    """k shots plus room for the longest query and answer may fill seq_len to the last token; one
    token fewer and they are refused, with the numbers."""
    tok = env["tok"]
    pool = [encode_example(tok, e) for e in eval_rows(6, True, 4)]
    demos = [pool[i] for i in np.random.default_rng(5).permutation(6)[:3]]
    length = len(data.pack(demos, 0)[0])
    assert ev.draw_demos(pool, 3, 5, length + 8, 8) == (demos, None)
    demos, why = ev.draw_demos(pool, 3, 5, length + 7, 8)
    assert demos is None and f"take {length} tokens, plus 8" in why and f"seq_len={length + 7}" in why


def test_a_file_without_a_split_never_lends_test_rows(env, tmp_path):
    """{task}.jsonl alone would be both demonstration pool and test set: refused. Split files give the
    pool from train and the queries from test, never one for the other."""
    tok = env["tok"]
    data.write_jsonl(str(tmp_path / "plain" / "copa.jsonl"), eval_rows(10, True, 1))
    with pytest.raises(ValueError, match="copa.*the same examples would be demonstrations and test set"):
        ev.load_eval_tasks([str(tmp_path / "plain")], tok, 256, [1, 2])
    pool = [dict(r, input=f"pool {i}") for i, r in enumerate(eval_rows(6, True, 2))]
    test = [dict(r, input=f"test {i}") for i, r in enumerate(eval_rows(4, True, 3))]
    for layout in ("rte/{split}.jsonl", "sst2_16_100_{split}.jsonl"):
        for split, part in (("train", pool), ("test", test)):
            data.write_jsonl(str(tmp_path / "split" / layout.format(split=split)), part)
    tasks = ev.load_eval_tasks([str(tmp_path / "split")], tok, 256, [1, 2])
    assert set(tasks) == {"rte", "sst2"}
    for by_seed in tasks.values():  # one pool and one test set, for every seed
        assert set(by_seed) == {1, 2}
        for demos, queries, pool_file in by_seed.values():
            assert [tok.decode(d.input_after_bos) for d in demos] == [r["input"] for r in pool] and pool_file is None
            assert [ex["input"] for ex, _ in queries] == [r["input"] for r in test]


def test_free_form_metrics_by_hand(env, monkeypatch):
    """Predictions are the decoded generation, stripped; exact match, ROUGE-L and token F1 are their
    means over queries (values worked out on paper)."""
    tok, model = env["tok"], sharp_model(env)
    golds = ["red cat", "the big dog", "yes"]
    said = ["red cat", "The Dog!", "ye"]
    monkeypatch.setattr(ev, "generate", lambda *a, **kw: [tok.encode_continuation("\n" + s) for s in said])
    queries = [(ex, encode_example(tok, ex)) for ex in (dict(input=f"q {i}", output=g, options=[]) for i, g in enumerate(golds))]
    res, _ = ev.evaluate_prompt(model, new_cache(model, 512), [], queries, tok, 64, 4)
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
    sample_main(["--ckpt", ckpt, "--demos", str(tmp_path / "demos.jsonl"), "--k", "2", "--queries", str(tmp_path / "q.jsonl"),
                 "--reduction", reduction, "--device", "cpu"])
    got = [line.split("\t")[1] for line in capsys.readouterr().out.split("\n")[:-1]]
    want = {r: [options[int(np.argmin([span_loss(model, tok, demos[:2], q, o, r) for o in options]))] for q in queries]
            for r in ("sum", "mean")}
    assert got == want[reduction]
    assert want["sum"] != want["mean"]  # the rules disagree on some queries here


def test_sampling_frequencies_follow_temperature_and_top_k():
    """inference.pick (sample.py's sampling): greedy at temperature 0; else softmax(logits / T) over
    the top_k logits only."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    assert pick(logits) == [0]
    n = 20000
    g = torch.Generator().manual_seed(0)
    for T, top_k in ((0.5, 3), (2.0, None), (1.0, 2)):
        drawn = Counter(pick(logits.expand(n, -1), T, top_k, g))
        keep = torch.ones(5, dtype=torch.bool) if top_k is None else logits[0] >= logits[0].sort(descending=True).values[top_k - 1]
        p = torch.where(keep, (logits[0].double() / T).exp(), torch.zeros(5, dtype=torch.float64))
        p = (p / p.sum()).tolist()
        for i in range(5):
            assert abs(drawn[i] - n * p[i]) <= 5 * math.sqrt(n * p[i] * (1 - p[i])) + (0 if p[i] else 0.5), (T, top_k, i, drawn, p)


# ----------------------------------------------------------------------------- LoRA: as trained, as loaded


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


def test_max_test_takes_a_label_balanced_subset(env):
    """--max_test on an option task: as many queries of each label as the file allows, in file
    order (a file's first rows, here 27 of one label, would reward naming that label). The suite's
    test sets are cut by the same rule."""
    rows = [dict(input=str(i), output="yes" if i < 27 or i >= 59 else "no", options=["yes", "no"]) for i in range(64)]
    picked = data.label_balanced(rows, 32)
    assert [r["input"] for r in picked] == [str(i) for i in list(range(16)) + list(range(27, 43))]
    assert [r["output"] for r in picked].count("no") == 16
    _, queries = ev.encode_eval_task("t", rows[:4], rows, env["tok"], 64, max_test=32)
    assert [ex for ex, _ in queries] == picked  # what eval.py scores
    few_no = [dict(r, output="no" if 27 <= i < 31 else "yes") for i, r in enumerate(rows)]  # 4 "no" in 64
    assert [r["output"] for r in data.label_balanced(few_no, 10)].count("no") == 4  # all of the rarer label, then the rest
    free = [dict(r, options=[]) for r in rows]
    assert data.label_balanced(free, 5) == free[:5] and data.label_balanced(rows, None) == rows == data.label_balanced(rows, 64)
