"""Gate-constrained merge search (``adapters merge-search``).

Finds merge recipes (method, per-input weights, density, lambda, gamma/epsilon, sign
election, KnOTS alignment) that keep what each parent could do, under the same policy
that ``adapters gate`` enforces. Optuna drives the search (multi-objective, seeded,
constraints from the policy, optional shared RDB storage for several workers); each
trial is a merge of LoRA factors in memory, merged into the weights of one loaded
base model in place (:mod:`merging.lora.live`: bit-identical to the model the gate scores
for that merge, base weights restored exactly between trials), so the base is loaded
once per process, nothing is written per trial, and the objectives are the gate's own
numbers.

Modules: :mod:`gate.search.space` (the space and its bounds), :mod:`gate.search.scoring`
(objectives and constraints from the policy), :mod:`gate.search.study` (sampler,
storage, shared budget, workers), :mod:`gate.search.front` (Pareto front, pick rules,
plot), :mod:`gate.search.run` (:func:`run_search`: from refs to a pushed version).
torch, transformers, peft and optuna are imported inside functions only.
"""
