"""
Checkpoint folders: reading the layouts users download, loading and saving our models, the model
training starts from, writing and finding training checkpoints and resuming from them, and
exporting adapters for Hugging Face PEFT. (A trained checkpoint is loaded for use, base model
beside it, by inference.load_models.)

Two layouts load wherever a model is accepted (train.py --init, eval.py, sample.py, bench.py):
  Mistral's        params.json + consolidated.safetensors (+ tokenizer.model.v3 or tokenizer.model)
  Hugging Face's   config.json + model.safetensors or model-0000x-of-0000N.safetensors with its
                   index (+ tokenizer.model). HF stores q/k rows permuted for the rotate-half RoPE
                   convention; they are permuted back to Mistral's interleaved layout on load.
A training checkpoint (out_dir/ckpt-NNNNNN) is Mistral's layout, or a LoRA adapter, plus
config.json (the training config), tokenizer.model and state.pt (optimizer, step). It is complete
when it holds DONE: written last, in a .tmp- folder that is then renamed into place.
"""
import errno
import json
import os
import re
import shutil
import zipfile
from dataclasses import MISSING, fields

import torch

from lora import block_of, lora_state_dict, require_lora, save_lora
from model import PRESETS, ModelArgs, Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))  # this repository: its own base model lives in assets/

# ----------------------------------------------------------------------------- reading the layouts

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def require(cfg, key, path):
    if cfg.get(key) is None:
        raise KeyError(f"{path}: missing required field '{key}'")
    return cfg[key]


def read_params_json(path):
    cfg = read_json(path)
    for f in fields(ModelArgs):
        if f.default is MISSING:
            require(cfg, f.name, path)  # rope_theta included: a wrong theta silently ruins a model
    return ModelArgs(**{f.name: cfg.get(f.name) for f in fields(ModelArgs)})


def hf_weight_files(path):
    """The HF weight files, from the shard index when there is one. Never a blind glob: the
    official Mistral repo ships consolidated.safetensors beside the HF shards."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(require(read_json(index), "weight_map", index).values()))
        files = [os.path.join(path, n) for n in names]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: weight file not found")
    return files


def weight_shape(files, key, path):
    """The shape of one tensor, read from the safetensors headers only."""
    from safetensors import safe_open
    for f in files:
        with safe_open(f, "pt") as sf:
            if key in sf.keys():
                return sf.get_slice(key).get_shape()
    raise KeyError(f"{path}: no 'head_dim', and no {key} in {', '.join(files)} to read it from")


def read_hf_config(path, files):
    cfg = read_json(path)
    theta = cfg.get("rope_theta")
    if theta is None:
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        raise KeyError(f"{path}: missing required field 'rope_theta' (or 'rope_parameters.rope_theta')")
    n_heads = require(cfg, "num_attention_heads", path)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        # Mistral-7B-v0.3's config.json has no head_dim: read it from q_proj's shape in the weights'
        # header (no tensor is loaded) rather than assume dim // n_heads.
        head_dim = weight_shape(files, "model.layers.0.self_attn.q_proj.weight", path)[0] // n_heads
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{path}: tie_word_embeddings=true is not a Mistral-shaped model (output head must be untied)")
    return ModelArgs(dim=require(cfg, "hidden_size", path), n_layers=require(cfg, "num_hidden_layers", path),
                     head_dim=head_dim, hidden_dim=require(cfg, "intermediate_size", path), n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads, norm_eps=require(cfg, "rms_norm_eps", path),
                     vocab_size=require(cfg, "vocab_size", path), rope_theta=float(theta),
                     max_seq_len=cfg.get("max_position_embeddings"), sliding_window=cfg.get("sliding_window"))


def read_safetensors(files, device, dtype):
    """Tensors straight to the target device and dtype, one at a time (no full fp32 copy)."""
    from safetensors import SafetensorError, safe_open
    state = {}
    for f in files:
        try:  # a truncated file (full disk, bad copy) fails here, on its header: say which file
            sf = safe_open(f, "pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{f}: cannot read weights ({e})") from None
        with sf:
            for key in sf.keys():
                if key in state:
                    raise ValueError(f"{f}: key '{key}' appears in more than one weight file")
                state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
    return state


HF_TO_NATIVE = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                "post_attention_layernorm": "ffn_norm"}


def hf_rows_to_native(w, n_heads):
    """Undo HF's q/k row permutation. Per head, HF stores the rotate-half order
    [x0, x2, x4, ..., x1, x3, x5, ...]; Mistral stores adjacent pairs [x0, x1, x2, x3, ...]."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def native_rows_to_hf(w, n_heads):
    """The inverse: the permutation HF's conversion script applies to Mistral's q/k."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_native(state, args, files):
    out = {}
    for key, w in state.items():
        if key == "model.embed_tokens.weight":
            name = "tok_embeddings.weight"
        elif key == "model.norm.weight":
            name = "norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        elif key.startswith("model.layers.") and key.endswith(".weight"):
            layer, module = key[len("model.layers."):-len(".weight")].split(".", 1)
            if module not in HF_TO_NATIVE:
                raise KeyError(f"{', '.join(files)}: unexpected key '{key}'")
            name = f"layers.{layer}.{HF_TO_NATIVE[module]}.weight"
            if module == "self_attn.q_proj":
                w = hf_rows_to_native(w, args.n_heads)
            elif module == "self_attn.k_proj":
                w = hf_rows_to_native(w, args.n_kv_heads)  # k uses the KV head count
        else:
            raise KeyError(f"{', '.join(files)}: unexpected key '{key}'")
        out[name] = w
    return out


def check_state_dict(model, state, path):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise KeyError(f"{path}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise ValueError(f"{path}: key '{k}' has shape {tuple(state[k].shape)}, the config implies {tuple(shape)}")


def mistral_layout(path):
    """Mistral's own files are preferred: the official repository ships them beside HF's shards."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("params.json", "consolidated.safetensors"))


def model_args(path):
    """The shape of the model in a folder of either layout, read without loading any weights
    (so a bad folder fails before anything heavy)."""
    if mistral_layout(path):
        return read_params_json(os.path.join(path, "params.json"))
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_hf_config(os.path.join(path, "config.json"), hf_weight_files(path))
    raise FileNotFoundError(f"{path}: expected params.json + consolidated.safetensors "
                            f"(Mistral layout) or config.json + model*.safetensors (HF layout)")


def tokenizer_file(path):
    """The sentencepiece model in a folder: Mistral's tokenizer.model.v3, or tokenizer.model."""
    for name in ("tokenizer.model.v3", "tokenizer.model"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: no tokenizer.model.v3 or tokenizer.model")


def initial_args(init, preset, vocab_size):
    """The shape of the model training starts from, read without loading weights (so bad configs
    fail fast): the checkpoint in folder `init`, or (init="scratch") `preset` with the tokenizer's vocabulary."""
    if init != "scratch":  # train.py has checked that it is a model folder
        return model_args(init)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
    return ModelArgs(**{**PRESETS[preset], "vocab_size": vocab_size})


def initial_model(init, args, seed, device, dtype):
    """The model training starts from: the one in folder `init`, or (init="scratch") a fresh
    `args`-shaped one drawn from `seed` on the CPU, so the same on any device (eval rebuilds it as the base)."""
    if init != "scratch":
        return load_model(init, device, dtype)
    with torch.device("meta"):  # no default init: init_weights draws every weight
        model = Transformer(args)
    return model.to_empty(device="cpu").init_weights(seed).to(device, dtype)


def load_model(path, device="cpu", dtype=None):
    """A Transformer from a folder of either layout, its weights straight to `device` and `dtype`."""
    device = torch.device(device)
    args = model_args(path)
    if mistral_layout(path):
        state = read_safetensors([os.path.join(path, "consolidated.safetensors")], device, dtype)
    else:
        files = hf_weight_files(path)
        state = hf_to_native(read_safetensors(files, device, dtype), args, files)
    with torch.device("meta"):  # no random weights are ever materialised
        model = Transformer(args)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_model(model, path):
    """Write Mistral's layout: params.json + consolidated.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "consolidated.safetensors"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(model.args.to_dict(), f, indent=2)


NATIVE_TO_HF = {v: k for k, v in HF_TO_NATIVE.items()}  # "attention.wq" -> "self_attn.q_proj"


def export_peft(model, out_dir, base_model_name_or_path="mistralai/Mistral-7B-v0.3"):
    """Write the adapter as a Hugging Face PEFT directory (adapter_model.safetensors +
    adapter_config.json) for the HF-format base model, without importing any HF package."""
    from safetensors.torch import save_file
    cfg, args = require_lora(model, "export_peft"), model.args
    tensors = {}
    for key, w in lora_state_dict(model).items():
        _, n, block, name, ab, _ = key.split(".")  # layers.N.attention.wq.lora_B.weight
        if ab == "lora_B" and name in ("wq", "wk"):
            # HF's q/k weights are ours with rows permuted (rotate-half RoPE): W_hf = P W, so the
            # update P (B A) = (P B) A; only B's rows move. k's permutation uses the KV heads.
            w = native_rows_to_hf(w, args.n_heads if name == "wq" else args.n_kv_heads)
        tensors[f"base_model.model.model.layers.{n}.{NATIVE_TO_HF[f'{block}.{name}']}.{ab}.weight"] = w.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                  target_modules=[NATIVE_TO_HF[f"{block_of(t)}.{t}"].split(".")[1] for t in cfg["targets"]],
                  bias="none", fan_in_fan_out=False, use_rslora=False, inference_mode=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- training checkpoints

def is_complete(ckpt):
    return os.path.isfile(os.path.join(ckpt, "DONE"))


def find_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first. One being written is a .tmp- folder (no
    ckpt- name yet, no DONE)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m[1]), d) for d in os.listdir(out_dir) if (m := re.fullmatch(r"ckpt-(\d+)", d))]
    return [os.path.join(out_dir, d) for _, d in sorted(found) if is_complete(os.path.join(out_dir, d))]


def find_checkpoint(path):
    """`path` itself if it is a complete checkpoint, else the newest complete ckpt-* in it."""
    if is_complete(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or output folder")
    found = find_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a ckpt-* folder holding DONE; "
                                f"ones still being written have none)")
    return found[-1]


def unreadable(ckpt, names=("consolidated.safetensors", "lora.safetensors", "state.pt", "config.json")):
    """Why one of a checkpoint's files cannot be read, or None. A kill never leaves a broken
    checkpoint (they are renamed into place when complete); a bad copy can (a truncated file).
    Cheap: a safetensors header must cover its file, a zip (state.pt) ends with its directory;
    the tensors themselves are not read."""
    from safetensors import SafetensorError, safe_open
    weights = [n for n in names if n.endswith(".safetensors") and os.path.isfile(os.path.join(ckpt, n))]
    if not weights:
        return f"{ckpt}: no weights (consolidated.safetensors or lora.safetensors)"
    for name in weights + [n for n in names if not n.endswith(".safetensors")]:
        path = os.path.join(ckpt, name)
        try:
            if name.endswith(".safetensors"):
                safe_open(path, "pt").keys()
            elif name.endswith(".pt"):
                zipfile.ZipFile(path).close()
            else:
                json.load(open(path))
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
            return f"{path}: {e}"
    return None


def resume_point(out_dir, master):
    """The checkpoint a rerun resumes from: the newest complete one in out_dir that can be read, or
    None to start afresh; none readable is an error. Newer ones that cannot be read are moved aside
    (rank 0 moves them, `master`), out of the ckpt-* names: else the rerun would not save their
    steps again, and would rotate them wrongly."""
    ckpts, problems = find_checkpoints(out_dir), {}
    for ckpt in reversed(ckpts):  # the newest that can be read
        problems[ckpt] = unreadable(ckpt)
        if problems[ckpt] is None:
            break
    resume = next((c for c, why in problems.items() if why is None), None)
    if ckpts and resume is None:
        raise ValueError(f"none of the {len(ckpts)} checkpoints in {out_dir} can be read; the newest: "
                         f"{problems[ckpts[-1]]}. Move them away to start afresh")
    if len(problems) > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has looked before rank 0 moves the broken ones away
    for ckpt, why in problems.items():
        if why and master:
            moved = os.path.join(out_dir, "unreadable-" + os.path.basename(ckpt))
            print(f"warning: {why}\n  checkpoint {ckpt} cannot be read: resuming from {resume}; moved to {moved}", flush=True)
            shutil.rmtree(moved, ignore_errors=True)  # a broken copy of the same step, from before
            os.replace(ckpt, moved)
    return resume


def trim_log(path, step):
    """Keep the log lines of steps up to `step` (the resumed one; 0 for a fresh start), so the steps
    run again after a kill are logged once. Rewritten atomically."""
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            return False
    if os.path.isfile(path):
        with open(path) as f:
            lines = [l.rstrip("\n") + "\n" for l in f if kept(l)]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def write_checkpoint(out_dir, step, model, optimizer, tokenizer_path, config):
    """out_dir/ckpt-{step:06d}: the weights (the adapter alone when the model has LoRA),
    tokenizer.model, config.json, state.pt (optimizer and step), then DONE; written in a .tmp-
    folder and renamed into place, so a kill never leaves a checkpoint that looks complete. A full
    disk removes the partial folder and says so; the checkpoints before it stay."""
    final, tmp = os.path.join(out_dir, f"ckpt-{step:06d}"), os.path.join(out_dir, f".tmp-ckpt-{step:06d}")
    if os.path.isdir(final):  # renamed into place only when complete: keep it
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        if hasattr(model, "lora_config"):
            save_lora(model, os.path.join(tmp, "lora.safetensors"))
        else:
            save_model(model, tmp)
        shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config, "step": step}, f, indent=2)
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(str(step))
    except Exception as e:  # torch.save reports a full disk as "unexpected pos", safetensors as "os error 28"
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e) \
            or shutil.disk_usage(out_dir).free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise RuntimeError(f"{final}: no space left on device; the partial checkpoint was removed, the ones "
                               f"before it are intact: free some space and rerun to resume") from None
        raise
    os.replace(tmp, final)  # atomic
    return final


def initial_path(config):
    """The folder training started from: as recorded (absolute), as typed (relative to the working
    folder), or as typed relative to this repository (its own base model, from any folder)."""
    tries = [config.get("init_path"), config["init"], os.path.join(ROOT, config["init"])]
    for path in filter(None, tries):
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"the checkpoint's base model init={config['init']} is not found; looked in "
                            + ", ".join(dict.fromkeys(filter(None, tries))))
