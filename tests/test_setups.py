"""safety_mech/setups.py: every config checked before any work, each problem a one-line ConfigError
naming the key: invalid values, unknown keys at every group level (pretraining, fine-tuning,
evaluation, analysis, the study), derived keys, keys that must match the base run."""
import pytest
from ml_collections import ConfigDict

from configs import analyze as an_config
from configs import evaluate as ev_config
from configs import finetune as ft_config
from configs import pretrain as pt_config
from configs import reproduce as repro_config
from safety_mech import data as data_lib
from safety_mech import setups, study
from safety_mech.analysis.suite import AnalysisConfig
from safety_mech.evaluation import EvaluationConfig
from safety_mech.setups import ConfigError


def _raises(fn, cfg, match):
    with pytest.raises(ConfigError, match=match) as err:
        fn(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def _finetune(method="ssft", size="tiny"):
    return ft_config.get_config(f"{method}:{size}")


def _resolved(cfg, size="tiny"):
    return setups.inherit_from_base(cfg, pt_config.get_config(size).to_dict())


def _add(cfg, group, key, value):
    node = cfg if group is None else cfg[group]
    with node.unlocked():
        node[key] = value
    return cfg


@pytest.mark.parametrize("group,key,value,match", [
    ("opt", "lrs", (-1.0,), "> 0"),
    ("opt", "lrs", (1e-3, 1e-3), "distinct"),
    ("opt", "min_lr", 1.0, r"min_lr <= max\(lrs\)"),
    ("opt", "b2", 1.0, "b2 must be in"),
    ("train", "steps", 0, "steps must be >= 1"),
    ("train", "seeds", (0, 0), "distinct"),
    ("train", "seeds", (-1,), ">= 0"),
    ("loss", "normalize", "mean", "normalize"),
    ("data", "mode_probs_start", (0.5, 0.5, 0.5, 0.5), "summing to 1"),
    ("data", "p_null_op", 1.5, "p_null_op"),
    ("data", "min_len", 0, "min_len"),
    ("model", "block", "postnorm", "block"),
    ("model", "pos", "rope", "pos"),
    ("model", "d_model", 130, "divisible"),
    ("model", "n_layer", 0, "n_layer"),
    ("eval", "sets", ("safe", "nope"), "unknown evaluation set"),
    ("eval", "n_final", 0, "n_final must be >= 1"),
])
def test_invalid_pretrain_values_are_one_line_errors(group, key, value, match):
    cfg = pt_config.get_config("tiny")
    cfg[group][key] = value
    message = _raises(setups.validate_pretrain, cfg, match)
    assert message.startswith(f"config.{group}")


@pytest.mark.parametrize("group", setups.PRETRAIN_GROUPS)
def test_unknown_pretrain_key_in_every_group(group):
    cfg = _add(pt_config.get_config("tiny"), group, "bogus", 1)
    _raises(setups.validate_pretrain, cfg, rf"unknown key\(s\) config\.{group}\.{{bogus}}")


def test_pretrain_groups_and_derived_keys():
    _raises(setups.validate_pretrain, _add(pt_config.get_config("tiny"), None, "method", {"beta": 0.1}),
            r"config groups must be .*unknown \['method'\]")
    cfg = pt_config.get_config("tiny")
    with cfg.unlocked():
        del cfg["loss"]
    _raises(setups.validate_pretrain, cfg, r"missing \['loss'\]")
    for key, value in (("seq_len", 160), ("vocab_size", 60)):
        cfg = _add(pt_config.get_config("tiny"), "model", key, value)
        _raises(setups.validate_pretrain, cfg, f"config.model.{key} is derived")
    cfg = _add(pt_config.get_config("tiny"), "loss", "model", {})
    _raises(setups.validate_pretrain, cfg, "config.loss.model is derived")


@pytest.mark.parametrize("group", setups.FINETUNE_GROUPS)
def test_unknown_finetune_key_in_every_group(group):
    cfg = _add(_resolved(_finetune()), group, "bogus", 1)
    match = r"unknown key\(s\) config\.data\.{bogus}; fine-tuning data keys" if group == "data" else \
        rf"unknown key\(s\) config\.{group}\.{{bogus}}"
    _raises(setups.validate_finetune, cfg, match)


def test_finetune_groups_derived_and_pretraining_only_keys():
    _raises(setups.validate_finetune, _add(_resolved(_finetune()), None, "loss", {}), r"unknown \['loss'\]")
    # pretraining's data keys are not fine-tuning's (the safety data has its own operator rule)
    _raises(setups.validate_finetune, _add(_resolved(_finetune()), "data", "p_four_iid", 1.0),
            r"config\.data\.{p_four_iid}")
    _raises(setups.validate_finetune, _add(_resolved(_finetune()), "method", "model", {}),
            "config.method.model is derived")
    _raises(setups.validate_finetune, _add(_resolved(_finetune()), "model", "seq_len", 28),
            "config.model.seq_len is derived")
    cfg = _resolved(_finetune())
    cfg.train.pack = True
    _raises(setups.validate_finetune, cfg, "config.train.pack=True applies to pretraining only")
    cfg = _resolved(_finetune("unlearn"))
    cfg.method.w_l = -1.0
    _raises(setups.validate_finetune, cfg, "w_l must be >= 0")
    cfg = _resolved(_finetune())
    cfg.method.name = "rlhf"
    _raises(setups.validate_finetune, cfg, "config.method: name='rlhf'")


def test_inherit_from_base_and_overrides():
    base = pt_config.get_config("tiny").to_dict()
    cfg = _finetune("dpo")
    cfg.method.beta = 0.1  # textbook DPO: one change
    cfg.method.normalize = "tokens"
    s = setups.validate_finetune(setups.inherit_from_base(cfg, base))
    assert s.method.betas == (0.1, 0.1) and s.method.normalize == "tokens"
    assert (s.data.max_len, s.data.T) == (base["data"]["max_len"], base["data"]["seq_len"])  # from the base run
    assert (s.model.n_layer, s.model.d_model, s.model.block) == (base["model"]["n_layer"], base["model"]["d_model"],
                                                                base["model"]["block"])
    assert cfg.model.n_layer is None  # the input config is not modified
    _raises(setups.validate_finetune, cfg, "config.model.n_layer is unset")
    cfg.model.d_model = 64
    with pytest.raises(ConfigError, match=rf"config.model.d_model=64 does not match B \(model.d_model={base['model']['d_model']}\)"):
        setups.inherit_from_base(cfg, base, "B")
    cfg = _finetune()
    cfg.data.max_len = 12  # the base's value: fine
    assert setups.inherit_from_base(cfg, base).data.max_len == 12
    cfg.data.max_len = 7
    with pytest.raises(ConfigError, match=r"config.data.max_len=7 does not match the base run \(data.max_len=12\)"):
        setups.inherit_from_base(cfg, base)
    for broken, match in ((dict(base, model={**base["model"], "rope": 1}), r"unknown model key\(s\) \['rope'\]"),
                          ({k: v for k, v in base.items() if k != "data"}, "has no 'data' group"),
                          (dict(base, data={k: v for k, v in base["data"].items() if k != "min_len"}),
                           "has no data.min_len")):
        with pytest.raises(ConfigError, match=match) as err:
            setups.inherit_from_base(_finetune(), broken, "B")
        assert "\n" not in str(err.value) and str(err.value).startswith("B")


@pytest.mark.parametrize("cls,module,group", [(EvaluationConfig, ev_config, "evaluate"),
                                              (AnalysisConfig, an_config, "analyze")])
def test_flat_groups(cls, module, group):
    cfg = _add(module.get_config("tiny"), None, "bogus", 1)
    _raises(lambda c: setups.validate_flat(cls, c, group), cfg, rf"unknown key\(s\) config\.{group}\.{{bogus}}")
    cfg = module.get_config("tiny")
    cfg.n = 0
    _raises(lambda c: setups.validate_flat(cls, c, group), cfg, rf"config\.{group}: n")
    cfg = module.get_config("tiny")
    cfg.sets = ("safe", "nope")
    _raises(lambda c: setups.validate_flat(cls, c, group), cfg, "nope")
    # a launcher's whole --config is the group: its keys are config.<key>
    cfg = _add(module.get_config("tiny"), None, "bogus", 1)
    _raises(lambda c: setups.validate_flat(cls, c, None), cfg, r"^unknown key\(s\) config\.{bogus}; valid keys")
    cfg = module.get_config("tiny")
    cfg.n = 0
    _raises(lambda c: setups.validate_flat(cls, c, None), cfg, "^config: n")


@pytest.mark.parametrize("path", [
    ("bogus",), ("finetune", "rlhf"), ("pretrain", "bogus"), ("pretrain", "opt", "bogus"),
    ("finetune", "dpo", "bogus"), ("finetune", "dpo", "method", "bogus"), ("finetune", "ssft", "data", "bogus"),
    ("evaluate", "bogus"), ("analyze", "bogus"),
])
def test_unknown_study_key_at_every_level(path):
    cfg = repro_config.get_config("micro")
    node = cfg
    for part in path[:-1]:
        node = node[part]
    with node.unlocked():
        node[path[-1]] = ConfigDict({"x": 1}) if len(path) <= 2 and path[0] in ("bogus", "finetune") else 1
    message = _raises(study.validate, cfg, path[-1])
    assert "config" in message


def test_study_values_and_the_pretrain_link():
    cfg = repro_config.get_config("micro")
    cfg.evaluate.n = 0
    _raises(study.validate, cfg, "config.evaluate: n must be >= 1")
    cfg = repro_config.get_config("micro")
    cfg.finetune.ssft.model.d_model = 7
    _raises(study.validate, cfg, "config.model.d_model=7 does not match config.pretrain")
    cfg = repro_config.get_config("micro")
    cfg.analyze.sets = ("safe", "jb_co_text")
    _raises(study.validate, cfg, "safe and unsafe included")
    cfg = repro_config.get_config("micro")
    with cfg.finetune.unlocked():
        del cfg.finetune["unlearn"]
    _raises(study.validate, cfg, "config.finetune must hold exactly")


def test_dataclass_from_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) config.data.{maxlen}; valid keys: .*max_len"):
        setups.dataclass_from_config(data_lib.DataConfig, {"max_len": 10, "maxlen": 3}, "data")
    got = setups.dataclass_from_config(data_lib.DataConfig, {"mode_probs_start": [0.25] * 4}, "data")
    assert got.mode_probs_start == (0.25,) * 4  # lists from JSON / configs become tuples
    with pytest.raises(ConfigError, match="config.data: DataConfig: need 1 <= min_len <= max_len"):
        setups.dataclass_from_config(data_lib.DataConfig, {"min_len": 9, "max_len": 3}, "data")
