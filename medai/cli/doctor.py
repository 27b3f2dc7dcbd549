"""``medai doctor``: what this machine offers for inference, and whether it computes correctly.

Prints hardware (CPU, cores, memory, accelerators visible to ONNX Runtime), the
installed onnxruntime distribution(s) and providers, the thread/arena settings medai
will use, the resolved inference settings, every model bundle's verification, and
the parity check of each model graph on every local provider (on a CPU-only machine:
the optimised CPU graph against the unoptimised CPU reference). Exit 1 when a
bundle is refused or a parity check fails.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_FAILURE, emit


def _memory() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                info[key] = round(int(value.split()[0]) / 1024 / 1024, 2)
    except OSError:
        pass
    return {"total_gib": info.get("MemTotal"), "available_gib": info.get("MemAvailable")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def doctor_command(
    ctx: typer.Context,
    parity: bool = typer.Option(True, "--parity/--no-parity", help="Run the provider parity checks."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore cached parity results and check again."),
    tune: bool = typer.Option(False, "--tune", help="Time every provider x precision of every graph on real "
                              "validation inputs, check each against fp32 CPU, keep the fastest that passes."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --tune: only this model."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=1, help="With --tune: time bound per model; "
                                            "candidates left untried are recorded as not measured."),
) -> None:
    """Report hardware, providers, threads, memory, model bundles and the parity check."""
    from medai import config
    from medai.inference import backends, registry
    from medai.inference import tune as tuning

    report: dict[str, Any] = {
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "python": platform.python_version()},
        "cpu": {"model": _cpu_model(), "logical": os.cpu_count(),
                "usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "physical": backends.physical_cores()},
        "memory": _memory(),
        "runtime": backends.runtime_info(),
        "session_settings": {"intra_op_threads": backends.thread_count(), "inter_op_threads": 1,
                             "execution_mode": "sequential", "graph_optimization": "all",
                             "cpu_memory_arena": False, "memory_pattern": True,
                             "memory_arena_graphs": []},
        "settings": {k: config.get(k) for k in ("device", "precision", "threads", "max_memory", "allow_unsigned")},
        "chosen_providers": backends.choose_providers(),
        "models": [], "parity": [], "tuning": [],
    }
    ok = True
    for entry in registry.scan():
        report["models"].append({"id": entry.id, "origin": entry.origin, "ok": entry.bundle is not None,
                                 "trust": entry.bundle.trust if entry.bundle else None, "error": entry.error})
        ok &= entry.bundle is not None
        if entry.bundle is not None:  # cards may ask for the arena (fixed-size graphs run per slice)
            report["session_settings"]["memory_arena_graphs"] += [
                f"{entry.id}/{key}" for key, g in entry.bundle.card.graphs.items() if g.memory_arena]
    if parity:
        for bundle in registry.list_bundles():
            for key in bundle.card.graphs:
                for provider in backends.available_providers():
                    reference = "CPU (no graph optimisation)"
                    try:
                        res = backends.parity_check(bundle, key, provider, use_cache=not fresh)
                    except Exception as exc:  # one model's problem must not hide the others
                        res = backends.ParityResult(provider, False, float("nan"), 0.0, 0.0,
                                                    reason=f"parity check could not run: {exc}")
                    report["parity"].append({"model": bundle.id, "graph": key, "provider": res.provider,
                                             "reference": reference, "passed": res.passed,
                                             "max_abs_diff": res.max_abs_diff, "dice": res.dice,
                                             "seconds": round(res.seconds, 2), "cached": res.cached,
                                             "reason": res.reason})
                    ok &= res.passed
    if tune:
        for bundle in [registry.get_bundle(model)] if model else registry.list_bundles():
            try:
                tuning.tune_bundle(bundle, seconds=seconds)
            except Exception as exc:  # one model's problem must not hide the others
                report["tuning"].append({"model": bundle.id, "error": f"tuning could not run: {exc}"})
                ok = False
    report["cpu"]["features"] = tuning.cpu_features()
    report["tuning"] += [v.as_dict() for v in tuning.verdicts()]
    emit(ctx, report, _human)
    if not ok:
        raise typer.Exit(EXIT_FAILURE)


def _human(r: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"Platform   {r['platform']['system']} {r['platform']['release']} {r['platform']['machine']}, "
              f"Python {r['platform']['python']}\n")
    c = r["cpu"]
    out.write(f"CPU        {c['model']}: {c['physical']} physical cores, {c['usable']} usable of {c['logical']} logical\n")
    m = r["memory"]
    out.write(f"Memory     {m['total_gib']} GiB total, {m['available_gib']} GiB available\n")
    rt = r["runtime"]
    out.write(f"Runtime    onnxruntime {rt['onnxruntime']} ({', '.join(f'{k} {v}' for k, v in rt['distributions'].items())})\n")
    out.write(f"Providers  offered: {', '.join(rt['providers_offered'])}; usable: {', '.join(rt['providers_usable'])}; "
              f"never used: {', '.join(rt['remote_providers_refused'])}\n")
    if "warning" in rt:
        out.write(f"WARNING    {rt['warning']}\n")
    s = r["session_settings"]
    arena_on = f" (on for {', '.join(s['memory_arena_graphs'])}, as their cards ask)" if s["memory_arena_graphs"] else ""
    out.write(f"Sessions   {s['intra_op_threads']} intra-op threads, {s['inter_op_threads']} inter-op, "
              f"{s['execution_mode']}, graph optimisation {s['graph_optimization']}, "
              f"CPU arena {'on' if s['cpu_memory_arena'] else 'off'}{arena_on}\n")
    out.write(f"Settings   {r['settings']}; provider order for runs: {', '.join(r['chosen_providers'])}\n")
    for mdl in r["models"]:
        out.write(f"Model      {mdl['id']} ({mdl['origin']}): {mdl['trust'] if mdl['ok'] else 'REFUSED ' + str(mdl['error'])}\n")
    for p in r["parity"]:
        verdict = "pass" if p["passed"] else f"FAIL ({p['reason']})"
        when = "cached" if p["cached"] else f"{p['seconds']} s"
        out.write(f"Parity     {p['model']}/{p['graph']} on {p['provider']} vs {p['reference']}: {verdict}; "
                  f"max |diff| {p['max_abs_diff']:.2e}, Dice {p['dice']:.5f} ({when})\n")
    if not r["tuning"]:
        out.write("Tuning     none on this machine yet: `medai doctor --tune` measures provider x precision "
                  "(the first run of a model starts it in the background; runs use fp32 until then)\n")
    for v in r["tuning"]:
        if "error" in v:
            out.write(f"Tuning     {v['model']}: {v['error']}\n")
            continue
        chosen = v["chosen"]
        pick = f"{chosen['provider']} {chosen['precision']}" if chosen else "nothing passed: fp32 CPU"
        out.write(f"Tuning     {v['model']}/{v['graph']} on {v['validation']} (Dice >= {v['dice_min']:g} vs "
                  f"fp32 CPU): chosen {pick}\n")
        for c in v["candidates"]:
            ms = f"{c['ms']:8.1f} ms" if c["ms"] is not None else "     -     "
            dice = f"Dice {c['dice']:.5f}" if c["dice"] is not None else "Dice    -   "
            mark = "*" if chosen and (c["provider"], c["precision"]) == (chosen["provider"], chosen["precision"]) else " "
            verdict = "pass" if c["passed"] else f"FAIL {c['reason']}"
            peak = f"{c['peak_mb']:6.0f} MB" if c.get("peak_mb") is not None else "    -    "
            out.write(f"         {mark} {c['provider']:<22} {c['precision']:<5} {ms}  {dice}  {peak}  "
                      f"{c['runtime']}: {verdict}\n")

def register(app: typer.Typer) -> None:
    app.command("doctor", help="Hardware, providers, threads, memory, model bundles and parity check.")(doctor_command)
