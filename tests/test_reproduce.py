"""config/reproduce.py: every arm sees the same tokens, and a claim's margin is read in units of
the seeds' spread, with the sign that favours the better arm."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "config", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_see_equal_tokens(reproduce, tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RUNS", str(tmp_path))
    monkeypatch.setattr(reproduce, "SAMPLE", 64)
    base = os.path.join(ROOT, "assets", "base-nano")
    batches = reproduce.arm_batches(base)
    shapes = json.load(open(tmp_path / "arms.json"))
    assert batches["manyicl"] == batches["mask-last"] == reproduce.BATCH
    per_step = {a: batches[a] * s["tokens_per_sequence"] for a, s in shapes.items()}
    for arm, tokens in per_step.items():  # equal within one sequence's rounding
        assert abs(tokens - per_step["manyicl"]) <= shapes[arm]["tokens_per_sequence"] / 2 + 1e-6, arm
    assert batches["zero-shot"] > 10 * batches["few-shot"] / 2 > batches["manyicl"]  # ~14 and ~230 tokens against ~506
    answers = {a: s["answers_per_sequence"] for a, s in shapes.items()}
    assert answers["zero-shot"] == answers["few-shot"] == answers["mask-last"] == 1.0  # one supervised answer each
    assert answers["manyicl"] > 10
    from suite import HELD_IN
    from train import TrainConfig
    from configurator import parse_config
    arm = parse_config(reproduce.ARM_DATA, TrainConfig)  # what every multi-task arm trains on
    assert arm.families.split(",") == HELD_IN and arm.generic_share == 0 and arm.data == "suite"


def test_margin_in_units_of_spread(reproduce):
    lead, z = reproduce.margin([0.6, 0.7, 0.8], [0.4, 0.5, 0.6])
    spread = np.sqrt((np.var([0.6, 0.7, 0.8]) + np.var([0.4, 0.5, 0.6])) / 2)
    assert lead == pytest.approx(0.2) and z == pytest.approx(0.2 / spread)
    lead, z = reproduce.margin([1.0, 1.2], [1.5, 1.7], better="lower")  # a loss: lower is better
    assert lead == pytest.approx(0.5) and z == pytest.approx(5.0)
    assert reproduce.margin([0.5], [0.5])[0] == 0


def test_mean_spread_is_the_population_std(reproduce):
    """RESULTS.md's "mean ± std over the 3 training seeds": numpy's std (ddof=0) of the seeds' values."""
    assert reproduce.mean_spread([0.5, 0.6, 0.7]) == "0.600 ± 0.082"
    assert reproduce.mean_spread([0.25, None]) == "0.250 ± 0.000" and reproduce.mean_spread([None]) == "–"


def test_logged_tokens(reproduce, tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:
        for tokens, targets, ms in ((8000, 3000, 250.0), (7990, 2900, 500.0)):
            f.write(json.dumps(dict(tokens_per_s=tokens / ms * 1000, target_tokens_per_s=targets / ms * 1000, ms=ms)) + "\n")
    assert reproduce.logged(tmp_path) == (15990, 5900)


def test_by_family_averages_a_familys_instances(reproduce):
    score = {"test_table_0": 1.0, "test_table_1": 0.5, "suffix_0": 0.0, "suffix_1": 0.25, "suffix_2": 0.5}
    assert reproduce.by_family(list(score), score.get) == {"suffix": 0.25, "test_table": 0.75}


def test_recall_scores_a_repeated_keys_first_answer_token(reproduce, monkeypatch, capsys):
    """`--recall` (the base's recall table in RESULTS.md): top-1 on the first answer token after a
    key seen before in the sequence, and only there. Scored here on a model that knows the layout:
    it names a repeated key's answer, never a new key's, and never the newline; so exactly 1.00 for
    every kind of key (0.50 if new keys counted, 0.00 if the opening newline were the target)."""
    import torch
    import checkpoints
    import data
    base = os.path.join(ROOT, "assets", "base-nano")
    nl = data.Tokenizer(os.path.join(base, "tokenizer.model")).newline_id

    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            t = tokens[0].tolist()
            pred = [0 if nxt == nl else nxt for nxt in t[1:]] + [0]
            seen, key_start = set(), 1  # <s> key ⏎ answer ⏎ ⏎⏎ key ⏎ answer ⏎ ...
            for i in range(1, len(t) - 1):
                if key_start is not None and t[i] == nl:  # the answer's opening newline
                    key = tuple(t[key_start + (key_start == 1):i])  # the first has sentencepiece's '▁' before it
                    pred[i] = t[i + 1] if key in seen else 0
                    seen.add(key)
                    key_start = None
                elif t[i] == nl and t[i - 1] == nl and t[i + 1] != nl:  # the separator ends: a key begins
                    key_start = i + 1
            return torch.nn.functional.one_hot(torch.tensor(pred), 512).float()[None]

    monkeypatch.setattr(checkpoints, "load_model", lambda path: Oracle())
    reproduce.recall([base], n_seq=2)
    line = capsys.readouterr().out.strip()
    assert line == (f"{base}: recall top-1 by key kind: nonce 1.00, english 1.00, held-out english 1.00, "
                    "number 1.00, held-out phrase 1.00")


def test_long_answer_probe_is_dev_vocabulary(reproduce, tmp_path):
    """`--long_answers`: 24 lookups in eval.py's layout, answers of 6-14 letters spelled only in
    the dev vocabularies (dev syllables, dev words) or numbers of 2-5 digits, every test key seen
    in the pool."""
    import re
    import suite
    from data import load_tasks
    reproduce.long_answers(str(tmp_path))
    pools, tests = load_tasks(str(tmp_path), split="train"), load_tasks(str(tmp_path), split="test")
    assert sorted(pools) == sorted(tests) and len(tests) == 24
    spelled = {"nonce": re.compile("(?:" + "|".join(suite.SYLLABLE_SETS["dev"][0]) + ")+"),
               "compound": re.compile("(?:" + "|".join(suite.ENGLISH["dev"]) + "){2}"), "num": re.compile("[1-9][0-9]*")}
    for name, rows in tests.items():
        kind = next(k for k in spelled if k in name)
        low, high = (2, 5) if kind == "num" else (6, 14)
        assert len(rows) == 64 and all(low <= len(r["output"]) <= high and spelled[kind].fullmatch(r["output"]) for r in rows)
        book = {r["input"]: r["output"] for r in pools[name]}
        assert all(book[r["input"]] == r["output"] for r in rows)
    longest = lambda kind: max(len(r["output"]) for name, rows in tests.items() if kind in name for r in rows)
    assert longest("devlong") >= 12 and longest("devnum") == 5


def test_outside_tasks_hold_what_they_claim(tmp_path):
    """config/outside_tasks.py: three sets in eval.py's layout; in set3 no test input is in its
    pool (recall of the same key cannot answer), in set2's dictionary every test key is; an
    option task's answer is one of its options; and the files are the same on every run."""
    from data import load_tasks
    script = os.path.join(ROOT, "config", "outside_tasks.py")
    spec = importlib.util.spec_from_file_location("outside_tasks", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tmp_path / "a"))
    module.main(str(tmp_path / "b"))
    for name in ("set1", "set2", "set3"):
        pools, tests = (load_tasks([str(tmp_path / "a" / name)], split) for split in ("train", "test"))
        assert len(pools) == len(tests) >= 12 and {len(v) for v in pools.values()} == {200}
        assert {len(v) for v in tests.values()} == {32}
        for task, test in tests.items():
            pool_inputs = {e["input"] for e in pools[task]}
            assert all(not e["options"] or e["output"] in e["options"] for e in test + pools[task]), task
            if name == "set3":
                assert not pool_inputs & {e["input"] for e in test}, task
            if task.startswith("recall"):
                assert {e["input"] for e in test} <= pool_inputs, task
        for task in tests:
            for split in ("train", "test"):
                same = open(tmp_path / "a" / name / task / f"{split}.jsonl").read()
                assert same == open(tmp_path / "b" / name / task / f"{split}.jsonl").read()
