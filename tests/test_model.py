import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoints import hf_rows_to_native, load_model, native_rows_to_hf, save_model
from memory import flops_per_token
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=2,
                 norm_eps=1e-5, vocab_size=97, rope_theta=1e6)  # head_dim != dim // n_heads on purpose


def tiny_model(seed=0, args=ARGS):
    torch.manual_seed(seed)
    m = Transformer(args).init_weights(seed)
    with torch.no_grad():  # non-trivial norm weights so a wrong key mapping shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def naive_forward(m, tokens):
    """The same maths written plainly in float64: explicit interleaved RoPE, explicit causal
    softmax attention, K/V repeated per query head."""
    a = m.args
    sd = {k: v.double() for k, v in m.state_dict().items()}
    B, T = tokens.shape

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps) * w

    def rope(x):  # x (B, T, H, hd): rotate pair (2i, 2i+1) by angle t * theta^(-2i/hd)
        out = x.clone()
        for t in range(T):
            for i in range(a.head_dim // 2):
                ang = t * a.rope_theta ** (-2 * i / a.head_dim)
                c, s = math.cos(ang), math.sin(ang)
                x0, x1 = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
                out[:, t, :, 2 * i] = x0 * c - x1 * s
                out[:, t, :, 2 * i + 1] = x0 * s + x1 * c
        return out

    h = sd["tok_embeddings.weight"][tokens]
    for l in range(a.n_layers):
        p = f"layers.{l}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, T, a.n_heads, a.head_dim))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, T, a.n_kv_heads, a.head_dim))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, a.n_kv_heads, a.head_dim)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(a.head_dim)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, -1)
        h = h + y @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        g = x @ sd[p + "feed_forward.w1.weight"].T
        h = h + (g * torch.sigmoid(g) * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_logits_match_naive_float64():
    m = tiny_model()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 11))
    ref = naive_forward(m, tokens)
    out = m(tokens)  # fp32 model (RoPE and norms in fp32) against the float64 reference
    assert out.shape == (2, 11, ARGS.vocab_size)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_rope_pairs_adjacent_dims():
    # Pins the layout: position 1 rotates dims (0, 1) by angle 1 rad (frequency theta^0 = 1).
    from model import apply_rope, rope_cos_sin
    x = torch.zeros(1, 2, 1, 4); x[..., 0] = 1.0
    cos, sin = rope_cos_sin(torch.arange(2), 4, 1e6)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[0, 1, 0], torch.tensor([math.cos(1), math.sin(1), 0, 0]))


def write_native(m, d):
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(d, "consolidated.safetensors"))
    json.dump(m.args.to_dict(), open(os.path.join(d, "params.json"), "w"))


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def rotate_half_permute(w, n_heads):
    """What HF's convert_mistral_weights_to_hf.py does to q/k, written independently here."""
    rows, cols = w.shape
    hd = rows // n_heads
    perm = torch.cat([torch.cat([torch.arange(h * hd, (h + 1) * hd, 2), torch.arange(h * hd + 1, (h + 1) * hd, 2)])
                      for h in range(n_heads)])
    return w[perm]


def write_hf(m, d, shards=2, head_dim_in_config=True, theta_key="rope_theta"):
    os.makedirs(d, exist_ok=True)
    a = m.args
    hf = {}
    for k, v in m.state_dict().items():
        if k == "tok_embeddings.weight": name = "model.embed_tokens.weight"
        elif k == "norm.weight": name = "model.norm.weight"
        elif k == "output.weight": name = "lm_head.weight"
        else:
            _, l, rest = k.split(".", 2)
            mod = rest[: -len(".weight")]
            name = f"model.layers.{l}.{HF_NAMES[mod]}.weight"
            if mod == "attention.wq": v = rotate_half_permute(v, a.n_heads)
            if mod == "attention.wk": v = rotate_half_permute(v, a.n_kv_heads)
        hf[name] = v.contiguous()
    keys = sorted(hf)
    if shards == 1:
        save_file(hf, os.path.join(d, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: hf[k] for k in part}, os.path.join(d, fname))
            weight_map.update({k: fname for k in part})
        json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    cfg = dict(hidden_size=a.dim, num_hidden_layers=a.n_layers, intermediate_size=a.hidden_dim, num_attention_heads=a.n_heads,
               num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps, vocab_size=a.vocab_size,
               max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)
    if head_dim_in_config: cfg["head_dim"] = a.head_dim
    if theta_key == "rope_theta": cfg["rope_theta"] = a.rope_theta
    elif theta_key == "rope_parameters": cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))


def test_permutation_helpers_are_inverse_and_match_hf():
    w = torch.randn(ARGS.n_kv_heads * ARGS.head_dim, 8)
    assert torch.equal(native_rows_to_hf(w, ARGS.n_kv_heads), rotate_half_permute(w, ARGS.n_kv_heads))
    assert torch.equal(hf_rows_to_native(native_rows_to_hf(w, 2), 2), w)


@pytest.mark.parametrize("layout", ["native", "hf_sharded", "hf_single_no_head_dim", "hf_rope_parameters"])
def test_both_layouts_load_to_same_logits(tmp_path, layout):
    m = tiny_model()
    d = str(tmp_path / layout)
    if layout == "native": write_native(m, d)
    elif layout == "hf_sharded": write_hf(m, d, shards=2)
    elif layout == "hf_single_no_head_dim": write_hf(m, d, shards=1, head_dim_in_config=False)
    else: write_hf(m, d, shards=3, theta_key="rope_parameters")
    if layout != "native":  # the official repo ships both side by side: a decoy must be ignored
        save_file({"junk": torch.zeros(1)}, os.path.join(d, "consolidated.safetensors"))
    loaded = load_model(d)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 13))
    diff = (loaded(tokens) - m(tokens)).abs().max().item()
    print(f"{layout}: max logit diff {diff:.2e}")
    assert diff == 0.0  # same weights, same maths: bit-identical
    assert loaded.args.head_dim == ARGS.head_dim and loaded.args.rope_theta == ARGS.rope_theta


def test_load_to_dtype_and_no_random_init(tmp_path):
    write_native(tiny_model(), str(tmp_path))
    m = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    # the values are the file's, rounded once to bf16: no random init, no tensor under another name
    saved = load_file(os.path.join(str(tmp_path), "consolidated.safetensors"))
    loaded = m.state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v.to(torch.bfloat16)), k
    assert len({v.to(torch.bfloat16).sum().item() for v in saved.values()}) > 1  # the tensors really differ


def test_save_pretrained_round_trip(tmp_path):
    m = tiny_model()
    save_model(m, str(tmp_path))
    m2 = load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_bad_checkpoints_name_key_and_file(tmp_path):
    m = tiny_model()
    # missing rope_theta in params.json
    d = str(tmp_path / "a"); write_native(m, d)
    cfg = json.load(open(f"{d}/params.json")); del cfg["rope_theta"]; json.dump(cfg, open(f"{d}/params.json", "w"))
    with pytest.raises(KeyError, match="params.json.*rope_theta"):
        load_model(d)
    # missing rope theta in HF config
    d = str(tmp_path / "b"); write_hf(m, d, theta_key=None)
    with pytest.raises(KeyError, match="config.json.*rope_theta"):
        load_model(d)
    # missing key
    d = str(tmp_path / "c"); write_native(m, d)
    sd = {k: v for k, v in m.state_dict().items() if k != "layers.1.feed_forward.w3.weight"}
    save_file(sd, f"{d}/consolidated.safetensors")
    with pytest.raises(KeyError, match="missing.*layers.1.feed_forward.w3.weight"):
        load_model(d)
    # unexpected key
    save_file({**m.state_dict(), "layers.0.extra.weight": torch.zeros(2)}, f"{d}/consolidated.safetensors")
    with pytest.raises(KeyError, match="unexpected.*layers.0.extra.weight"):
        load_model(d)
    # shape mismatch: config says a different hidden_dim
    save_file(m.state_dict(), f"{d}/consolidated.safetensors")
    cfg = json.load(open(f"{d}/params.json")); cfg["hidden_dim"] = 128; json.dump(cfg, open(f"{d}/params.json", "w"))
    with pytest.raises(ValueError, match="layers.0.feed_forward.w1.weight.*shape"):
        load_model(d)
    # malformed JSON, missing directory contents, missing shard
    open(f"{d}/params.json", "w").write("{not json")
    with pytest.raises(ValueError, match="params.json.*not valid JSON"):
        load_model(d)
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_model(str(tmp_path / "empty"))
    d = str(tmp_path / "e"); write_hf(m, d, shards=2); os.remove(f"{d}/model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(d)
    # a key in two shards: which copy would win is not for the loader to guess
    d = str(tmp_path / "f"); write_hf(m, d, shards=2)
    first, second = (f"{d}/model-0000{i}-of-00002.safetensors" for i in (1, 2))
    key = next(iter(load_file(first)))
    save_file({**load_file(second), key: load_file(first)[key]}, second)
    with pytest.raises(ValueError, match=f"00002.safetensors: key '{key}' appears in more than one weight file"):
        load_model(d)
    # tied input and output embeddings (a Gemma- or small-Llama-shaped config): not Mistral's shape
    d = str(tmp_path / "g"); write_hf(m, d)
    cfg = json.load(open(f"{d}/config.json")); cfg["tie_word_embeddings"] = True; json.dump(cfg, open(f"{d}/config.json", "w"))
    with pytest.raises(ValueError, match="config.json: tie_word_embeddings=true"):
        load_model(d)


def test_sliding_window_refuses_longer_sequences():
    args = ModelArgs(**{**ARGS.__dict__, "sliding_window": 8})
    m = Transformer(args).init_weights()
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_targets_loss_equals_full_logits_cross_entropy():
    m = tiny_model()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 20))
    tokens[0, 5] = 0  # id 0 is a token like any other: only negative targets are unsupervised
    targets = torch.full((2, 20), -100)
    targets[0, 3:7] = tokens[0, 4:8]; targets[1, 15:19] = tokens[1, 16:20]
    logits = m(tokens)
    ref = F.cross_entropy(logits.view(-1, ARGS.vocab_size), targets.view(-1), ignore_index=-100)
    loss = m(tokens, targets)
    assert torch.allclose(loss, ref, atol=1e-6)
    from model import chunked_cross_entropy  # chunking changes nothing, gradients included
    h = torch.randn(10, ARGS.dim, requires_grad=True); t = torch.randint(0, ARGS.vocab_size, (10,))
    a = chunked_cross_entropy(h, m.output.weight, t, chunk=3); ga, = torch.autograd.grad(a, h)
    b = F.cross_entropy(h @ m.output.weight.t(), t); gb, = torch.autograd.grad(b, h)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)


def test_activation_checkpointing_same_gradients():
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16))
    targets = torch.randint(0, ARGS.vocab_size, (2, 16))
    grads = []
    plans = ("none", "full", "selective", ["selective", "none"], ["full", "selective"], [False, True])
    for ckpt in plans:  # one scheme for all blocks, or one per block (plan_checkpointing's)
        m = tiny_model()
        m.activation_checkpointing = ckpt
        m(tokens, targets).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g in grads[1:]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], g))
    m.activation_checkpointing = True  # the booleans name the schemes: False none, True full
    assert m.checkpointing_plan() == ["full"] * ARGS.n_layers
    m.activation_checkpointing = [False, True]
    assert m.checkpointing_plan() == ["none", "full"]
    m.activation_checkpointing = ["full"]  # one name short
    with pytest.raises(ValueError, match="one per layer"):
        m(tokens, targets)


def kept_bytes(n_layers, scheme, dtype, lora):
    """What the CPU allocator still holds after a forward pass, i.e. what autograd and the
    checkpoints keep for the backward pass (the loss itself is a few bytes)."""
    from lora import apply_lora
    m = tiny_model(args=dataclasses.replace(ARGS, n_layers=n_layers)).to(dtype)
    if lora:
        apply_lora(m, 4, 8)
    m.activation_checkpointing = scheme
    tokens = torch.randint(0, ARGS.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    targets = torch.full_like(tokens, -100)
    targets[:, ::40] = 1
    with torch.profiler.profile(profile_memory=True) as prof:
        loss = m(tokens, targets)  # held: its graph holds what the backward pass needs
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [True, False])
def test_activation_bytes_match_the_allocator(dtype, lora):
    """activation_bytes per block against the allocator: 4 blocks minus 2 blocks, so embeddings,
    the final norm and the loss cancel out. Slack: the CPU RNG state each checkpoint saves (5 KB)
    and LoRA's bf16 weight casts (8 KB here)."""
    from memory import activation_bytes
    est = activation_bytes(ARGS, 256, dtype.itemsize, lora_rank=4 if lora else 0,
                           lora_targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3") if lora else (), train_base=not lora)
    for scheme in ("none", "selective", "full"):
        per_block = (kept_bytes(4, scheme, dtype, lora) - kept_bytes(2, scheme, dtype, lora)) / 2
        assert abs(per_block - est[scheme]) <= 0.02 * est[scheme] + 9000, (scheme, per_block, est[scheme])


def test_plan_checkpointing_mistral_7b_at_32k():
    from memory import estimate_peak, plan_checkpointing
    from model import PRESETS, TransformerBlock
    a, GiB = ModelArgs(**PRESETS["mistral-7b"]), 2**30
    lora = dict(dtype_bytes=2, lora_rank=16, lora_targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    fixed = 7_248_023_552 * 2 + 32 * 1_310_720 * 16  # bf16 weights; fp32 LoRA with its grads and AdamW moments
    peak = lambda plan: estimate_peak(a, 32768, 1, plan, fixed, **lora)
    assert 30 * GiB < peak(["full"] * 32) < 31 * GiB  # README's measured figure: 30.7 GiB (compiled blocks)
    with pytest.raises(ValueError, match="even 'full' in every block needs ~30.58 GiB"):
        plan_checkpointing(a, 32768, 1, 30 * GiB, fixed, **lora)
    assert plan_checkpointing(a, 32768, 1, 31 * GiB, fixed, **lora) == ["full"] * 31 + ["selective"]
    with torch.device("meta"):  # forward FLOPs per token recomputed: a block's matmuls (+ attention if full)
        block = 2 * sum(p.numel() for p in TransformerBlock(a, 0).parameters() if p.dim() == 2)
    cost = lambda plan: plan.count("selective") * block + plan.count("full") * (block + 2 * 4096 * 32768)
    costs = []
    for budget in range(31, 240, 4):  # more memory: never more recomputation, always within the budget
        plan = plan_checkpointing(a, 32768, 1, budget * GiB, fixed, **lora)
        assert peak(plan) <= budget * GiB and plan == sorted(plan, key=["full", "selective", "none"].index)
        costs.append(cost(plan))
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0 and len(set(costs)) > 10
    assert plan_checkpointing(a, 32768, 1, 38 * GiB, fixed, **lora).count("full") < 4  # mostly selective
    plan80 = plan_checkpointing(a, 32768, 1, 71 * GiB, fixed, **lora)  # an 80 GB card, 10% margin
    assert plan80.count("full") == 0 and plan80.count("none") >= 5


def test_flops_per_token_mistral_7b():
    from model import PRESETS
    a = ModelArgs(**PRESETS["mistral-7b"])
    n = 7_248_023_552 - 32768 * 4096 - 65 * 4096  # Mistral-7B-v0.3 params minus embedding and norms
    assert flops_per_token(a, 32768, lora=True) == 4 * n + 6 * 32 * 4096 * 32768
    assert flops_per_token(a, 32768, lora=False) == 6 * n + 6 * 32 * 4096 * 32768


def test_auto_checkpointing_fits_the_budget_or_is_none_on_cpu():
    """train.py's activation_checkpointing="auto": on the CPU with no budget no checkpointing; with
    memory_budget_gib, the plan that recomputes least within it."""
    from memory import checkpointing_mode, estimate_peak, training_memory
    from train import TrainConfig
    m, cfg = tiny_model(), TrainConfig(seq_len=1024, batch_size=1)
    assert checkpointing_mode("auto", m, cfg) == "none"
    fixed, est = training_memory(m, torch.float32)
    peak = lambda plan: estimate_peak(ARGS, 1024, 1, plan, fixed, **est)
    for plan in (["full", "full"], ["none", "none"]):  # a budget exactly the plan's estimate gets that plan
        cfg.memory_budget_gib = peak(plan) / 2**30
        assert checkpointing_mode("auto", m, cfg) == plan
    cfg.memory_budget_gib = (peak(["full", "full"]) + peak(["none", "none"])) / 2 / 2**30
    plan = checkpointing_mode("auto", m, cfg)
    assert plan not in (["full", "full"], ["none", "none"]) and peak(plan) <= cfg.memory_budget_gib * 2**30
    with pytest.raises(ValueError, match="none, full, selective or auto"):
        checkpointing_mode("ful")


def test_training_memory_counts_weights_grads_and_adam_moments():
    """What a run holds all along: every weight, and for each trainable one its gradient (its own
    dtype) and AdamW's two fp32 moments (8 bytes a parameter). LoRA trains only the adapters."""
    from lora import apply_lora
    from memory import training_memory
    m = tiny_model()
    n = sum(p.numel() for p in m.parameters())
    assert training_memory(m, torch.float32) == (4 * n + (4 * n + 8 * n), dict(
        dtype_bytes=4, lora_rank=0, lora_targets=(), train_base=True))
    apply_lora(m, 4, 8.0, targets=("wq", "wv"))
    r = sum(p.numel() for name, p in m.named_parameters() if ".lora_" in name)
    assert training_memory(m, torch.bfloat16) == (4 * n + 4 * r + (4 * r + 8 * r), dict(
        dtype_bytes=2, lora_rank=4, lora_targets=("wq", "wv"), train_base=False))
