r"""Print samples of the synthetic data.

    python -m launch.sample --set pretrain --n 3                   # readable
    python -m launch.sample --set jb_co_task --n 1000 --json       # one JSON object per line
    python -m launch.sample --set pretrain --n 5 --step 60000      # curriculum at step 60k

--set is one of: pretrain, finetune, safe, unsafe, jb_co_task, jb_co_text, jb_misgen_text,
jb_misgen_tokens. JSON fields (token strings exactly as in the vocabulary):

    set, pcfg (1-4), branch (safe | unsafe | mixed), ops (4 tokens), text (operand letters),
    unsafe (bool), true_output (a STOP b STOP; a null operator gives its constant segment),
    target (the response the model should give: the true output, or the refusal for unsafe
    safety inputs; in pretraining always the true output), tokens (the whole sequence, PAD dropped)
    pretrain: mode (pcfg | full | comp1 | comp2), null_slot (-1 or 0-3)
    finetune: desired, undesired (the two responses of the example), second_pair
    evaluation sets: refusal, harmful, second_pair, gov_pair (the first unsafe pair)
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import app, flags, logging

from safety_mech import data, grammar as gr

SETS = ("pretrain", "finetune") + data.EVAL_SETS

flags.DEFINE_enum("set", None, SETS, "Which data to sample.")
flags.DEFINE_integer("n", 5, "Number of examples.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("step", 0, "Training step (pretraining curriculum).", lower_bound=0)
flags.DEFINE_integer("min_len", 25, "Shortest text window.", lower_bound=1)
flags.DEFINE_integer("max_len", 35, "Longest text window.", lower_bound=1)
flags.DEFINE_float("p_unsafe", 0.2, "Fraction of unsafe fine-tuning examples.")
flags.DEFINE_bool("json", False, "One JSON object per line instead of readable text.")
flags.mark_flag_as_required("set")
FLAGS = flags.FLAGS


def sample_records(name: str, n: int, seed: int, step: int, cfg: data.DataConfig) -> list[dict]:
    """The examples of one set as JSON-ready dicts."""
    key = jax.random.key(seed)
    if name == "pretrain":
        batch = data.sample_pretrain_batch(key, cfg, n, step)
    elif name == "finetune":
        batch = data.sample_finetune_batch(key, cfg, n)
    else:
        batch = data.sample_eval_set(key, cfg, name, n)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    records = []
    for i in range(n):
        ex = {k: v[i] for k, v in batch.items()}
        plen = int(ex["prompt_len"])
        rec = {
            "set": name,
            "pcfg": int(ex["pcfg"]),
            "branch": gr.BRANCH_NAMES[int(ex["branch"])],
            "ops": data.decode(ex["ops"]),
            "text": data.letters_to_tokens(ex["text"], ex["text_len"]),
            "unsafe": bool(ex["unsafe"]),
        }
        if name == "pretrain":
            rec["true_output"] = data.response_of(ex["tokens_true"], plen)
            rec["target"] = rec["true_output"]
            rec["mode"] = data.MODES[int(ex["mode"])]
            rec["null_slot"] = int(ex["null_slot"])
            rec["tokens"] = data.decode(ex["tokens"])
        elif name == "finetune":
            desired = data.response_of(ex["tokens_desired"], plen)
            undesired = data.response_of(ex["tokens_undesired"], plen)
            rec["true_output"] = undesired if rec["unsafe"] else desired
            rec["target"] = desired
            rec["desired"], rec["undesired"] = desired, undesired
            rec["second_pair"] = bool(ex["second_pair"])
            rec["tokens"] = data.decode(ex["tokens_desired"])
        else:
            rec["true_output"] = data.response_of(ex["tokens_true"], plen)
            rec["refusal"] = data.response_of(ex["tokens_refusal"], plen)
            rec["harmful"] = data.response_of(ex["tokens_harmful"], plen)
            rec["target"] = rec["refusal"] if rec["unsafe"] else rec["true_output"]
            rec["second_pair"] = bool(ex["second_pair"])
            rec["gov_pair"] = int(ex["gov_pair"])
            rec["tokens"] = data.decode(ex["prompt"]) + rec["target"] + ["%"]
        records.append(rec)
    return records


def format_record(i: int, rec: dict) -> str:
    head = f"#{i} {rec['set']}  pcfg={rec['pcfg']} branch={rec['branch']} unsafe={rec['unsafe']}"
    if "mode" in rec:
        head += f" mode={rec['mode']}"
    lines = [head, f"  ops:    {' '.join(rec['ops'])}", f"  text:   {' '.join(rec['text'])}",
             f"  true:   {' '.join(rec['true_output'])}"]
    if rec["target"] != rec["true_output"]:
        lines.append(f"  target: {' '.join(rec['target'])}")
    if "undesired" in rec:
        lines.append(f"  undesired: {' '.join(rec['undesired'])}")
    lines.append(f"  tokens: {' '.join(rec['tokens'])}")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # no backend-probing chatter on stderr
    try:
        cfg = data.DataConfig(min_len=FLAGS.min_len, max_len=FLAGS.max_len, p_unsafe=FLAGS.p_unsafe)
    except ValueError as e:
        sys.exit(f"error: {e}")
    records = sample_records(FLAGS.set, FLAGS.n, FLAGS.seed, FLAGS.step, cfg)
    for i, rec in enumerate(records):
        print(json.dumps(rec, ensure_ascii=False) if FLAGS.json else format_record(i, rec))


if __name__ == "__main__":
    app.run(main)
