"""Bring trained models from other frameworks into medai as signed ONNX bundles.

``nnunet``: a trained nnU-Net v2 results folder (and so a TotalSegmentator task folder).
``monai_bundle``: a MONAI bundle (``configs/inference.json``, ``models/model.pt``).

Importing needs torch (the ``[models]`` extra) and, for nnU-Net, ``nnunetv2``; the
bundles made run on the torch-free runtime like every shipped model. Each import
measures parity against the source framework's own inference on an image the user
gives and writes the figures on the card.
"""
