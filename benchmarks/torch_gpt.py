"""A plain PyTorch GPT of the same architecture as ``safety_mech/model.py``: the yardstick a user would
pick instead of our JAX code, timed on one training step.

    python benchmarks/torch_gpt.py                          # paper model, batch 512, compiled, bf16 autocast
    python benchmarks/torch_gpt.py --preset tiny --batch 128 --no-compile
    python benchmarks/torch_gpt.py --no-bf16 --json         # {"ms_per_step", "tokens_per_s", "compile_s", "device"}
    python benchmarks/torch_gpt.py --preset micro --batch 8 --steps 3 --device cpu --no-compile

``TorchGPT`` is the model of ``model.py``'s docstring (both blocks and position kinds); ``load_params``
copies our parameters into it, and its float32 logits equal ``model.apply``'s (tests/test_torch_gpt.py).
The step: AdamW as ours (clip 1.0, weight decay on kernels) on one fixed random batch. Times are
medians over ``--steps`` steps after warm-up, each step synchronized.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from configs import pretrain as pretrain_config
from configs.common import SIZES
from safety_mech import model as model_lib
from safety_mech import setups


class _Block(nn.Module):
    """One block: ``attn`` (fused q|k|v ``c_attn``, heads contiguous in each; ``c_proj``) and ``mlp``
    (``c_fc`` -> tanh-GELU -> ``c_proj``), named as our params; ``ln_2`` for ``block="prenorm"`` only."""

    def __init__(self, cfg: model_lib.ModelConfig):
        super().__init__()
        D, self.n_head, self.paper = cfg.d_model, cfg.n_head, cfg.block == "paper"
        self.ln_1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(D, 3 * D), "c_proj": nn.Linear(D, D)})
        if not self.paper:
            self.ln_2 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(D, cfg.d_mlp), "c_proj": nn.Linear(cfg.d_mlp, D)})

    def _attend(self, x):
        B, T, D = x.shape
        q, k, v = self.attn.c_attn(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(K), [B, H, T, K]
        return self.attn.c_proj(y.transpose(1, 2).reshape(B, T, D))

    def _mlp(self, x):
        return self.mlp.c_proj(F.gelu(self.mlp.c_fc(x), approximate="tanh"))

    def forward(self, x):
        if self.paper:  # REF: the residual stream is overwritten by LN1; no norm before the MLP
            x = self.ln_1(x)
            x = x + self._attend(x)
            return x + self._mlp(x)
        x = x + self._attend(self.ln_1(x))
        return x + self._mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """The model of ``cfg`` (``cfg.dtype`` and ``cfg.attention`` are JAX-side choices and ignored here):
    tokens [B, T] -> logits [B, T, V]. Sinusoidal positions are a non-persistent buffer, not a parameter.
    Initialised as ``model.init_params`` draws (GPT-2: N(0, 0.02), residual projections 0.02/sqrt(2L))."""

    def __init__(self, cfg: model_lib.ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        else:
            pe = torch.from_numpy(model_lib.sinusoidal_positions(cfg.seq_len, cfg.d_model))
            self.register_buffer("pe", pe, persistent=False)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():  # LayerNorms start at scale 1, bias 0 already
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln_" not in name:
                    p.normal_(0.0, 0.02 / math.sqrt(2 * cfg.n_layer) if "c_proj" in name else 0.02)

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.wte(tokens) + (self.wpe.weight[:T] if hasattr(self, "wpe") else self.pe[:T])
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _flatten(tree, prefix=""):
    """Our nested params dict as {"h_0/attn/c_attn/kernel": array, ...}."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}


_WEIGHT_NAMES = {nn.Linear: "kernel", nn.LayerNorm: "scale", nn.Embedding: "embedding"}  # our leaf names


def load_params(torch_model: TorchGPT, params: dict) -> None:
    """Copy our parameter dict (``model.init_params``' layout) into ``torch_model`` in place: Flax
    kernels [in, out] become Linear weights [out, in]; LayerNorm scale -> weight, embedding -> weight.
    Every parameter on both sides must be matched, with its shape."""
    flat, used = _flatten(params), set()
    for name, p in torch_model.named_parameters():
        *parts, leaf = name.split(".")  # h.{i}.attn.c_attn.weight -> h_{i}/attn/c_attn/kernel
        module = torch_model.get_submodule(".".join(parts))
        if parts[0] == "h":
            parts[:2] = [f"h_{parts[1]}"]
        path = "/".join(parts + [leaf if leaf == "bias" else _WEIGHT_NAMES[type(module)]])
        if path not in flat:
            raise KeyError(f"params have no {path!r} (for torch {name})")
        value = torch.from_numpy(np.array(flat[path], dtype=np.float32))
        value = value.T if isinstance(module, nn.Linear) and leaf == "weight" else value
        if value.shape != p.shape:
            raise ValueError(f"{path}: shape {tuple(value.shape)}, torch wants {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(value)
        used.add(path)
    if used != set(flat):
        raise KeyError(f"params not loaded: {sorted(set(flat) - used)}")


def make_step(cfg: model_lib.ModelConfig, batch: int, device="cuda", compile: bool = True, bf16: bool = True):
    """``(step, model)``: ``step()`` trains ``model`` (the eager module; its compiled wrapper shares the
    parameters) for one step on one fixed random batch of ``batch x cfg.seq_len`` tokens (next-token
    cross entropy; the data does not change the cost) and returns the loss tensor without a host sync."""
    device = torch.device(device)
    model = TorchGPT(cfg).to(device)
    forward = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen).to(device)
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]  # as ours: dense kernels only
    rest = [p for p in model.parameters() if all(p is not d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return step, model


def time_steps(step, n: int, device, warmup: int = 2) -> float:
    """Median milliseconds per ``step()`` over ``n`` calls after ``warmup`` calls, each synchronized."""
    cuda, times = torch.device(device).type == "cuda", []
    for _ in range(warmup + n):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=SIZES)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode, no torch.compile")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32, no bfloat16 autocast")
    parser.add_argument("--json", action="store_true", help='print {"ms_per_step", "tokens_per_s", ...} only')
    args = parser.parse_args(argv)
    cfg = setups.validate_pretrain(pretrain_config.get_config(args.preset)).model
    step, model = make_step(cfg, args.batch, args.device, args.compile, args.bf16)
    compile_s = time_steps(step, 1, args.device, warmup=0) / 1e3  # the first step compiles (torch.compile)
    ms = time_steps(step, args.steps, args.device)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    r = {"ms_per_step": ms, "tokens_per_s": args.batch * cfg.seq_len / ms * 1e3, "compile_s": compile_s,
         "device": f"{device.type}:{name}"}
    if args.json:
        print(json.dumps(r))
        return
    n_params = sum(p.numel() for p in model.parameters())
    rows = [("device", r["device"]), ("preset / params", f"{args.preset} / {n_params:,}"),
            ("batch x T", f"{args.batch} x {cfg.seq_len}"),
            ("mode", ("compiled" if args.compile else "eager") + (", bf16 autocast" if args.bf16 else ", float32")),
            ("compile + first step (s)", f"{compile_s:.1f}"), ("step (ms, median)", f"{ms:.1f}"),
            ("tokens/s (batch x T)", f"{r['tokens_per_s']:,.0f}")]
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
