"""HellaSwag (Zellers et al. 2019): read and check the rowanz JSONL schema, render examples.

The data: the official rowanz/hellaswag files (hellaswag_val.jsonl: 10,042 examples), one JSON object
per line with at least
    ctx_a, ctx_b, ctx (= ctx_a + " " + ctx_b when ctx_b is not empty), activity_label,
    endings (4 strings), label (the index of the right ending, 0-3)
or the Hugging Face dataset Rowan/hellaswag (the same fields; its label is a string).

Two ways to turn an example into four (context, continuation) requests:
- `llmc`: llm.c's dev/data/hellaswag.py, also build-nanogpt's: context `ctx`, each ending tokenized on its
  own as " " + ending; acc picks the lowest summed loss, acc_norm the lowest mean loss per token.
- `harness`: lm-evaluation-harness's tasks/hellaswag: context activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize(), WikiHow's bracketed artifacts ([title], [step], ...) removed from context and
  endings; the continuation is " " + ending, tokenized as the tail of the tokenized whole (lm-eval's
  TemplateLM._encode_pair); acc_norm divides the log-likelihood by the ending's length in characters.

The scoring loop that runs a model over these examples is eval/hellaswag_score.py's hellaswag_eval,
which `python -m eval.hellaswag` and training's periodic evaluation both call: data/ reads, checks and
renders task files and runs no model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError

STYLES = ("llmc", "harness")
HF_PREFIX = "hf:"
HF_NAME = "Rowan/hellaswag"
FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label")
# The original files were on GitHub (rowanz/hellaswag), reported disabled in September 2026; the Hugging
# Face copy holds the same 10,042 validation examples.
HOW_TO_GET = (
    f"on a machine with network run once with --data {HF_PREFIX}{HF_NAME} (the datasets cache keeps it), or save "
    f"it as a file: python -c \"import datasets; datasets.load_dataset('{HF_NAME}', split='validation')"
    ".to_json('hellaswag_val.jsonl')\" and pass that file with --data PATH"
)


def check_example(doc: object, where: str) -> dict:
    """The example with `label` as an int; a DataError naming `where` (file:line) and the problem otherwise."""
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {type(doc).__name__}")
    missing = [f for f in FIELDS if f not in doc]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}; not the HellaSwag schema (fields {', '.join(FIELDS)})")
    for f in ("ctx", "ctx_a", "ctx_b", "activity_label"):
        if not isinstance(doc[f], str):
            raise DataError(f"{where}: field {f!r} must be a string, got {type(doc[f]).__name__}")
    endings = doc["endings"]
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise DataError(f"{where}: field 'endings' must be a list of 4 strings")
    label = doc["label"]
    if isinstance(label, str) and label.strip().isdigit():  # the Hugging Face copy stores "0".."3"
        label = int(label)
    if label == "" or label is None:
        raise DataError(f"{where}: no label (the test split's labels are hidden); evaluate the validation split")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise DataError(f"{where}: label must be 0, 1, 2 or 3 (the index of the right ending), got {label!r}")
    return {**doc, "label": label}


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Checked examples of a rowanz-schema JSONL file (the first `limit` of them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; {HOW_TO_GET}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg}); expected one HellaSwag example per line") from None
            out.append(check_example(doc, f"{path}:{n}"))
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


def read_hf(name: str = HF_NAME, split: str = "validation", limit: int | None = None) -> list[dict]:
    """Checked examples of a Hugging Face copy (downloaded once, then read from the datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as e:  # offline and not cached, or no such dataset
        raise DataError(f"cannot load {HF_PREFIX}{name} ({type(e).__name__}: {str(e)[:160]}); {HOW_TO_GET}") from None
    except ValueError as e:  # datasets' message for an unknown split lists the known ones
        raise DataError(f"{HF_PREFIX}{name}: {str(e)[:300]}") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    return [check_example(ds[i], f"{HF_PREFIX}{name}[{split}][{i}]") for i in range(n)]


def load_examples(data: str, split: str = "validation", limit: int | None = None) -> list[dict]:
    """Examples from a local JSONL path or `hf:NAME` (see the module docstring)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    if data.startswith(HF_PREFIX):
        return read_hf(data[len(HF_PREFIX) :], split, limit)
    return read_jsonl(data, limit)


def harness_preprocess(text: str) -> str:
    """lm-eval's tasks/hellaswag/utils.preprocess: WikiHow's bracketed artifacts out, spaces collapsed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass(frozen=True)
class Rendered:
    """One example as four scoring requests."""

    context: list[int]
    endings: list[list[int]]  # the continuation tokens of each ending
    norm: list[float] | None  # harness: the length in characters that acc_norm divides by; llmc: None (per token)


def render(doc: dict, encode: Callable[[str], list[int]], style: str = "llmc") -> Rendered:
    """Tokenize one checked example in the given style (`encode`: text -> token ids, the model's tokenizer)."""
    if style == "llmc":
        return Rendered(encode(doc["ctx"]), [encode(" " + e) for e in doc["endings"]], None)
    if style == "harness":
        query = harness_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [harness_preprocess(e) for e in doc["endings"]]
        context = encode(query)  # query has no trailing space (stripped), so no space moves to the ending
        endings = [encode(query + " " + c)[len(context) :] for c in choices]
        return Rendered(context, endings, [float(len(c)) for c in choices])
    raise DataError(f"unknown HellaSwag style {style!r}; choose one of {', '.join(STYLES)}")
