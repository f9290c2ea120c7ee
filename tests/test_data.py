import json
import os

import numpy as np
import pytest

from data import (IGNORE, Encoded, TrainSampler, Tokenizer, build_sequence, collate, encode_example, encode_tasks,
                  load_tasks, pack, targets_for)
from suite import DEV, HELD_IN, HELD_OUT, make_suite, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran far away question answer yes no maybe red blue green".split()
    lines = [" ".join(rng.choice(words, 8)) + f" {rng.integers(1000)}." for _ in range(500)]
    return Tokenizer(train_tokenizer(lines, str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=300))


TASK = [{"input": "the cat sat", "output": "yes", "options": ["yes", "no"]},
        {"input": "a dog ran far", "output": "no", "options": ["yes", "no"]},
        {"input": "red blue", "output": "maybe so", "options": []}]


def test_tokenizer_ids_and_round_trip(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("the cat sat 123.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "the cat sat 123."
    assert tok.encode_continuation("cat") != tok.encode("cat")  # no dummy-prefix '▁' mid-text


def test_packed_tokens_equal_full_text_encoding(tok):
    enc = [encode_example(tok, ex) for ex in TASK]
    tokens, spans = pack(enc, tok.bos_id)
    full = "the cat sat\nyes\n\n\na dog ran far\nno\n\n\nred blue\nmaybe so\n"
    assert tokens == tok.encode(full, bos=True)  # exact, not merely within a token or two
    assert [tok.decode(tokens[s:e]) for s, e in spans] == ["\nyes\n", "\nno\n", "\nmaybe so\n"]  # "⏎y⏎"
    assert [tokens[s] for s, _ in spans] == [tok.newline_id] * 3 and all(tokens[e - 1] == tok.newline_id for _, e in spans)


def test_masks_position_by_position():
    # hand-built: <s>=1, x1=[5,6], answer1=[9,7,9], sep+x2=[9,9,8], answer2=[9,4,4,9]
    ex = [Encoded([5, 6], None, [9, 7, 9], []), Encoded(None, [9, 9, 8], [9, 4, 4, 9], [])]
    tokens, spans = pack(ex, 1)
    assert tokens == [1, 5, 6, 9, 7, 9, 9, 9, 8, 9, 4, 4, 9] and spans == [(3, 6), (9, 13)]
    _ = IGNORE
    assert targets_for(tokens, spans, "all").tolist() == [_, _, 9, 7, 9, _, _, _, 9, 4, 4, 9, _]
    assert targets_for(tokens, spans, "last").tolist() == [_, _, _, _, _, _, _, _, 9, 4, 4, 9, _]
    assert targets_for(tokens, spans, "none").tolist() == tokens[1:] + [_]


def test_build_sequence_masks_after_packing(tok):
    tasks = [{"input": f"question {i}", "output": f"answer {i}", "options": []} for i in range(60)]
    encoded = [encode_example(tok, ex) for ex in tasks]
    for mask in ("all", "last", "none"):
        tokens, targets = build_sequence(encoded, tok.bos_id, max_len=120, loss_mask=mask, seed=3)
        assert len(tokens) == len(targets) <= 120 and tokens[0] == tok.bos_id
        text = tok.decode(tokens[1:])
        blocks = text.rstrip("\n").split("\n\n\n")
        inputs = [b.split("\n")[0] for b in blocks]
        assert len(set(inputs)) == len(inputs)  # never repeated
        assert all(b == f"question {b.split()[1]}\nanswer {b.split()[1]}" for b in blocks)  # never split
        sup = targets != IGNORE
        assert (targets[sup] == tokens[1:][sup[:-1]]).all()  # alignment: targets[t] == tokens[t+1]
        if mask == "all":   # supervised text is exactly the answers with their newlines
            assert tok.decode(tokens[1:][sup[:-1]]) == "".join(f"\nanswer {i.split()[1]}\n" for i in inputs)
        if mask == "last":
            assert tok.decode(tokens[1:][sup[:-1]]) == f"\nanswer {inputs[-1].split()[1]}\n"
        if mask == "none":
            assert sup[:-1].all() and not sup[-1]
    # adding the next example would overflow: packing stopped at the right place
    tokens, _ = build_sequence(encoded, tok.bos_id, max_len=120, seed=3)
    order = np.random.default_rng(3).permutation(60)
    nxt = encode_example(tok, tasks[order[len(tok.decode(tokens[1:]).rstrip().split("\n\n\n"))]])
    assert len(tokens) + len(nxt.input_after_separator) + len(nxt.answer) > 120
    assert len(build_sequence(encoded, tok.bos_id, 10_000, seed=0, max_shots=5)[0]) < 200  # max_shots bounds it


def test_sampler_depends_only_on_seed_step_index(tok):
    tasks = {f"t{j}": [encode_example(tok, {"input": f"q {j} {i}", "output": f"a {i}"}) for i in range(30)] for j in range(4)}
    s = TrainSampler(tasks, tok.bos_id, 64, seed=7)
    global_batch = 8
    def steps(world_size, accum):  # what each (rank, micro-step) would draw, as train.py does
        out = {}
        for step in range(3):
            for rank in range(world_size):
                for micro in range(accum):
                    idx = micro * world_size + rank
                    out[(step, idx)] = s.sequence(step, idx)[0].tolist()
        return out
    one, eight = steps(1, global_batch), steps(8, 1)
    assert one == eight and len(one) == 24
    assert TrainSampler(tasks, tok.bos_id, 64, seed=7).sequence(2, 5)[0].tolist() == one[(2, 5)]  # resume
    assert one[(0, 0)] != one[(0, 1)]


def test_collate_pads_without_targets():
    x, y = collate([(np.array([1, 2, 3]), np.array([2, 3, -100])), (np.array([1, 4]), np.array([-100, -100]))])
    assert x.tolist() == [[1, 2, 3], [1, 4, 0]] and y.tolist() == [[2, 3, -100], [-100, -100, -100]]


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)
    return str(path)


def test_load_tasks_layouts(tmp_path):
    line = json.dumps({"task": "x", "input": "a", "output": "b", "options": [], "extra": 1}) + "\n"
    write(tmp_path / "meta" / "sst2_16_100_train.jsonl", line * 3)
    write(tmp_path / "meta" / "sst2_16_100_test.jsonl", line * 2)
    write(tmp_path / "plain" / "copa.jsonl", line)
    write(tmp_path / "folders" / "rte" / "train.jsonl", line * 4)
    write(tmp_path / "folders" / "rte" / "test.jsonl", line)
    tasks = load_tasks([str(tmp_path / "meta"), str(tmp_path / "plain"), str(tmp_path / "folders")], split="train")
    assert {k: len(v) for k, v in tasks.items()} == {"sst2": 3, "copa": 1, "rte": 4}
    assert tasks["sst2"][0] == {"input": "a", "output": "b", "options": []}
    assert {k: len(v) for k, v in load_tasks(str(tmp_path / "folders"), split="test").items()} == {"rte": 1}


def test_metaicl_names_with_underscores_and_every_split(tmp_path):
    """MetaICL's {task}_{k}_{seed}_{split}.jsonl: task names hold underscores (ag_news,
    poem_sentiment, ...), and each of train, dev and test is its own split: a test file must never
    be read as a task of its own (it would be trained on)."""
    sizes = {"train": 3, "dev": 2, "test": 1}
    for task in ("ag_news", "poem_sentiment", "sst2"):
        for split, n in sizes.items():
            rows = [json.dumps({"input": f"{task} {split} {i}", "output": "b"}) + "\n" for i in range(n)]
            write(tmp_path / "meta" / f"{task}_16_100_{split}.jsonl", "".join(rows))
    write(tmp_path / "folders" / "rte" / "dev.jsonl", '{"input": "rte dev", "output": "b"}\n')
    for split, n in sizes.items():
        tasks = load_tasks([str(tmp_path / "meta"), str(tmp_path / "folders")], split=split)
        expected = {"ag_news": n, "poem_sentiment": n, "sst2": n, **({"rte": 1} if split == "dev" else {})}
        assert {k: len(v) for k, v in tasks.items()} == expected, split
        assert all(ex["input"].split()[:2] == [task, split] for task in ("ag_news", "poem_sentiment", "sst2")
                   for ex in tasks[task])
    with pytest.raises(ValueError, match="task 'ag_news' comes from two files"):  # no split: all three are ag_news
        load_tasks(str(tmp_path / "meta"))


@pytest.mark.parametrize("content,message", [
    ('{"input": "a", "output": "b"}\n{"input": "a", "output": \n', r"bad.jsonl:2: malformed JSON"),
    ('{"input": "a"}\n', r"bad.jsonl:1: missing 'output'"),
    ('{"output": "a"}\n', r"bad.jsonl:1: missing 'input'"),
    ('{"input": 3, "output": "a"}\n', r"bad.jsonl:1: 'input' must be a string"),
    ('{"input": "a", "output": "b", "options": "b"}\n', r"bad.jsonl:1: 'options' must be a list"),
    ('{"input": "a", "output": "c", "options": ["a", "b"]}\n', r"bad.jsonl:1: output 'c' is not one of its options"),
    ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object"),
    ('\n\n', r"bad.jsonl: task file is empty"),
])
def test_bad_task_files_name_file_and_line(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        load_tasks(write(tmp_path / "bad.jsonl", content))


def test_blank_lines_are_skipped_not_the_end(tmp_path):
    """A blank line (an editor's, or between blocks) is passed over; the examples after it count,
    and an error after it still names its own line."""
    rows = '{"input": "a", "output": "b"}\n\n  \n{"input": "c", "output": "d"}\n'
    assert [ex["input"] for ex in load_tasks(write(tmp_path / "gaps.jsonl", rows))["gaps"]] == ["a", "c"]
    with pytest.raises(ValueError, match=r"late.jsonl:3: missing 'output'"):
        load_tasks(write(tmp_path / "late.jsonl", '{"input": "a", "output": "b"}\n\n{"input": "c"}\n'))


def test_missing_paths_and_duplicate_tasks(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_tasks(str(tmp_path / "nowhere.jsonl"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty: folder holds no .jsonl"):
        load_tasks(str(tmp_path / "empty"))
    line = '{"input": "a", "output": "b"}\n'
    a = write(tmp_path / "d" / "sst2_16_100_train.jsonl", line)
    b = write(tmp_path / "d" / "sst2_16_13_train.jsonl", line)
    with pytest.raises(ValueError, match="task 'sst2' comes from two files"):
        load_tasks([a, b])
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "no.model"))


def test_too_long_examples_are_skipped_and_counted(tok):
    tasks = {"a": [{"input": "cat " * 50, "output": "yes"}, {"input": "cat", "output": "no"}],
             "b": [{"input": "dog", "output": "yes"}]}
    enc, skipped = encode_tasks(tasks, tok, max_len=20)
    assert skipped == 1 and len(enc["a"]) == 1 and len(enc["b"]) == 1
    with pytest.raises(ValueError, match="task 'a': all 2 examples are longer than seq_len=5"):
        encode_tasks({"a": tasks["a"]}, tok, max_len=5)


def test_suite_is_deterministic_and_needs_context(tmp_path):
    a, b = make_suite(str(tmp_path / "a"), instances=(3, 2), n_train=(20, 20), n_test=5), make_suite(str(tmp_path / "b"), instances=(3, 2), n_train=(20, 20), n_test=5)
    train = load_tasks(os.path.join(a, "train"))
    assert train == load_tasks(os.path.join(b, "train"))
    assert len({t.rsplit("_", 1)[0] for t in train}) == len(HELD_IN) >= 6  # every held-in family has files
    held_out = load_tasks(os.path.join(a, "eval"), split="test")
    assert len({t.rsplit("_", 1)[0] for t in held_out}) == len(HELD_OUT) >= 4
    assert len({t.rsplit("_", 1)[0] for t in load_tasks(os.path.join(a, "dev"), split="test")}) == len(DEV) >= 4
    assert any(ex["options"] for exs in train.values() for ex in exs) and any(not ex["options"] for exs in train.values() for ex in exs)
    # two instances of a family hide different rules: same inputs, different answers
    cl = [load_tasks(os.path.join(a, "train", f"table_label_{i}.jsonl"))[f"table_label_{i}"] for i in (0, 1)]
    assert cl[0][0]["options"] != cl[1][0]["options"]
    Tokenizer(os.path.join(a, "tokenizer.model"))


def test_generic_share_of_suite_sequences_is_language_modelling(tok):
    """generic_share of the sequences are the base model's pre-training text (every next token a
    target), the rest task sequences (targets on answers only); share 0 draws no text at all."""
    from suite import SuiteSampler
    is_text = lambda seq: int((seq[1] != IGNORE).sum()) == len(seq[0]) - 1
    for share in (0.0, 0.25, 0.75):
        sampler = SuiteSampler(tok, 160, "all", seed=5, generic_share=share)
        text = np.mean([is_text(sampler.sequence(step, i)) for step in range(50) for i in range(8)])
        assert (text == 0) if share == 0 else abs(text - share) < 0.06, (share, text)


def test_suite_sampler_draws_a_fresh_hidden_rule_per_sequence(tok):
    from suite import SuiteSampler
    sampler = SuiteSampler(tok, 200, "all", seed=3, families=["number_rule"])
    a, b, c = sampler.sequence(5, 0), sampler.sequence(5, 0), sampler.sequence(5, 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    constants = set()
    for index in range(12):
        tokens, targets = sampler.sequence(7, index)
        text = tok.decode(tokens.tolist())
        pairs = [block.split("\n") for block in text.split("\n\n\n")]
        assert len(pairs) > 5 and all(len(p) == 2 for p in pairs[:-1])  # x ⏎y⏎ ⏎⏎x ⏎y⏎ ...
        shifts = {int(y) - int(x) for x, y in pairs[:-1]}
        assert len(shifts) == 1  # one hidden rule inside a sequence ...
        constants |= shifts
        assert (targets != IGNORE).sum() >= 2 * len(pairs)  # every answer supervised (mask all)
    assert len(constants) >= 4  # ... and a new one for (nearly) every sequence
    one_shot = SuiteSampler(tok, 200, "all", seed=3, max_shots=1, families=["edit"]).sequence(0, 0)
    assert tok.decode(one_shot[0].tolist()).count("\n") == 2
    few = SuiteSampler(tok, 400, "last", seed=3, max_shots=5, families=["lookup"]).sequence(0, 0)  # random shots:
    assert tok.decode(few[0].tolist()).count("\n") == 5 * 4 - 2  # only max_shots inputs drawn, all of them used


def test_stratified_shots_balance_labels_without_a_period(tok):
    from data import shot_order
    pool = [{"input": str(i), "output": "a" if i % 10 else "b", "options": ["a", "b"]} for i in range(100)]  # 90/10
    encoded = [encode_example(tok, ex) for ex in pool]
    rng = np.random.default_rng
    assert shot_order(encoded, rng(4)).tolist() == rng(4).permutation(100).tolist()  # "random": as before
    order = shot_order(encoded, rng(4), "stratified")
    assert sorted(order.tolist()) == list(range(100))  # every example once
    first = [pool[i]["output"] for i in order[:20]]
    assert first.count("a") == first.count("b") == 10  # balanced while both labels last
    starts = [first[r * 2] for r in range(10)]
    assert len(set(starts)) == 2  # the label order changes from round to round: no A B A B period
    free = [encode_example(tok, dict(ex, options=[])) for ex in pool]
    assert shot_order(free, rng(4), "stratified").tolist() == rng(4).permutation(100).tolist()  # free-form: random
    with pytest.raises(ValueError, match="shots"):
        shot_order(encoded, rng(4), "balanced")
    tokens, _ = build_sequence(encoded, tok.bos_id, 120, seed=1, shots="stratified")  # fewer than 20 shots fit
    answers = tok.decode(tokens.tolist()).split("\n")[1::4]  # x ⏎y⏎ ⏎⏎ ...
    assert abs(answers.count("a") - answers.count("b")) <= 1


def test_prefetched_sequences_equal_direct_ones(tok):
    from data import Prefetcher
    from suite import GenericSampler, SuiteSampler
    for sampler in (SuiteSampler(tok, 128, "all", seed=3), GenericSampler(tok, 128, seed=3)):
        prefetcher = Prefetcher(sampler, workers=2, ahead=1)
        try:
            for step in (0, 1, 5):  # a skipped step (a resume) too
                got = prefetcher.get(step, [0, 3])
                for i, (tokens, targets) in zip([0, 3], got):
                    want = sampler.sequence(step, i)
                    assert np.array_equal(tokens, want[0]) and np.array_equal(targets, want[1])
        finally:
            prefetcher.close()


def test_generic_stories_reward_long_context(tok):
    from suite import GenericSampler, generic_document
    doc = generic_document(np.random.default_rng(0))
    lines = doc.split("\n")
    name, animal = lines[0].split()[0], lines[0].split()[3]  # "bakori is a red fox from the lake."
    assert sum(name in line for line in lines[1:]) >= 3 or sum(animal in line for line in lines[1:]) >= 3
    tokens, targets = GenericSampler(tok, 300, seed=1).sequence(2, 0)
    assert len(tokens) == 300 and tokens[0] == tok.bos_id
    assert targets[:-1].tolist() == tokens[1:].tolist() and targets[-1] == IGNORE  # every next token


def test_held_out_and_dev_tasks_speak_their_own_vocabulary(tmp_path):
    """No label or dictionary answer of a dev or held-out task is ever an answer in training, no
    family is in two splits, and option test sets are balanced: naming one label scores
    1 / (number of labels)."""
    import suite
    assert not (set(HELD_IN) & set(DEV) or set(HELD_IN) & set(HELD_OUT) or set(DEV) & set(HELD_OUT))
    root = make_suite(str(tmp_path / "s"), instances=(20, 2), n_train=(40, 60), n_test=24)
    train_answers = {ex["output"] for exs in load_tasks(os.path.join(root, "train")).values() for ex in exs}
    train_answers |= {o for exs in load_tasks(os.path.join(root, "train")).values() for ex in exs for o in ex["options"]}
    for split in ("dev", "eval"):
        for name, exs in load_tasks(os.path.join(root, split), split="test").items():
            answers = {ex["output"] for ex in exs} | {o for ex in exs for o in ex["options"]}
            if exs[0]["options"] or name.startswith(("dev_lookup", "translate")):  # labels, not strings made from the input
                assert not answers & train_answers, (split, name, answers & train_answers)
            if exs[0]["options"]:
                counts = [sum(ex["output"] == o for ex in exs) for o in exs[0]["options"]]
                assert max(counts) - min(counts) <= 1, (name, counts)
    rng = np.random.default_rng(0)
    words = {w for _ in range(50) for w in suite.roster(rng).split()}
    assert not words & set(suite.ENGLISH["dev"]) and not words & set(suite.ENGLISH["test"])  # generic text too


def test_fresh_labels_in_held_in_instances_only(tok, tmp_path):
    """A third of held-in instances get answers that are new letter strings (no vocabulary to
    learn), in SuiteSampler's draws and in make_suite's held-in files alike; dev and held-out
    instances never do."""
    import re
    from suite import ENGLISH, SYLLABLE_SETS, label_words
    def fresh(labels, split="train"):  # lowercase letters, not one of the split's English words or syllable strings
        nonce = [re.compile("(?:" + "|".join(s) + ")+") for s in SYLLABLE_SETS[split]]
        return all(w.isalpha() and w.islower() and w not in ENGLISH[split] and not any(p.fullmatch(w) for p in nonce)
                   for w in labels)
    for split, low, high in (("train", 0.27, 0.40), ("dev", 0.0, 0.0), ("test", 0.0, 0.0)):
        share = np.mean([fresh(label_words(np.random.default_rng(i), split, 4), split) for i in range(600)])
        assert low <= share <= high, (split, share)
    from suite import SuiteSampler
    sampler = SuiteSampler(tok, 160, "all", seed=2, families=["lookup"])
    answers = [tok.decode(sampler.sequence(0, i)[0].tolist()).split("\n")[1::4] for i in range(90)]
    assert 0.2 <= np.mean([fresh(a[:1]) for a in answers]) <= 0.5  # the sampler's instances: a third fresh
    files = load_tasks(os.path.join(make_suite(str(tmp_path / "s"), instances=(30, 1), n_train=(4, 4), n_test=2), "train"))
    assert 0.15 <= np.mean([fresh([ex["output"] for ex in files[f"lookup_{i}"]]) for i in range(30)]) <= 0.55


def test_held_in_answers_run_long():
    """Held-in answers (one word, no space) run to 10-11 letters and 4-6 digits, longer than any
    dev or held-out answer: a model trained on short answers stops copying a long one early
    (RESULTS.md). No held-in answer is a held-out number (3 digits from 200)."""
    from suite import label_words
    answers = {split: [w for i in range(600) for w in label_words(np.random.default_rng(i), split, 4) if " " not in w]
               for split in ("train", "dev", "test")}
    lengths = {split: np.array([len(w) for w in a]) for split, a in answers.items()}
    assert lengths["train"].max() == 11 and np.mean(lengths["train"] >= 10) > 0.1
    assert lengths["dev"].max() == 7 and lengths["test"].max() == 9  # their vocabularies as they were
    numbers = [w for w in answers["train"] if w.isdigit()]
    assert {len(w) for w in numbers} == {1, 4, 5, 6} and 0.2 < len([w for w in numbers if len(w) > 1]) / len(numbers) < 0.8


def test_held_in_keys_share_endings():
    """Every held-in dictionary (table_label, lookup) has keys that share their endings and
    differ at the start, so only the whole key tells its answer; dev and held-out keys are drawn
    as before. The training mix draws the two recall families twice as often as the others."""
    from suite import HELD_IN, TRAIN_MIX, keys_and_values
    for i in range(60):
        keys, book = keys_and_values(np.random.default_rng(i), "train", 8)
        assert len(keys) >= 4 and set(book) == set(keys)
        ends = {k.split(" ")[-1] if " " in k else k[-2:] for k in keys}
        assert len(ends) <= 3 < len(keys) or len(keys) <= 3, keys  # several keys to an ending
        assert len({k.split(" ")[0] if " " in k else k[:-2] for k in keys}) >= 2, keys  # that differ before it
    dev = [keys_and_values(np.random.default_rng(i), "dev", 8)[0] for i in range(60)]
    assert np.mean([len({k[-2:] for k in keys}) > 3 for keys in dev]) > 0.5  # dev keys mostly end differently
    assert sorted(set(TRAIN_MIX)) == sorted(HELD_IN)
    assert {f: TRAIN_MIX.count(f) for f in HELD_IN} == dict(feature_label=1, part_label=1, edit=1, number_rule=1,
                                                             table_label=2, lookup=2)


def test_held_in_families_do_not_move_dev_and_held_out_files(tmp_path, monkeypatch):
    """Each suite file is drawn from its own generator: with a held-in family removed (or added,
    or changed), every dev and held-out file, and the generic test text, stays byte for byte."""
    import suite
    a = make_suite(str(tmp_path / "a"), instances=(2, 1), n_train=(10, 20), n_test=4)
    monkeypatch.setattr(suite, "HELD_IN", [f for f in suite.HELD_IN if f != "edit"])
    b = make_suite(str(tmp_path / "b"), instances=(2, 1), n_train=(10, 20), n_test=4)
    assert os.path.isfile(os.path.join(a, "train", "edit_0.jsonl")) and not os.path.isfile(os.path.join(b, "train", "edit_0.jsonl"))
    same = [os.path.join(split, task, f) for split in ("dev", "eval") for task in os.listdir(os.path.join(a, split))
            for f in ("train.jsonl", "test.jsonl")] + ["generic_test.txt", os.path.join("train", "lookup_1.jsonl")]
    assert len(same) > 16
    for name in same:
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read(), name
