"""Text for calibration and evaluation, drawn from the Python standard library's docstrings.

Why docstrings: they ship with every Python, need no download, are English prose with code
mixed in (close to what small instruction models see), and come from many modules, so two
disjoint sets of modules give a calibration text and a held-out evaluation text that share
style but not content. Sources are parsed with :mod:`ast` (nothing is imported or run).
"""
from __future__ import annotations

import ast
import math
import os
import sysconfig
from typing import Iterable, List, Optional, Sequence

import torch

CALIBRATION_MODULES = (
    "argparse", "textwrap", "difflib", "pathlib/__init__", "pathlib", "shutil", "subprocess",
    "logging/__init__", "tarfile", "zipfile/__init__", "zipfile", "configparser", "csv",
    "tempfile", "threading", "queue", "socket", "ftplib", "smtplib", "gettext", "optparse",
    "pprint", "contextlib", "copy", "enum", "glob", "fnmatch", "getopt", "shlex", "sched",
    # more text for distillation, after the modules above (~58k tokens on Python 3.11, whose
    # first tokens are the calibration batches): a faster machine trains on more than they hold
    "typing", "os", "collections/__init__", "datetime", "json/__init__", "urllib/parse",
    "urllib/request", "http/client", "http/server", "email/message", "unittest/case",
    "unittest/mock", "doctest", "pdb", "ipaddress", "xml/etree/ElementTree", "ssl",
    "asyncio/events", "asyncio/tasks", "concurrent/futures/_base", "imaplib", "mailbox", "timeit",
    "platform", "pkgutil", "mimetypes",
)
EVALUATION_MODULES = (
    "random", "statistics", "fractions", "calendar", "heapq", "bisect", "string/__init__",
    "string", "inspect", "dataclasses", "functools", "ast", "codecs", "locale", "pickle",
    "tokenize", "traceback", "weakref", "abc", "numbers", "operator", "uuid", "base64",
)


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_docstrings(name: str) -> List[str]:
    """Docstrings of one standard-library module (module, classes, functions), source order.

    ``name`` is a path below the stdlib directory without ``.py`` (``"logging/__init__"``);
    a module missing from this Python gives an empty list, so the corpora degrade gracefully
    across Python versions instead of failing.
    """
    path = os.path.join(_stdlib_dir(), name + ".py")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        try:
            tree = ast.parse(fh.read())
        except SyntaxError:
            return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


def corpus_text(modules: Iterable[str]) -> str:
    seen, docs = set(), []
    for name in modules:
        for doc in module_docstrings(name):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return "\n\n".join(docs)


def calibration_text() -> str:
    return corpus_text(CALIBRATION_MODULES)


def evaluation_text() -> str:
    return corpus_text(EVALUATION_MODULES)


def token_batches(
    tokenizer,
    split: str = "calibration",
    num_tokens: int = 4096,
    seq_len: int = 256,
    batch_size: int = 4,
    text: Optional[str] = None,
) -> List[torch.Tensor]:
    """Tokenise a corpus into ``[batch, seq_len]`` id tensors holding ``num_tokens`` in all.

    ``split`` is ``"calibration"`` or ``"evaluation"`` (disjoint module sets); ``text`` overrides
    it. A corpus shorter than ``num_tokens`` yields what it has.
    """
    if text is None:
        if split == "calibration":
            text = calibration_text()
        elif split == "evaluation":
            text = evaluation_text()
        else:
            raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if seq_len < 2 or num_tokens < seq_len:
        raise ValueError(f"need seq_len >= 2 and num_tokens >= seq_len, got {seq_len}, {num_tokens}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_seq = min(num_tokens // seq_len, ids.numel() // seq_len)
    if n_seq == 0:
        raise ValueError(f"the {split} text has only {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rows = ids[: n_seq * seq_len].view(n_seq, seq_len)
    return [rows[i : i + batch_size] for i in range(0, n_seq, batch_size)]


def output_tensor(output):
    """``(tensor, is_logits)`` from a model output: ``.logits`` of a Hugging Face output, else
    the tensor itself, or the first tensor of a tuple or of a ``ModelOutput``."""
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits, True
    if isinstance(output, torch.Tensor):
        return output, False
    if hasattr(output, "to_tuple"):  # a Hugging Face ModelOutput without logits (e.g. last_hidden_state)
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], False
    raise TypeError(f"cannot find logits or a tensor in a model output of type {type(output).__name__}")


@torch.no_grad()
def perplexity(model, batches: Sequence[torch.Tensor], progress: bool = False, desc: str = "perplexity") -> float:
    """Token-level perplexity of a causal LM: exp of the mean next-token cross-entropy.

    Computed from the logits (not the model's own loss) so that any model returning logits
    works, GraphModules included, and batches of different sizes weigh by their token count.
    """
    from .convert.rewrite import set_mode

    was_training = model.training
    set_mode(model, False)
    total, count = 0.0, 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, leave=False)
    try:
        for ids in it:
            try:
                out = model(input_ids=ids, use_cache=False)
            except TypeError:
                out = model(ids)
            logits = output_tensor(out)[0][:, :-1].float()
            target = ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += target.numel()
    finally:
        set_mode(model, was_training)
    return math.exp(total / max(count, 1))
