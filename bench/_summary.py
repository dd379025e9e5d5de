"""Human-readable summary of a bench_analyze result: each ratio with the raw numbers it comes from."""

from __future__ import annotations

from typing import Any

# PERFORMANCE.md's goals; on a GPU the efficiency goal is 0.85 and the naive loop's 30x
GOALS = {"pipeline_efficiency": 0.90, "reading_ratio": 3.0, "naive_ratio": 5.0, "rss_ratio_4x": 1.2}
GPU_GOALS = {**GOALS, "pipeline_efficiency": 0.85, "naive_ratio": 30.0}


def goals_for(backend: dict[str, Any]) -> dict[str, float]:
    """The goals that apply to the measured backend (GPU ones when the model ran on a GPU)."""
    return GPU_GOALS if str(backend.get("device", "cpu")).startswith("cuda") else GOALS


def _rate(d: dict[str, Any]) -> str:
    """'12.3 tiles/s, 0.0456 CPU-s/tile (n tiles)'."""
    return f"{d['per_s']:.2f} tiles/s, {d['cpu_s_per_item']:.4f} CPU-s/tile ({d['n']} tiles)"


def _verdict(name: str, value: float, goals: dict[str, float]) -> str:
    goal = goals[name]
    ok = value <= goal if name == "rss_ratio_4x" else value >= goal
    return f"{'meets' if ok else 'MISSES'} goal {'<=' if name == 'rss_ratio_4x' else '>='} {goal}"


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The ratios first, each with its raw numbers, then the machine."""
    r, m, goals = res["ratios"], res["machine"], res["goals"]
    warm, alone, rd = res["analysis"]["warm"], res["model_alone"], res["reading"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['mem_total_gib']} GiB RAM, "
        f"load average {m['loadavg_1_5_15'][0]:.2f} at start, {m['loadavg_at_end'][0]:.2f} at end; "
        f"code at {m.get('git', 'unknown')}",
        f"threads: predictor intra-op {res['threads']['predictor_intra_op']}, pipeline readers "
        f"{res['analysis']['reader_threads']}, OpenSlide {rd['openslide_threads']}, torch {res['naive']['torch_threads']}",
        f"model: {res['model']['note']}"
        + (f"; int8: {res['model']['int8']['path']} ({res['model']['int8']['note']})" if "int8" in res["model"] else ""),
        f"backend: {res['backend']}",
        f"slide: {res['slides']['small']['path']}, {res['slides']['small']['tissue_tiles']} tissue tiles "
        f"(read {res['slides']['small']['lvl_tile_size']} px at level {res['slides']['small']['level']}, "
        f"input {res['slides']['small']['input_size']} px)",
        "",
        f"pipeline efficiency {r['pipeline_efficiency']:.3f} ({_verdict('pipeline_efficiency', r['pipeline_efficiency'], goals)})"
        f"; in CPU-s/tile {r['pipeline_efficiency_cpu']:.3f}; share of the analysis wall time inside predict "
        f"{r.get('in_model_share', float('nan')):.3f}; tile phase alone (read + infer) "
        f"{r.get('tile_phase_efficiency', float('nan')):.3f}",
        f"  analyze_slide (warm), mean of {len(res['analysis']['runs'])}: {_rate(warm)}; per-run efficiency "
        f"against the model runs around it: {res['analysis']['pair_efficiencies']}",
        *[
            f"    analysis {k}: {_rate(a)}; phases {a.get('phases_s', {})}"
            for k, a in enumerate(res["analysis"]["runs"])
        ],
        f"  model alone, batch {alone['batch']}: mean {alone['mean_per_s']:.2f} tiles/s, "
        f"{alone['mean_cpu_s_per_tile']:.4f} CPU-s/tile",
        *[f"    model run {k}: {_rate(m)}" for k, m in enumerate(alone["runs"])],
        f"reading ratio {r['reading_ratio']:.2f} ({_verdict('reading_ratio', r['reading_ratio'], goals)})"
        f"; in CPU-s/tile {r['reading_ratio_cpu']:.2f}",
        f"  pipeline read path, no-op model: {_rate(rd['pipeline_noop_model'])}",
        f"  OpenSlide read_region + RGB + resize: {_rate(rd['openslide_read_region'])}",
        f"naive ratio {r['naive_ratio']:.2f}x ({_verdict('naive_ratio', r['naive_ratio'], goals)}); in CPU-s/tile "
        f"{r['naive_ratio_cpu']:.2f}x",
        f"  naive loop (OpenSlide + torch eager, batch 1): {_rate(res['naive'])}",
    ]
    if "naive_1_thread" in res:
        lines.append(
            f"  naive loop with 1 torch thread: {_rate(res['naive_1_thread'])}; CPU-s/tile ratio "
            f"{r['naive_1_thread_ratio_cpu']:.2f}x"
        )
    if "rss" in res:
        rs = res["rss"]
        small, large = rs["small"], rs["large_4x_tissue"]
        lines += [
            f"peak RSS ratio {rs['ratio']:.3f} ({_verdict('rss_ratio_4x', rs['ratio'], goals)})",
            f"  4x tissue: {large['peak_rss_mib']:.0f} MiB over {large['tissue_tiles']} tiles; "
            f"slide: {small['peak_rss_mib']:.0f} MiB over {small['tissue_tiles']} tiles "
            f"(after imports: {small['peak_rss_after_imports_mib']:.0f} MiB)",
            f"  cold (fresh process): {small['cold_tiles_per_s']:.2f} and {large['cold_tiles_per_s']:.2f} tiles/s, "
            f"{small['cpu_s_per_tile']:.4f} and {large['cpu_s_per_tile']:.4f} CPU-s/tile; "
            f"session load {small['session_load']['wall_s']:.2f} s",
        ]
    return lines


def print_summary(res: dict[str, Any]) -> None:
    """Print the summary to stdout."""
    print("\n".join(summary_lines(res)))
