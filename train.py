"""
ManyICL training: one task's examples packed to fill the context, a loss on every answer.

    python train.py                                   # our small base model, built-in suite, CPU, minutes
    python train.py config/mistral7b.py --lr=2e-4     # a config file, then typed overrides
    torchrun --standalone --nproc_per_node 8 train.py config/mistral7b.py

Single process without torchrun works too; under torchrun it is DDP (NCCL on GPU, gloo on CPU).
A checkpoint is a directory out_dir/ckpt-NNNNNN holding the weights (full, or the LoRA adapter),
config.json, tokenizer.model and state.pt; rerunning the same command resumes from the newest.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (find_checkpoints, initial_args, initial_model, load_model, resume_point, tokenizer_file, trim_log,
                         write_checkpoint)
from configurator import dtype_named, parse_config
from data import IGNORE, Prefetcher, TrainSampler, Tokenizer, check_shots, collate, encode_tasks, load_tasks
from lora import apply_lora, load_lora
from memory import checkpointing_mode, flops_per_token, peak_flops, sdpa_backend
from metaicl import read_setting, setting_file
from suite import SPLIT_OF, TRAIN_MIX, SUITE_DIR, GenericSampler, SuiteSampler, ensure_suite

ROOT = os.path.dirname(os.path.abspath(__file__))
# AdamW's betas as in GPT-3, LLaMA and nanoGPT: beta2 = 0.95 forgets old squared gradients faster
# than PyTorch's 0.999, which keeps steps stable when the gradients' scale changes
ADAMW_BETAS = (0.9, 0.95)
# A step's dropout RNG is seeded from (seed, step, rank) alone, so a resumed run draws the masks a
# straight one does; prime strides keep the seeds of a run's steps and ranks apart
SEED_STRIDE, STEP_STRIDE = 100_003, 1009


@dataclass
class TrainConfig:
    init: str = "assets/base-nano"     # a checkpoint directory, or "scratch" (a fresh model of `preset`);
                                       # the default is our small language model (RESULTS.md: "The base model")
    preset: str = "nano"               # model shape when init=scratch
    data: str = "suite"                # "suite": a fresh built-in task per sequence; "generic": plays, songs, stories for LM
                                       # pre-training (every token a target); or MetaICL JSONL files/folders
    setting: str = ""                  # MetaICL's config/{setting}.json (e.g. hr_to_lr): train on its "train" tasks,
                                       # {data}/{task}/{task}_16384_100_train.jsonl each ("" = every task in `data`)
    families: str = ""                 # suite families to train on, comma-separated, a family listed twice drawn twice
                                       # as often ("" = suite.TRAIN_MIX: the held-in families, recall twice)
    generic_share: float = 0.7         # share of suite sequences that are the base's own pre-training text, every
                                       # token a target: it keeps the base's recall (chosen on dev, RESULTS.md)
    eval_data: str = "data/suite/dev"  # tasks for the validation loss ("" = none); the suite's dev families by default
    tokenizer: str = ""                # default: the suite's, or tokenizer.model[.v3] inside `init`
    out_dir: str = "out"
    seq_len: int = 512                 # tokens per packed sequence (32768 for Mistral-7B-v0.3)
    batch_size: int = 16               # sequences per device per micro-step
    grad_accum: int = 1                # micro-steps per optimizer step, in total across all ranks
    max_steps: int = 800
    lr_decay_steps: int = 0            # cosine reaches min_lr here; 0 means max_steps
    lr: float = 5e-4                   # chosen on the dev families against 1.5e-4 and 1.5e-3 (RESULTS.md)
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


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_steps, then flat."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def tokenizer_path(cfg):
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init == "scratch":
        return os.path.join(ensure_suite(), "tokenizer.model")
    return tokenizer_file(cfg.init)


def split_default_batch(cfg, world, print0):
    """Under torchrun with the default grad_accum=1, split the global batch over the ranks (16
    sequences on 4 GPUs: 4 each, 4 micro-steps in total), so the run sees the very sequences of a
    single process. Typed values are left as they are (and checked below)."""
    if world > 1 and cfg.grad_accum == TrainConfig.grad_accum and cfg.batch_size % world == 0:
        cfg.batch_size, cfg.grad_accum = cfg.batch_size // world, world
        print0(f"global batch split over {world} ranks: batch_size={cfg.batch_size}, grad_accum={world}")


def check_options(cfg, world):
    """Refuse values that cannot work and options that would be silently ignored in this run."""
    if cfg.init != "scratch" and not any(os.path.isfile(os.path.join(cfg.init, f)) for f in ("params.json", "config.json")):
        raise FileNotFoundError(f"init={cfg.init}: not 'scratch' and not a checkpoint directory "
                                f"(no params.json or config.json)")
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} (total micro-steps) is not divisible by world size {world}")
    if cfg.loss_mask not in ("all", "last", "none"):
        raise ValueError(f"loss_mask must be all, last or none; got '{cfg.loss_mask}'")
    check_shots(cfg.shots)
    if not 0 <= cfg.generic_share < 1:
        raise ValueError(f"generic_share must be in [0, 1): the share of suite sequences that are generic text; got {cfg.generic_share}")
    if cfg.keep_last < 1 or not cfg.task_temperature > 0:
        raise ValueError(f"keep_last must be at least 1 and task_temperature above 0; got {cfg.keep_last}, {cfg.task_temperature}")
    text = cfg.data in ("suite", "generic")
    for names, ignored, why in (  # options that would have no effect in this run
            ("setting", text, "it needs data=<MetaICL data folder> (holding {task}/{task}_16384_100_train.jsonl)"),
            ("families generic_share", cfg.data != "suite", "only the built-in suite (data=suite) has families"),
            ("task_temperature", text, "it weights task files by their size; the suite and generic text have none"),
            ("preset", cfg.init != "scratch", "the model's shape comes from init; preset is for init=scratch"),
            ("lora_alpha lora_dropout lora_targets", not cfg.lora_rank, "LoRA is off (lora_rank=0)"),
            ("memory_budget_gib", cfg.activation_checkpointing != "auto", "only activation_checkpointing=auto plans for it"),
            ("max_shots shots", cfg.data == "generic", "data=generic is plain text, not examples")):
        changed = [n for n in names.split() if getattr(cfg, n) != getattr(TrainConfig, n)]
        if ignored and changed:
            raise ValueError(f"{', '.join(changed)} would be ignored: {why}")
    if cfg.data == "generic" and cfg.loss_mask != "none":
        raise ValueError("data=generic is language modelling (every token a target): pass loss_mask=none")


def make_samplers(cfg, tok):
    """The training sampler, the validation one (None without eval_data) and a line about the data."""
    max_shots = cfg.max_shots or None
    if cfg.data == "suite" or os.path.abspath(cfg.eval_data) == os.path.join(SUITE_DIR, "dev"):
        ensure_suite()  # generated once, a few seconds; one rank writes, the others wait (a lock)
    if cfg.data == "suite":  # every sequence a fresh instance of a held-in family (suite.SuiteSampler)
        families = cfg.families.split(",") if cfg.families else TRAIN_MIX
        unknown = sorted(set(families) - set(SPLIT_OF))
        if unknown:
            raise ValueError(f"families: unknown {', '.join(unknown)}; the suite has {', '.join(SPLIT_OF)} "
                             f"(its generic text is not a family: --generic_share sets how much of it)")
        sampler = SuiteSampler(tok, cfg.seq_len, cfg.loss_mask, cfg.seed, max_shots, families, cfg.shots, cfg.generic_share)
        about_data = f"built-in suite: a fresh task instance per sequence, {cfg.generic_share:.0%} of them generic text"
    elif cfg.data == "generic":  # language-model pre-training on fresh generic stories
        sampler = GenericSampler(tok, cfg.seq_len, cfg.seed)
        about_data = "generic text: fresh stories, every token a target"
    else:  # MetaICL's training files: those of a setting's "train" tasks, or every file given
        files = ([setting_file(cfg.data, t, 16384, 100, "train") for t in read_setting(cfg.setting, "train")]
                 if cfg.setting else cfg.data.split(","))
        train_tasks, skipped = encode_tasks(load_tasks(files, split="train"), tok, cfg.seq_len)
        sampler = TrainSampler(train_tasks, tok.bos_id, cfg.seq_len, cfg.loss_mask, cfg.seed, cfg.task_temperature,
                               max_shots, cfg.shots)
        about_data = (f"{len(train_tasks)} training tasks, {sum(map(len, train_tasks.values()))} examples "
                      f"({skipped} skipped: longer than seq_len={cfg.seq_len})")
    val_sampler = None
    if cfg.eval_data:
        val_tasks, _ = encode_tasks(load_tasks(cfg.eval_data.split(","), split="train"), tok, cfg.seq_len)
        val_sampler = TrainSampler(val_tasks, tok.bos_id, cfg.seq_len, cfg.loss_mask, cfg.seed + 1, math.inf,  # tasks alike
                                   max_shots, cfg.shots)
    return sampler, val_sampler, about_data


def all_reduce(values, device):
    """The sums over ranks (in float64), or the values themselves in a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def validation_loss(model, sampler, cfg, device, autocast):
    """Token-weighted loss on fixed held-out sequences, sharded over ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(rank, cfg.eval_sequences, world):
        x, y = (t.to(device) for t in collate([sampler.sequence(0, i)], cfg.seq_len if cfg.compile else None))
        n = int((y != IGNORE).sum())
        with autocast:
            loss_sum += model(x, y).item() * n
        count += n
    model.train()
    loss_sum, count = all_reduce([loss_sum, count], device)
    return loss_sum / max(count, 1)


def save_checkpoint(cfg, step, model, optimizer, tok, master):
    """Rank 0 writes out_dir/ckpt-{step} and keeps the newest keep_last; every rank waits for it."""
    if master:
        write_checkpoint(cfg.out_dir, step, model, optimizer, tok.path,
                         {**asdict(cfg), "lora_targets": cfg.lora_targets.split(","),
                          "init_path": os.path.abspath(cfg.init)})  # eval finds the base from any folder
        for old in find_checkpoints(cfg.out_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def main(argv):
    cfg = parse_config(argv, TrainConfig)
    for name in ("init", "eval_data"):  # the defaults live in this repository, wherever it is run from
        if getattr(cfg, name) == getattr(TrainConfig, name) and not os.path.exists(getattr(cfg, name)):
            setattr(cfg, name, os.path.join(ROOT, getattr(cfg, name)))

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
    dtype = dtype_named(cfg.dtype, device)

    # ---- validate everything cheap before anything heavy (every rank fails with the same message)
    split_default_batch(cfg, world, print0)
    check_options(cfg, world)
    micro_steps = cfg.grad_accum // world
    sdpa_backend(cfg.sdpa_backend), checkpointing_mode(cfg.activation_checkpointing)  # validate names
    tok = Tokenizer(tokenizer_path(cfg))
    args = initial_args(cfg.init, cfg.preset, tok.vocab_size)  # the model's shape, read without loading weights
    if args.max_seq_len is not None and cfg.seq_len > args.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    if tok.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces, the model only {args.vocab_size}")
    sampler, val_sampler, about_data = make_samplers(cfg, tok)
    print0(f"{about_data}; world size {world}, "
           f"{micro_steps} micro-steps x {cfg.batch_size} sequences per rank, global batch {cfg.batch_size * cfg.grad_accum}")

    # ---- model: fresh, or loaded; then LoRA; then resume
    resume = resume_point(cfg.out_dir, master)  # the newest readable checkpoint in out_dir, or None
    weights_dtype = dtype if cfg.lora_rank else torch.float32  # frozen base in bf16; trained weights fp32
    if resume and not cfg.lora_rank:
        model = load_model(resume, device, weights_dtype)
    else:  # init's weights, or (init="scratch") a random init on the CPU: eval rebuilds it as the baseline
        model = initial_model(cfg.init, args, cfg.seed, device, weights_dtype)
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
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable")
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=ADAMW_BETAS, fused=use_cuda)
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
    signals = []  # the signals received
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.append(signum))

    # ---- the loop
    flops = flops_per_token(args, cfg.seq_len, lora=cfg.lora_rank > 0)
    peak = peak_flops(device)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        trim_log(os.path.join(cfg.out_dir, "log.jsonl"), step)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None  # one JSON object per step
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    prefetcher = Prefetcher(sampler, cfg.workers)
    model.train()
    while step < cfg.max_steps:
        t0 = time.time()
        torch.manual_seed(cfg.seed * SEED_STRIDE + step * STEP_STRIDE + rank)  # dropout RNG: a function of (step, rank)
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
        n_targets = [int((y != IGNORE).sum()) for _, y in batches]  # per micro-batch, counted before any backward
        local_tokens = sum(len(tokens) for seqs in sequences for tokens, _ in seqs)  # real tokens, no padding
        total_targets, total_tokens = all_reduce([sum(n_targets), local_tokens], device)
        loss_sum = 0.0
        for m, ((x, y), n) in enumerate(zip(batches, n_targets)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if ddp:
                forward.require_backward_grad_sync = m == micro_steps - 1  # sync grads only on the last micro-step
            with sdpa_backend(cfg.sdpa_backend):
                with autocast:
                    loss = forward(x, y)
                # mean over this micro-batch's targets -> share of the global token-weighted mean;
                # times world because DDP averages gradients over ranks
                (loss * n / total_targets * world).backward()
            loss_sum += loss.item() * n
        loss_sum, = all_reduce([loss_sum], device)
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
            entry["val_loss"] = validation_loss(model, val_sampler, cfg, device, autocast)
        if master:
            log.write(json.dumps(entry) + "\n"); log.flush()
            if step % cfg.log_interval == 0 or step == cfg.max_steps or "val_loss" in entry:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
        stop_now, = all_reduce([float(bool(signals))], device)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or stop_now:
            save_checkpoint(cfg, step, model, optimizer, tok, master)
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
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress bar's line: the message gets its own
            bar.close()
        where = traceback.extract_tb(e.__traceback__)[-1]
        sys.exit(f"error: {e}  [{os.path.basename(where.filename)}:{where.lineno}]")
