"""
rmlab score.py: score responses with one reward model, or two the Llama 2 way (README.md, "score.py").

    python score.py --rm runs/default "How do I bake bread?" "Knead, proof, bake." "No idea."
    python score.py --rm runs/default --data pairs.jsonl --out scores.jsonl
    zcat test.jsonl.gz | python score.py --rm runs/default --data - --skip-bad
    python score.py --safety-rm A --helpful-rm B --data safety=harmless-base/test.jsonl.gz

--rm takes a train.py run dir (RUN or RUN/rm: its two models, or its one; an rm stage that did
not finish is refused, not scored with the model it did finish) or a checkpoint dir (ours, or a
Hugging Face LlamaForSequenceClassification dir with its tokenizer). With two models every
response gets R_s, R_h and Llama 2's R_c: R_s on a safety prompt (the record's is_safety, a
safety=FILE tag, or --is-safety) or where σ(R_s) < 0.15, else R_h (model/rewards.py). That rule
needs rewards calibrated on validation pairs: one of ours without them (a periodic RUN/rm/KIND/ckpt)
is refused as one of two models; alone, its raw scores still rank.

A sequence is BOS + prompt + response + EOS, tokenized as in training (or in the model's chat
format, data/chat.py), up to --max-len (default: the length train.py trained at, its meta's
max_len, checked against the model's max_seq_len; else max_seq_len); a longer one keeps its end
(data/encode.py), and every cut is counted and flagged (cut* = tokens removed, 0 = whole). A
command-line prompt is one user turn in HH's template unless --verbatim; its table shows each
response as typed, in quotes, so that " a" and "a" differ.

Records (--data FILE, or - for stdin): every format of data/records.py, plus two score-only
forms, {"prompt", "response"} and {"prompt", "responses"} with neither "ranking" nor "scores".
Pairs and rankings give the accuracy tables (ties apart) and the length baseline on the same pairs.
A row of score.py's own --out is refused: its "scores" would be read as ranking labels.

--out: one JSON line per input record, in input order: its own fields plus score_chosen and
score_rejected (a pair), scores (a ranking or response list, in order) or score (one response),
and cut* named the same way. Each comes as score* (raw), prob* = σ(raw) and white* = (raw −
mean) / std with the checkpoint's validation statistics (null without them). With two models
score* is R_c (what the accuracy uses), score_safety* and score_helpful* are R_s and R_h, and
used_safety* says which one R_c took. An unscored response is null; an unscored record (dropped
by the data rules, or malformed under --skip-bad) keeps its fields and gets "score_error". An
input field whose name is one of ours (e.g. a ranking's "scores") is kept as "input_<name>"
(or "input_input_<name>", and so on, where that name is taken too: no input value is lost).
Every line is strict JSON: an input field holding NaN or Infinity (which Python's json reads) is
written as null (a number the scorer reads is refused when read), and a white* that overflows
float32 is refused.

Exit codes: 0 success; 2 bad input (a bad flag, a missing or malformed file, a checkpoint that
is not a reward model, whose rewards overflow or, of two, is not calibrated; no record to score),
with one line on stderr; 1 anything else.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from data import DataError, LoadStats, PrefRecord, parse_data_spec
from data.chat import ChatFormat, ChatTemplateError
from data.evaluate import accuracy_table, pair_outcomes, score_responses
from data.records import parse_record, read_each
from model.checkpoint import HF_CONFIG, MANIFEST, META_PARAMS, CheckpointError, load_checkpoint
from data.cli import OneLineParser, data_file, device_flag, nonnegative_int, positive_int, resolve_device
from model.parallel import reuse_freed_memory
from model.precision import DTYPES, autocast, resolve_dtype
from model.rewards import select_reward, sigmoid_prob, whiten

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Bad input from the user: one line on stderr, exit code 2."""


def parse_args(argv=None):
    p = OneLineParser(
        prog="score.py",
        description="Score responses with one or two reward models (Llama 2's safety/helpfulness rule).",
        epilog="exit codes: 0 success; 2 bad input (bad flag, missing or malformed file, a checkpoint "
               "that is not a reward model, nothing to score); 1 anything else",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="a prompt to score responses to (instead of --data)")
    p.add_argument("responses", nargs="*", help="responses to the prompt; each gets a line with its rank")
    g = p.add_argument_group("reward models")
    g.add_argument("--rm", default="", help="train.py run dir (RUN or RUN/rm) or one checkpoint dir")
    g.add_argument("--safety-rm", default="", help="the safety model (with --helpful-rm)")
    g.add_argument("--helpful-rm", default="", help="the helpfulness model (with --safety-rm)")
    g.add_argument("--device", type=device_flag, default="auto",
                   help="auto (CUDA if present, else CPU), cpu, cuda[:N]")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bf16 autocast where the device has bf16 matrix units (CUDA; AMX CPUs "
                        "for models 512 wide or more), else fp32")
    g = p.add_argument_group("input and output")
    g.add_argument("--data", type=data_file, default=None, help="records to score: a JSONL/JSONL.gz/JSON "
                   "file or - for stdin; safety=FILE marks all its records as safety prompts")
    g.add_argument("--out", default="",
                   help="write one JSON line per record, in input order, with the scores")
    g.add_argument("--skip-bad", action="store_true",
                   help="count and skip malformed records instead of failing")
    g.add_argument("--is-safety", action="store_true", help="the command-line prompt is a safety prompt")
    g.add_argument("--verbatim", action="store_true",
                   help="take the command-line prompt and responses as raw text, not as one user turn "
                   "(as --data reads a string prompt: an HH transcript is read as its canonical form)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-len", type=nonnegative_int, default=0,
                   help="tokens per sequence (0: the --max-len train.py trained it at, else its max_seq_len)")
    g.add_argument("--batch-tokens", type=positive_int, default=8192,
                   help="about this many tokens per forward pass")
    g.add_argument("--layout", choices=("packed", "padded"), default="packed",
                   help="packed: a prompt computed once for all its responses; padded: one row per response")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.prompt):
        p.error("give either --data FILE or a prompt and its responses")
    if args.prompt and not args.responses:
        p.error("a prompt needs at least one response after it")
    if args.data and (args.is_safety or args.verbatim):
        p.error("--is-safety and --verbatim are for a command-line prompt; with --data, tag the file "
                "safety=FILE")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: no such folder")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out}: a folder, not a file")
    if bool(args.safety_rm) != bool(args.helpful_rm):
        p.error("--safety-rm and --helpful-rm go together")
    if bool(args.rm) == bool(args.safety_rm):
        p.error("give --rm DIR, or --safety-rm DIR and --helpful-rm DIR")
    if 0 < args.max_len < 3:
        p.error(f"argument --max-len: {args.max_len} leaves no room for a token between BOS and EOS "
                "(0 or >= 3)")
    return args


# -----------------------------------------------------------------------------------------
# Reward models: find them, load them, refuse a language model.

@dataclass
class RewardModel:
    name: str                   # "reward", or "safety" / "helpful" with two models
    path: str
    model: torch.nn.Module
    tokenizer: object
    max_len: int
    mean: Optional[float]       # validation statistics saved by train.py (None: not saved)
    std: Optional[float]
    chat: Optional[ChatFormat]  # the chat format pairs are read in (None: HH text)


def is_checkpoint_dir(path):
    return any(os.path.isfile(os.path.join(path, f)) for f in (MANIFEST, HF_CONFIG, META_PARAMS))


def lm_head_message(path):
    return (f"{path} is a language model (LM head), not a reward model. Train reward models from it with "
            f"`python train.py --init-from {path} --stages rm --data PAIRS --out RUN`, "
            "then score with --rm RUN")


def reward_model_dirs(path):
    """{name: checkpoint dir} for one --rm argument (see the module docstring)."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        raise BadInput(lm_head_message(path))     # GGUF files hold language models
    if not os.path.isdir(path):
        raise BadInput(f"--rm {path}: no such directory")
    if is_checkpoint_dir(path):
        return {"reward": path}
    rm_dir = os.path.join(path, "rm") if os.path.isdir(os.path.join(path, "rm")) else path
    found = {k: os.path.join(rm_dir, k, "model") for k in ("safety", "helpful", "reward")
             if is_checkpoint_dir(os.path.join(rm_dir, k, "model"))}
    unfinished = rm_stage_unfinished(rm_dir, found)
    if unfinished:        # else the model it did finish would be scored alone, without a word
        run = path if rm_dir != path else os.path.dirname(os.path.normpath(path)) or "."
        raise BadInput(f"--rm {path}: the rm stage did not finish ({unfinished}); finish it with "
                       f"`python train.py --out {run} --resume` and the run's other flags")
    if "safety" in found and "helpful" in found:
        return {"safety": found["safety"], "helpful": found["helpful"]}
    if len(found) == 1:
        return {"reward": next(iter(found.values()))}
    lm_dir = os.path.join(path, "lm", "model")
    if is_checkpoint_dir(lm_dir):
        raise BadInput(f"--rm {path}: this train.py run has a language model ({lm_dir}) but no reward model; "
                       f"add them with `python train.py --out {path} --stages tokenizer,lm,rm` and the run's "
                       f"other flags, then score with --rm {path}")
    raise BadInput(f"--rm {path}: neither a checkpoint dir ({MANIFEST}, {HF_CONFIG} or {META_PARAMS}) "
                   f"nor a train.py run dir with rm/*/model")


def rm_stage_unfinished(rm_dir, found):
    """Why train.py's rm stage in rm_dir is unfinished, or "" (see train.py's stage_rm)."""
    for kind in ("safety", "helpful", "reward"):   # a killed stage leaves rm/KIND/ with only ckpt/
        if os.path.isdir(os.path.join(rm_dir, kind)) and kind not in found:
            return f"{os.path.join(rm_dir, kind)} has no model"
    # Killed between two models, the next one's folder may not exist yet: stage.json says so. A
    # stage cut short by --max-steps or --max-minutes is not done either, but its models are whole.
    if not found:
        return ""                 # nothing to score silently: reward_model_dirs says what is missing
    try:
        with open(os.path.join(rm_dir, "stage.json")) as f:
            stage = json.load(f)
    except (OSError, ValueError):
        return ""                 # not a train.py stage folder (or none): the models found are all
    if isinstance(stage, dict) and stage.get("done") is False and not stage.get("cut_short"):
        return f"{os.path.join(rm_dir, 'stage.json')} is not marked done"
    return ""


def load_reward_model(name, path, device, max_len):
    try:
        ck = load_checkpoint(path, map_location=device, dtype=None)    # the file's: cast in run() for fp32
    except FileNotFoundError as e:
        raise BadInput(f"{path}: {e}")
    if ck.model.head_kind != "reward":
        raise BadInput(lm_head_message(path))
    if ck.tokenizer is None:
        raise BadInput(f"{path}: no tokenizer that rmlab can read beside the weights (tokenizer.json or a "
                       "SentencePiece tokenizer.model); copy the base model's tokenizer files into it")
    limit = ck.model.config.max_seq_len
    if max_len > limit:
        raise BadInput(f"--max-len {max_len} is longer than the model's maximum ({limit}) in {path}")
    meta = ck.meta or {}
    ours = os.path.isfile(os.path.join(path, MANIFEST))
    mean, std = meta.get("val_reward_mean"), meta.get("val_reward_std")
    for key, value in (("val_reward_mean", mean), ("val_reward_std", std)) if ours else ():
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):  # not True
            raise BadInput(f"{os.path.join(path, MANIFEST)}: field 'meta.{key}' is {value!r}; expected "
                           "a finite number, the validation statistics train.py saves")
    stats_ok = all(type(v) in (int, float) and math.isfinite(v) for v in (mean, std)) and std > 0
    # Two models: R_c compares R_s with logit(0.15) and mixes R_s with R_h, which means something only
    # once train.py has fixed each model's offset and scale on validation pairs (model/rewards.py),
    # as it does when its rm stage ends: a periodic checkpoint (RUN/rm/KIND/ckpt) has not.
    if name != "reward" and ours and "bias_shift" not in meta:
        raise BadInput(f"{path} ({name} model): not calibrated (no 'bias_shift' in its meta, as in a "
                       "periodic checkpoint of the rm stage), and the σ(R_s) < 0.15 rule of two models "
                       f"needs calibrated rewards; give the finished model, RUN/rm/{name}/model (`python "
                       "train.py --out RUN --resume` finishes the stage), or score this one alone with "
                       f"--rm {path}")
    # train.py says in the meta whether it read pairs in the chat format (older runs did not: HH
    # text); a foreign checkpoint that carries a chat template is read in it.
    chat = None
    if meta.get("chat_format", False) if ours else ck.tokenizer.chat_template:
        try:
            chat = ChatFormat(ck.tokenizer)
        except ChatTemplateError as e:
            raise BadInput(f"{path}: {e}")
    # train.py saves the length it trained at (a from-scratch model's max_seq_len may be longer);
    # a damaged one would cut every sequence, or index past the model's positions.
    trained = meta.get("max_len") if ours else None
    if trained is not None and (type(trained) is not int or not 3 <= trained <= limit):   # not True
        raise BadInput(f"{os.path.join(path, MANIFEST)}: field 'meta.max_len' is {trained!r}; expected "
                       f"the length train.py trained at, an integer from 3 to max_seq_len ({limit})")
    return RewardModel(name, path, ck.model.eval(), ck.tokenizer, max_len or trained or limit,
                       float(mean) if stats_ok else None, float(std) if stats_ok else None, chat)


def load_reward_models(args, device):
    dirs = reward_model_dirs(args.rm) if args.rm else {"safety": args.safety_rm, "helpful": args.helpful_rm}
    for name, path in dirs.items():
        if not os.path.isdir(path):
            raise BadInput(f"--{name}-rm {path}: no such directory")
    return {name: load_reward_model(name, path, device, args.max_len) for name, path in dirs.items()}


# -----------------------------------------------------------------------------------------
# Input: the records, each kept with the JSON it came from (for --out).

@dataclass
class Item:
    obj: object                     # the input JSON value
    kind: str                       # "pair" | "ranking" (also a plain response list) | "single"
    record: Optional[PrefRecord]    # None: not scored
    error: Optional[str] = None     # why not


# Fields every --out row has, scored (prob* and white*) or not (score_error): an input row with
# them is score.py's output, whose "scores" would be read back as ranking labels.
OUTPUT_MARKS = (("prob", "white"), ("probs", "whites"), ("prob_chosen", "white_chosen"), ("score_error",))


def parse_item(obj, where, tag):
    """One JSON value as an Item: a record of data/records.py or a score-only form (module docstring)."""
    mark = next((m[0] for m in OUTPUT_MARKS if set(m) <= obj.keys()), None) if isinstance(obj, dict) else None
    if mark:              # BadInput, not DataError: a wrong file, not a malformed line --skip-bad skips
        raise BadInput(f"{where}: field {mark!r}: this record is score.py output; score the original file")
    ranked = isinstance(obj, dict) and (obj.get("ranking") is not None or obj.get("scores") is not None)
    unranked = isinstance(obj, dict) and not {"chosen", "rejected"} & obj.keys() and (
        "response" in obj or ("responses" in obj and not ranked))
    record = parse_record(obj, where, tag, unranked=unranked)
    return Item(obj, "ranking" if "responses" in obj else "single" if unranked else "pair", record)


def has_non_finite(value):
    """Whether a parsed JSON value holds a NaN or ±Infinity (Python's json reads them, and 1e999)."""
    stack = [value]
    while stack:                          # not recursive: a value may be nested as deep as json reads
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return True
        stack.extend(value.values() if isinstance(value, dict) else value if isinstance(value, list) else ())
    return False


def read_items(spec, skip_bad):
    """Items of a --data argument, in input order, and the LoadStats of reading them."""
    tag, path = parse_data_spec(spec)             # checked by --data's type, data.cli.data_file
    stats = LoadStats()
    parse = lambda value, where: parse_item(value, where, tag)
    # A dropped or (with --skip-bad) malformed line keeps its place in --out, with the reason.
    items = [item if item is not None else Item(value, "", None, problem)
             for value, item, problem in read_each(path, parse, stats, skip_bad)]
    return items, stats


def command_line_item(args):
    """The command-line prompt and responses, read as --data reads {"prompt", "responses"}: one
    user turn (or, with --verbatim, raw text) and its responses, a blank one as ""."""
    prompt = args.prompt if args.verbatim else [{"role": "user", "content": args.prompt}]
    obj = {"prompt": prompt, "responses": list(args.responses)}
    record = parse_record(obj, "command line", unranked=True)
    record.is_safety = args.is_safety
    return Item({"prompt": args.prompt, "responses": list(args.responses)}, "ranking", record)


# -----------------------------------------------------------------------------------------
# Scoring: every model, every response; then R_c, σ and whitening.

def score_all(models, records, args, device):
    """Raw rewards {model name: (n,) float64, n = all responses of all records in order, NaN =
    not scored}, the tokens cut per response (n,), the length statistics per model, and the
    seconds spent scoring."""
    flat = lambda nested: torch.tensor([float("nan") if x is None else x for rec in nested for x in rec],
                                       dtype=torch.float64)
    raw, cuts, length_stats, seconds = {}, None, {}, 0.0
    for name, rm in models.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(args.dtype, device):
            scores, stats, cut = score_responses(rm.model, records, rm.tokenizer, rm.max_len, device,
                                                 batch_tokens=args.batch_tokens, layout=args.layout,
                                                 long_responses="keep_end", chat=rm.chat)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        bad = sum(s is not None and not math.isfinite(s) for rec in scores for s in rec)
        if bad:              # NaN marks "not scored" below: a NaN reward must not pass for one
            raise BadInput(f"{rm.path}: {bad} reward(s) NaN or infinite in {args.dtype}")
        raw[name], length_stats[name] = flat(scores), stats
        # tokens cut per response: the most any model cut (two models may differ in tokenizer or length)
        cuts = flat(cut) if cuts is None else torch.maximum(cuts, flat(cut))
    return raw, cuts, length_stats, seconds


def combine(raw, models, is_safety):
    """Per response: the headline score ("": raw, or R_c) and each model's, as score/prob/white.

    Returns {(model, stat): (n,) float64 tensor} with model in "", "safety", "helpful" and
    stat in "score", "prob", "white"; and used_safety (n,) bool or None. NaN = not scored.
    """
    nan = float("nan")
    per_model = {name: (r, torch.full_like(r, nan) if models[name].std is None
                        else whiten(r, models[name].mean, models[name].std).double())
                 for name, r in raw.items()}
    for name, (r, w) in per_model.items():      # whiten is fp32: a huge reward or a tiny std overflows it
        rm, bad = models[name], int((r.isfinite() & ~w.isfinite()).sum())
        if rm.std is not None and bad:
            raise BadInput(f"{rm.path}: {bad} whitened reward(s) overflow float32: (R - {rm.mean:g}) / "
                           f"{rm.std:g}, with its validation statistics")
    used_safety = None
    if "safety" in raw:
        (r_s, white_s), (r_h, white_h) = per_model["safety"], per_model["helpful"]
        # Compared in float64 against logit(0.15): exact on the fp32 rewards, nothing rounds.
        r_c, used_safety = select_reward(r_s, r_h, is_safety)
        missing = r_s.isnan() | r_h.isnan()
        white_c = torch.where(used_safety, white_s, white_h)
        per_model = {"": (r_c.masked_fill(missing, nan), white_c.masked_fill(missing, nan)), **per_model}
    else:
        per_model = {"": per_model.popitem()[1]}        # the one model's, named ""
    out = {}
    for model, (score, w) in per_model.items():
        out[model, "score"], out[model, "prob"], out[model, "white"] = score, sigmoid_prob(score).double(), w
    return out, used_safety


# -----------------------------------------------------------------------------------------
# Output: --out lines, the command-line table, the accuracy tables, the summary.

def output_row(item, values, used_safety, start):
    """The input record's own fields plus its scores, named as the module docstring says (or why
    it has none); `values` are flat over all scored responses, this record's from `start`."""
    def named(stem, plural, vals):
        if item.kind == "pair":
            return {f"{stem}_chosen": vals[0], f"{stem}_rejected": vals[1]}
        return {plural: vals} if item.kind == "ranking" else {stem: vals[0]}

    row = dict(item.obj) if isinstance(item.obj, dict) else ({} if item.obj is None else {"input": item.obj})
    # NaN is not JSON: such a field is one the scorer does not read (a margin's NaN is refused), so null
    row = {k: None if has_non_finite(v) else v for k, v in row.items()}
    new = {"score_error": item.error}
    if item.record is not None:
        span = slice(start, start + len(item.record.responses))
        scored = [v == v for v in values["", "score"][span].tolist()]     # NaN: not scored
        # NaN: a white* without statistics (or of an unscored response) is null
        kept = lambda t, kind: [kind(v) if ok and v == v else None for v, ok in zip(t[span].tolist(), scored)]
        new = {}
        for (model, stat), t in values.items():
            suffix = f"_{model}" if model else ""
            new.update(named(stat + suffix, stat + "s" + suffix, kept(t, int if stat == "cut" else float)))
        if used_safety is not None:
            new.update(named("used_safety", "used_safety", kept(used_safety, bool)))
    for key in [k for k in new if k in row]:          # never overwrite an input field: rename it
        name = f"input_{key}"
        while name in row or name in new:                 # not onto another input field either
            name = f"input_{name}"
        row[name] = row.pop(key)
    row.update(new)
    return row


def write_jsonl(path, rows):
    with open(path + ".tmp", "w", encoding="utf-8") as f:     # then renamed: a reader never sees half
        # ASCII escapes: a lone surrogate stays legal. allow_nan=False: every number is finite by
        # now (parse_item, combine, output_row), and a NaN or Infinity token is not JSON.
        f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def print_ranked(texts, values, used_safety):
    """One line per command-line response: its rank (1 = best), its scores, and its text as typed,
    quoted and unstripped (the model saw " a" and "a" differently; so does the reader)."""
    score, two_models = values["", "score"], used_safety is not None
    columns = {"R_c": ("", "score"), "R_s": ("safety", "score"), "R_h": ("helpful", "score"),
               "σ(R_c)": ("", "prob"), "white": ("", "white")}
    if not two_models:
        columns = {"score": ("", "score"), "σ": ("", "prob"), "white": ("", "white")}
    print(f"{'rank':>4} " + " ".join(f"{c:>8}" for c in columns) + ("  model " if two_models else "")
          + "  response")
    for j, text in enumerate(texts):
        s = score[j].item()
        rank = "-" if s != s else str(1 + int((score > s).sum()))
        cells = " ".join(f"{values[k][j].item():>8.4f}" for k in columns.values())
        model = ("  safety " if used_safety[j] else "  helpful") if two_models else ""
        cut = values["", "cut"][j].item()
        shown = repr(text) if len(text) <= 60 else repr(text[:60]) + "…"
        print(f"{rank:>4} {cells}{model}  {shown}"
              + (f"  (cut: {cut:.0f} tokens)" if cut > 0 else ""))


def print_accuracy(records, scores, label, full=True):
    """Accuracy (ties apart), per rating, per category, helpful vs safety, and the length
    baseline, all on the pairs whose two responses were scored; nothing without such pairs."""
    outcomes = pair_outcomes(records, scores)
    if not outcomes:
        return
    t = accuracy_table(outcomes)
    print(f"accuracy ({label}) on {t['n']} pairs: {t['accuracy']:.3f} "
          f"[95% CI {t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}], ties {t['ties']:.3f}, "
          f"mean gap {t['mean_gap']:.3f}")
    if not full:
        return
    # "The longer response (in characters) wins", scored like the model: ties apart, same pairs.
    lengths = [[len(text) if x is not None else None for text, x in zip(r.responses, s)]
               for r, s in zip(records, scores)]
    length = accuracy_table(pair_outcomes(records, lengths))
    paired = torch.tensor([(x, n) for s, ls in zip(scores, lengths) for x, n in zip(s, ls) if x is not None],
                          dtype=torch.float64)                                    # (responses, 2)
    corr = float(torch.corrcoef(paired.T)[0, 1]) if len(paired) > 1 else float("nan")
    print(f"  length baseline (the longer response wins) on the same pairs: {length['accuracy']:.3f}, "
          f"ties {length['ties']:.3f}; corr(reward, length) {corr:+.3f}")
    for name, title in (("per_rating", "per rating"), ("per_category", "per category"),
                        ("by_kind", "helpful / safety")):
        if t[name] and (name != "by_kind" or len(t[name]) > 1):
            cells = (f"{k} {v['accuracy']:.3f} (n {v['n']})" for k, v in t[name].items())
            print(f"  {title}: " + ", ".join(cells))


def length_line(length_stats):
    """Truncation under the keep-the-end policy; per model only where the models differ."""
    said = {name: f"max_len {st.max_len}, {st.n_prompts_truncated} prompts cut at the start "
                  f"({st.n_prompt_tokens_cut} tokens), {st.n_responses_cut} responses longer than max_len "
                  "alone (scored on their end, flagged cut*)"
            for name, st in length_stats.items()}
    if len(set(said.values())) == 1:
        return "length: " + next(iter(said.values()))
    return "length: " + "; ".join(f"{name} model: {line}" for name, line in said.items())


# -----------------------------------------------------------------------------------------
# main

def run(args):
    device = resolve_device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()
    models = load_reward_models(args, device)
    width = min(rm.model.config.dim for rm in models.values())      # auto: bf16 only where it pays
    args.dtype, why = resolve_dtype(args.dtype, device, width)
    if args.dtype == "fp32":         # bf16 autocast needs no fp32 copy of a bf16 hub model; fp32 does
        for rm in models.values():
            rm.model.float()
    two_models = "safety" in models
    for rm in models.values():
        stats = (f"val mean {rm.mean:.4f}, std {rm.std:.4f}" if rm.std is not None
                 else "no saved validation statistics (white* = null)")
        print(f"{rm.name} model: {rm.path} ({stats})")

    if args.data:
        items, load_stats = read_items(args.data, args.skip_bad)
        print(f"data: {args.data}: {load_stats.summary()}"
              + (f"; first: {load_stats.errors[0]}" if load_stats.errors else ""))
    else:
        items, load_stats = [command_line_item(args)], None
    scored = [it for it in items if it.record is not None]
    if not scored:
        raise BadInput(f"--data {args.data}: no record to score")
    records = [it.record for it in scored]

    raw, cuts, length_stats, seconds = score_all(models, records, args, device)
    is_safety = torch.tensor([rec.is_safety for rec in records for _ in rec.responses], dtype=torch.bool)
    values, used_safety = combine(raw, models, is_safety)
    values["", "cut"] = cuts

    sizes = [len(rec.responses) for rec in records]
    *starts, n = itertools.accumulate(sizes, initial=0)      # each record's first response; all responses
    per_record = lambda t: [[None if v != v else v for v in part.tolist()] for part in t.split(sizes)]

    if not args.data:
        print_ranked(items[0].obj["responses"], values, used_safety)
    if args.out:
        start_of = {id(it): s for it, s in zip(scored, starts)}
        write_jsonl(args.out, [output_row(it, values, used_safety, start_of.get(id(it), 0)) for it in items])
    print_accuracy(records, per_record(values["", "score"]), "R_c" if two_models else "raw score")
    for name in ("safety", "helpful") if two_models else ():
        print_accuracy(records, per_record(values[name, "score"]), f"{name} model alone", full=False)
    print(length_line(length_stats))
    n_pairs = sum(len(rec.pairs) for rec in records)
    n_scored = int((~values["", "score"].isnan()).sum())
    rate = lambda k: k / max(seconds, 1e-9)
    print(f"scored {n_scored}/{n} responses of {len(records)} records ({n_pairs} pairs) with {len(models)} "
          f"model(s) on {device.type} in {args.dtype} ({why}) in {seconds:.2f} s: "
          + (f"{rate(n_pairs):.1f} pairs/s, " if n_pairs else "")
          + f"{rate(n_scored):.1f} responses/s (layout {args.layout})"
          + (f"; wrote {args.out}" if args.out else ""))


def main(argv=None):
    args = parse_args(argv)          # a bad flag exits with 2 and one line (OneLineParser)
    try:
        run(args)
    except (BadInput, DataError, CheckpointError, ChatTemplateError) as e:
        # ChatTemplateError: a template refusing a record
        print(f"score.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"score.py: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("score.py: interrupted", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
