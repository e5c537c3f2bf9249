"""Readable examples of every data set (``launch/sample.py`` prints them): JSON-ready records with
token strings exactly as in the vocabulary.

Fields: set, pcfg (1-4), branch (safe | unsafe | mixed), ops (4 tokens), text (operand letters),
unsafe (bool), true_output (a STOP b STOP; a null operator gives its constant segment), target
(the response the model should give: the true output, or the refusal for unsafe safety inputs; in
pretraining always the true output), tokens (the whole sequence, PAD dropped); pretrain: mode,
null_slot (-1 or 0-3); finetune: desired, undesired, second_pair; evaluation sets: refusal,
harmful, second_pair, gov_pair (the first unsafe pair).
"""
from __future__ import annotations

import jax
import numpy as np

from safety_mech import data, safety_data
from safety_mech import grammar as gr

SETS = ("pretrain", "finetune") + safety_data.EVAL_SETS


def sample_records(name: str, n: int, seed: int, step: int, cfg: data.DataConfig) -> list[dict]:
    """The examples of one set as JSON-ready dicts."""
    key = jax.random.key(seed)
    if name == "pretrain":
        batch = data.sample_pretrain_batch(key, cfg, n, step)
    elif name == "finetune":
        batch = safety_data.sample_finetune_batch(key, cfg, n)
    else:
        batch = safety_data.sample_eval_set(key, cfg, name, n)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    records = []
    for i in range(n):
        ex = {k: v[i] for k, v in batch.items()}
        plen = int(ex["prompt_len"])
        rec = {
            "set": name,
            "pcfg": int(ex["pcfg"]),
            "branch": gr.BRANCH_NAMES[int(ex["branch"])],
            "ops": gr.decode(ex["ops"]),
            "text": gr.letters_to_tokens(ex["text"], ex["text_len"]),
            "unsafe": bool(ex["unsafe"]),
        }
        if name == "pretrain":
            rec["true_output"] = gr.response_of(ex["tokens_true"], plen)
            rec["target"] = rec["true_output"]
            rec["mode"] = data.MODES[int(ex["mode"])]
            rec["null_slot"] = int(ex["null_slot"])
            rec["tokens"] = gr.decode(ex["tokens"])
        elif name == "finetune":
            desired = gr.response_of(ex["tokens_desired"], plen)
            undesired = gr.response_of(ex["tokens_undesired"], plen)
            rec["true_output"] = undesired if rec["unsafe"] else desired
            rec["target"] = desired
            rec["desired"], rec["undesired"] = desired, undesired
            rec["second_pair"] = bool(ex["second_pair"])
            rec["tokens"] = gr.decode(ex["tokens_desired"])
        else:
            rec["true_output"] = gr.response_of(ex["tokens_true"], plen)
            rec["refusal"] = gr.response_of(ex["tokens_refusal"], plen)
            rec["harmful"] = gr.response_of(ex["tokens_harmful"], plen)
            rec["target"] = rec["refusal"] if rec["unsafe"] else rec["true_output"]
            rec["second_pair"] = bool(ex["second_pair"])
            rec["gov_pair"] = int(ex["gov_pair"])
            rec["tokens"] = gr.decode(ex["prompt"]) + rec["target"] + ["%"]
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
