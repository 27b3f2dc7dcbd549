"""On-device inference: signed model bundles and registry, backends, planner, pipelines."""
