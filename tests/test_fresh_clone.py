"""A fresh clone, used as a new user would: torchrun on a tree without the suite, eval.py from
another folder, eval.py on the committed base, a newer suite beside a user's own files."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's files as git would clone them (no data/suite/, no out/), committed."""
    dest = tmp_path_factory.mktemp("clone") / "manyicl"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(dest / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), dest / name)
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=dest, check=True,
                                    capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "clone")
    assert not (dest / "data" / "suite").exists()
    return dest


def run(cmd, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_torchrun_on_a_tree_without_the_suite_then_eval_from_elsewhere(clone, tmp_path):
    # every rank needs the suite at once: one writes it, the others wait for it
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "train.py",
         "--max_steps=2", "--batch_size=1", "--grad_accum=3", "--seq_len=128", "--eval_interval=1",
         "--eval_sequences=3", "--out_dir=out"], cwd=clone)
    assert (clone / "data" / "suite" / "DONE").is_file()
    # the default global batch of 16 sequences splits over 4 ranks by itself: 4 each, the same data as one process
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "train.py",
               "--max_steps=1", "--seq_len=64", "--eval_interval=1", "--eval_sequences=4", "--out_dir=out4"], cwd=clone)
    assert "batch_size=4, grad_accum=4" in out and "global batch 16" in out
    run([sys.executable, "train.py", "--max_steps=1", "--seq_len=64", "--eval_interval=1", "--eval_sequences=4",
         "--out_dir=out1"], cwd=clone)
    four, one = (json.loads(open(clone / d / "log.jsonl").readline()) for d in ("out4", "out1"))
    assert four["loss"] == pytest.approx(one["loss"], abs=1e-5) and four["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    # eval.py and sample.py from another folder, on that checkpoint: the base is found
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run([sys.executable, str(clone / "eval.py"), "--ckpt", str(clone / "out"), "--ks", "0,1", "--seeds", "100",
               "--max_test", "2"], cwd=elsewhere)
    assert "base mean" in out and (clone / "out" / "eval.json").is_file()
    demos = clone / "data" / "suite" / "eval" / sorted(os.listdir(clone / "data" / "suite" / "eval"))[0] / "train.jsonl"
    out = run([sys.executable, str(clone / "sample.py"), f"--ckpt={clone / 'out'}", f"--demos={demos}", "--k=2",
               "--prompt=abc"], cwd=elsewhere)
    assert out.startswith("abc\t")
    # eval.py on the committed base writes nothing into the tree git tracks
    run([sys.executable, "eval.py", "--ckpt", "assets/base-nano", "--ks", "0", "--seeds", "100", "--max_test", "2"],
        cwd=clone)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", status


def test_a_newer_suite_removes_only_its_own_files(tmp_path, monkeypatch):
    out = str(tmp_path / "suite")
    make = suite.make_suite
    small = lambda d: make(d, instances=(1, 1), n_train=(4, 4), n_test=2)
    monkeypatch.setattr(suite, "make_suite", small)
    monkeypatch.setattr(suite, "SUITE_VERSION", "old")
    suite.ensure_suite(out)
    written = open(os.path.join(out, "DONE")).read().split("\n")[1:-1]
    assert written and all(os.path.isfile(os.path.join(out, w)) for w in written)
    mine = [os.path.join(out, "train", "my_task.jsonl"), os.path.join(out, "eval", "my_task", "train.jsonl")]
    for path in mine:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write('{"input": "a", "output": "b"}\n')
    stale = os.path.join(out, written[0])
    os.rename(stale, stale + ".keep")  # stands for a file the old suite wrote that the new one does not
    open(os.path.join(out, "DONE"), "a").write(written[0] + ".keep\n")
    monkeypatch.setattr(suite, "SUITE_VERSION", "new")
    suite.ensure_suite(out)
    assert open(os.path.join(out, "DONE")).read().split()[0] == "new"
    assert all(os.path.isfile(p) for p in mine)             # the user's files survive
    assert not os.path.exists(stale + ".keep")              # the old suite's leave no trace
    assert os.path.isfile(stale)                            # and the new suite is whole


def test_a_suite_that_lists_no_files_is_moved_aside(tmp_path, monkeypatch):
    out = tmp_path / "suite"
    (out / "eval" / "mine").mkdir(parents=True)
    (out / "eval" / "mine" / "train.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (out / "DONE").write_text("v6 1234")
    def new_suite(d):
        os.makedirs(d)  # the old folder is out of the way
        open(os.path.join(d, "DONE"), "w").write(f"{suite.SUITE_VERSION} 0\n")
    monkeypatch.setattr(suite, "make_suite", new_suite)
    suite.ensure_suite(str(out))
    assert (tmp_path / "suite-v6" / "eval" / "mine" / "train.jsonl").is_file()
    assert (out / "DONE").read_text().split()[0] == suite.SUITE_VERSION


def test_train_and_eval_from_other_folders(tmp_path, monkeypatch):
    """train.py --init=mybase, run in the folder holding mybase; then eval's base, loaded from
    another folder, is mybase itself (the checkpoint records where it was, not only as typed)."""
    import torch
    import train
    from checkpoints import load_model
    from inference import load_models
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(os.path.join(ROOT, "assets", "base-nano"), work / "mybase")
    monkeypatch.chdir(work)
    train.main(["--init=mybase", "--max_steps=1", "--seq_len=64", "--batch_size=2", "--eval_data=", "--out_dir=out"])
    monkeypatch.chdir(elsewhere)
    base, _, _, config = load_models(str(work / "out"), "cpu", torch.float32)
    assert config["init"] == "mybase"
    mine = load_model(str(work / "mybase"))
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), mine.state_dict().values()))
    # and train.py run from that other folder with its defaults: the base and the dev families of
    # the validation loss are this repository's, wherever it is run from
    train.main(["--max_steps=1", "--seq_len=64", "--batch_size=2", "--eval_interval=1", "--eval_sequences=2", "--out_dir=out"])
    assert "val_loss" in json.loads(open(elsewhere / "out" / "log.jsonl").readline())
