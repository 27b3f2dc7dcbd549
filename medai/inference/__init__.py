"""On-device inference: signed model bundles and registry, backends, planner, pipelines.

Where things are:

* ``card.py`` — the model card schema (``card.toml``); ``bundle.py`` — verification of a
  bundle (signature, pin/trust, file digests); ``trust.py`` — keys and trust store;
  ``registry.py`` — shipped/installed bundles, install/rollback/import; ``pinned.py`` —
  generated card digests of shipped bundles.
* ``pipeline.py`` — the interface a model's pipeline implements (start here to add a model);
  ``pipelines/<name>.py`` — the pipelines; ``steps.py`` — deterministic recorded
  pre/post-processing; ``sliding.py`` — tiled inference with blending.
* ``backends.py`` — execution providers, sessions, parity check; ``planner.py`` — memory
  prediction and budget; ``select.py`` — which series a model accepts.
* ``run.py`` — ``run_model``/``run_study``: the one entry point that writes SEG, mask and
  result.json.
"""
