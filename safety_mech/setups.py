"""Configs (``ml_collections.ConfigDict``, the files in ``configs/``) validated into frozen
dataclasses: one config system for every stage.

Each ``validate_*`` function checks a whole config before any work starts and raises a one-line
:class:`ConfigError` naming the key (an unknown key, a missing group, a value the dataclass
rejects, or one of the wrong type). Groups:

* pretraining: ``data`` (``data.DataConfig``), ``model`` (``model.ModelConfig`` without
  ``vocab_size`` / ``seq_len``, which follow from the grammar and the data), ``opt``
  (``optim.OptConfig``), ``train`` (``train.TrainConfig``), ``eval`` (``metrics.EvalConfig``),
  ``loss`` (``normalize`` of the LM loss). ``data.curriculum_hold_steps`` / ``curriculum_end_step``
  left unset follow SPEC §5: ``opt.warmup_steps // 2`` (clamped to the run) and ``train.steps``.
* fine-tuning: the same groups with ``method`` (``finetune_losses.MethodConfig``) instead of
  ``loss``; ``model`` and the data lengths (:data:`DATA_FROM_BASE`) come from the base run
  (:func:`inherit_from_base`).
* evaluation (``evaluation.EvaluationConfig``) and analysis (``analysis.suite.AnalysisConfig``):
  flat groups.
* the study: ``pretrain``, ``finetune.{ssft,dpo,unlearn}``, ``evaluate``, ``analyze``.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import NamedTuple

import ml_collections

from safety_mech import data as data_lib
from safety_mech import grammar
from safety_mech import metrics as metrics_lib
from safety_mech import model as model_lib
from safety_mech import optim
from safety_mech import train as train_lib
from safety_mech.finetune_losses import METHODS, MethodConfig
from safety_mech.losses import LossConfig

PRETRAIN_GROUPS = ("data", "model", "opt", "train", "eval", "loss")
FINETUNE_GROUPS = ("data", "model", "opt", "train", "eval", "method")
STUDY_GROUPS = ("pretrain", "finetune", "evaluate", "analyze")
STUDY_KEYS = ("base",)  # flat keys of a study config besides its groups
# model.ModelConfig fields set from the grammar and the data lengths, never by a config
DERIVED_MODEL_KEYS = ("vocab_size", "seq_len")
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(model_lib.ModelConfig) if f.name not in DERIVED_MODEL_KEYS)
# data.DataConfig fields the fine-tuning sampler reads; the pretraining-only ones keep their defaults
FINETUNE_DATA_KEYS = ("min_len", "max_len", "seq_len", "p_second_pair", "p_unsafe", "per_batch_mixing")
# must equal the base run's: the lengths (the model's positions follow them)
DATA_FROM_BASE = ("min_len", "max_len", "seq_len")
P_UNSAFE = {"ssft": 0.2, "dpo": 0.5, "unlearn": 0.5}  # SPEC §7
# Keys the configs gained after runs were written: a run's config.json without one ran with this value
ADDED_KEYS = {"model.attention": "einsum"}


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the offending key."""


# A value's type against its dataclass field's annotation (tuples are not checked: a scalar
# learning rate or seed stands for a one-element tuple).
_TYPE_CHECKS = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
                "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
                "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}


def missing_key(cfg: ml_collections.ConfigDict, parts) -> tuple[list[str], str, str | None] | None:
    """For a dotted key (``parts``) that ``cfg`` lacks: (the existing groups above it, the first
    missing part, the nearest existing key there or None); None when the whole key exists."""
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, known, 1)
            return list(parts[:i]), part, hint[0] if hint else None
        node = node[part]
    return None


def check_types(cls, values: dict, where: str) -> None:
    """A one-line :class:`ConfigError` for the first value of ``values`` whose type is not its
    ``cls`` field's (int, float, bool, str, optionally ``| None``); other keys are not checked."""
    for field in dataclasses.fields(cls):
        kinds = [k.strip() for k in str(field.type).split("|")]
        kind = [k for k in kinds if k != "None"]
        if field.name not in values or len(kind) != 1 or kind[0] not in _TYPE_CHECKS:
            continue
        value = values[field.name]
        if not (value is None and "None" in kinds) and not _TYPE_CHECKS[kind[0]](value):
            raise ConfigError(f"{where}.{field.name}={value!r} is a {type(value).__name__}, expected {kind[0]}")


def dataclass_from_config(cls, values, group: str | None):
    """Build the frozen dataclass ``cls`` from a mapping (``ConfigDict`` or dict) of config group
    ``group`` (``None``: the whole config is the group, as a launcher's flat ``--config``); unknown
    keys and values the dataclass rejects become a one-line :class:`ConfigError`."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    fields = {f.name for f in dataclasses.fields(cls)}
    where = "config" if group is None else f"config.{group}"
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {where}.{{{', '.join(unknown)}}}; valid keys: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    check_types(cls, values, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def _check_groups(cfg, groups, where: str = "config") -> None:
    keys = set(cfg.keys())
    unknown, missing = sorted(keys - set(groups)), sorted(set(groups) - keys)
    if unknown or missing:
        raise ConfigError(f"{where} groups must be {groups}; unknown {unknown}, missing {missing}")


class PretrainSetup(NamedTuple):
    """A validated pretraining config."""

    data: data_lib.DataConfig
    model: model_lib.ModelConfig
    opt: optim.OptConfig
    train: train_lib.TrainConfig
    eval: metrics_lib.EvalConfig
    loss: LossConfig


class FinetuneSetup(NamedTuple):
    """A validated fine-tuning config; ``loss`` is the method config with ``model`` set."""

    data: data_lib.DataConfig
    model: model_lib.ModelConfig
    opt: optim.OptConfig
    train: train_lib.TrainConfig
    eval: metrics_lib.EvalConfig
    loss: MethodConfig

    @property
    def method(self) -> MethodConfig:
        return self.loss


def _common(cfg, data_values: dict):
    """data, model, opt, train, eval of a pretraining or fine-tuning config."""
    grammar.load_grammar_data()  # the data's grammars readable before any work (else a one-line GrammarError)
    data_cfg = dataclass_from_config(data_lib.DataConfig, data_values, "data")
    model_values = dict(cfg.model.to_dict())
    for key in DERIVED_MODEL_KEYS:
        if key in model_values:
            raise ConfigError(f"config.model.{key} is derived (grammar vocabulary / data lengths); remove it")
    model_values.update(vocab_size=grammar.VOCAB_SIZE, seq_len=data_cfg.T)
    model_cfg = dataclass_from_config(model_lib.ModelConfig, model_values, "model")
    for name in ("n_layer", "n_head", "d_model", "d_mlp"):
        if getattr(model_cfg, name) < 1:
            raise ConfigError(f"config.model.{name} must be >= 1, got {getattr(model_cfg, name)}")
    if not model_cfg.ln_eps > 0:
        raise ConfigError(f"config.model.ln_eps must be > 0, got {model_cfg.ln_eps}")
    opt_cfg = dataclass_from_config(optim.OptConfig, cfg.opt, "opt")
    train_cfg = dataclass_from_config(train_lib.TrainConfig, cfg.train, "train")
    eval_cfg = dataclass_from_config(metrics_lib.EvalConfig, cfg.eval, "eval")
    return data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg


def validate_pretrain(cfg) -> PretrainSetup:
    """A ``configs/pretrain.py`` config as frozen dataclasses (see the module docstring)."""
    _check_groups(cfg, PRETRAIN_GROUPS)
    data_values = dict(cfg.data.to_dict())
    check_types(train_lib.TrainConfig, cfg.train.to_dict(), "config.train")  # the curriculum defaults read them
    check_types(optim.OptConfig, cfg.opt.to_dict(), "config.opt")
    steps, warmup = cfg.train.get("steps"), cfg.opt.get("warmup_steps")
    if data_values.get("curriculum_end_step") is None and isinstance(steps, int):
        data_values["curriculum_end_step"] = steps
    end = data_values.get("curriculum_end_step")
    if data_values.get("curriculum_hold_steps") is None and isinstance(warmup, int) and isinstance(end, int):
        # warmup/2 can exceed a short run's length: the curriculum then holds for the whole run
        data_values["curriculum_hold_steps"] = min(warmup // 2, max(end, 0))
    data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg = _common(cfg, data_values)
    if "model" in cfg.loss:
        raise ConfigError("config.loss.model is derived (the config's model); remove it")
    loss_cfg = dataclass_from_config(LossConfig, {**cfg.loss.to_dict(), "model": model_cfg}, "loss")
    return PretrainSetup(data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg, loss_cfg)


def inherit_from_base(cfg, base_config: dict, base_name: str = "the base run") -> ml_collections.ConfigDict:
    """A copy of fine-tuning config ``cfg`` with its unset model keys and :data:`DATA_FROM_BASE`
    keys taken from ``base_config`` (the base run's ``config.json``); a key set to another value
    than the base's raises a one-line :class:`ConfigError` naming it."""
    resolved = cfg.copy_and_resolve_references()
    for group, keys in (("model", MODEL_KEYS), ("data", DATA_FROM_BASE)):
        base_group = base_config.get(group)
        if not isinstance(base_group, dict):
            raise ConfigError(f"{base_name}: config.json has no '{group}' group")
        base_group = {**{k.split(".")[1]: v for k, v in ADDED_KEYS.items() if k.startswith(f"{group}.")},
                      **base_group}
        extra = sorted(set(base_group) - set(keys)) if group == "model" else []
        if extra:
            raise ConfigError(f"{base_name}: unknown model key(s) {extra} in its config.json")
        for key in keys:
            if key not in base_group:
                raise ConfigError(f"{base_name}: config.json has no {group}.{key}")
            mine, theirs = resolved[group][key], base_group[key]
            if mine is None:
                resolved[group][key] = theirs
            elif mine != theirs:
                raise ConfigError(f"config.{group}.{key}={mine!r} does not match {base_name} ({group}.{key}={theirs!r}); "
                                  "fine-tuning keeps the base run's model and data")
    return resolved


def validate_finetune(cfg) -> FinetuneSetup:
    """A resolved ``configs/finetune.py`` config (:func:`inherit_from_base`) as frozen dataclasses."""
    _check_groups(cfg, FINETUNE_GROUPS)
    for group, keys in (("model", MODEL_KEYS), ("data", DATA_FROM_BASE)):
        unset = [k for k in keys if cfg[group].get(k) is None]
        if unset:
            raise ConfigError(f"config.{group}.{unset[0]} is unset: it comes from the base run "
                              "(setups.inherit_from_base)")
    unknown = sorted(set(cfg.data.keys()) - set(FINETUNE_DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) config.data.{{{', '.join(unknown)}}}; fine-tuning data keys: "
                          f"{', '.join(FINETUNE_DATA_KEYS)}")
    data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg = _common(cfg, dict(cfg.data.to_dict()))
    if train_cfg.pack:
        raise ConfigError("config.train.pack=True applies to pretraining only (a fine-tuning batch holds two "
                          "completions per example); set it False")
    if "model" in cfg.method:
        raise ConfigError("config.method.model is derived (the base run's model); remove it")
    method = dataclass_from_config(MethodConfig, cfg.method, "method")
    return FinetuneSetup(data_cfg, model_cfg, opt_cfg, train_cfg, eval_cfg, dataclasses.replace(method, model=model_cfg))


def validate_flat(cls, cfg, group: str | None):
    """A flat config group (evaluation, analysis) as the frozen dataclass ``cls``; ``group=None``
    for a launcher's ``--config`` (keys named ``config.<key>``)."""
    return dataclass_from_config(cls, cfg, group)


class StudySetup(NamedTuple):
    """A validated study: the pretraining setup, each method's resolved config and setup, and the
    evaluation and analysis configs."""

    pretrain: PretrainSetup
    finetune: dict  # {method: (resolved ConfigDict, FinetuneSetup)}
    evaluate: object  # evaluation.EvaluationConfig
    analyze: object  # analysis.suite.AnalysisConfig


def validate_study(cfg, evaluation_cls, analysis_cls) -> StudySetup:
    """A ``configs/reproduce.py`` config: every group checked, each method's fine-tuning config
    resolved against the pretraining config (its model and data lengths)."""
    _check_groups(cfg, STUDY_GROUPS + STUDY_KEYS)
    if not isinstance(cfg.base, str):
        raise ConfigError(f"config.base must be a shipped base's name or '' (pretrain in the study), got {cfg.base!r}")
    if sorted(cfg.finetune.keys()) != sorted(METHODS):
        raise ConfigError(f"config.finetune must hold exactly {list(METHODS)}, got {sorted(cfg.finetune.keys())}")
    pre = validate_pretrain(cfg.pretrain)
    base = cfg.pretrain.to_dict()
    finetune = {}
    for m in METHODS:
        try:
            resolved = inherit_from_base(cfg.finetune[m], base, "config.pretrain")
            finetune[m] = (resolved, validate_finetune(resolved))
        except ConfigError as e:  # which method's config: they have the same keys
            raise ConfigError(f"config.finetune.{m}: {e}") from None
    return StudySetup(pre, finetune, validate_flat(evaluation_cls, cfg.evaluate, "evaluate"),
                      validate_flat(analysis_cls, cfg.analyze, "analyze"))
