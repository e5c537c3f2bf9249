"""Analyses of SPEC §10: weights in, arrays out; no plotting here (plots live in plots.py).

weights      §10.1-10.3  ΔW summary, null-space scores with random baselines, row-space statistics
activations  §10.4       activation windows after EOT, cluster means, τ
lipschitz    §10.5       ‖∂ max_v z_v / ∂E‖_F at EOT
realmodels   §10.7       §10.1-10.2 for two safetensors checkpoints, streamed (optional extra)

Submodules are imported explicitly (``from safety_mech.analysis import weights``): importing the package
loads nothing heavy, and ``realmodels`` only needs safetensors when it runs.
"""
