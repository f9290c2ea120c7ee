"""sample.py, the command line: its answers against eval.py's and against plain re-encoding, the
prefix cache file, adapters, and its messages. The script is run, never imported."""
import json
import os
import runpy
import shutil

import numpy as np
import pytest
import torch

import inference
from checkpoints import save_model
from data import encode_example, pack
from test_eval import examples, fake_checkpoint, random_model, tiny_model, tok  # noqa: F401 (tok: a fixture)
from test_inference import naive_generate, write_ckpt
from test_train import ROOT


def sample_script():
    """sample.py's functions, from running the file as it stands (no file imports a command line)."""
    return runpy.run_path(os.path.join(ROOT, "sample.py"))


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("flag,message", [("--k=-1", "--k=-1: must be at least 0"),
                                          ("--temperature=-0.5", "--temperature=-0.5: must be at least 0"),
                                          ("--top_k=0", "--top_k=0: must be at least 1")])
def test_bad_sampling_values_are_refused(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as e:  # before any checkpoint is read
        sample_script()["main"](["--ckpt", str(tmp_path / "nowhere"), "--demos", "d.jsonl", "--prompt", "x", flag])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_k_demonstrations_leave_a_token_for_the_query(tok):
    """--k=K takes the first K demonstrations, and the context must still hold a query after them:
    K that fill seq_len exactly are refused by name, as K that overflow it are."""
    choose = sample_script()["choose_demos"]
    pool = [encode_example(tok, e) for e in examples(4, options=False, seed=3)]
    packed = len(pack(pool[:2], tok.bos_id)[0])
    assert choose(iter(pool), 2, packed + 1, 1) == pool[:2]
    for seq_len in (packed, packed - 1):
        with pytest.raises(ValueError, match=f"k=2 demonstrations do not fit in seq_len={seq_len}"):
            choose(iter(pool), 2, seq_len, 1)
    with pytest.raises(ValueError, match="k=5: there are only 4 demonstrations"):
        choose(iter(pool), 5, 10_000, 1)
    three = len(pack(pool[:3], tok.bos_id)[0])  # k=max leaves `room` tokens free: here the third's length
    assert choose(iter(pool), "max", three, three - packed) == pool[:2]
    assert choose(iter(pool), "max", three + 1, 1) == pool[:3]


def test_query_files_are_read_line_by_line(tmp_path):
    """Blank lines are passed over; a line that is not an object with an input string and a list of
    string options is refused, naming the file and the line."""
    read = sample_script()["read_queries"]
    path = tmp_path / "q.jsonl"
    path.write_text('{"input": "a"}\n\n{"input": "b", "options": ["x", "y"]}\n')
    a = lambda: type("Args", (), dict(prompt=None, queries=str(path)))
    assert list(read(a())) == [{"input": "a"}, {"input": "b", "options": ["x", "y"]}]
    for bad in ('{"input": "c", "options": [1, 2]}', '{"options": ["x"]}', '["c"]', "not json"):
        path.write_text('{"input": "a"}\n\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"{path}:3: expected a JSON object with an 'input' string"):
            list(read(a()))


def task_files(tmp_path, tok):
    """A fake checkpoint, demonstrations, and queries: free-form ones and ones with options."""
    out, ckpt = fake_checkpoint(tmp_path, tok)
    demos = examples(12, options=False, seed=7)
    sample_dir = tmp_path / "t"
    os.makedirs(sample_dir, exist_ok=True)
    for name, rows in (("train", demos), ("free", examples(3, options=False, seed=8)), ("opt", examples(3, options=True, seed=9))):
        with open(sample_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out, ckpt, demos, str(sample_dir)


def answers(capsys, argv):
    sample_script()["main"](argv)
    return [line.split("\t") for line in capsys.readouterr().out.split("\n")[:-1]]  # not splitlines: answers may hold \x1c


def counting_embeddings(monkeypatch):
    """Tokens the loaded model embeds, i.e. forwards (the prefix included when it is encoded); the
    script imports load_models afresh on every run, so it gets the counting one."""
    embedded, load = [], inference.load_models
    def counted(*a, **kw):
        base, model, tok, config = load(*a, **kw)
        model.tok_embeddings.register_forward_hook(lambda m, inp, out: embedded.append(inp[0].numel()))
        return base, model, tok, config
    monkeypatch.setattr(inference, "load_models", counted)
    return embedded


def test_sample_answers_equal_evals(tmp_path, tok, capsys, monkeypatch):
    import eval as ev
    out, ckpt, demos, d = task_files(tmp_path, tok)
    common = ["--ckpt", str(out), "--demos", f"{d}/train.jsonl", "--k", "5", "--max_new_tokens", "6", "--device", "cpu"]
    free = answers(capsys, common + ["--queries", f"{d}/free.jsonl"])
    _, model, _, _ = inference.load_models(str(out), "cpu", torch.float32, base=False)
    queries = [(ex, encode_example(tok, ex)) for ex in examples(3, options=False, seed=8)]
    res, _ = ev.evaluate_prompt(model, inference.new_cache(model, 256), [encode_example(tok, e) for e in demos[:5]],
                                queries, tok, 2048, 6)
    assert free == [[s["input"], s["prediction"].replace("\n", " ")] for s in res["samples"]]
    # options: the one whose answer span has the lowest summed loss, re-encoding every prompt from scratch
    opt = answers(capsys, common + ["--queries", f"{d}/opt.jsonl"])
    prefix = pack([encode_example(tok, e) for e in demos[:5]], tok.bos_id)[0]
    for (inp, got), ex in zip(opt, examples(3, options=True, seed=9)):
        q = encode_example(tok, ex)
        losses = inference.score_options_uncached(model, prefix, [(q.input_after_separator, o) for o in q.options],
                                                  reduction="sum")
        assert inp == ex["input"] and got == ex["options"][int(np.argmin(losses))]
    # --reduction=mean: per token, where a long option can win (options of very different lengths)
    rows = [dict(input=ex["input"], options=["yes", "yes no " * 6 + "yes"]) for ex in examples(6, options=True, seed=10)]
    with open(f"{d}/long.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    by_rule = {rule: answers(capsys, common + ["--queries", f"{d}/long.jsonl", "--reduction", rule]) for rule in ("sum", "mean")}
    for rule, got in by_rule.items():
        for (_, answer), row in zip(got, rows):
            q = encode_example(tok, dict(row, output=row["options"][0]))
            losses = inference.score_options_uncached(model, prefix, [(q.input_after_separator, o) for o in q.options],
                                                      reduction=rule)
            assert answer == row["options"][int(np.argmin(losses))]
    assert by_rule["sum"] != by_rule["mean"]  # the two rules disagree here, so each is tested
    # --prompt, and inputs from stdin
    assert answers(capsys, common + ["--prompt", free[1][0]]) == [free[1]]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(free[2][0] + "\n" + free[0][0] + "\n"))
    assert answers(capsys, common) == [free[2], free[0]]


def test_prefix_cache_round_trip(tmp_path, tok, capsys, monkeypatch):
    out, ckpt, demos, d = task_files(tmp_path, tok)
    cache = str(tmp_path / "t.prefix.safetensors")
    common = ["--ckpt", str(out), "--demos", f"{d}/train.jsonl", "--queries", f"{d}/free.jsonl", "--max_new_tokens", "6",
              "--device", "cpu", "--seq_len", "200", "--room", "40"]
    embedded = counting_embeddings(monkeypatch)
    plain = answers(capsys, common)
    n_plain = sum(embedded)
    first = answers(capsys, common + ["--cache", cache])  # encodes the prefix, writes the file
    assert os.path.isfile(cache) and not os.path.exists(cache + ".tmp")
    n_first = sum(embedded) - n_plain
    second = answers(capsys, common + ["--cache", cache])  # reads it
    n_second = sum(embedded) - n_plain - n_first
    k_max = sample_script()["choose_demos"]([encode_example(tok, e) for e in demos], "max", 200, 40)
    prefix = pack(k_max, tok.bos_id)[0]
    assert 0 < len(k_max) < len(demos) and plain == first == second
    assert n_first == n_plain and n_first - n_second == len(prefix)  # the prefix was not encoded again
    # made for other demonstrations, another model: refused, naming the file
    with pytest.raises(ValueError, match=f"{cache}: a prefix cache made for other demonstrations"):
        sample_script()["main"](common + ["--cache", cache, "--k", "2"])
    # as many tokens as the cached prefix, one of them different: refused too, not reused
    _, model, _, config = inference.load_models(str(out), "cpu", torch.float32, base=False)
    changed = list(prefix)
    changed[-2] = next(t for t in range(3, tok.vocab_size) if t != prefix[-2])
    with pytest.raises(ValueError, match=f"{cache}: a prefix cache made for other demonstrations .*, and differ"):
        inference.load_prefix(inference.new_cache(model, 200), cache, inference.identity(model, tok, config), changed)
    same_but_bf16 = dict(inference.identity(model, tok, config), dtype=str(torch.bfloat16))
    with pytest.raises(ValueError, match=f"{cache}: a prefix cache made for another dtype"):
        inference.load_prefix(inference.new_cache(model, 200), cache, same_but_bf16, prefix)
    # a context past the model's max_seq_len (512 here) is refused before anything is encoded
    with pytest.raises(ValueError, match="sequence of 1024 tokens exceeds the model's max_seq_len=512"):
        sample_script()["main"](common + ["--seq_len", "1024"])
    other = tmp_path / "other"
    os.makedirs(other)
    shutil.copytree(out / "ckpt-000002", other / "ckpt-000002")
    save_model(tiny_model(tok, seed=6, max_seq_len=512), str(other / "ckpt-000002"))
    with pytest.raises(ValueError, match=f"{cache}: a prefix cache made for another model"):
        sample_script()["main"](common + ["--cache", cache, "--ckpt", str(other)])


def test_a_query_too_long_is_named_and_the_next_answered(tmp_path, tok, capsys):
    """A query that does not fit in the room the demonstrations leave: an error line for it, and the
    queries after it are answered as they would be alone."""
    out, ckpt, demos, d = task_files(tmp_path, tok)
    common = ["--ckpt", str(out), "--demos", f"{d}/train.jsonl", "--max_new_tokens", "6", "--device", "cpu",
              "--seq_len", "200", "--room", "40"]
    alone = answers(capsys, common + ["--queries", f"{d}/free.jsonl"])
    rows = [json.loads(l) for l in open(f"{d}/free.jsonl")]
    long = dict(input="a long query " * 20, output="")
    with open(tmp_path / "mixed.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [rows[0], long, rows[1]])
    sample_script()["main"](common + ["--queries", str(tmp_path / "mixed.jsonl")])
    got = capsys.readouterr()
    assert [line.split("\t") for line in got.out.split("\n")[:-1]] == [alone[0], [long["input"], ""], alone[1]]
    assert got.err.count("error: ") == 1


def test_sample_with_a_lora_adapter_on_an_hf_layout_base(tmp_path, tok, capsys):
    from lora import apply_lora, save_lora
    from test_model import write_hf
    base = random_model(tok, seed=3)
    write_hf(base, str(tmp_path / "base_hf"))
    tuned = apply_lora(base, 4, 8, targets=["wq", "w2"])
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ckpt = tmp_path / "lora_out" / "ckpt-000001"
    save_lora(tuned, str(ckpt / "lora.safetensors"))
    write_ckpt(ckpt, tok, dict(init=str(tmp_path / "base_hf"), seed=0, seq_len=128, lora_rank=4, lora_alpha=8,
                               lora_dropout=0.0, lora_targets=["wq", "w2"]))
    _, _, demos, d = task_files(tmp_path, tok)
    got = answers(capsys, ["--ckpt", str(tmp_path / "lora_out"), "--demos", f"{d}/train.jsonl", "--k", "3",
                           "--prompt", "the cat", "--max_new_tokens", "5", "--device", "cpu"])
    prompt = (pack([encode_example(tok, e) for e in demos[:3]], tok.bos_id)[0]
              + encode_example(tok, dict(input="the cat", output="")).input_after_separator)
    ref = naive_generate(tuned.eval(), prompt, tok.newline_id, tok.eos_id, 5)
    assert got == [["the cat", tok.decode(ref).strip().replace("\n", " ")]]


def test_sample_unreadable_checkpoint_is_a_message(tmp_path, tok):
    import subprocess
    import sys
    out, ckpt, _, d = task_files(tmp_path, tok)
    weights = ckpt / "consolidated.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out), "--demos", f"{d}/train.jsonl", "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"{weights}: Error while deserializing header" in p.stderr and f"checkpoint {ckpt} cannot be read" in p.stderr
    import eval as ev  # eval.py loads checkpoints with the same function: the same message
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} cannot be read"):
        ev.main(["--ckpt", str(out), "--device", "cpu"])
