"""`fusion-attn export`: the model as an ONNX graph, checked against torch and TensorRT's op list."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionAttnError
from ..files import written_aside
from .common import model_args


def add_parser(verbs):
    export = verbs.add_parser("export", help="export the model to ONNX and check it")
    model_args(export, backend=False, tau=False)  # τ is an input of the graph, not part of it
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--opset", type=int, default=18, choices=[17, 18],
                        help="18 (default; TensorRT 10.x) or 17 (TensorRT 8.6, JetPack 5)")
    return export


def run(args) -> int:
    import shutil

    import numpy as np

    from ..backends.export import example_inputs, unsupported_ops
    from ..pipeline import create_backend, load_model, onnx_for

    model, source = load_model(args.checkpoint)
    if args.output.is_dir():
        raise FusionAttnError(f"-o {args.output} is a folder; give the .onnx file to write")
    # the graph the backends export and cache for these weights (exported now if not yet), checked, then
    # written beside the output and moved over it: an old file is replaced only by a whole new one
    cached = onnx_for(model, opset=args.opset)
    x = example_inputs(model, batch=3)
    ort_out = create_backend("onnxruntime", model, onnx_path=cached).run(x)
    torch_out = create_backend("torch", model).run(x)
    diff = max(float(np.abs(ort_out[k].astype(np.float64) - torch_out[k]).max()) for k in ort_out)
    bad = unsupported_ops(cached)
    path = args.output
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() != Path(cached).resolve():
        with written_aside(path) as tmp:
            shutil.copyfile(cached, tmp)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) from {source}")
    print(f"  parity torch vs onnxruntime, batch 3: max abs diff {diff:.2e}")
    print(f"  TensorRT ONNX parser allow-list: {'all ops supported' if not bad else 'UNSUPPORTED: ' + ', '.join(bad)}")
    return 0 if not bad and diff < 1e-4 else 1
