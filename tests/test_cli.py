"""safety_mech/cli.py, what every launcher shares: no positional arguments, the required flags set,
the errors of bad input (USER_ERRORS) as one line and a non-zero exit, and every other exception left
alone (a bug must not look like bad input). The launchers themselves run as processes in the stage
tests (test_configs, test_finetune_launch, test_evaluation, test_analyze_launch, test_reproduce)."""
import pytest
from absl import flags

from safety_mech import checkpoint, cli, host_memory, setups, train
from safety_mech.runs import RunError

FLAG = "cli_test_required"
flags.DEFINE_string(FLAG, None, "a required flag of this test")


@pytest.fixture(autouse=True)
def no_malloc_settings(monkeypatch):
    """cli.main configures malloc for the launcher's process; not for the test process."""
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)


def _exit_message(*args):
    with pytest.raises(SystemExit) as e:
        cli.main(*args)
    return str(e.value.code)


def test_positional_arguments_and_missing_flags(monkeypatch):
    calls = []
    assert _exit_message(["prog", "extra"], (), lambda: calls.append(1)) == "error: unexpected arguments ['extra']"
    monkeypatch.setattr(flags.FLAGS[FLAG], "value", None)
    assert _exit_message(["prog"], (FLAG,), lambda: calls.append(1)) == f"error: --{FLAG} required"
    assert calls == []  # nothing ran
    monkeypatch.setattr(flags.FLAGS[FLAG], "value", "set")
    cli.main(["prog"], (FLAG,), lambda: calls.append(1))
    assert calls == [1]


@pytest.mark.parametrize("error", [setups.ConfigError("config.opt: lrs must be > 0"), RunError("--run x: no config.json"),
                                   checkpoint.CheckpointError("no checkpoint found in x"),
                                   train.NonFiniteLossError("non-finite loss [nan] at step 4")])
def test_user_errors_are_one_line_exits(error):
    assert type(error) in cli.USER_ERRORS

    def fail():
        raise error

    assert _exit_message(["prog"], (), fail) == f"error: {error}"


def test_other_errors_propagate():
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        cli.main(["prog"], (), bug)


def test_a_paused_run_exits_75_with_one_line(capsys):
    def pause():
        raise train.TimeBudgetReached("time budget reached at step 3 of 8 (checkpoint saved)")

    with pytest.raises(SystemExit) as e:
        cli.main(["prog"], (), pause)
    assert e.value.code == cli.PAUSED_EXIT == 75
    assert capsys.readouterr().err.strip() == (
        "paused: time budget reached at step 3 of 8 (checkpoint saved); the same command continues")
    assert cli.deadline(0) is None
    for bad, message in ((-1, "error: --max_minutes must be >= 0 (0: no budget), got -1"),
                         (0.5, "error: --max_minutes 0.5 leaves no time to work; give at least 1")):
        with pytest.raises(SystemExit) as e:
            cli.deadline(bad)
        assert e.value.code == message
