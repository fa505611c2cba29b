"""The side-by-side table (markdown) and the JSON document of a `jip2p-bench` run.

Input: the ``BENCH`` records of the side processes (one per case and variant, or a record with
``error``: a process that failed, or, with ``not_run``, one the run's time budget left out). PyTorch's
eager train records carry its FLOP count at their resolution. Derived here, identically for both
sides: items/s, achieved TFLOP/s (UNet training FLOPs per image × images/s), MFU against the
device's dense bf16 peak, and the JAX speed-up over each PyTorch variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

SINGLE = "†"


def write_text(path: str, text: str) -> None:
  """Writes ``path`` whole or not at all (a temporary sibling, then a rename; its folder made);
  a failure (a full disk) is an `OutputError` naming it."""
  from jip2p import files
  with files.replacing(path) as tmp:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def _peak(device: str) -> float | None:
  from jip2p.train.metrics import peak_flops
  return peak_flops(device or "")


def torch_flops(records: Sequence[dict]) -> dict[int, float]:
  """{resolution: the UNet's training FLOPs per image} as PyTorch's FlopCounterMode counted them."""
  return {int(r["case"].split("_")[2]): r["torch_unet_flops_per_image"] for r in records
          if r.get("torch_unet_flops_per_image")}


def derive(records: Sequence[dict]) -> list[dict]:
  """Each record with ``items_per_s``, ``flops_per_image`` (and its ``flops_source``),
  ``tflops``, ``mfu`` and ``speedup`` (JAX over this record, on PyTorch rows) filled in."""
  counted = torch_flops(records)
  xla_flops = {r["case"]: r["xla_unet_flops_per_image"] for r in records
               if r.get("xla_unet_flops_per_image")}
  jax_rows = {r["case"]: r for r in records if r["side"] == "jax" and "time_s" in r}
  out = []
  for r in records:
    r = dict(r)
    if "time_s" in r:
      r["items_per_s"] = r["items"] / r["time_s"]
      if r["kind"] == "train":
        res = int(r["case"].split("_")[2])
        if res in counted:
          r["flops_per_image"], r["flops_source"] = counted[res], "torch FlopCounterMode"
        elif r["case"] in xla_flops:
          r["flops_per_image"], r["flops_source"] = xla_flops[r["case"]], "XLA cost analysis"
        if r.get("flops_per_image"):
          achieved = r["items_per_s"] * r["flops_per_image"]
          r["tflops"] = achieved / 1e12
          peak = _peak(r.get("device", ""))
          r["mfu"] = achieved / peak if peak else None
      jax_row = jax_rows.get(r["case"])
      if r["side"] == "torch" and jax_row is not None:
        r["speedup"] = jax_row["items"] / jax_row["time_s"] / r["items_per_s"]
    out.append(r)
  return out


def _f(value, fmt: str, single: bool = False) -> str:
  if value is None:
    return "—"
  return format(value, fmt) + (SINGLE if single else "")


def _side(r: dict) -> str:
  if r["side"] == "jax":
    settings = ", ".join(r[k] for k in ("dtype", "attention") if r.get(k))
    return f"JAX ({settings})" if settings else "JAX"
  return f"PyTorch {r.get('variant', '?')}"


def _peak_gib(r: dict) -> float | None:
  """The device's memory high-water mark, or on a CPU (no device memory) the process's resident
  one, GiB."""
  return r.get("peak_gib") if r.get("peak_gib") is not None else r.get("peak_rss_gib")


def _runs(r: dict) -> str:
  return f"{r['iters']}" if "iters" in r else "—"


def _problem(r: dict) -> str:
  return f"{'not run' if r.get('not_run') else 'failed'}: {r['error']}"


def _in_case_order(rows: Sequence[dict]) -> list[dict]:
  """Rows grouped by case, cases in the order they first appear (a run does torch.compile last)."""
  order = {}
  for r in rows:
    order.setdefault(r["case"], len(order))
  return sorted(rows, key=lambda r: order[r["case"]])


def table(records: Sequence[dict], second_start: Mapping[str, float] | None = None) -> str:
  """Markdown: one table per kind of case, one row per (case, side)."""
  second_start = second_start or {}
  lines = []
  train = _in_case_order([r for r in records if r["kind"] == "train"])
  if train:
    lines += ["### Train step", "",
              "| case | side | img/s | step (ms) | runs | peak GiB " + SINGLE + " | TFLOP/s | MFU "
              "| first step (s) " + SINGLE + " | 2nd start (s) " + SINGLE + " | JAX ÷ this |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in train:
      if "error" in r:
        lines.append(f"| {r['case']} | {_side(r)} | {_problem(r)} |||||||||")
        continue
      lines.append(
          f"| {r['case']} | {_side(r)} | {_f(r['items_per_s'], '.1f')} "
          f"| {_f(1000 * r['time_s'], '.1f')} | {_runs(r)} | {_f(_peak_gib(r), '.1f')} "
          f"| {_f(r.get('tflops'), '.4g')} | {_f(r.get('mfu'), '.1%')} "
          f"| {_f(r['first_s'], '.1f')} "
          f"| {_f(second_start.get(r['case']) if r['side'] == 'jax' else None, '.1f')} "
          f"| {_f(r.get('speedup'), '.2f')}{'×' if r.get('speedup') else ''} |")
    lines.append("")
  for kind, title, unit in (("edit", "Edit latency", "s per call"),
                            ("p2p", "P2P paired generation", "s per batch")):
    rows = [r for r in records if r["kind"] == kind]
    if not rows:
      continue
    per = "images/s" if kind == "edit" else "pairs/s"
    lines += [f"### {title}", "",
              f"| case | side | {unit} | {per} | runs | peak GiB {SINGLE} | first run (s) {SINGLE} "
              "| JAX ÷ this |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
      if "error" in r:
        lines.append(f"| {r['case']} | {_side(r)} | {_problem(r)} ||||||")
        continue
      lines.append(
          f"| {r['case']} | {_side(r)} | {_f(r['time_s'], '.3f')} | {_f(r['items_per_s'], '.2f')} "
          f"| {_runs(r)} | {_f(_peak_gib(r), '.1f')} | {_f(r['first_s'], '.1f')} "
          f"| {_f(r.get('speedup'), '.2f')}{'×' if r.get('speedup') else ''} |")
    lines.append("")
  return "\n".join(lines)


def environment(records: Sequence[dict]) -> dict:
  """Device and software versions per side, from the first record of each that reports them."""
  env = {}
  for r in records:
    if r.get("versions") and r["side"] not in env:
      env[r["side"]] = {"device": r.get("device"), "platform": r.get("platform"),
                        "versions": r["versions"]}
      if r["side"] == "jax":
        env["jax"].update(xla_flags=r.get("xla_flags"),
                          compilation_cache=r.get("compilation_cache"))
  return env


def markdown(records: Sequence[dict], *, title: str, command: str,
             second_start: Mapping[str, float] | None = None) -> str:
  env = environment(records)
  counted = torch_flops(records)
  lines = [f"## {title}", "", f"`{command}`", ""]
  for side, name in (("jax", "JAX"), ("torch", "PyTorch")):
    if side in env:
      e = env[side]
      versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items())
      lines.append(f"- {name} side: {e['device']} ({e['platform']}); {versions}")
  if "jax" in env:
    lines.append(f"- XLA_FLAGS: `{env['jax']['xla_flags'] or '(none)'}`")
  if counted:
    counts = ", ".join(f"{res} px: {f / 1e9:.1f} GFLOP" for res, f in sorted(counted.items()))
    lines.append(f"- UNet training FLOPs per image (torch FlopCounterMode): {counts}")
  lines += [
      f"- Times are medians of the `runs` timed runs after warm-up runs (both excluded from the "
      f"first-run figure), device-synchronised. {SINGLE}: a single run — the first step/run "
      "includes compilation; peak memory is the device's high-water mark (on a CPU: the process's "
      "resident high-water mark, getrusage maxrss, on both sides); 2nd start is the "
      "first step of a fresh process with the persistent compilation cache filled by the first.",
      "- JAX ÷ this: JAX's throughput over this row's (> 1: JAX is faster).", "",
      table(records, second_start)]
  return "\n".join(lines)
