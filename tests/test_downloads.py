"""The folders users download, end to end as they run them: an HF folder laid out like
Mistral-7B-v0.3's on the hub, and Mistral's own layout with tokenizer.model.v3, each through
train.py --init (LoRA), eval.py, sample.py (subprocesses), and the PEFT export."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import export_peft, load_model, model_args, tokenizer_file
from lora import apply_lora, load_lora
from model import ModelArgs, Transformer
from test_model import rotate_half_permute, write_hf, write_native
from test_setting import TEST_TASKS, metaicl_folder
from test_train import ROOT, run

TOKENIZER = os.path.join(ROOT, "assets", "base-nano", "tokenizer.model")  # 1024 pieces
# head_dim 24, not dim // n_heads = 16: a config without head_dim must not be guessed from dim
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=24, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=1024, rope_theta=1e6, max_seq_len=4096)


def hf_like_v03(d):
    """What huggingface.co/mistralai/Mistral-7B-v0.3 holds in HF's layout: bf16 shards with their
    index, a config.json with no head_dim and rope_theta at the top level, tokenizer.model, and
    the files of HF's tokenizer and generation we do not read."""
    m = Transformer(ARGS).init_weights(7).to(torch.bfloat16)
    write_hf(m, d, shards=2, head_dim_in_config=False)
    cfg = json.load(open(f"{d}/config.json"))
    assert "head_dim" not in cfg and "rope_theta" in cfg
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu", attention_dropout=0.0,
               bos_token_id=1, eos_token_id=2, initializer_range=0.02, torch_dtype="bfloat16", use_cache=True,
               transformers_version="4.42.0.dev0", max_position_embeddings=32768)
    json.dump(cfg, open(f"{d}/config.json", "w"), indent=2)
    for name in ("generation_config.json", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        json.dump({}, open(f"{d}/{name}", "w"))
    shutil.copy(TOKENIZER, f"{d}/tokenizer.model")
    assert sorted(f for f in os.listdir(d) if "safetensors" in f) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    return m


def mistral_layout_v3(d):
    m = Transformer(ARGS).init_weights(7)
    write_native(m, d)
    shutil.copy(TOKENIZER, f"{d}/tokenizer.model.v3")  # Mistral's name; no tokenizer.model
    return m


def script(name, *args):
    p = subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.parametrize("layout", ["hf_v0.3", "mistral_v3_tokenizer"])
def test_downloaded_folder_train_eval_sample(tmp_path, layout):
    base, root, out = str(tmp_path / "base"), str(tmp_path / "metaicl"), str(tmp_path / "out")
    original = (hf_like_v03 if layout == "hf_v0.3" else mistral_layout_v3)(base)
    assert model_args(base).head_dim == 24
    setting = metaicl_folder(root)
    # train: LoRA on the downloaded base, the setting's training tasks, the folder's own tokenizer
    p = run([f"--init={base}", "--lora_rank=8", f"--data={root}", f"--setting={setting}", f"--out_dir={out}",
             "--eval_data=", "--seq_len=128", "--batch_size=1", "--max_steps=2", "--warmup_steps=1", "--lr=1e-2"])
    assert "2 training tasks" in p.stdout
    ckpt = os.path.join(out, "ckpt-000002")
    saved = json.load(open(f"{ckpt}/config.json"))
    assert saved["init"] == base and saved["tokenizer"] == "" and os.path.isfile(f"{ckpt}/tokenizer.model")
    # eval: the setting's test tasks (the data folder defaults to the one trained on)
    p = script("eval.py", "--ckpt", out, "--setting", setting, "--ks", "0,16", "--seeds", "100,13", "--max_test", "3", "--seq_len", "512",
               "--device", "cpu")
    res = json.load(open(f"{out}/eval.json"))
    assert set(res["tasks"]) == set(TEST_TASKS) and res["settings"]["tasks"] == [root]
    assert res["summary"]["16"]["trained"]["n_tasks"] == 2 and res["summary"]["16"]["base"]["n_tasks"] == 2
    # sample: one answer, "input<TAB>answer"
    demos = f"{root}/superglue-rte/superglue-rte_16_100_train.jsonl"
    p = script("sample.py", f"--ckpt={out}", f"--demos={demos}", "--k=4", "--prompt=the cat", "--device=cpu",
               "--max_new_tokens=3")
    assert p.stdout.startswith("the cat\t"), p.stdout
    if layout != "hf_v0.3":
        return
    # bench: the folder's shapes
    p = script("bench.py", f"--init={base}", "--seq_len=32", "--steps=1", "--warmup=0", "--lora_rank=8")
    assert f"init {base}" in p.stdout and "tok/s" in p.stdout
    # PEFT export of the trained adapter, checked against the HF folder's own weights: HF's
    # q/k plus the exported update equals ours merged, permuted to HF's rotate-half rows
    model = load_model(base)
    apply_lora(model, 8, saved["lora_alpha"])
    load_lora(model, f"{ckpt}/lora.safetensors")
    export_peft(model, str(tmp_path / "peft"))
    adapter = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert cfg["r"] == 8 and len(adapter) == 2 * 7 * ARGS.n_layers
    hf = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        hf.update(load_file(f"{base}/{f}"))
    scale = cfg["lora_alpha"] / cfg["r"]
    for name, ours, heads in (("q_proj", "wq", ARGS.n_heads), ("k_proj", "wk", ARGS.n_kv_heads)):
        key = f"base_model.model.model.layers.1.self_attn.{name}"
        update = scale * adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]
        assert update.abs().max() > 0  # the adapter trained
        lin = getattr(model.layers[1].attention, ours)
        merged = lin.weight.float() + scale * lin.lora_B.weight @ lin.lora_A.weight
        hf_w = hf[f"model.layers.1.self_attn.{name}.weight"].float()
        assert torch.allclose(hf_w + update, rotate_half_permute(merged, heads), atol=1e-5)
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"],
                       rotate_half_permute(original.layers[1].attention.wq.weight, ARGS.n_heads))


def test_tokenizer_file_prefers_mistrals_v3_name(tmp_path):
    """Mistral's folders may hold tokenizer.model.v3 beside a tokenizer.model: the .v3 is read."""
    d = str(tmp_path)
    shutil.copy(TOKENIZER, f"{d}/tokenizer.model.v3")
    open(f"{d}/tokenizer.model", "w").write("another tokenizer")
    assert tokenizer_file(d) == f"{d}/tokenizer.model.v3"
    os.remove(f"{d}/tokenizer.model.v3")
    assert tokenizer_file(d) == f"{d}/tokenizer.model"
    os.remove(f"{d}/tokenizer.model")
    with pytest.raises(FileNotFoundError, match=f"{d}: no tokenizer.model.v3 or tokenizer.model"):
        tokenizer_file(d)
