"""
MetaICL's settings: config/{setting}.json names the tasks a setting trains on ("train") and tests
on ("test"), and each task's files in a MetaICL data folder are {task}/{task}_{k}_{seed}_{split}.jsonl
(k examples drawn with `seed`). train.py --setting trains on the "train" tasks' 16384_100 files;
eval.py --setting scores the "test" tasks with each seed's own pool and test set.
"""
import json
import os

from data import METAICL_NAME


def read_setting(path, split):
    """The task names of one side ("train" or "test") of MetaICL's config/{setting}.json,
    {"train": [...], "test": [...]} (hr_to_lr, class_to_class, non_nli_to_nli, ...)."""
    try:
        with open(path) as f:
            setting = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"setting {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"setting {path}: not valid JSON ({e})") from None
    tasks = setting.get(split) if isinstance(setting, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"setting {path}: needs \"{split}\": a non-empty list of task names, as MetaICL's "
                         f"config/{{setting}}.json ({{\"train\": [...], \"test\": [...]}})")
    return list(dict.fromkeys(tasks))  # in order, once each


def setting_file(data_dir, task, k, seed, split):
    """MetaICL's {data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl; k=None: the largest k there is.
    A task of the setting without it is an error that names the task and what was looked for."""
    folder = os.path.join(data_dir, task)
    if k is None:
        found = [int(m["k"]) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                 if (m := METAICL_NAME.match(f)) and (m["task"], int(m["seed"]), m["split"]) == (task, seed, split)]
        if not found:
            raise FileNotFoundError(f"task '{task}' of the setting: no {os.path.join(folder, f'{task}_*_{seed}_{split}.jsonl')}")
        k = max(found)
    path = os.path.join(folder, f"{task}_{k}_{seed}_{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task '{task}' of the setting: no {path}")
    return path


def setting_eval_files(data_dir, setting, seeds):
    """task -> seed -> (demonstration pool, test set) for a setting's "test" tasks: MetaICL's
    per-seed files, the largest {task}_{k}_{seed}_train.jsonl and {task}_16_{seed}_test.jsonl."""
    return {task: {s: (setting_file(data_dir, task, None, s, "train"), setting_file(data_dir, task, 16, s, "test"))
                   for s in seeds} for task in read_setting(setting, "test")}
