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
  prediction and budget (which series a model reads is :mod:`medai.routing`).
* ``run.py`` — ``run_on_volume`` (and ``run_model`` for a file or folder): one model run
  that writes SEG, mask and result.json; the surfaces call it through :mod:`medai.results`.
"""
