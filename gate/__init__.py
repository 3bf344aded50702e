"""The eval gate: decide whether a candidate adapter may be released, and release it.

* :mod:`gate.policy`: the YAML policy, validated by hand, and its digest;
  :mod:`gate.policy_fields`: the field checkers; :mod:`gate.safe_yaml`: bounded YAML.
* :mod:`gate.check_kinds`: which check kinds exist and the parameters each declares.
* :mod:`gate.checks`: one module per check kind (structural, merge_equivalence,
  perplexity, retention, generation, drift), each declaring its own ``PARAMS``.
* :mod:`gate.context`: the candidate (registry version or PEFT directory), its lineage
  parents and the release baseline; :mod:`gate.provenance`: the lineage walk;
  :mod:`gate.source_check`: drift's source checked against its record.
* :mod:`gate.evaluate`: model loading with transformers and the scoring primitives
  (perplexity, answer log-likelihood, greedy generation); :mod:`gate.lora_deltas`:
  an adapter's true deltas without PEFT.
* :mod:`gate.runner`: :func:`gate.runner.run_gate` runs a policy and records the result.
* :mod:`gate.results`: the frozen result values; :mod:`gate.report`: JSON, JUnit XML,
  Markdown and rich renderings.
* :mod:`gate.promote`: promotion rules for protected aliases and alias history, on
  :mod:`gate.store_config` (pinned policy, trusted keys), :mod:`gate.records` (what a
  passing record is), :mod:`gate.custody` and :mod:`gate.default_policy`.

Nothing here imports torch at module level; the CLI imports these modules lazily.
"""
