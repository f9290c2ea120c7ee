"""
Configuration from the command line, nanoGPT-style but typed: a dataclass holds every key with its
default and a comment; a config file of `key = literal` lines and then --key=value overrides change
it. Used by train.py and bench.py, each with its own dataclass. `dtype_named` reads the dtype
settings of every script (train.py, eval.py, sample.py).

    python train.py config/mistral7b.py --lr=2e-4 --max_steps 500
"""
import ast
import difflib
import inspect
import io
import sys
import tokenize
from dataclasses import fields

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def parse_config(argv, config_class):
    """Defaults, then an optional config file of `key = literal` lines, then --key=value (or
    --key value). -h / --help lists every key with its default and comment, and exits."""
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


def dtype_named(name, device):
    """A dtype by name; "auto" or None: bfloat16 on a GPU, float32 on the CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]
