"""MetaICL's settings by name: config/{setting}.json picks the training tasks (train.py) and the
test tasks (eval.py, each seed with its own files) out of a MetaICL data folder."""
import json
import os

import pytest

import data
import metaicl
import eval as ev
from data import write_jsonl
from test_eval import WORDS, fake_checkpoint, tok  # noqa: F401 (tok: a fixture)
from test_train import run

TRAIN_TASKS = {"ag_news": 30, "glue-sst2": 25}        # {task}_16384_100_train.jsonl of these sizes
TEST_TASKS = {"superglue-rte": {100: 16, 13: 16},     # the largest demonstration pool per seed
              "tweet_eval-hate": {100: 40, 13: 36}}
TEST_SIZE = {100: 6, 13: 5}                           # {task}_16_{seed}_test.jsonl
SEEDS = (100, 13)


def rows(n, tag=""):
    """n option examples; their inputs carry `tag` (which file they came from), if any."""
    return [dict(task="t", input=f"{tag}{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}",
                 output=["yes", "no"][i % 2], options=["yes", "no"]) for i in range(n)]


def metaicl_folder(root):
    """MetaICL's layout, {task}/{task}_{k}_{seed}_{split}.jsonl, with the files a real folder has
    beside the ones a setting uses (other k, dev splits, a task of no setting), and the setting."""
    for task, n in TRAIN_TASKS.items():
        write_jsonl(f"{root}/{task}/{task}_16384_100_train.jsonl", rows(n))
        write_jsonl(f"{root}/{task}/{task}_16_100_train.jsonl", rows(16))  # not for training
        write_jsonl(f"{root}/{task}/{task}_16_100_dev.jsonl", rows(4))
    for task, pools in TEST_TASKS.items():
        for s, n in pools.items():
            write_jsonl(f"{root}/{task}/{task}_16_{s}_train.jsonl", rows(16))
            if n > 16:
                write_jsonl(f"{root}/{task}/{task}_{n}_{s}_train.jsonl", rows(n))
            write_jsonl(f"{root}/{task}/{task}_16_{s}_dev.jsonl", rows(4))
            write_jsonl(f"{root}/{task}/{task}_16_{s}_test.jsonl", rows(TEST_SIZE[s], f"test{s} "))
            write_jsonl(f"{root}/{task}/{task}_32_{s}_test.jsonl", rows(3))  # another k's test set: never scored
    write_jsonl(f"{root}/other_task/other_task_16_100_test.jsonl", rows(4))
    setting = os.path.join(root, "setting.json")
    json.dump({"train": list(TRAIN_TASKS), "test": list(TEST_TASKS)}, open(setting, "w"))
    return setting


def test_setting_files(tmp_path):
    root = str(tmp_path / "metaicl")
    setting = metaicl_folder(root)
    assert metaicl.read_setting(setting, "train") == ["ag_news", "glue-sst2"]
    files = metaicl.setting_eval_files(root, setting, SEEDS)
    assert set(files) == set(TEST_TASKS)
    assert files["tweet_eval-hate"][13] == (f"{root}/tweet_eval-hate/tweet_eval-hate_36_13_train.jsonl",
                                            f"{root}/tweet_eval-hate/tweet_eval-hate_16_13_test.jsonl")
    assert files["superglue-rte"][100][0].endswith("superglue-rte_16_100_train.jsonl")
    # what is missing is named: the key, the task, the file or pattern looked for
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["ag_news"]}))
    with pytest.raises(ValueError, match=r'bad.json: needs "test": a non-empty list of task names'):
        metaicl.read_setting(str(bad), "test")
    for tasks in ([], ["ag_news", 3], ["ag_news", ""], "ag_news"):  # empty, not names, not a list
        bad.write_text(json.dumps({"train": tasks}))
        with pytest.raises(ValueError, match=r'bad.json: needs "train": a non-empty list of task names'):
            metaicl.read_setting(str(bad), "train")
    with pytest.raises(FileNotFoundError, match=r"task 'superglue-rte' of the setting: no .*superglue-rte_\*_42_train.jsonl"):
        metaicl.setting_eval_files(root, setting, (100, 42))
    with pytest.raises(FileNotFoundError, match="cannot read it"):
        metaicl.read_setting(str(tmp_path / "none.json"), "train")
    # a task named twice is one task, in the order first named (its file read once, not merged with itself)
    bad.write_text(json.dumps({"train": ["glue-sst2", "ag_news", "glue-sst2"]}))
    assert metaicl.read_setting(str(bad), "train") == ["glue-sst2", "ag_news"]


def test_train_on_a_setting(tmp_path, tok):
    root = str(tmp_path / "metaicl")
    setting = metaicl_folder(root)
    common = [f"--tokenizer={tok.path}", "--init=scratch", "--preset=tiny", "--eval_data=", "--seq_len=96",
              "--batch_size=1", "--max_steps=2", "--warmup_steps=1"]
    p = run(common + [f"--data={root}", f"--setting={setting}", f"--out_dir={tmp_path / 'out'}"])
    assert f"2 training tasks, {sum(TRAIN_TASKS.values())} examples" in p.stdout  # only the 16384_100 files
    # a task of the setting missing from the folder, a key missing from the setting, no data folder
    json.dump({"train": ["ag_news", "no_such_task"], "test": []}, open(tmp_path / "missing.json", "w"))
    json.dump({"test": ["ag_news"]}, open(tmp_path / "nokey.json", "w"))
    for args, message in (([f"--data={root}", f"--setting={tmp_path / 'missing.json'}"],
                           f"task 'no_such_task' of the setting: no {root}/no_such_task/no_such_task_16384_100_train.jsonl"),
                          ([f"--data={root}", f"--setting={tmp_path / 'nokey.json'}"], 'nokey.json: needs "train"'),
                          ([f"--setting={setting}"], "needs data=<MetaICL data folder>")):
        p = run(common + args + [f"--out_dir={tmp_path / 'x'}"], check=False)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_eval_on_a_setting_uses_each_seeds_files(tmp_path, tok, capsys):
    out, ckpt = fake_checkpoint(tmp_path, tok)
    root = str(tmp_path / "metaicl")
    setting = metaicl_folder(root)
    res = ev.main(["--ckpt", str(out), "--tasks", root, "--setting", setting, "--ks", "0,16,32,100,max",
                   "--seeds", "100,13", "--seq_len", "512", "--device", "cpu", "--no_base"])
    printed = capsys.readouterr().out
    assert set(res["tasks"]) == set(TEST_TASKS)  # exactly the setting's test tasks
    hate, rte = res["tasks"]["tweet_eval-hate"], res["tasks"]["superglue-rte"]
    assert hate["n_pool"] == {"100": 40, "13": 36} and rte["n_pool"] == 16  # each seed's largest pool
    assert hate["n_test"] == rte["n_test"] == {"100": 6, "13": 5}           # each seed's test file
    for s in SEEDS:
        assert all(x["input"].startswith(f"test{s} ") for x in hate["k"]["16"]["trained"]["seeds"][str(s)]["samples"])
    assert hate["k"]["32"]["trained"]["seeds"]["13"]["shots"] == 32
    assert hate["k"]["max"]["trained"]["seeds"]["100"]["shots"] == 40
    assert hate["k"]["max"]["trained"]["seeds"]["13"]["shots"] == 36
    # k above a pool: reported with the pool file, in eval.json and under the table, never capped
    pool = f"{root}/superglue-rte/superglue-rte_16_100_train.jsonl"
    assert rte["k"]["32"] == {"skipped": f"k=32 is larger than the demonstration pool (16 examples) ({pool})"}
    assert f"task 'superglue-rte', k=32: skipped: k=32 is larger than the demonstration pool" in printed
    assert "skipped" in hate["k"]["100"] and res["summary"]["32"]["trained"]["n_tasks"] == 1
    assert res["settings"]["setting"] == setting
    # the default seeds with a setting are MetaICL's; a missing one is named
    with pytest.raises(FileNotFoundError, match=r"task 'superglue-rte' of the setting: no .*superglue-rte_\*_21_train.jsonl"):
        ev.main(["--ckpt", str(out), "--tasks", root, "--setting", setting, "--device", "cpu", "--no_base"])
