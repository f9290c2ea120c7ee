"""inference.py: KV-cache inference (scores and generations against plain re-encoding, the two-part
attention against one masked softmax) and loading a trained checkpoint beside its base."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoints
import inference
from checkpoints import save_model
from data import encode_example, pack
from model import ModelArgs, Transformer
import test_model
from test_eval import examples, fake_checkpoint, overfit, random_model, tiny_model, tok  # noqa: F401 (tok: a fixture)
from test_train import ROOT

# ----------------------------------------------------------------------------- KV-cache inference

def test_kv_cache_continuation_equals_full_forward():
    m, args = test_model.tiny_model(), test_model.ARGS
    tokens = torch.randint(0, args.vocab_size, (2, 15))
    full = m(tokens)
    cache = inference.KVCache(args, 2, 32, "cpu", torch.float32)
    parts = [m(tokens[:, :9], cache=cache), m(tokens[:, 9:10], cache=cache), m(tokens[:, 10:], cache=cache)]
    assert cache.length == 15
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    cache.length = 9  # rewind to the prefix and continue differently: still exact
    assert (m(tokens[:, 9:], cache=cache) - full[:, 9:]).abs().max() < 1e-5


def test_a_cache_fills_the_model_to_max_seq_len_and_no_further(tok):
    """With a cache, the last position a model may reach is max_seq_len - 1: the token there sees
    max_seq_len positions, as a full sequence of that length would. One more is refused."""
    model, n = tiny_model(tok, seed=2, max_seq_len=16), 16
    ids = torch.randint(3, tok.vocab_size, (1, n + 1))
    cache = inference.KVCache(model.args, 1, n + 4, "cpu", torch.float32)
    with torch.no_grad():
        model(ids[:, : n - 1], cache=cache)
        assert torch.allclose(model(ids[:, n - 1:n], cache=cache)[0, -1], model(ids[:, :n])[0, -1], atol=1e-5)
        with pytest.raises(ValueError, match="17 tokens exceeds the model's max_seq_len=16"):
            model(ids[:, n:], cache=cache)


def test_prefill_of_short_prefixes_and_batches_filled_to_the_budget(tok):
    """prefill's logits after a prefix of 1, 2 or 5 tokens are a plain forward's last ones; and
    batches() packs consecutive segments up to the token budget exactly (a bigger one goes alone)."""
    model = tiny_model(tok, seed=2)
    ids = list(np.random.default_rng(1).integers(3, tok.vocab_size, 5))
    with torch.no_grad():
        for n in (1, 2, 5):
            got = inference.prefill(model, inference.new_cache(model, 16), ids[:n])
            torch.testing.assert_close(got, model(torch.tensor(ids[:n])[None])[0, -1], atol=1e-5, rtol=1e-5)
    assert list(inference.batches([2, 2, 3, 9, 1], 4)) == [[0, 1], [2], [3], [4]]


def test_a_prefill_cut_short_leaves_no_prefix_behind(tok):
    """A cache whose prefill of another prefix stopped partway (an error, a Ctrl-C in a notebook)
    holds some of that prefix's keys: it must not pass for the old prefix, which is encoded again."""
    model = tiny_model(tok, seed=2)
    rng = np.random.default_rng(3)
    a, b = (list(rng.integers(3, tok.vocab_size, 10)) for _ in range(2))
    segment = [([5, 6], [7, 8, 9])]
    fresh = inference.score_options(model, a, segment, cache=inference.new_cache(model, 32))
    cache = inference.new_cache(model, 32)
    inference.prefill(model, cache, a)
    def stop(*_):
        raise KeyboardInterrupt
    hook = model.layers[1].register_forward_pre_hook(stop)  # layer 0 has written b's keys by then
    with pytest.raises(KeyboardInterrupt):
        inference.prefill(model, cache, b)
    hook.remove()
    assert inference.score_options(model, a, segment, cache=cache) == pytest.approx(fresh, abs=1e-6)


def test_a_prefix_must_leave_a_token_of_room(tok):
    """A prefix is encoded to be followed by a query: one that fills the cache is refused by name,
    one a token shorter is encoded. After it, a segment or an input that does not fit is refused."""
    model = tiny_model(tok, seed=2)
    prefix = list(np.random.default_rng(0).integers(3, tok.vocab_size, 12))
    with torch.no_grad():
        inference.prefill(model, inference.new_cache(model, 13), prefix)
        with pytest.raises(ValueError, match="prefix of 12 tokens leaves no room in a cache of 12"):
            inference.prefill(model, inference.new_cache(model, 12), prefix)
        # and after a prefix, a segment to score or an input to continue must fit in what is left
        cache = inference.new_cache(model, 16)
        with pytest.raises(ValueError, match="a segment of 5 tokens does not fit after a prefix of 12 \\(cache of 16\\)"):
            inference.score_options(model, prefix, [([5, 6], [7, 8, 9])], cache=cache)
        with pytest.raises(ValueError, match="an input of 4 tokens leaves no room after a prefix of 12 \\(cache of 16\\)"):
            inference.generate(model, prefix, [[5, 6, 7, 8]], tok.newline_id, tok.eos_id, cache=cache)


@pytest.mark.parametrize("k", [0, 3])
def test_cached_scores_equal_uncached(tok, k):
    model = random_model(tok)
    pool = [encode_example(tok, e) for e in examples(5, options=False, seed=1)]
    prefix = pack(pool[:k], tok.bos_id)[0]
    queries = [encode_example(tok, dict(input=x, output="yes", options=["yes", "no", "maybe so", "the cat sat on a mat"]))
               for x in ["the cat", "a dog ran far away and on", "red", ""]]  # "" : empty input at k=0
    segments = [(q.input_after(k), o) for q in queries for o in q.options]
    assert len({len(x) + len(o) for x, o in segments}) > 4  # lengths differ
    ref = inference.score_options_uncached(model, prefix, segments)
    for budget in (2048, 20):  # all in one row; several rows
        got = inference.score_options(model, prefix, segments, batch_tokens=budget)
        assert np.allclose(got, ref, atol=1e-4, rtol=0), (budget, np.abs(np.array(got) - ref).max())
    assert np.std(ref) > 0.1  # the options really score differently


def test_one_cache_serves_prefix_after_prefix(tok):
    """eval.py keeps one cache per model for every k and seed: a new prefix is encoded again, the
    same one reused; either way the scores are those of a fresh cache."""
    model = random_model(tok)
    pool = [encode_example(tok, e) for e in examples(6, options=False, seed=2)]
    segments = [(pool[5].input_after(3), o) for o in ([5, 9], [7], [4, 4, 4])]
    cache = inference.new_cache(model, 512)
    for demos in (pool[:3], pool[1:4], pool[1:4], pool[:3]):
        prefix = pack(demos, tok.bos_id)[0]
        got = inference.score_options(model, prefix, segments, cache=cache)
        assert np.allclose(got, inference.score_options_uncached(model, prefix, segments), atol=1e-4, rtol=0)


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
    inputs = [encode_example(tok, dict(input=x, output="a")).input_after_separator
              for x in ["the cat", "red blue green yes", "no"]]
    # A random model seldom emits a newline, so to exercise the stop rules take as "newline" a
    # token it repeats, and as eos one it emits: the three queries end in different ways.
    free = [naive_generate(model, prefix + x, -1, -1, 10) for x in inputs]
    stop = next((t for r in free for t in r if r.count(t) > 1), free[0][0])
    eos = free[2][4]
    ref = [naive_generate(model, prefix + x, stop, eos, 10) for x in inputs]
    assert min(map(len, ref)) < 10
    for budget in (2048, 12):  # one batch; several
        assert inference.generate(model, prefix, inputs, stop, eos, 10, batch_tokens=budget) == ref


def test_generation_ends_where_the_cache_does(tok):
    """A cache with room for fewer new tokens than max_new_tokens: each continuation is cut at the
    cache's end (the same tokens as far as they go), never an error."""
    model = random_model(tok, seed=1)
    prefix = pack([encode_example(tok, e) for e in examples(2, options=False, seed=2)], tok.bos_id)[0]
    inputs = [encode_example(tok, dict(input=x, output="a")).input_after_separator for x in ["the cat", "no"]]
    free = [naive_generate(model, prefix + x, -1, -1, 12) for x in inputs]  # never stops: 12 tokens each
    cache = inference.new_cache(model, len(prefix) + len(inputs[0]) + 5)
    got = inference.generate(model, prefix, inputs, -1, -1, 12, cache=cache)
    room = [cache.max_len - len(prefix) - len(x) for x in inputs]
    assert got == [f[:r] for f, r in zip(free, room)] and [len(g) for g in got] == [5, room[1]] and room[1] < 12


def test_generation_stops_at_the_closing_newline(tok):
    model = tiny_model(tok)
    q = encode_example(tok, dict(input="what is it", output="ans"))
    overfit(model, pack([q], tok.bos_id)[0], steps=80)  # <s> what is it ⏎ ans ⏎
    out = inference.generate(model, [tok.bos_id], [q.input_after_bos], tok.newline_id, tok.eos_id, max_new_tokens=10)[0]
    assert tok.decode(out).strip() == "ans" and len(out) < 10
    assert out == q.answer[:-1]  # the opening newline and the answer; the closing one ended it


def test_sum_reduction_is_the_answer_spans_log_probability(tok):
    model = random_model(tok)
    prefix = pack([encode_example(tok, e) for e in examples(3, options=False, seed=1)], tok.bos_id)[0]
    segments = [(encode_example(tok, dict(input=x, output="a")).input_after_separator,
                 encode_example(tok, dict(input="", output=o)).answer)
                for x in ("the cat", "red") for o in ("yes", "maybe so", "the cat sat on a mat")]
    mean = inference.score_options(model, prefix, segments, reduction="mean")
    total = inference.score_options(model, prefix, segments, reduction="sum")
    assert np.allclose(total, [m * len(y) for m, (_, y) in zip(mean, segments)], atol=1e-4)
    assert np.allclose(total, inference.score_options_uncached(model, prefix, segments, reduction="sum"), atol=1e-3)
    with pytest.raises(ValueError, match="reduction must be mean or sum"):
        inference.score_options(model, prefix, segments, reduction="max")


def test_whole_prompt_as_prefix_with_an_empty_input(tok):
    """A whole prompt as the shared prefix and an empty query: continued from the prefix's own last
    logits, alone or after a non-empty query in the same row."""
    model = random_model(tok, seed=2)
    prompt = pack([encode_example(tok, e) for e in examples(2, options=False, seed=3)], tok.bos_id)[0]
    prompt += encode_example(tok, dict(input="the cat", output="a")).input_after_separator
    got = inference.generate(model, prompt, [[]], -1, -1, 6)[0]
    assert got == naive_generate(model, prompt, -1, -1, 6) and len(got) == 6
    other = [5, 6, 7]
    assert inference.generate(model, prompt, [other, []], -1, -1, 6) == [naive_generate(model, prompt + other, -1, -1, 6), got]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_part_attention_equals_one_masked_softmax(dtype, device):
    """inference.cached_attention (prefix unmasked, the rest masked, merged by log-sum-exp) against
    one SDPA call over all keys with the equivalent dense mask. On a GPU this checks the fused
    kernels' log-sum-exp (flash in bf16, mem-efficient in fp32)."""
    from inference import cached_attention
    from model import repeat_kv
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, S = 1, 4, 2, 7, 16, 50
    q = (torch.randn(B, T, H, D, generator=g) * 3).transpose(1, 2).to(dtype)  # strided, as in model.py
    cache_k, cache_v = (torch.randn(B, Hkv, 64, D, generator=g) * 3).to(dtype), torch.randn(B, Hkv, 64, D, generator=g).to(dtype)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # a view of a larger cache, as in KVCache.attend
    for M in (0, 1, 12, S):
        mask = (torch.rand(T, M, generator=g) > 0.5) | torch.ones(T, M, dtype=torch.bool).tril(M - T) if M else None
        dense = torch.cat([torch.ones(T, S - M, dtype=torch.bool), mask], 1) if M else None
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), *repeat_kv(k.double(), v.double(), H), attn_mask=dense)
        got = cached_attention(q.to(device), k.to(device), v.to(device), None if mask is None else mask.to(device)).cpu()
        assert got.dtype == dtype and got.shape == ref.shape
        assert (got.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2), M


def test_masked_part_in_blocks_of_rows():
    """masked_attention_lse takes a block of rows at a time against only the columns its mask
    touches: packed segments (block-diagonal, causal), a row with nothing visible, blocks of 4."""
    from inference import masked_attention_lse
    from model import repeat_kv
    g = torch.Generator().manual_seed(1)
    H, T, D = 4, 30, 8
    q, k, v = torch.randn(1, H, T, D, generator=g), torch.randn(1, 2, T, D, generator=g), torch.randn(1, 2, T, D, generator=g)
    seg = torch.arange(T) // 7
    mask = (seg[:, None] == seg[None, :]).tril()
    mask[9] = False
    s = (q @ repeat_kv(k, v, H)[0].transpose(-1, -2) * D ** -0.5).masked_fill(~mask, float("-inf"))
    for rows in (4, 256):
        y, lse = masked_attention_lse(q, k, v, mask, rows)
        keep = torch.arange(T) != 9
        assert torch.allclose(lse[0, :, keep, 0], s.logsumexp(-1)[0, :, keep], atol=1e-5)
        assert torch.allclose(y[:, :, keep], (s.softmax(-1) @ repeat_kv(k, v, H)[1])[:, :, keep], atol=1e-5)
        assert (y[:, :, 9] == 0).all() and (lse[:, :, 9] == float("-inf")).all()


def test_top_k_1_sampling_is_greedy_and_a_seed_repeats(tok):
    model = random_model(tok, seed=4)
    prefix = pack([encode_example(tok, e) for e in examples(2, options=False, seed=5)], tok.bos_id)[0]
    inputs = [encode_example(tok, dict(input=x, output="a")).input_after_separator for x in ("the cat", "no")]
    greedy = inference.generate(model, prefix, inputs, -1, -1, 8)
    assert inference.generate(model, prefix, inputs, -1, -1, 8, temperature=1.0, top_k=1) == greedy
    hot = [inference.generate(model, prefix, inputs, -1, -1, 8, temperature=5.0, seed=s) for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]


# ----------------------------------------------------------------------------- a trained checkpoint, for use

def test_clear_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty" / "ckpt-000100")  # no DONE: incomplete
    with pytest.raises(FileNotFoundError, match="empty: no complete checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path / "empty"))
    out, ckpt = fake_checkpoint(tmp_path, tok)
    assert checkpoints.find_checkpoint(str(out)) == str(ckpt) == checkpoints.find_checkpoint(str(ckpt))
    os.remove(ckpt / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model: tokenizer not found"):
        inference.load_models(str(out), "cpu", torch.float32)


def test_the_newest_complete_checkpoint_is_found(tmp_path):
    out = str(tmp_path)
    for step, done in ((2, True), (10, True), (100, True), (300, False)):  # 300: still being written
        os.makedirs(os.path.join(out, f"ckpt-{step:06d}"))
        if done:
            open(os.path.join(out, f"ckpt-{step:06d}", "DONE"), "w").write(str(step))
    os.makedirs(os.path.join(out, ".tmp-ckpt-000400"))
    assert checkpoints.find_checkpoints(out) == [os.path.join(out, f"ckpt-{s:06d}") for s in (2, 10, 100)]
    assert checkpoints.find_checkpoint(out) == os.path.join(out, "ckpt-000100")


def test_scratch_base_is_the_untrained_init(tmp_path, tok):
    out, _ = fake_checkpoint(tmp_path, tok)
    base, trained, _, config = inference.load_models(str(out), "cpu", torch.float32)
    x = torch.tensor([[1, 5, 9, 4]])
    ref = tiny_model(tok, seed=5, max_seq_len=512)
    assert torch.equal(base(x), Transformer(ref.args).init_weights(5)(x)) and torch.equal(trained(x), ref(x))
    assert config["seq_len"] == 256


def write_ckpt(ckpt, tok, config):
    shutil.copy(tok.path, ckpt / "tokenizer.model")
    json.dump(config, open(ckpt / "config.json", "w"))
    (ckpt / "DONE").write_text("")


def test_adapter_and_fine_tuned_checkpoints(tmp_path, tok):
    if not os.path.isfile(os.path.join(ROOT, "lora.py")):
        pytest.skip("lora.py not written yet")
    from lora import apply_lora, save_lora
    from model import PRESETS
    x = torch.tensor([[1, 5, 9, 4, 7]])
    base_dir = tmp_path / "base"
    base = tiny_model(tok, seed=7)
    save_model(base, str(base_dir))

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
    b, t, _, _ = inference.load_models(str(tmp_path / "out"), "cpu", torch.float32)
    assert torch.equal(b(x), base(x)) and torch.allclose(t(x), tuned(x), atol=1e-5)
    json.dump(dict(config, lora_rank=8), open(ckpt / "config.json", "w"))
    with pytest.raises(ValueError, match="lora.safetensors: LoRA rank is 4 in the file but 8 in the model"):
        inference.load_models(str(ckpt), "cpu", torch.float32)

    # LoRA on a scratch model (train.py allows it): the base is the preset's init with the seed
    ckpt = tmp_path / "scratch_lora" / "ckpt-000003"
    args = ModelArgs(**{**PRESETS["tiny"], "vocab_size": tok.vocab_size})
    tuned = adapter(Transformer(args).init_weights(11), ckpt)
    write_ckpt(ckpt, tok, dict(config, init="scratch", preset="tiny", seed=11))
    b, t, _, _ = inference.load_models(str(ckpt), "cpu", torch.float32)
    assert torch.equal(b(x), Transformer(args).init_weights(11)(x)) and torch.allclose(t(x), tuned(x), atol=1e-5)

    # every weight fine-tuned from a pretrained base: full weights in the checkpoint
    ckpt = tmp_path / "full" / "ckpt-000002"
    save_model(tiny_model(tok, seed=8), str(ckpt))
    write_ckpt(ckpt, tok, dict(config, lora_rank=0))
    b, t, _, _ = inference.load_models(str(ckpt), "cpu", torch.float32)
    assert torch.equal(b(x), base(x)) and torch.equal(t(x), tiny_model(tok, seed=8)(x))
    b, t, _, _ = inference.load_models(str(ckpt), "cpu", torch.float32, base=False)
    assert b is None and t is not None
