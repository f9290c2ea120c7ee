"""
ManyICL training: one task's examples packed to fill the context, a loss on every answer.

    python train.py                                   # our small base model, built-in suite, CPU, minutes
    python train.py config/mistral7b.py --lr=2e-4     # a config file, then typed overrides
    torchrun --standalone --nproc_per_node 8 train.py config/mistral7b.py

Single process without torchrun works too; under torchrun it is DDP (NCCL on GPU, gloo on CPU).
A checkpoint is a directory out_dir/ckpt-NNNNNN holding the weights (full, or the LoRA adapter),
config.json, tokenizer.model and state.pt; rerunning the same command resumes from the newest.
"""
import ast
import difflib
import inspect
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import tokenize
import traceback
import zipfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import HELD_IN, IGNORE, GenericSampler, Prefetcher, SuiteSampler, TrainSampler, Tokenizer, collate, encode_tasks, ensure_suite, load_tasks
from model import (PRESETS, ModelArgs, Transformer, flops_per_token, plan_checkpointing, read_hf_config, read_params_json,
                   sdpa_backend, training_memory)
from lora import apply_lora, load_lora, save_lora


@dataclass
class TrainConfig:
    init: str = "assets/base-nano"     # a checkpoint directory, or "scratch" (a fresh model of `preset`);
                                       # the default is our small language model (README: "The base model")
    preset: str = "nano"               # model shape when init=scratch
    data: str = "suite"                # "suite": a fresh built-in task per sequence; "generic": plays, songs, stories for LM
                                       # pre-training (every token a target); or MetaICL JSONL files/folders
    families: str = ""                 # suite families to train on, comma-separated ("" = data.HELD_IN)
    eval_data: str = "data/suite/eval" # held-out tasks for the validation loss ("" = none)
    tokenizer: str = ""                # default: the suite's, or tokenizer.model[.v3] inside `init`
    out_dir: str = "out"
    seq_len: int = 512                 # tokens per packed sequence (32768 for Mistral-7B-v0.3)
    batch_size: int = 16               # sequences per device per micro-step
    grad_accum: int = 1                # micro-steps per optimizer step, in total across all ranks
    max_steps: int = 800
    lr_decay_steps: int = 0            # cosine reaches min_lr here; 0 means max_steps
    lr: float = 5e-4                   # 2e-3 erased the base model's recall within 200 steps (README)
    min_lr: float = 5e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    loss_mask: str = "all"             # all (ManyICL) | last (MetaICL) | none (language modelling)
    max_shots: int = 0                 # examples per sequence; 0 = as many as fit (ManyICL)
    shots: str = "random"              # order of the shots: random | stratified (labels balanced round-robin)
    workers: int = 0                   # background processes making the next steps' sequences (0 = in the loop)
    task_temperature: float = math.inf # task sampling ∝ size**(1/T); inf = uniform over tasks
    lora_rank: int = 0                 # 0 = train every weight (right for a small model; the paper uses 16)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    dtype: str = "auto"                # auto: bfloat16 on GPU, float32 on CPU
    compile: bool = False
    activation_checkpointing: str = "none"  # none | full | selective (keep attention outputs) | auto (per block, to fit the budget)
    memory_budget_gib: float = 0.0     # peak memory "auto" plans for; 0 = 90% of the GPU's (on the CPU: no checkpointing)
    sdpa_backend: str = "auto"         # auto | cudnn | flash | efficient | math (see bench.py)
    eval_interval: int = 50
    eval_sequences: int = 16
    ckpt_interval: int = 50
    keep_last: int = 2
    log_interval: int = 10
    device: str = "auto"


def parse_config(argv, config_class=None):
    """Defaults, then an optional config file of `key = literal` lines, then --key=value (or
    --key value). -h / --help lists every key with its default and comment, and exits."""
    config_class = config_class or TrainConfig
    cfg, valid = config_class(), {f.name: f.type for f in fields(config_class)}
    overrides, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            print(config_help(config_class))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:  # --key value
                if not argv or argv[0].startswith("--"):
                    sys.exit(f"error: {arg} needs a value: --{key}=VALUE or --{key} VALUE")
                value = argv.pop(0)
            overrides.append((key, value, "command line"))
        else:  # a config file: python syntax, but only literal assignments (never exec'd)
            try:
                tree = ast.parse(open(arg).read(), arg)
            except (OSError, SyntaxError) as e:
                sys.exit(f"error: cannot read config file {arg}: {e}")
            for node in tree.body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    sys.exit(f"error: {arg}:{node.lineno}: only `key = value` lines are allowed")
                overrides.append((node.targets[0].id, ast.literal_eval(node.value), f"{arg}:{node.lineno}"))
    for key, value, where in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            sys.exit(f"error: unknown config key '{key}' ({where}); {hint} (--help lists them all)")
        try:
            setattr(cfg, key, convert(value, valid[key]))
        except ValueError:
            sys.exit(f"error: bad value {value!r} for '{key}' ({where}): expected {valid[key]}")
    return cfg


def config_help(config_class):
    """The script's docstring, then every key with its default and the comment beside it in the
    class: read from the source, so those comments stay the one place a key is documented. A
    comment alone on the next line, indented past the key, continues it."""
    comments, name, col = {}, None, 0
    for t in tokenize.generate_tokens(io.StringIO(inspect.getsource(config_class)).readline):
        if t.type == tokenize.NAME and t.line[:t.start[1]].isspace():  # first word of a line
            name, col = t.string, t.start[1]
        elif t.type == tokenize.COMMENT and name and (not t.line[:t.start[1]].isspace() or t.start[1] > col):
            comments[name] = (comments.get(name, "") + " " + t.string.lstrip("# ")).strip()
    doc = (getattr(sys.modules["__main__"], "__doc__", None) or "").strip("\n")
    keys = [(f"  --{f.name}={getattr(config_class, f.name)!s}", comments.get(f.name, "")) for f in fields(config_class)]
    width = max(len(k) for k, _ in keys) + 2
    return "\n".join([doc, "", "keys (--key=value or --key value; default shown):"] +
                     [f"{k:<{width}}{c}".rstrip() for k, c in keys])


def convert(value, typ):
    if not isinstance(value, str):
        return typ(value)
    if typ == "bool" or typ is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return {"int": int, "float": float, "str": str}.get(typ, typ)(value)


def checkpointing_mode(name, model=None, cfg=None, dtype=torch.float32):
    """model.activation_checkpointing for a config name. "auto" (given the model): the per-block
    plan that recomputes least while its estimated peak (model.estimate_peak) fits
    cfg.memory_budget_gib, or with none set 90% of the GPU memory this process holds or could take
    (the estimate is rough: the 10% is its margin). On the CPU with no budget "auto" is "none":
    torch cannot see host memory, and CPU runs are small."""
    if name not in ("none", "full", "selective", "auto"):
        raise ValueError(f"activation_checkpointing must be none, full, selective or auto; got '{name}'")
    if name != "auto" or model is None:
        return name
    device = next(model.parameters()).device
    if cfg.memory_budget_gib:
        budget = cfg.memory_budget_gib * 2**30
    elif device.type == "cuda":
        budget = 0.9 * (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device))
    else:
        return "none"
    fixed, estimate = training_memory(model, dtype)
    return plan_checkpointing(model.args, cfg.seq_len, cfg.batch_size, budget, fixed, **estimate)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_steps, then flat."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU. None when unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("4090", 165e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def find_checkpoints(out_dir):
    """Complete checkpoints, oldest first. Incomplete ones still carry a .tmp- name."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("ckpt-"))


def unreadable(ckpt, names=("consolidated.safetensors", "lora.safetensors", "state.pt", "config.json")):
    """Why one of a checkpoint's files cannot be read, or None. Checkpoints are renamed into place
    only when complete, so a kill never leaves a broken one; a full disk or a bad copy can (a
    truncated file). Cheap: a safetensors header must cover its file, a zip (state.pt) ends with
    its directory; the tensors themselves are not read."""
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


def tokenizer_path(cfg):
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init == "scratch":
        return os.path.join(ensure_suite(), "tokenizer.model")
    for name in ("tokenizer.model.v3", "tokenizer.model"):
        if os.path.isfile(os.path.join(cfg.init, name)):
            return os.path.join(cfg.init, name)
    raise FileNotFoundError(f"{cfg.init}: no tokenizer.model.v3 or tokenizer.model; set --tokenizer=PATH")


def base_model_args(cfg, vocab_size):
    """The model's shape, read without loading weights (so bad configs fail fast)."""
    if cfg.init == "scratch":
        if cfg.preset not in PRESETS:
            raise ValueError(f"unknown preset '{cfg.preset}'; choose one of {sorted(PRESETS)}")
        return ModelArgs(**{**PRESETS[cfg.preset], "vocab_size": vocab_size})
    if os.path.isfile(os.path.join(cfg.init, "params.json")):
        return read_params_json(os.path.join(cfg.init, "params.json"))
    if os.path.isfile(os.path.join(cfg.init, "config.json")):
        return read_hf_config(os.path.join(cfg.init, "config.json"), [])
    raise FileNotFoundError(f"init={cfg.init}: not 'scratch' and not a checkpoint directory (no params.json/config.json)")


def main(argv):
    cfg = parse_config(argv)

    # ---- distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1
    ddp = "RANK" in os.environ
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    master = rank == 0
    print0 = lambda *a: master and print(*a, flush=True)
    dtype = {"auto": torch.bfloat16 if use_cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32, "float16": torch.float16}[cfg.dtype]

    # ---- validate everything cheap before anything heavy (every rank fails with the same message)
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} (total micro-steps) is not divisible by world size {world}")
    if cfg.loss_mask not in ("all", "last", "none"):
        raise ValueError(f"loss_mask must be all, last or none; got '{cfg.loss_mask}'")
    if cfg.shots not in ("random", "stratified"):
        raise ValueError(f"shots must be random or stratified; got '{cfg.shots}'")
    micro_steps = cfg.grad_accum // world
    sdpa_backend(cfg.sdpa_backend), checkpointing_mode(cfg.activation_checkpointing)  # validate names
    tok = Tokenizer(tokenizer_path(cfg))
    args = base_model_args(cfg, tok.vocab_size)
    if args.max_seq_len is not None and cfg.seq_len > args.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    if tok.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces, the model only {args.vocab_size}")
    max_shots = cfg.max_shots or None
    if cfg.data == "suite" or cfg.eval_data == TrainConfig.eval_data:
        ensure_suite()  # generated once, a few seconds
    if cfg.data == "suite":  # every sequence a fresh instance of a held-in family (data.SuiteSampler)
        families = cfg.families.split(",") if cfg.families else HELD_IN
        sampler = SuiteSampler(tok, cfg.seq_len, cfg.loss_mask, cfg.seed, max_shots, families, cfg.shots)
        about_data = "built-in suite: a fresh task instance per sequence"
    elif cfg.data == "generic":  # language-model pre-training on fresh generic stories
        sampler = GenericSampler(tok, cfg.seq_len, cfg.seed)
        about_data = "generic text: fresh stories, every token a target"
    else:
        train_tasks, skipped = encode_tasks(load_tasks(cfg.data.split(","), split="train"), tok, cfg.seq_len)
        sampler = TrainSampler(train_tasks, tok.bos_id, cfg.seq_len, cfg.loss_mask, cfg.seed, cfg.task_temperature,
                               max_shots, cfg.shots)
        about_data = (f"{len(train_tasks)} training tasks, {sum(map(len, train_tasks.values()))} examples "
                      f"({skipped} skipped: longer than seq_len={cfg.seq_len})")
    val_sampler = None
    if cfg.eval_data:
        val_tasks, _ = encode_tasks(load_tasks(cfg.eval_data.split(","), split="train"), tok, cfg.seq_len)
        val_sampler = TrainSampler(val_tasks, tok.bos_id, cfg.seq_len, cfg.loss_mask, cfg.seed + 1, math.inf, max_shots)
    print0(f"{about_data}; world size {world}, "
           f"{micro_steps} micro-steps x {cfg.batch_size} sequences per rank, global batch {cfg.batch_size * cfg.grad_accum}")

    # ---- model: fresh, or loaded; then LoRA; then resume
    ckpts, problems = find_checkpoints(cfg.out_dir), {}
    for ckpt in reversed(ckpts):  # the newest that can be read
        problems[ckpt] = unreadable(ckpt)
        if problems[ckpt] is None:
            break
    resume = next((c for c, why in problems.items() if why is None), None)
    if ckpts and resume is None:
        raise ValueError(f"none of the {len(ckpts)} checkpoints in {cfg.out_dir} can be read; the newest: "
                         f"{problems[ckpts[-1]]}. Move them away to start afresh")
    if ddp and len(problems) > 1:
        dist.barrier()  # every rank has looked before rank 0 moves the broken ones away
    for ckpt, why in problems.items():
        if why:  # moved out of the ckpt-* names, or the rerun would not save that step, or rotate wrongly
            moved = os.path.join(cfg.out_dir, "unreadable-" + os.path.basename(ckpt))
            print0(f"warning: {why}\n  checkpoint {ckpt} cannot be read: resuming from {resume}; moved to {moved}")
            if master:
                shutil.rmtree(moved, ignore_errors=True)  # a broken copy of the same step, from before
                os.replace(ckpt, moved)
    weights_dtype = dtype if cfg.lora_rank else torch.float32  # frozen base in bf16; trained weights fp32
    if resume and not cfg.lora_rank:
        model = Transformer.from_pretrained(resume, device, weights_dtype)
    elif cfg.init == "scratch":  # random init on the CPU (reproducible: eval rebuilds it as the baseline)
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device="cpu").init_weights(cfg.seed).to(device, weights_dtype)
    else:
        model = Transformer.from_pretrained(cfg.init, device, weights_dtype)
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)  # LoRA's A is drawn from torch's global RNG: a function of the seed, like the rest
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets.split(",")))
        if resume:
            load_lora(model, os.path.join(resume, "lora.safetensors"))
    model.activation_checkpointing = checkpointing_mode(cfg.activation_checkpointing, model, cfg, dtype)
    if cfg.activation_checkpointing == "auto":
        plan = model.checkpointing_plan()
        print0("activation checkpointing (auto): " + ", ".join(f"{plan.count(s)} {s}" for s in ("full", "selective", "none")))
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable")
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=use_cuda)
    step = 0
    if resume:
        state = torch.load(os.path.join(resume, "state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print0(f"resuming from {resume} at step {step}")
    forward = model.compile_blocks() if cfg.compile else model
    if ddp:  # DDP over trainable parameters only: frozen base weights are neither broadcast nor bucketed
        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if not p.requires_grad])
        forward = DDP(forward, device_ids=[local_rank] if use_cuda else None)
    autocast = torch.autocast("cuda", dtype=dtype, enabled=use_cuda and dtype != torch.float32)

    # ---- pre-emption: finish the step, write a checkpoint, exit cleanly
    stop = {"requested": False}
    def on_signal(signum, frame):
        stop["requested"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def all_reduce(values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    def save_checkpoint(step):
        final = os.path.join(cfg.out_dir, f"ckpt-{step:06d}")
        if master and not os.path.isdir(final):
            tmp = os.path.join(cfg.out_dir, f".tmp-ckpt-{step:06d}")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if cfg.lora_rank:
                save_lora(model, os.path.join(tmp, "lora.safetensors"))
            else:
                model.save_pretrained(tmp)
            shutil.copy(tok.path, os.path.join(tmp, "tokenizer.model"))
            json.dump({**asdict(cfg), "lora_targets": cfg.lora_targets.split(","), "step": step},
                      open(os.path.join(tmp, "config.json"), "w"), indent=2)
            torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(tmp, "state.pt"))
            open(os.path.join(tmp, "DONE"), "w").write(str(step))
            os.replace(tmp, final)  # atomic: a crash never leaves a half checkpoint named ckpt-*
            for old in find_checkpoints(cfg.out_dir)[:-cfg.keep_last]:
                shutil.rmtree(old)
        if ddp:
            dist.barrier()

    @torch.no_grad()
    def validation_loss():
        """Token-weighted loss on fixed held-out sequences, sharded over ranks."""
        model.eval()
        loss_sum, count = 0.0, 0
        for i in range(rank, cfg.eval_sequences, world):
            x, y = (t.to(device) for t in collate([val_sampler.sequence(0, i)], cfg.seq_len if cfg.compile else None))
            n = int((y != IGNORE).sum())
            with autocast:
                loss_sum += model(x, y).item() * n
            count += n
        model.train()
        loss_sum, count = all_reduce([loss_sum, count])
        return loss_sum / max(count, 1)

    # ---- the loop
    flops = flops_per_token(args, cfg.seq_len, lora=cfg.lora_rank > 0)
    peak = peak_flops(device)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None  # one JSON object per step
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    prefetcher = Prefetcher(sampler, cfg.workers)
    model.train()
    while step < cfg.max_steps:
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100_003 + step * 1009 + rank)  # dropout RNG: a function of (step, rank)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # this rank's micro-batches; global index = (micro * world + rank) * batch_size + b,
        # so the global batch is the same whatever the world size
        mine = [(m * world + rank) * cfg.batch_size + b for m in range(micro_steps) for b in range(cfg.batch_size)]
        made = prefetcher.get(step, mine)  # sampler.sequence(step, i) for each, made ahead by workers
        sequences = [made[m * cfg.batch_size:(m + 1) * cfg.batch_size] for m in range(micro_steps)]
        pad_to = cfg.seq_len if cfg.compile else None  # fixed shapes: a compiled model never recompiles
        batches = [collate(seqs, pad_to) for seqs in sequences]
        local_targets = sum(int((y != IGNORE).sum()) for _, y in batches)
        local_tokens = sum(len(tokens) for seqs in sequences for tokens, _ in seqs)  # real tokens, no padding
        total_targets, total_tokens = all_reduce([local_targets, local_tokens])
        loss_sum = 0.0
        for m, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = int((y != IGNORE).sum())
            if ddp:
                forward.require_backward_grad_sync = m == micro_steps - 1  # sync grads only on the last micro-step
            with sdpa_backend(cfg.sdpa_backend):
                with autocast:
                    loss = forward(x, y)
                # mean over this micro-batch's targets -> share of the global token-weighted mean;
                # times world because DDP averages gradients over ranks
                (loss * n / total_targets * world).backward()
            loss_sum += loss.item() * n
        loss_sum, = all_reduce([loss_sum])
        step_loss = loss_sum / total_targets
        if not math.isfinite(step_loss):
            raise RuntimeError(f"non-finite loss {step_loss} at step {step + 1}; stopping without a checkpoint")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        dt = time.time() - t0
        entry = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "ms": dt * 1000,
                 "tokens_per_s": total_tokens / dt, "target_tokens_per_s": total_targets / dt}
        if peak:
            entry["mfu"] = flops * total_tokens / dt / (peak * world)
            entry["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if val_sampler and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            entry["val_loss"] = validation_loss()
        if master:
            log.write(json.dumps(entry) + "\n"); log.flush()
            if step % cfg.log_interval == 0 or step == cfg.max_steps or "val_loss" in entry:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
        stop_now, = all_reduce([float(stop["requested"])])
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop_now:
            save_checkpoint(step)
        if stop_now:
            print0(f"signal received: checkpoint written at step {step}, exiting")
            break
    bar.close()
    prefetcher.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:  # a message, not a traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        sys.exit(f"error: {e}  [{os.path.basename(where.filename)}:{where.lineno}]")
