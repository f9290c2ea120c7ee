"""No option is silently ignored: train.py refuses one that would have no effect in the run asked for."""
import pytest

import train

IGNORED = [  # (flags, the option named in the error)
    (["--task_temperature=2"], "task_temperature"),                        # the suite has no task sizes
    (["--data=generic", "--loss_mask=none", "--task_temperature=2"], "task_temperature"),
    (["--data=tasks/", "--families=parity"], "families"),                  # families belong to the suite
    (["--data=tasks/", "--generic_share=0.5"], "generic_share"),
    (["--setting=config/hr_to_lr.json"], "setting"),                       # a setting names MetaICL files
    (["--preset=tiny"], "preset"),                                         # init gives the shape
    (["--lora_alpha=16"], "lora_alpha"),                                   # LoRA is off
    (["--lora_targets=wq"], "lora_targets"),
    (["--lora_dropout=0.1"], "lora_dropout"),
    (["--memory_budget_gib=20"], "memory_budget_gib"),                     # only "auto" plans
    (["--data=generic", "--loss_mask=none", "--shots=stratified"], "shots"),  # plain text has no shots
    (["--data=generic", "--loss_mask=none", "--max_shots=4"], "max_shots"),
    (["--data=generic"], "loss_mask=none"),                                # every token is a target there
]
IMPOSSIBLE = [(["--keep_last=0"], "keep_last must be at least 1"), (["--families=edit,generic"], "unknown generic.*generic_share"), (["--generic_share=1"], "generic_share must be in"), (["--data=t/", "--task_temperature=0"], "task_temperature above 0")]


@pytest.mark.parametrize("flags,named", IGNORED + IMPOSSIBLE)
def test_an_option_without_effect_is_refused(flags, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        train.main([*flags, f"--out_dir={tmp_path}", "--max_steps=1"])


@pytest.mark.parametrize("flags", [["--init=scratch", "--preset=tiny", "--max_steps=0"],
                                   ["--lora_rank=4", "--lora_alpha=8", "--max_steps=0"],
                                   ["--activation_checkpointing=auto", "--memory_budget_gib=1", "--max_steps=0"]])
def test_the_same_options_where_they_act_are_accepted(flags, tmp_path):
    train.main([*flags, f"--out_dir={tmp_path}", "--eval_data="])


def test_the_validation_sequences_follow_every_option_of_the_training_ones(tmp_path):
    """Validation is packed like training: same loss mask, shot count and shot order, on eval_data."""
    from data import Tokenizer, TrainSampler, encode_tasks, load_tasks
    from suite import make_suite
    suite = make_suite(str(tmp_path / "s"), instances=(1, 1), n_train=(8, 60), n_test=4)
    cfg = train.parse_config([f"--eval_data={suite}/dev", "--shots=stratified", "--max_shots=5", "--loss_mask=last",
                              "--seq_len=256"], train.TrainConfig)
    tok = Tokenizer(f"{suite}/tokenizer.model")
    _, val, _ = train.make_samplers(cfg, tok)
    tasks, _ = encode_tasks(load_tasks([f"{suite}/dev"], split="train"), tok, 256)
    for shots, mask, n in (("stratified", "last", 5), ("random", "last", 5), ("stratified", "all", 5), ("stratified", "last", 6)):
        same = TrainSampler(tasks, tok.bos_id, 256, mask, cfg.seed + 1, float("inf"), n, shots)
        equal = all(a.shape == b.shape and (a == b).all() for i in range(4) for a, b in zip(val.sequence(0, i), same.sequence(0, i)))
        assert equal == ((shots, mask, n) == ("stratified", "last", 5)), (shots, mask, n)


def test_config_file_then_command_line_typed_by_the_dataclass(tmp_path):
    """Defaults, then a config file's `key = literal` lines, then --key=value or --key value, the
    later winning; values typed by TrainConfig's fields (booleans as true/false/1/0)."""
    from configurator import parse_config
    path = tmp_path / "c.py"
    path.write_text("lr = 3e-4\nmax_steps = 50\ncompile = True\nout_dir = 'from_file'\n")
    cfg = parse_config([str(path), "--max_steps=7", "--out_dir", "typed", "--seq_len", "96", "--compile=0"], train.TrainConfig)
    assert (cfg.lr, cfg.max_steps, cfg.out_dir, cfg.seq_len, cfg.compile) == (3e-4, 7, "typed", 96, False)
    path.write_text("lr = 1\nout_dir = 5\n")  # a literal of another type is made the field's
    cfg = parse_config([str(path)], train.TrainConfig)
    assert [(v, type(v)) for v in (cfg.lr, cfg.out_dir)] == [(1.0, float), ("5", str)]
    assert type(cfg.max_steps) is int and type(cfg.lr) is float
    for text, value in (("1", True), ("true", True), ("True", True), ("0", False), ("false", False)):
        assert parse_config([f"--compile={text}"], train.TrainConfig).compile is value
    with pytest.raises(SystemExit, match="bad value 'maybe' for 'compile'"):
        parse_config(["--compile=maybe"], train.TrainConfig)


@pytest.mark.parametrize("argv", [["--lr"], ["--lr", "--max_steps=3"]])
def test_a_key_without_its_value_is_refused(argv):
    """`--lr` at the end, or followed by another --key, has no value: an error, never the next flag."""
    from configurator import parse_config
    with pytest.raises(SystemExit, match="--lr needs a value: --lr=VALUE or --lr VALUE"):
        parse_config(argv, train.TrainConfig)


def test_torchrun_splits_only_the_default_batch():
    """Under torchrun with grad_accum left at its default, the global batch of one process is split
    over the ranks (the same sequences); a grad_accum the user typed is kept, as is a batch that
    does not divide."""
    said = []
    for typed, world, want in (([], 4, (4, 4)), (["--grad_accum=8"], 4, (16, 8)), (["--batch_size=6"], 4, (6, 1)),
                               ([], 1, (16, 1))):
        cfg = train.parse_config(typed, train.TrainConfig)
        train.split_default_batch(cfg, world, said.append)
        assert (cfg.batch_size, cfg.grad_accum) == want, typed
    assert said == ["global batch split over 4 ranks: batch_size=4, grad_accum=4"]
