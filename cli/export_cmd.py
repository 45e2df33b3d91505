"""``tpru export --model M --format onnx --out DIR [--int8]``: ONNX graphs + manifest for the onnx engine."""

from __future__ import annotations

import click

from tpru_agent.cli import render


@click.command("export")
@click.option("--model", "-m", required=True, help="Model name (tpru-3b...), Hub id or local folder.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Export format.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--int8", is_flag=True, help="Quantise the decoder to int8 (ONNX Runtime dynamic quantisation); the "
              "vision graph stays fp32 (int8 there drifted ~10% for ~1.2x).")
@click.option("--frame-size", default=None, metavar="WxH",
              help="Fixed frame size of the vision graph, multiples of 28 (default: the size a large square frame is "
                   "served at under the model's budget: 196x196 for TPRU's). Frames of another size are resized to "
                   "it.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--external-data/--no-external-data", default=None,
              help="Keep weights in <graph>.onnx.data files (default: only for graphs over 2 GB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model: str, fmt: str, out: str, int8: bool, frame_size: str | None, opset: int,
           external_data: bool | None, overwrite: bool, as_json: bool) -> None:
    """Export MODEL to ONNX for `TPRU(DIR, engine="onnx")` (vision / embedding / decoder graphs + tpru_onnx.json)."""
    from tpru_agent.onnx.export import export_onnx, read_manifest

    with render.err_console.status(f"exporting {model} to {fmt} ...") as status:
        folder = export_onnx(model, out, int8=int8, frame_size=frame_size, opset=opset, external_data=external_data,
                             overwrite=overwrite, on_step=lambda text: status.update(f"{text} ..."))
    manifest = read_manifest(folder)
    if as_json:
        render.emit_json(dict(manifest, folder=str(folder)))
        return
    frame = manifest["frame"]
    render.show_table(f"ONNX export of {model} ({manifest['precision']}, opset {manifest['opset']})",
                      ["graph", "file", "size"],
                      [[name, " + ".join([g["file"], *g["data"]]), f"{g['bytes'] / 2**20:.1f} MiB"]
                       for name, g in manifest["graphs"].items()])
    render.console.print(f"frames {frame['width']}x{frame['height']} ({frame['tokens']} visual tokens each); "
                         f"folder [bold]{folder}[/]", highlight=False)
    render.note(f"use it with: TPRU({str(folder)!r}) or tpru order FRAMES --model {folder}")
