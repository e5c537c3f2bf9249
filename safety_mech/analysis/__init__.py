"""Analyses of SPEC §10: weights in, arrays out; no plotting here (plots live in plots.py).

weights       §10.1-10.3  ΔW summary, null-space scores with random baselines, row-space statistics
activations   §10.4       activation windows after EOT, cluster means, τ
lipschitz     §10.5       ‖∂ max_v z_v / ∂E‖_F at EOT
realmodels    §10.7       §10.1-10.2 for two safetensors checkpoints, streamed (optional extra)
interventions §10.6       θ(α) = θ_IT + α(θ_ST − θ_IT) (all weights or MLP only), α sweeps of a caller's
                          metrics and of τ; ΔW arithmetic (``finetune_losses.delta_arithmetic``)
plots         §10.2-10.6  matplotlib figures (Agg) shaped like the paper's, one PNG per call, one palette
figures       §10         the study's figures from analysis.json and the evaluation metrics (via plots)
probes        §7, §9      logistic probes of the residual stream (unsafe vs safe, text branch); Null /
                          Instruct split by branch, always-unsafe operators, PCFG, posterior
bayes         §7, §9      the Bayes reading of an input: window counts per (PCFG, branch), exact
                          operator likelihoods, P(unsafe | text, ops), the refusal ceiling

``launch/analyze.py`` runs the §10 ones on fine-tuned runs and writes ``analysis.json``, the figures
and the SPEC §11 findings; ``benchmarks/refusal_breakdown.py`` and ``refusal_ceiling.py`` are the CLIs
of ``probes`` and ``bayes``.

Submodules are imported explicitly (``from safety_mech.analysis import weights``): importing the package
loads nothing heavy, and ``realmodels`` only needs safetensors when it runs.
"""
