"""Model bundles shipped with medai (installed as package data under ``medai.models``)
and the scripts that build them from their sources (need the ``[models]`` extra)."""
