"""``medai models``: list, show, verify, install, roll back and import signed model bundles
(plain ONNX, nnU-Net v2 results folders, MONAI bundles)."""

from __future__ import annotations

import base64
import contextlib
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_FAILURE, emit

models_app = typer.Typer(help="Signed model bundles: list, show, verify, install, rollback, import.",
                         no_args_is_help=True)


def _bundle_row(bundle: Any, origin: str, error: str | None = None, folder_id: str | None = None,
                path: Path | None = None) -> dict[str, Any]:
    if bundle is None:
        return {"id": folder_id, "version": None, "origin": origin, "trust": None, "ok": False,
                "path": str(path), "error": error}
    return {"id": bundle.id, "version": bundle.version, "origin": origin, "trust": bundle.trust, "ok": True,
            "task": bundle.card.task, "name": bundle.card.name, "path": str(bundle.path),
            "card_sha256": bundle.card_sha256}


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        status = r["trust"] if r["ok"] else f"REFUSED: {r['error']}"
        sys.stdout.write(f"{r['id']:<22} {r['version'] or '-':<16} {r['origin']:<10} {status}\n")


@models_app.command("list")
def list_command(ctx: typer.Context,
                 allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Development only (audited).")) -> None:
    """Every bundle found (installed and shipped) and whether it verifies."""
    from medai.inference import registry

    rows = [_bundle_row(e.bundle, e.origin, e.error, e.id, e.path)
            for e in registry.scan(allow_unsigned=allow_unsigned or None)]
    emit(ctx, rows, _print_rows)


@models_app.command("show")
def show_command(ctx: typer.Context, model_id: str = typer.Argument(..., metavar="ID"),
                 allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Development only (audited).")) -> None:
    """The model card of ID (verified first): intended use, data, licence, metrics."""
    import json

    from medai.inference import registry

    bundle = registry.get_bundle(model_id, allow_unsigned=allow_unsigned or None)
    data = {"path": str(bundle.path), "origin": bundle.origin, "trust": bundle.trust,
            "card_sha256": bundle.card_sha256, "card": bundle.card.raw}

    def human(d: dict[str, Any]) -> None:
        card = d["card"]
        out = sys.stdout
        out.write(f"{card['name']}  ({card['id']} {card['version']}, {d['trust']})\n{card.get('summary', '')}\n\n")
        out.write(f"Intended use: {card.get('intended_use', {}).get('text', '')}\n")
        out.write(f"Out of scope: {card.get('intended_use', {}).get('out_of_scope', '')}\n")
        out.write(f"Training data: {card.get('training_data', {}).get('text', '')}\n")
        out.write(f"Licence: {card.get('license', {}).get('spdx', '')} - {card.get('license', {}).get('attribution', '')}\n")
        out.write("Metrics measured by medai:\n")
        for m in card.get("metrics", []):
            extra = {k: v for k, v in m.items() if k not in {"name", "value", "note", "data"}}
            out.write(f"  {m['name']}: {m['value']}  {json.dumps(extra)}\n    data: {m.get('data', '')}\n"
                      f"    {m.get('note', '')}\n")
        out.write(f"Files: {', '.join(card.get('files', {}))}\n")

    emit(ctx, data, human)


@models_app.command("verify")
def verify_command(ctx: typer.Context,
                   target: Optional[str] = typer.Argument(None, help="Model id or bundle folder (default: all).")) -> None:
    """Verify signatures and file digests; exit 1 when any bundle is refused."""
    from medai.errors import ModelIntegrityError
    from medai.inference import registry
    from medai.inference.bundle import load_bundle

    rows: list[dict[str, Any]] = []
    if target is None:
        rows = [_bundle_row(e.bundle, e.origin, e.error, e.id, e.path) for e in registry.scan()]
    else:
        path = Path(target)
        try:
            if path.is_dir():
                origin = "shipped" if path.resolve().parent == registry.shipped_dir() else "path"
                bundle = load_bundle(path, origin=origin, pinned=registry.pins())
            else:
                bundle = registry.get_bundle(target)
            rows = [_bundle_row(bundle, bundle.origin)]
        except ModelIntegrityError as exc:
            rows = [_bundle_row(None, "path" if path.is_dir() else "?", str(exc), target, path)]
    emit(ctx, rows, _print_rows)
    if not rows or not all(r["ok"] for r in rows):
        raise typer.Exit(EXIT_FAILURE)


@models_app.command("install")
def install_command(ctx: typer.Context,
                    source: Path = typer.Argument(..., help="Bundle folder, .zip or .tar(.gz)."),
                    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Development only (audited).")) -> None:
    """Install a bundle signed by a trusted key; the previous version is kept for rollback."""
    from medai.inference import registry

    bundle = registry.install(source, allow_unsigned=allow_unsigned or None)
    emit(ctx, _bundle_row(bundle, "installed"), lambda r: sys.stdout.write(
        f"installed {r['id']} {r['version']} ({r['trust']})\n"))


@models_app.command("rollback")
def rollback_command(ctx: typer.Context, model_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Make the previously installed version of ID current again."""
    from medai.inference import registry

    bundle = registry.rollback(model_id)
    emit(ctx, _bundle_row(bundle, "installed"), lambda r: sys.stdout.write(
        f"{r['id']} is now {r['version']}\n"))


@models_app.command("import")
def import_command(ctx: typer.Context,
                   onnx_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Your model.onnx."),
                   card: Path = typer.Option(..., "--card", exists=True, dir_okay=False,
                                             help="card.toml for it (without [files]; see docs/models.md)."),
                   extra: list[Path] = typer.Option([], "--file", exists=True, dir_okay=False,
                                                    help="Extra file to include (licence, ...).")) -> None:
    """Bring your own model: bundle it with your card, sign it with this machine's key, install it."""
    from medai.inference import registry

    bundle = registry.import_onnx(onnx_file, card, extra_files=tuple(extra))
    emit(ctx, _bundle_row(bundle, "installed"), lambda r: sys.stdout.write(
        f"imported {r['id']} {r['version']} ({r['trust']})\n"))


def _imported_row(bundle: Any, parity: Any) -> dict[str, Any]:
    row = _bundle_row(bundle, bundle.origin)
    row["parity"] = {"min_dice": round(parity.min_dice, 6), "dice": {str(k): round(v, 6) for k, v in parity.dice.items()},
                     "max_prob_diff": parity.max_prob_diff}
    return row


def _print_imported(r: dict[str, Any]) -> None:
    sys.stdout.write(f"imported {r['id']} {r['version']} ({r['trust']}) at {r['path']}\n"
                     f"parity with the source framework: lowest per-label Dice {r['parity']['min_dice']}, "
                     f"max |probability diff| {r['parity']['max_prob_diff']:.3g}\n")


@models_app.command("import-nnunet")
def import_nnunet_command(
        ctx: typer.Context,
        folder: Path = typer.Argument(..., exists=True, file_okay=False,
                                      help="nnU-Net v2 results folder <Trainer>__<Plans>__<configuration> "
                                           "(dataset.json, plans.json, fold_*/checkpoint_final.pth)."),
        model_id: str = typer.Option(..., "--id", help="Id for the bundle ([a-z0-9-])."),
        license: str = typer.Option(..., "--license", help="Licence of the weights, as you hold them (SPDX id)."),
        parity_image: Path = typer.Option(..., "--parity-image", exists=True, dir_okay=False,
                                          help="A representative image (NIfTI/NRRD/MHA) on which the import checks "
                                               "parity with nnUNetPredictor."),
        folds: list[str] = typer.Option([], "--fold", help="Fold(s) to import (default: every fold found)."),
        checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint"),
        mirroring: bool = typer.Option(True, "--mirroring/--no-mirroring", help="Test-time mirroring as trained."),
        tile_step: float = typer.Option(0.5, "--tile-step", help="Sliding-window step (fraction of the patch)."),
        reorient: Optional[str] = typer.Option(None, "--reorient",
                                               help="RAS: bring each volume to the closest canonical RAS layout "
                                                    "before nnU-Net and the labels back after, as TotalSegmentator "
                                                    "does (use it for TotalSegmentator tasks)."),
        version: str = typer.Option("1.0.0", "--version"),
        name: Optional[str] = typer.Option(None, "--name"),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the signed bundle here instead of installing it."),
) -> None:
    """Import a trained nnU-Net v2 model (e.g. a TotalSegmentator task) as a signed ONNX bundle (needs the models extra and nnunetv2)."""
    from medai.inference.importers.nnunet import import_nnunet

    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints progress; stdout stays the result
        bundle, parity = import_nnunet(folder, model_id=model_id, license=license, parity_image=parity_image,
                                       folds=folds or None, checkpoint=checkpoint, use_mirroring=mirroring,
                                       tile_step_size=tile_step, reorient=reorient, version=version, name=name,
                                       install=out is None, out_dir=out)
    emit(ctx, _imported_row(bundle, parity), _print_imported)


@models_app.command("import-monai-bundle")
def import_monai_command(
        ctx: typer.Context,
        folder: Path = typer.Argument(..., exists=True, file_okay=False,
                                      help="MONAI bundle folder (configs/inference.json, configs/metadata.json, "
                                           "models/model.pt or model.ts)."),
        model_id: str = typer.Option(..., "--id", help="Id for the bundle ([a-z0-9-])."),
        license: str = typer.Option(..., "--license", help="Licence of the weights, as you hold them (SPDX id)."),
        parity_image: Path = typer.Option(..., "--parity-image", exists=True, dir_okay=False,
                                          help="A representative image on which the import checks parity with "
                                               "MONAI's own inference."),
        version: str = typer.Option("1.0.0", "--version"),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the signed bundle here instead of installing it."),
) -> None:
    """Import a MONAI bundle as a signed ONNX bundle; transforms without a medai step are refused by name."""
    from medai.inference.importers.monai_bundle import import_monai_bundle

    with contextlib.redirect_stdout(sys.stderr):  # MONAI/torch may print; stdout stays the result
        bundle, parity = import_monai_bundle(folder, model_id=model_id, license=license, parity_image=parity_image,
                                             version=version, install=out is None, out_dir=out)
    emit(ctx, _imported_row(bundle, parity), _print_imported)


@models_app.command("trust")
def trust_command(ctx: typer.Context,
                  key_file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                                  help="Publisher's Ed25519 public key: PEM, or base64 raw 32 bytes."),
                  name: str = typer.Option("", "--name", help="Label for this key.")) -> None:
    """Trust bundles signed by a publisher's (e.g. your organisation's) key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from medai.errors import ModelIntegrityError
    from medai.compliance import audit as _audit
    from medai.inference import trust

    data = key_file.read_bytes()
    try:
        if b"BEGIN PUBLIC KEY" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = base64.b64decode(data.strip(), validate=True)
    except ValueError as exc:
        raise ModelIntegrityError(f"{key_file}: not an Ed25519 public key ({exc})") from None
    kid = trust.add_trusted_key(raw, name=name or key_file.name)
    _audit.record("security_alert", detail={"what": "model signing key trusted", "key_id": kid, "name": name},
                  outcome="success")
    emit(ctx, {"key_id": kid}, lambda d: sys.stdout.write(f"trusted key {d['key_id']}\n"))


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
