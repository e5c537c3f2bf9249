"""SPEC §10.7: weight-only analyses of two safetensors checkpoints (small generated files)."""
import json
import sys

import ml_dtypes
import numpy as np
import pytest

from safety_mech.analysis import realmodels, weights

st = pytest.importorskip("safetensors.numpy")

OUT, IN, K = 48, 16, 6  # "up_proj" [out, in] as Hugging Face stores it (y = W x)


def _checkpoints(seed=0, dtype=np.float32):
    """A base and a tuned 2-layer "Llama": every MLP ΔW planted in the null space of W_baseᵀ,
    attention deltas random, norms 1-D (never selected)."""
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for i in range(2):
        Q = np.linalg.qr(rng.standard_normal((OUT, OUT)))[0]
        up = Q[:, :K] @ rng.standard_normal((K, IN))  # rank K: col(up) = span Q[:, :K]
        down = rng.standard_normal((IN, OUT))
        q = rng.standard_normal((IN, IN))
        p = f"model.layers.{i}."
        base.update({p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": down,
                     p + "self_attn.q_proj.weight": q, p + "input_layernorm.weight": np.ones(IN)})
        tuned.update({p + "mlp.up_proj.weight": up + 0.01 * Q[:, K:K + 2] @ rng.standard_normal((2, IN)),
                      p + "mlp.down_proj.weight": down + 0.01 * rng.standard_normal((IN, OUT)),
                      p + "self_attn.q_proj.weight": q + 0.01 * rng.standard_normal((IN, IN)),
                      p + "input_layernorm.weight": np.ones(IN)})
    cast = lambda d: {k: v.astype(dtype) for k, v in d.items()}  # noqa: E731
    return cast(base), cast(tuned)


def _save(tensors, path, shards=1):
    names = sorted(tensors)
    paths = []
    for s in range(shards):
        f = path.parent / f"{path.stem}-{s:05d}-of-{shards:05d}.safetensors" if shards > 1 else path
        # Contiguous copies: safetensors.numpy writes a transposed view's memory, not its values.
        st.save_file({n: np.ascontiguousarray(tensors[n]) for n in names[s::shards]}, str(f))
        paths.append(f)
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base, tuned = _checkpoints()
    (root / "base_dir").mkdir()
    return dict(arrays=(base, tuned),
                base=_save(base, root / "base.safetensors")[0],
                tuned=_save(tuned, root / "tuned.safetensors")[0],
                base_dir=_save(base, root / "base_dir" / "model.safetensors", shards=2)[0].parent,
                tuned_shards=_save(tuned, root / "tuned.safetensors", shards=3))


def test_default_pattern_selects_mlp_matrices(files):
    res = realmodels.analyze_checkpoints(files["base"], files["tuned"], top=2, n_random=100)
    assert sorted(res) == [f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("down_proj", "up_proj")]
    up = res["model.layers.0.mlp.up_proj.weight"]
    assert up["shape"] == [OUT, IN]  # used as stored: out x in
    assert up["null_space"]["k_it"] <= K
    np.testing.assert_allclose(up["null_space"]["scores"], 1.0, atol=1e-4)  # planted outside col(W_base)
    assert up["null_space"]["energy_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert up["effective_rank"] <= 2
    json.dumps(res)


def test_matches_in_memory_analysis(files):
    base, tuned = files["arrays"]
    res = realmodels.analyze_checkpoints(files["base"], files["tuned"], pattern=r"q_proj|up_proj",
                                         dtype=np.float64, top=3, n_random=50)
    assert sorted(res) == sorted(n for n in base if "q_proj" in n or "up_proj" in n)
    for name, r in res.items():
        expected = weights.matrix_analysis(base[name].astype(np.float64), tuned[name].astype(np.float64),
                                           top=3, n_random=50)
        assert _close(r, expected)


def _close(a, b, rtol=1e-6):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_close(a[k], b[k], rtol) for k in a)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=1e-9)
    return True


def test_sharded_checkpoints_give_the_same_result(files):
    single = realmodels.analyze_checkpoints(files["base"], files["tuned"], top=2, n_random=50)
    assert len(list(files["base_dir"].glob("*.safetensors"))) == 2
    sharded = realmodels.analyze_checkpoints(files["base_dir"], [str(p) for p in files["tuned_shards"]],
                                             top=2, n_random=50)
    assert _close(sharded, single)
    index = realmodels.tensor_index(realmodels.safetensors_files(files["tuned_shards"]))
    assert index["model.layers.1.mlp.up_proj.weight"][1] == (OUT, IN)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])  # Llama-2 ships float16, most newer models bf16
def test_half_precision_delta_is_exact(tmp_path, dtype):
    base, tuned = _checkpoints(seed=1, dtype=np.dtype(dtype) if dtype == "float16" else ml_dtypes.bfloat16)
    b = _save(base, tmp_path / "b.safetensors")[0]
    t = _save(tuned, tmp_path / "t.safetensors")[0]
    res = realmodels.analyze_checkpoints(b, t, pattern="up_proj", dtype=np.float64, top=2, n_random=10)
    name = "model.layers.0.mlp.up_proj.weight"
    dW = tuned[name].astype(np.float64) - base[name].astype(np.float64)
    np.testing.assert_allclose(res[name]["top_singular_values"], np.linalg.svd(dW, compute_uv=False)[:2], rtol=1e-12)


def test_transpose_for_in_by_out_storage(tmp_path):
    base, tuned = _checkpoints(seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    b = _save({name: base[name].T}, tmp_path / "b.safetensors")[0]  # stored in x out (GPT-2 Conv1D style)
    t = _save({name: tuned[name].T}, tmp_path / "t.safetensors")[0]
    res = realmodels.analyze_checkpoints(b, t, transpose=True, top=2, n_random=10)[name]
    assert res["shape"] == [OUT, IN]
    np.testing.assert_allclose(res["null_space"]["scores"], 1.0, atol=1e-4)


def test_errors(files, tmp_path):
    tuned = files["arrays"][1]
    with pytest.raises(ValueError, match="matches"):
        realmodels.analyze_checkpoints(files["base"], files["tuned"], pattern="no_such_tensor")
    partial = _save({k: v for k, v in tuned.items() if "layers.1" not in k}, tmp_path / "partial.safetensors")[0]
    with pytest.raises(KeyError, match="missing"):
        realmodels.analyze_checkpoints(files["base"], partial)
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = _save({**tuned, name: tuned[name][:-1]}, tmp_path / "wrong.safetensors")[0]
    with pytest.raises(ValueError, match="shape"):
        realmodels.analyze_checkpoints(files["base"], wrong, pattern="up_proj")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        realmodels.safetensors_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        realmodels.safetensors_files(tmp_path / "nope.safetensors")


def test_missing_safetensors_names_the_extra(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[safetensors\]"):
        realmodels.analyze_checkpoints(files["base"], files["tuned"])
