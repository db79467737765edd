"""Helpers shared by the test modules (the fixtures built on them are in conftest.py): tiny random
models of several families, a character tokenizer for the builtin tasks, fresh tracking stores, the
runs of a store."""

import functools
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Shapes every family builds with: 4 attention heads of 8 dimensions, 2 KV heads where the family has them.
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {
    "llama": SMALL,
    "mistral": SMALL,
    "qwen2": SMALL,
    "qwen3": {**SMALL, "head_dim": 8},
    "phi3": {**SMALL, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
    "gemma": {**SMALL, "head_dim": 8},
    "gemma2": {**SMALL, "head_dim": 8},
    "gemma3_text": {**SMALL, "head_dim": 8},
    "gpt2": dict(n_embd=32, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
    "bloom": dict(hidden_size=32, n_head=4),  # a family without sublayer adapters (pruning.families)
}
LAYERS_FIELD = {"gpt2": "n_layer", "bloom": "n_layer"}


def tiny_lm(family: str = "llama", layers: int = 4, vocab_size: int = 128, seed: int = 0, **config) -> torch.nn.Module:
    """A random causal LM of `family` in eval mode: `layers` blocks of SHAPES[family], `config` on top;
    the same weights for the same arguments."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {**SHAPES[family], LAYERS_FIELD.get(family, "num_hidden_layers"): layers, **config}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=vocab_size, **settings)).eval()


@functools.cache
def char_tokenizer():
    """One token per character of the builtin tasks' text (Python's pydoc topics), `[UNK]` (id 0) and
    `<s>` (id 1, BOS, EOS and padding, so that no family's tokenizer class adds a pad token of its own);
    adds no special tokens when encoding."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(topics.values())))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="<s>", pad_token="<s>")


def save_tiny(folder: Path, family: str = "llama", layers: int = 4, **config) -> str:
    """`tiny_lm` (context 256 unless `config` says otherwise) with the character tokenizer, saved in `folder`
    like a hub checkpoint; the folder."""
    tokenizer = char_tokenizer()
    tiny_lm(family, layers, len(tokenizer), **{"max_position_embeddings": 256, **config}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def copy_store(template: Path, path: Path):
    """(uri, client) of a new SQLite tracking store at `path`, a copy of the empty `template`."""
    from contract import tracking

    shutil.copy(template, path)
    uri = f"sqlite:///{path}"
    return uri, tracking.connect(uri)


def runs(client, kind: str | None = None, status: str | None = None) -> list:
    """The runs in every experiment of the store, oldest first: those tagged prunetrack.kind=`kind` (else
    all) of `status` (else any)."""
    query = " and ".join(
        ([f"tags.`prunetrack.kind` = '{kind}'"] if kind else []) + ([f"attributes.status = '{status}'"] if status else [])
    )
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query, order_by=["attributes.start_time ASC"])


def mlflow_run(uri: str, entry: str, *params: str, cwd: Path, options=(), env=None, timeout: float = 600):
    """`mlflow run <repo> -e <entry> --env-manager local <options> -P <param> ...` against tracking store `uri`,
    with this interpreter's folder first on PATH (MLproject runs `python` from PATH); the finished process."""
    env = {**(env or os.environ), "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", *options]
    for param in params:
        cmd += ["-P", param]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_each_config_once(client) -> Counter:
    """Every configuration hash has exactly one FINISHED run; returns the statuses of all config runs."""
    config_runs = runs(client, "config")
    finished = Counter(r.data.tags["config_hash"] for r in config_runs if r.info.status == "FINISHED")
    assert finished and set(finished.values()) == {1}, finished
    assert {r.data.tags["config_hash"] for r in config_runs} == set(finished)
    return Counter(r.info.status for r in config_runs)
