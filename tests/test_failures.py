"""A disk that fills up, or a kill, while train.py writes a checkpoint: one line that says so,
no partial checkpoint left to resume from, and a rerun that ends where a straight run does, each
step logged once."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import write_checkpoint
from model import ModelArgs, Transformer
from test_train import ROOT, assert_same_weights, common, final_weights, losses, run, suite  # noqa: F401 (suite: a fixture)

# train.py with its checkpoint writers patched: when writing ckpt-AT, write half of a file, then
# fail as a full disk does (state.pt: OSError ENOSPC; weights: safetensors' own error), or be killed
FAULTY_TRAIN = r'''
import errno, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import safetensors.torch, torch
from safetensors import SafetensorError
fault, at = sys.argv.pop(1), "ckpt-%06d" % int(sys.argv.pop(1))

def failing(real, error):
    def write(obj, path, *args, **kwargs):
        if at not in str(path):
            return real(obj, path, *args, **kwargs)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise error
    return write

if fault in ("state", "kill"):
    torch.save = failing(torch.save, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
else:
    safetensors.torch.save_file = failing(safetensors.torch.save_file, SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"))
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
'''


def args(suite, out):
    return common(suite, out, max_steps=6, lr_decay_steps=6, ckpt_interval=2, keep_last=5)


@pytest.fixture(scope="module")
def straight(suite, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    run(args(suite, out))
    return out


@pytest.mark.parametrize("fault", ["state", "weights", "kill"])
def test_full_disk_or_kill_while_writing_a_checkpoint(suite, straight, tmp_path, fault):
    out, wrapper = str(tmp_path / "out"), tmp_path / "faulty_train.py"
    wrapper.write_text(FAULTY_TRAIN)
    p = subprocess.run([sys.executable, str(wrapper), fault, "4"] + args(suite, out), cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    logged = [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))]
    assert logged == [1, 2, 3, 4]  # steps 3 and 4 ran after the last checkpoint
    if fault == "kill":
        assert p.returncode == -9 and sorted(os.listdir(out)) == [".tmp-ckpt-000004", "ckpt-000002", "log.jsonl"]
    else:  # one line naming the checkpoint; the partial folder is gone
        assert "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(
            f"error: {out}/ckpt-000004: no space left on device; the partial checkpoint was removed"), p.stderr[-2000:]
        assert sorted(os.listdir(out)) == ["ckpt-000002", "log.jsonl"]
    p = run(args(suite, out))  # the same command again, space freed
    assert f"resuming from {out}/ckpt-000002 at step 2" in p.stdout
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3, 4, 5, 6]  # each once
    assert losses(out) == pytest.approx(losses(straight), abs=1e-6)
    assert_same_weights(final_weights(straight), final_weights(out), atol=1e-6)
    assert sorted(os.listdir(out)) == ["ckpt-000002", "ckpt-000004", "ckpt-000006", "log.jsonl"]


def test_a_checkpoint_already_written_is_kept(tmp_path):
    """ckpt-{step} exists only once renamed into place, complete: writing the same step again keeps
    it as it is (no error from renaming onto a full folder, no second copy, no .tmp- folder left)."""
    tokenizer = os.path.join(ROOT, "assets", "base-nano", "tokenizer.model")
    args = ModelArgs(dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1, norm_eps=1e-5,
                     vocab_size=400, rope_theta=1e4)
    first, second = (Transformer(args).eval() for _ in range(2))
    with torch.no_grad():
        second.tok_embeddings.weight.add_(1.0)  # different weights, same step
    opt = torch.optim.AdamW(first.parameters())
    out = str(tmp_path)
    path = write_checkpoint(out, 4, first, opt, tokenizer, {"note": "first"})
    assert write_checkpoint(out, 4, second, opt, tokenizer, {"note": "second"}) == path
    assert sorted(os.listdir(out)) == ["ckpt-000004"]
    assert json.load(open(os.path.join(path, "config.json")))["note"] == "first"
    assert torch.equal(load_file(os.path.join(path, "consolidated.safetensors"))["tok_embeddings.weight"],
                       first.tok_embeddings.weight)
