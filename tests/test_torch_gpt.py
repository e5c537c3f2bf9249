"""benchmarks/torch_gpt.py: the PyTorch GPT computes our model's logits from our parameters (both
blocks, both position kinds), its step trains, and the CLI runs (eager mode only, CPU)."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_mech import model as model_lib

torch = pytest.importorskip("torch")

CFG = model_lib.ModelConfig(vocab_size=54, seq_len=20, n_layer=2, n_head=2, d_model=16, d_mlp=32)


def _torch_gpt():
    spec = importlib.util.spec_from_file_location(
        "torch_gpt", pathlib.Path(__file__).parents[1] / "benchmarks" / "torch_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tg = _torch_gpt()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: torch's thread pool only adds barrier waits, which dominate on a loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loaded(cfg):
    params = model_lib.init_params(jax.random.key(0), cfg)
    # init_params' zero biases and unit LayerNorm scales would hide a bias or scale left unloaded
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape, np.float32)), params)
    net = tg.TorchGPT(cfg)
    tg.load_params(net, params)
    return params, net


def _logits(net, tokens):
    with torch.no_grad():
        return net(torch.tensor(np.asarray(tokens), dtype=torch.long)).numpy()


@pytest.mark.parametrize("block", ["paper", "prenorm"])
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_logits_equal_ours(block, pos):
    cfg = model_lib.ModelConfig(**{**CFG.__dict__, "block": block, "pos": pos})
    params, net = _loaded(cfg)
    assert "pe" not in dict(net.named_parameters()) and ("pe" in dict(net.named_buffers())) == (pos == "sinusoidal")
    assert sum(p.numel() for p in net.parameters()) == model_lib.count_params(params, exclude_head=False)
    tokens = jax.random.randint(jax.random.key(2), (3, cfg.seq_len), 0, cfg.vocab_size)
    ours = np.asarray(model_lib.apply(params, cfg, tokens=tokens))
    theirs = _logits(net, tokens)
    assert theirs.dtype == np.float32 and theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_logits(net, tokens[:, :7]), ours[:, :7], rtol=0, atol=1e-5)  # causal, shorter T


def test_a_wrong_weight_is_caught():
    params, net = _loaded(CFG)
    tokens = jax.random.randint(jax.random.key(2), (3, CFG.seq_len), 0, CFG.vocab_size)
    ours = np.asarray(model_lib.apply(params, CFG, tokens=tokens))
    with torch.no_grad():
        net.h[1].mlp.c_fc.weight[5, 3] += 0.2  # one weight of the last MLP
    assert np.abs(_logits(net, tokens) - ours).max() > 1e-3


def test_load_params_rejects_mismatched_params():
    params = model_lib.init_params(jax.random.key(0), CFG)
    with pytest.raises(KeyError, match="wpe/embedding"):
        tg.load_params(tg.TorchGPT(model_lib.ModelConfig(**{**CFG.__dict__, "pos": "learned"})), params)
    with pytest.raises(KeyError, match="not loaded"):
        tg.load_params(tg.TorchGPT(CFG), {**params, "extra": {"bias": np.zeros(3)}})
    with pytest.raises(ValueError, match="h_0/mlp/c_fc/kernel"):
        tg.load_params(tg.TorchGPT(model_lib.ModelConfig(**{**CFG.__dict__, "d_mlp": 48})), params)


def test_step_lowers_the_loss():
    torch.manual_seed(0)
    step, net = tg.make_step(CFG, batch=4, device="cpu", compile=False, bf16=False)
    before = [p.detach().clone() for p in net.parameters()]
    losses = [step() for _ in range(20)]
    assert all(isinstance(x, torch.Tensor) and x.ndim == 0 for x in losses)
    assert losses[-1].item() < losses[0].item() - 0.1, [x.item() for x in losses]
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # every parameter trains


def test_cli_json(capsys):
    tg.main(["--preset", "micro", "--batch", "4", "--steps", "2", "--device", "cpu", "--no-compile", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"ms_per_step", "tokens_per_s", "compile_s", "device"} and r["device"] == "cpu:cpu"
    assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(4 * 28 / r["ms_per_step"] * 1e3)
