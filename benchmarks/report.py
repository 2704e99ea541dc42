"""The benchmark report as people read it: a table on stdout and a PNG chart beside the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .stages import GATE_SCORES


def table(report: dict[str, Any]) -> str:
    if "stages" not in report:  # --peaks-only
        return "\n".join(peak_lines(report["peaks"]))
    stages = report["stages"]
    others = [side for side in report["sides"] if side != "runtime"]
    subject = f"{report['settings'].get('backend_under_test', 'runtime')} {report['compute_precision']['runtime']}" \
        if "compute_precision" in report else "runtime"
    if report.get("directory_precision", {}).get("runtime") == "int8" and "int8" not in subject:
        subject += " int8"  # OpenVINO: int8 kernels where the graph is quantized, the hint's precision elsewhere
    head = f"{'stage':<14} {subject + ' ms (median [min..max])':>34}"
    for other in others:
        head += f" {other + ' ms':>12} {'ratio':>7}"
    if report.get("flops"):
        head += f" {'GFLOP':>9} {'GFLOP/s':>9}"
    lines = [head]
    for stage, e in stages.items():
        rt = e["runtime"]
        row = f"{stage:<14} {rt['median'] * 1e3:>12.2f} [{rt['min'] * 1e3:>8.2f}..{rt['max'] * 1e3:>9.2f}]"
        for other in others:
            row += f" {e[other]['median'] * 1e3:>12.2f} {e[f'ratio_runtime_over_{other}']['median']:>7.3f}"
        if report.get("flops") and stage in report["flops"]:
            gflop = report["flops"][stage] / 1e9
            row += f" {gflop:>9.2f} {gflop / rt['median']:>9.1f}"
        lines.append(row)
    if "e2e" in stages:
        o = stages["e2e"]["overhead"]
        lines.append(f"runtime overhead (e2e wall - engine time): {o['median'] * 1e3:.2f} ms = "
                     f"{o['fraction_median']:.3%} of end to end")
    if report.get("matmul_peak"):
        p = report["matmul_peak"]
        lines.append(f"machine matmul peak (square matmul, n in {p['sizes']}): fp32 {p['fp32_gflops']:.1f} GFLOP/s "
                     f"(torch {p['torch_fp32_gflops']:.1f}, ONNX Runtime {p['ort_fp32_gflops']:.1f}), "
                     f"bf16 {p['bf16_gflops']:.1f} GFLOP/s (torch {p['torch_bf16_gflops']:.1f}"
                     + (f", OpenVINO {p['openvino_bf16_gflops']:.1f})" if "openvino_bf16_gflops" in p else ")"))
    if "peaks" in report:
        lines += peak_lines(report["peaks"])
    if report.get("fraction_of_peak"):
        lines.append("fraction of peak (stage FLOPs / median time, over the peak of the side's backend and "
                     "precision, same run):")
    for stage, sides in report.get("fraction_of_peak", {}).items():
        lines.append(f"  {stage:<14} " + "; ".join(f"{side} {f['gflops']:.1f} GFLOP/s = {f['fraction']:.0%} of "
                                                   f"{f['peak']}" for side, f in sides.items()))
    for side, profile in report.get("openvino_profile", {}).items():
        shares = ", ".join(f"{name} {t['share']:.0%}" for name, t in list(profile["by_type"].items())[:8])
        lines.append(f"OpenVINO profile of one UNet step ({side}, {profile['precision']}, latent "
                     f"{'x'.join(map(str, profile['latent']))}, {profile['wall_ms_median']:.1f} ms): {shares}")
    mem = report.get("memory", {})
    if "peak_rss_mib" in mem:
        lines.append(f"runtime peak RSS (torch-free process, one e2e): {mem['peak_rss_mib']:.0f} MiB"
                     + (f" = {mem['rss_over_fp32_weights']:.2f} x fp32 weights" if "rss_over_fp32_weights" in mem
                        else ""))
    for side, base in report.get("memory_sides", {}).items():
        if "peak_rss_mib" in base:
            lines.append(f"peak RSS of the same restore on {side}: {base['peak_rss_mib']:.0f} MiB")
    lines.append("engine files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["engine_bytes"].items()))
    if "openvino_load" in report:
        c = report["openvino_load"]
        lines.append(f"OpenVINO directory load {c['load_s']:.1f} s, first UNet call (prepares the weights and "
                     f"compiles for the shape) {c['first_call_s']:.1f} s")
    if "accuracy" in report:
        a = report["accuracy"]
        if a["subject"] == "int8" and report["settings"]["precision"] != "int8":
            lines.append(f"note: the --int8-engines directory is a {report['settings']['precision']} directory "
                         "(its manifest's precision), not an int8 one")
        lines.append(f"{a['subject']} vs {a['baseline']} (same inputs; ratio above = {a['subject']} / "
                     f"{a['baseline']} time):")
        for name, g in a["graphs"].items():
            psnr = "exact" if g["psnr_db"] in (None, float("inf")) else f"{g['psnr_db']:.1f} dB"
            lines.append(f"  {name:<14} max abs {g['max_abs']:.3g}, PSNR {psnr}"
                         + ("" if g.get("finite", True) else " — NOT FINITE (fp16 overflow)"))
        psnr = a["final_image_psnr_db"]
        lines.append(f"  final image    PSNR {'exact' if psnr is None else f'{psnr:.1f} dB'} (uint8, "
                     f"max {a['final_image_max_abs_u8']} levels, {a.get('final_image_steps', '?')} steps)")
        lines.append(f"  MUSIQ          max score shift {a['musiq_max_abs_shift']:.3g} (graph identical: "
                     f"{a['musiq_graph_identical']}); of {', '.join(map(str, GATE_SCORES))} these change class: "
                     f"{a['gate_flips_near_40_70'] or 'none'}")
    return "\n".join(lines)


def peak_lines(peaks: dict[str, Any]) -> list[str]:
    """The machine's peaks: per backend/precision its best kernel, then every kernel's median."""
    lines = [f"machine peaks (same run; median GFLOP/s of {peaks['runs']} runs, {peaks['chain']} kernels in a row, "
             "best kernel first):"]
    for key, by_kernel in peaks["measured"].items():
        rest = ", ".join(f"{name} {m['gflops_median']:.1f}" for name, m in by_kernel.items())
        lines.append(f"  {key:<14} {peaks['peak_gflops'][key]:>8.1f} ({peaks['peak_kernel'][key]}); {rest}")
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if s not in ("loop", "e2e")]
    sides = report["sides"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        xs = [j + i * width for j in range(len(stages))]
        axes[0].bar(xs, [report["stages"][s][side]["median"] * 1e3 for s in stages], width, label=side)
    axes[0].set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(stages))], stages)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("per stage")
    axes[0].legend()
    if "e2e" in report["stages"]:
        for i, side in enumerate(sides):
            axes[1].bar(i, report["stages"]["e2e"][side]["median"], label=side)
        axes[1].set_xticks(range(len(sides)), sides)
        axes[1].set_ylabel("s (median)")
        axes[1].set_title(f"end to end, {report['settings']['steps']} steps")
    settings = report["settings"]
    fig.suptitle(f"{settings['name']} — {settings['size']} (H×W), {report['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
