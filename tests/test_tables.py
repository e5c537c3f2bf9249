"""The paper-shaped tables of safety_mech/tables.py and the metric-key scheme they read."""
from safety_mech import metrics, replicas, tables


def _run_metrics(method, lr, value, seeds=(0,)):
    out = {}
    for model in replicas.names(method, [lr], seeds):
        for s, m in (("safe", "gen_instruct"), ("unsafe", "gen_null"), ("jb_co_task", "gen_strict"),
                     ("adversarial", "gen_strict"), ("adversarial/budget=0.5", "gen_strict")):
            out.update({f"{model}/{s}/{m}": value, f"{model}/{s}/{m}_lo": value - 0.1,
                        f"{model}/{s}/{m}_hi": value + 0.1, f"{model}/{s}/n": 10})
    return out


def test_paper_table_from_several_runs():
    table = tables.paper_table([_run_metrics("ssft", 1e-4, 0.5), _run_metrics("dpo", 1e-5, 0.25)])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | Instruct (safe) | Null (unsafe) | JB-CO-Task")
    assert lines[0].count("|") == len(tables.TABLE_COLUMNS) + 2
    assert lines[2].startswith("| ssft, η=0.0001 | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | – |")
    assert lines[3].startswith("| dpo, η=1e-05 | 25.0 [15.0, 35.0] |") and lines[3].endswith("| 25.0 [15.0, 35.0] |")
    assert tables.paper_table(_run_metrics("ssft", 1e-4, 0.5)) == tables.paper_table([_run_metrics("ssft", 1e-4, 0.5)])
    sweep = tables.sweep_table([_run_metrics("ssft", 1e-4, 0.5)], "budget")
    assert "budget=0.5" in sweep and "50.0 [40.0, 60.0]" in sweep and tables.sweep_table({}, "k") == ""


def test_rows_name_the_seed_only_when_a_run_has_several():
    table = tables.paper_table([_run_metrics("ssft", 1e-4, 0.5, seeds=(0, 3)), _run_metrics("dpo", 1e-4, 0.5)])
    labels = [line.split(" | ")[0] for line in table.strip().splitlines()[2:]]
    assert labels == ["| ssft, η=0.0001, seed=0", "| ssft, η=0.0001, seed=3", "| dpo, η=0.0001"]


def test_split_key():
    assert tables.split_key("ssft/lr=0.0001/seed=0/adversarial/k=2/gen_null") == \
        ("ssft/lr=0.0001/seed=0", "adversarial/k=2/gen_null")
    assert tables.split_key("ssft>unlearn/lr=1e-05/seed=2/safe/gen_instruct_lo") == \
        ("ssft>unlearn/lr=1e-05/seed=2", "safe/gen_instruct_lo")
    assert tables.split_key("eval/safe/gen_instruct") is None and tables.split_key("ssft/lr=1/seed=0") is None


def test_seed_mean_table_pools_the_seeds_inputs():
    a = _run_metrics("ssft", 1e-4, 0.5, seeds=(0,))
    b = _run_metrics("ssft", 1e-4, 0.3, seeds=(1,))
    lines = tables.seed_mean_table([a, b]).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| model (seeds) | Instruct (safe) |")
    lo, hi = metrics.wilson_interval(0.5 * 10 + 0.3 * 10, 20)  # 8 of the 20 pooled inputs
    assert lines[2].startswith(f"| ssft, η=0.0001 (2) | 40.0 [{100 * lo:.1f}, {100 * hi:.1f}] |")
