import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import export_peft, load_model, save_model
from lora import (ALL_TARGETS, LoRALinear, apply_lora, load_lora, lora_parameters, lora_state_dict,
                  merge_lora, save_lora)
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=2,
                 norm_eps=1e-5, vocab_size=97, rope_theta=1e6)
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
N_LORA = 2 * 7 * ARGS.n_layers  # A and B for each of the 7 targets in each block


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ARGS).init_weights(seed)


def randomize_lora(model, seed=1):
    """B = 0 after apply_lora, which hides most bugs: give every adapter non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_model(seed=0, rank=4, alpha=8, **kw):
    return randomize_lora(apply_lora(tiny_model(seed), rank, alpha, **kw))


def test_fresh_adapter_changes_nothing():
    model = tiny_model()
    before = model(TOKENS)
    apply_lora(model, rank=4, alpha=8, dropout=0.1)  # train mode, dropout on: B = 0 still wins
    assert torch.equal(model(TOKENS), before)


def test_lora_linear_is_w_x_plus_scaled_b_a_x():
    model = lora_model(rank=4, alpha=8)
    m = model.layers[1].feed_forward.w2
    assert isinstance(m, LoRALinear)
    x = torch.randn(3, 5, ARGS.hidden_dim)
    W, A, B = m.weight, m.lora_A.weight, m.lora_B.weight
    torch.testing.assert_close(m(x), x @ W.T + (8 / 4) * (x @ A.T @ B.T))
    assert not torch.allclose(model(TOKENS), tiny_model()(TOKENS), atol=1e-3)


def test_state_dict_keys_and_freezing():
    model = apply_lora(tiny_model(), rank=4, alpha=8)
    keys = set(model.state_dict())
    assert set(Transformer(ARGS).state_dict()) <= keys  # base keys unchanged
    assert len(keys - set(Transformer(ARGS).state_dict())) == N_LORA
    assert "layers.1.attention.wq.lora_A.weight" in keys and "layers.0.feed_forward.w3.lora_B.weight" in keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in keys if ".lora_" in k}
    assert model.layers[0].attention.wk.lora_A.weight.shape == (4, ARGS.dim)
    assert model.layers[0].attention.wk.lora_B.weight.shape == (ARGS.n_kv_heads * ARGS.head_dim, 4)


def test_only_some_targets():
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("wv", "wq"))
    for layer in model.layers:
        wrapped = {n for n in ("wq", "wk", "wv", "wo") if isinstance(getattr(layer.attention, n), LoRALinear)}
        wrapped |= {n for n in ("w1", "w2", "w3") if isinstance(getattr(layer.feed_forward, n), LoRALinear)}
        assert wrapped == {"wq", "wv"}
    assert len(lora_parameters(model)) == 2 * 2 * ARGS.n_layers
    assert model.lora_config["targets"] == ("wq", "wv")
    with pytest.raises(ValueError, match="wx"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets=("wq", "wx"))


def test_what_apply_lora_refuses():
    """No targets; a model that already has adapters (a second set would wrap the first); a
    Linear with a bias (Mistral has none, and the update would not cover it)."""
    with pytest.raises(ValueError, match=r"LoRA targets \(\): choose one or more of"):
        apply_lora(tiny_model(), rank=4, alpha=8, targets=())
    model = apply_lora(tiny_model(), rank=4, alpha=8)
    with pytest.raises(ValueError, match="apply_lora: the model already has LoRA adapters"):
        apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="LoRALinear expects a bias-free nn.Linear"):
        LoRALinear(nn.Linear(8, 8, bias=True), rank=2, alpha=4)


def test_merge_equals_unmerged_and_is_a_plain_transformer(tmp_path):
    model = lora_model()
    expected = model(TOKENS)
    merge_lora(model)
    torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(model, "lora_config")
    for layer in model.layers:
        for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
                  layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3):
            assert type(m) is nn.Linear
    assert list(model.state_dict()) == list(Transformer(ARGS).state_dict())
    save_model(model, tmp_path)
    assert torch.equal(load_model(tmp_path)(TOKENS), model(TOKENS))


def test_save_load_round_trip_is_exact(tmp_path):
    model = lora_model(dropout=0.05)
    path = tmp_path / "out" / "lora.safetensors"
    save_lora(model, str(path))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"rank": "4", "alpha": "8", "dropout": "0.05",
                                "targets": "wq,wk,wv,wo,w1,w2,w3"}
    saved = load_file(str(path))
    assert set(saved) == set(lora_state_dict(model)) and len(saved) == N_LORA
    assert all(v.dtype == torch.float32 for v in saved.values())

    other = load_lora(apply_lora(tiny_model(), rank=4, alpha=8, dropout=0.05), str(path))
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[k], v), k
    model.eval(), other.eval()  # dropout off for the comparison
    assert torch.equal(other(TOKENS), model(TOKENS))


def test_only_lora_gets_gradients_and_optimizer_state():
    model = lora_model()
    loss = model(TOKENS[:, :-1], targets=TOKENS[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == N_LORA and {id(p) for p in params} == {id(p) for p in lora_parameters(model)}
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    assert len(opt.state) == N_LORA
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def rotate_half_rows(w, n_heads):
    """HF's q/k row order, written independently: per head, the even rows then the odd rows."""
    head_dim = w.shape[0] // n_heads
    order = [h * head_dim + i for h in range(n_heads)
             for i in list(range(0, head_dim, 2)) + list(range(1, head_dim, 2))]
    return w[order]


def test_peft_export(tmp_path):
    model = lora_model(rank=4, alpha=8, dropout=0.1)
    export_peft(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == "mistralai/Mistral-7B-v0.3"
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "down_proj", "up_proj"])

    hf = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = ARGS
    out_in = {"self_attn.q_proj": (a.n_heads * a.head_dim, a.dim), "self_attn.k_proj": (a.n_kv_heads * a.head_dim, a.dim),
              "self_attn.v_proj": (a.n_kv_heads * a.head_dim, a.dim), "self_attn.o_proj": (a.dim, a.n_heads * a.head_dim),
              "mlp.gate_proj": (a.hidden_dim, a.dim), "mlp.down_proj": (a.dim, a.hidden_dim), "mlp.up_proj": (a.hidden_dim, a.dim)}
    expected = {}
    for n in range(a.n_layers):
        for mod, (out, inp) in out_in.items():
            expected[f"base_model.model.model.layers.{n}.{mod}.lora_A.weight"] = (4, inp)
            expected[f"base_model.model.model.layers.{n}.{mod}.lora_B.weight"] = (out, 4)
    assert {k: tuple(v.shape) for k, v in hf.items()} == expected

    # v/o/mlp: copied as is. q/k: applying the exported update to HF's permuted base weight must
    # give HF's permutation of our merged weight.
    p = "base_model.model.model.layers.1."
    assert torch.equal(hf[p + "mlp.down_proj.lora_B.weight"], model.layers[1].feed_forward.w2.lora_B.weight)
    base = {name: getattr(model.layers[1].attention, name).weight.detach().clone() for name in ("wq", "wk")}
    merged = merge_lora(copy.deepcopy(model)).layers[1].attention
    for name, mod, heads in (("wq", "q_proj", a.n_heads), ("wk", "k_proj", a.n_kv_heads)):
        delta = 2.0 * hf[p + f"self_attn.{mod}.lora_B.weight"] @ hf[p + f"self_attn.{mod}.lora_A.weight"]
        torch.testing.assert_close(rotate_half_rows(base[name], heads) + delta,
                                   rotate_half_rows(getattr(merged, name).weight, heads))


def test_load_mismatches_are_clear_errors(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_lora(lora_model(rank=4, alpha=8, targets=("wq", "wv")), path)
    fresh = lambda **kw: apply_lora(tiny_model(), **{"rank": 4, "alpha": 8, "targets": ("wq", "wv"), **kw})
    with pytest.raises(ValueError, match=re.escape(path) + ".*rank is 4 in the file but 8"):
        load_lora(fresh(rank=8), path)
    with pytest.raises(ValueError, match="alpha is 8.0 in the file but 16.0"):
        load_lora(fresh(alpha=16), path)
    with pytest.raises(ValueError, match="targets is .* in the file but"):
        load_lora(fresh(targets=("wq", "wk", "wv")), path)
    with pytest.raises(ValueError, match="no LoRA adapters; call apply_lora first"):
        load_lora(tiny_model(), path)

    meta = {"rank": "4", "alpha": "8", "dropout": "0.0", "targets": "wq,wv"}
    state = load_file(path)
    missing = {k: v for k, v in state.items() if k != "layers.1.attention.wv.lora_B.weight"}
    save_file(missing, path, metadata=meta)
    with pytest.raises(KeyError, match=r"missing key\(s\) \['layers.1.attention.wv.lora_B.weight'\]"):
        load_lora(fresh(), path)
    save_file({**state, "layers.0.attention.wo.lora_A.weight": torch.zeros(4, ARGS.dim)}, path, metadata=meta)
    with pytest.raises(KeyError, match=r"unexpected key\(s\) \['layers.0.attention.wo.lora_A.weight'\]"):
        load_lora(fresh(), path)
    save_file({**state, "layers.0.attention.wq.lora_B.weight": torch.zeros(95, 4)}, path, metadata=meta)
    with pytest.raises(ValueError, match=r"key 'layers.0.attention.wq.lora_B.weight' has shape \(95, 4\), the model expects \(96, 4\)"):
        load_lora(fresh(), path)


def test_file_without_metadata_like_mistral_finetune(tmp_path):
    model = lora_model(rank=4, alpha=8)  # alpha / rank = 2.0, mistral-finetune's scaling
    path = str(tmp_path / "lora.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in lora_state_dict(model).items()}, path)  # bf16, no metadata
    other = load_lora(apply_lora(tiny_model(), rank=4, alpha=8), path)
    for k, v in lora_state_dict(model).items():
        assert lora_state_dict(other)[k].dtype == torch.float32
        assert torch.equal(lora_state_dict(other)[k], v.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="no LoRA metadata.*alpha/rank = 2.0"):
        load_lora(apply_lora(tiny_model(), rank=4, alpha=4), path)
    with pytest.raises(ValueError, match="rank is 4 in the file but 2"):
        load_lora(apply_lora(tiny_model(), rank=2, alpha=4), path)
    with pytest.raises(ValueError, match="targets is"):
        load_lora(apply_lora(tiny_model(), rank=4, alpha=8, targets=("wq",)), path)
    # adapters of two ranks in one file: named as such, whichever rank the model has
    mixed = {k: v for k, v in lora_state_dict(model).items()}
    mixed.update({k: v for k, v in lora_state_dict(lora_model(rank=2, alpha=4)).items() if ".w2." in k})
    save_file(mixed, path)
    for rank in (2, 4):
        with pytest.raises(ValueError, match=rf"rank is \[2, 4\] in the file but {rank}"):
            load_lora(apply_lora(tiny_model(), rank=rank, alpha=2 * rank), path)


def test_bf16_base_with_fp32_lora(tmp_path):
    model = randomize_lora(apply_lora(tiny_model().to(torch.bfloat16), rank=4, alpha=8))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    loss = model(TOKENS[:, :-1], targets=TOKENS[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    for p in lora_parameters(model):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    # mistral-inference's load_lora wants the adapter in the model's dtype
    save_lora(model, str(tmp_path / "lora.safetensors"), dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(str(tmp_path / "lora.safetensors")).values()} == {torch.bfloat16}
    merge_lora(model)  # folded in fp32, rounded once: the merged model is bf16 again, as its base was
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def matmuls(model):
    """How many matmuls (aten mm and addmm) one forward pass launches."""
    with torch.profiler.profile() as prof:
        model(TOKENS[:, :-1], targets=TOKENS[:, 1:])
    return sum(e.name in ("aten::mm", "aten::addmm") for e in prof.events())


@pytest.mark.parametrize("targets", [ALL_TARGETS, ("wq", "wv", "w1", "w2")])
def test_fused_lora_matches_plain(targets):
    """fused=True (one A matmul for wq/wk/wv and one for w1/w3; scale and add inside addmm): the
    same loss and gradients as the plain path, in fp32 to rounding and in bf16 to bf16's precision,
    and the same parameter names, so the files do not change."""
    out = {}
    for dtype, fused in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]:
        model = randomize_lora(apply_lora(tiny_model().to(dtype), rank=4, alpha=8, targets=targets, fused=fused))
        loss = model(TOKENS[:, :-1], targets=TOKENS[:, 1:])
        loss.backward()
        out[dtype, fused] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = out[torch.float32, False], out[torch.float32, True]
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-6) for k in g0)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    for fused in (False, True):  # bf16 against fp32: the plain path's gradients are up to 5% off here
        lb, gb = out[torch.bfloat16, fused]
        assert abs(lb - l0) < 2e-2 * l0 and max(rel(gb[k], g0[k]) for k in g0) < 0.1
    if targets == ALL_TARGETS:  # the shared A's: 2 fewer matmuls for wq/wk/wv, 1 fewer for w1/w3, per block
        assert matmuls(lora_model()) - matmuls(lora_model(fused=True)) == 3 * ARGS.n_layers


def test_fused_with_dropout_takes_the_plain_path():
    """The fused path has no dropout: with dropout on, fused=True must fall back to the plain path,
    the same outputs under the same random state (and dropout does act: another state differs)."""
    outs = {}
    for fused, seed in ((False, 0), (True, 0), (True, 1)):
        model = lora_model(dropout=0.5, fused=fused).train()
        torch.manual_seed(seed)
        outs[fused, seed] = model(TOKENS)
    assert torch.equal(outs[False, 0], outs[True, 0])
    assert not torch.allclose(outs[True, 0], outs[True, 1])
