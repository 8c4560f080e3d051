"""Run a model exported by ``convkit export --onnx`` in onnxruntime.

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    probabilities = session.run(None, {"input": images_nhwc.astype(np.float32)})[0]

The graph takes ``input``, float32 ``[batch, H, W, C]`` (channels last, as convkit takes it),
normalised as the training data was, or pixel values 0–255 when exported with ``--pixels``; it
gives ``probabilities``, ``[batch, classes]``. The model's metadata holds the class names
(``convkit.classes``, JSON) and what the input is (``convkit.input``): ``describe`` prints them.

Command line:

    python convkit_onnx.py MODEL.onnx                          # check it and describe it
    python convkit_onnx.py MODEL.onnx INPUT.f32 OUTPUT.f32 [...]  # for the tests
    python convkit_onnx.py --bench MODEL.onnx IMAGES.u8 THREADS BATCH  # for `convkit compare`

The second form checks the model with ``onnx.checker`` (full check, with shape inference), reads
``N×H×W×C`` float32 images (raw, little-endian) and writes ``N×K`` probabilities, for each
triple given.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def check(path):
    """The model at `path`, after onnx's full check (structure, operator sets, shapes)."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    return model


def describe(path):
    """Input, output and classes of an exported model, as text."""
    model = check(path)
    meta = {p.key: p.value for p in model.metadata_props}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    graph = model.graph
    return "\n".join(
        [
            f"{path}: {model.producer_name} {model.producer_version}, opset {model.opset_import[0].version}, {len(graph.node)} nodes",
            f"input  {graph.input[0].name} {dims(graph.input[0])}: {meta.get('convkit.input', '?')}",
            f"output {graph.output[0].name} {dims(graph.output[0])}",
            f"classes {json.loads(meta.get('convkit.classes', '[]'))}",
        ]
    )


def run(path, images):
    """Probabilities `[N, K]` for `images` (`[N, H, W, C]` float32)."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def bench(path, images_u8, threads, batch):
    """onnxruntime's inference rate, images/s, on the `N×H×W×C` bytes at `images_u8` scaled to
    [0, 1], in batches of `batch` on `threads` intra-op threads: the best of three passes over
    every image, after one untimed batch. Printed as one JSON line."""
    import time

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    h, w, c = (int(d) for d in shape[1:])
    x = (np.fromfile(images_u8, dtype=np.uint8).reshape(-1, h, w, c) / np.float32(255.0)).astype(np.float32)
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:batch]})
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            session.run(None, {name: x[i : i + batch]})
        best = max(best, len(x) / (time.perf_counter() - start))
    print(json.dumps({"version": ort.__version__, "threads": threads, "batch_size": batch, "images_per_second": best}))


def main(argv):
    if len(argv) == 6 and argv[1] == "--bench":
        bench(argv[2], argv[3], int(argv[4]), int(argv[5]))
        return
    if len(argv) == 2:
        print(describe(argv[1]))
        return
    if len(argv) < 4 or (len(argv) - 1) % 3:
        sys.exit("usage: python convkit_onnx.py MODEL.onnx [INPUT.f32 OUTPUT.f32 [MODEL INPUT OUTPUT ...]]")
    for path, inputs, outputs in zip(*[iter(argv[1:])] * 3):
        model = check(path)
        h, w, c = (d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        x = np.frombuffer(Path(inputs).read_bytes(), dtype="<f4").reshape(-1, h, w, c)
        p = run(path, x)
        Path(outputs).write_bytes(p.astype("<f4").tobytes())


if __name__ == "__main__":
    main(sys.argv)
