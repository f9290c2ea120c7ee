"""train.py end to end, as users run it: subprocesses, 2-process gloo DDP, resume, signals."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import load_model, save_model
from model import ModelArgs, Transformer
from suite import make_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return make_suite(str(tmp_path_factory.mktemp("suite")), instances=(2, 1), n_train=(80, 80), n_test=10)


def common(suite, out, **kw):
    cfg = dict(init="scratch", preset="tiny", data=f"{suite}/train", eval_data=f"{suite}/eval", tokenizer=f"{suite}/tokenizer.model", out_dir=out,
               seq_len=96, batch_size=1, grad_accum=2, max_steps=3, warmup_steps=1, eval_interval=2, eval_sequences=2,
               log_interval=1, ckpt_interval=100, lr=3e-3)
    cfg.update(kw)
    cfg["preset"] = cfg["preset"] if cfg["init"] == "scratch" else None  # a checkpoint has its own shape
    return [f"--{k}={v}" for k, v in cfg.items() if v is not None]  # None: leave the key alone


def run(args, nproc=1, check=True, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
          [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    p = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(out, key="loss"):
    return [json.loads(l).get(key) for l in open(os.path.join(out, "log.jsonl"))]


def optimizer_state(out, step):
    return torch.load(os.path.join(out, f"ckpt-{step:06d}", "state.pt"), weights_only=True)


def assert_same_optimizer_state(a, b, atol):
    """AdamW's step count and both moments of every parameter, and the step saved beside them."""
    assert a["step"] == b["step"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in sa[i]:
            worst = (sa[i][k].double() - sb[i][k].double()).abs().max().item()
            assert worst <= atol * (1 if k != "exp_avg_sq" else 1e-3), (i, k, worst)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def final_weights(out):
    ckpt = sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))[-1]
    return load_file(os.path.join(out, ckpt, "consolidated.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


def test_ddp_two_processes_equal_one_process_with_accumulation(suite, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(common(suite, one, grad_accum=2))
    p = run(common(suite, two, grad_accum=2), nproc=2)
    assert "world size 2, 1 micro-steps" in p.stdout
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert_same_weights(final_weights(one), final_weights(two), atol=1e-5)
    # the gradient itself (AdamW and clipping would hide a wrong scale) and the validation loss
    # over both ranks' shards, at steps 2 and 3
    assert losses(one, "grad_norm") == pytest.approx(losses(two, "grad_norm"), rel=1e-4)
    assert losses(one, "val_loss")[1:] == pytest.approx(losses(two, "val_loss")[1:], rel=1e-5)
    assert None not in losses(two, "val_loss")[1:]
    # grad_accum is the global count: a world size that does not divide it is a clear error
    p = run(common(suite, str(tmp_path / "bad"), grad_accum=3), nproc=2, check=False)
    assert p.returncode != 0 and "grad_accum=3 (total micro-steps) is not divisible by world size 2" in p.stderr


def test_resume_is_exact(suite, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(common(suite, straight, max_steps=6, lr_decay_steps=6))
    run(common(suite, resumed, max_steps=3, lr_decay_steps=6))
    p = run(common(suite, resumed, max_steps=6, lr_decay_steps=6, workers=1))  # sequences made ahead by a worker
    assert "resuming from" in p.stdout and "ckpt-000003" in p.stdout
    assert losses(resumed)[3:] == pytest.approx(losses(straight)[3:], abs=1e-6)
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=1e-6)
    assert sorted(os.listdir(resumed)) == ["ckpt-000003", "ckpt-000006", "log.jsonl"]  # keep_last=2, no .tmp left
    assert_same_optimizer_state(optimizer_state(straight, 6), optimizer_state(resumed, 6), atol=1e-6)


def test_sigterm_writes_loadable_checkpoint(suite, tmp_path):
    out = str(tmp_path / "sig")
    cmd = [sys.executable, "train.py"] + common(suite, out, max_steps=10_000, eval_interval=10_000)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(log) and os.path.getsize(log) > 0) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "signal received: checkpoint written" in stdout
    ckpts = [d for d in os.listdir(out) if d.startswith("ckpt-")]
    assert len(ckpts) == 1 and not any(d.startswith(".tmp") for d in os.listdir(out))
    load_model(os.path.join(out, ckpts[0]))


def test_loss_decreases_on_tiny_default(suite, tmp_path):
    out = str(tmp_path / "learn")
    # data="suite" is train.py's default: a fresh built-in task instance for every sequence
    run(common(suite, out, data="suite", max_steps=40, seq_len=256, batch_size=2, warmup_steps=5, eval_interval=40))
    l = losses(out)
    assert sum(l[-5:]) / 5 < 0.6 * sum(l[:3]) / 3, l
    last = json.loads(open(os.path.join(out, "log.jsonl")).readlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "target_tokens_per_s", "val_loss"} <= last.keys()


def test_lora_on_pretrained_checkpoint_trains_only_adapter(suite, tmp_path):
    base_dir = str(tmp_path / "base")
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, vocab_size=1024, rope_theta=1e6, max_seq_len=512)
    save_model(Transformer(args).init_weights(3), base_dir)
    out = str(tmp_path / "lora")
    run(common(suite, out, init=base_dir, lora_rank=4, lora_alpha=8, lr=1e-2))
    ckpt = os.path.join(out, "ckpt-000003")
    adapter = load_file(os.path.join(ckpt, "lora.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert len(adapter) == 2 * 7 * args.n_layers
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved away from zero
    assert not os.path.exists(os.path.join(ckpt, "consolidated.safetensors"))  # no base weights saved
    p = run(common(suite, str(tmp_path / "long"), init=base_dir, lora_rank=4, seq_len=1024), check=False)
    assert "seq_len=1024 exceeds the model's max_seq_len=512" in p.stderr
    small = str(tmp_path / "small")  # a tokenizer with more pieces than the model has embeddings
    save_model(Transformer(dataclasses.replace(args, vocab_size=100)).init_weights(3), small)
    p = run(common(suite, str(tmp_path / "small-out"), init=small), check=False)
    assert p.returncode != 0 and "tokenizer.model has 333 pieces, the model only 100" in p.stderr


def tiny_base(base_dir):
    args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, vocab_size=1024, rope_theta=1e6, max_seq_len=512)
    save_model(Transformer(args).init_weights(3), base_dir)
    return base_dir


def test_lora_resume_is_exact(suite, tmp_path):
    """Stopped after 2 steps and rerun to 4: the adapter, AdamW's state and the losses equal a
    straight run's (the base is frozen, so only these carry the run). The adapter's random init
    is a function of the seed, so the two runs' first steps are the same too."""
    base_dir = tiny_base(str(tmp_path / "base"))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    lora = dict(init=base_dir, lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=4, lr_decay_steps=4, eval_interval=100,
                ckpt_interval=2)
    run(common(suite, straight, **lora))
    run(common(suite, resumed, **{**lora, "max_steps": 2}))
    assert losses(resumed) == losses(straight)[:2]  # step 2 depends on lora_A's init: same seed, same A
    a, b = (load_file(os.path.join(out, "ckpt-000002", "lora.safetensors")) for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p = run(common(suite, resumed, **lora))
    assert "resuming from" in p.stdout and "ckpt-000002" in p.stdout
    assert losses(resumed)[2:] == pytest.approx(losses(straight)[2:], abs=1e-6)
    assert losses(resumed, "grad_norm")[2:] == pytest.approx(losses(straight, "grad_norm")[2:], rel=1e-5)
    a, b = (load_file(os.path.join(out, "ckpt-000004", "lora.safetensors")) for out in (straight, resumed))
    assert_same_weights(a, b, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    assert_same_optimizer_state(optimizer_state(straight, 4), optimizer_state(resumed, 4), atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--nope=1"], "unknown config key 'nope'"),
    (["--max_steps=abc"], "bad value 'abc' for 'max_steps'"),
    (["--compile=maybe"], "bad value 'maybe' for 'compile'"),
    (["--loss_mask=some"], "loss_mask must be all, last or none"),
    (["--data=/nonexistent/tasks"], "/nonexistent/tasks: no such task file or folder"),
    (["--init=/nonexistent/model"], "init=/nonexistent/model: not 'scratch' and not a checkpoint directory"),
    (["config/does_not_exist.py"], "cannot read config file config/does_not_exist.py"),
])
def test_bad_config_fails_fast_with_clear_message(suite, tmp_path, args, message):
    p = run(common(suite, str(tmp_path / "x")) + args, check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_config_file_then_overrides(suite, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("max_steps = 1\nlr = 1e-3\nloss_mask = 'last'\n")
    out = str(tmp_path / "c")
    run([str(cfg)] + common(suite, out, max_steps=2, lr=None))
    saved = json.load(open(os.path.join(out, "ckpt-000002", "config.json")))
    assert saved["loss_mask"] == "last" and saved["max_steps"] == 2 and saved["lr"] == 1e-3


def test_help_and_key_value_with_a_space():
    from train import TrainConfig
    for script, key in (("train.py", "loss_mask"), ("bench.py", "prefix")):
        for flag in ("--help", "-h"):
            p = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and f"--{key}=" in p.stdout, p.stderr
    help_text = run(["--help"]).stdout
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}={getattr(TrainConfig, name)}" in help_text
    assert "last (MetaICL)" in help_text  # the same-line comment of loss_mask, read from the source
    p = run(["--max_step", "3"], check=False)
    assert p.returncode != 0 and "unknown config key 'max_step' (command line); did you mean 'max_steps'?" in p.stderr
    p = run(["--max_steps"], check=False)
    assert p.returncode != 0 and "--max_steps needs a value" in p.stderr


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(suite, tmp_path):
    out = str(tmp_path / "trunc")
    run(common(suite, out, max_steps=2, ckpt_interval=1, eval_interval=100))
    newest = os.path.join(out, "ckpt-000002", "consolidated.safetensors")
    with open(newest, "r+b") as f:  # a full disk: the weights file cut short
        f.truncate(os.path.getsize(newest) // 2)
    # --key value (a space) works as well as --key=value
    p = run(common(suite, out, max_steps=None, ckpt_interval=1, eval_interval=100) + ["--max_steps", "3"])
    assert "warning: " + newest in p.stdout and "resuming from " + os.path.join(out, "ckpt-000001") + " at step 1" in p.stdout
    assert sorted(os.listdir(out)) == ["ckpt-000002", "ckpt-000003", "log.jsonl", "unreadable-ckpt-000002"]
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]  # step 2 ran twice, logged once
    for _ in range(2):  # the same step broken twice: the second broken copy replaces the first
        open(os.path.join(out, "ckpt-000003", "state.pt"), "w").write("not a zip")
        p = run(common(suite, out, max_steps=3, ckpt_interval=1, eval_interval=100))
        assert "resuming from " + os.path.join(out, "ckpt-000002") + " at step 2" in p.stdout
    assert sorted(os.listdir(out)) == ["ckpt-000002", "ckpt-000003", "log.jsonl", "unreadable-ckpt-000002",
                                       "unreadable-ckpt-000003"]
    for ckpt in ("ckpt-000002", "ckpt-000003"):  # none readable: one clear error naming the file
        open(os.path.join(out, ckpt, "state.pt"), "w").write("not a zip")
    p = run(common(suite, out, max_steps=4), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "none of the 2 checkpoints" in p.stderr and os.path.join(out, "ckpt-000003", "state.pt") in p.stderr
