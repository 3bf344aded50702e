"""The eval gate: decide whether a candidate adapter may be released, and release it.

* :mod:`gate.policy`: the YAML policy, validated by hand, and its digest.
* :mod:`gate.context`: the candidate (registry version or PEFT directory), its lineage
  parents and the release baseline.
* :mod:`gate.evaluate`: model loading on CPU with transformers and the scoring
  primitives (perplexity, answer log-likelihood, greedy generation).
* :mod:`gate.checks`: one module per check kind (structural, merge_equivalence,
  perplexity, retention, generation).
* :mod:`gate.runner`: :func:`gate.runner.run_gate` runs a policy and records the result.
* :mod:`gate.results`: the frozen result values; :mod:`gate.report`: JSON, JUnit XML,
  Markdown and rich renderings.
* :mod:`gate.promote`: promotion rules for protected aliases and alias history.

Nothing here imports torch at module level; the CLI imports these modules lazily.
"""
