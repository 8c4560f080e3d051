"""A convkit checkpoint as the equivalent ``torch.nn.Sequential``.

    from convkit_torch import load
    model, classes = load("runs/mnist/model.safetensors")   # or the run folder
    probabilities = model(images_nchw)                       # as `convkit predict` gives them

The model takes PyTorch's NCHW batches (``x_nhwc.permute(0, 3, 1, 2)``), holds the trained
weights (convkit's layout is PyTorch's: conv ``[out, in, kh, kw]``, dense ``[out, in]``), and
ends with the head's softmax or sigmoid, so its output is the probabilities. Two Keras
semantics are kept: ``Flatten`` flattens channels-last (H, W, C), as the Dense kernel after it
expects, and ``same`` padding puts the odd row or column at the bottom and right, as
TensorFlow does. BatchNormalization's moving statistics become ``running_mean`` and
``running_var`` (Keras' momentum 0.99 is PyTorch's 0.01). Call ``model.eval()`` for inference
(dropout off, moving statistics used); ``load`` returns it in eval mode.

Command line, for the tests: ``python convkit_torch.py CHECKPOINT INPUT.f32 OUTPUT.f32 [...]``
reads ``N×H×W×C`` float32 images (raw, little-endian) and writes ``N×K`` probabilities, for
each triple given; ``python convkit_torch.py --mapping`` prints the layer types it maps.
"""

import json
import math
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open

STEMS = {
    "Conv2D": "conv2d",
    "MaxPooling2D": "max_pooling2d",
    "AveragePooling2D": "average_pooling2d",
    "GlobalMaxPooling2D": "global_max_pooling2d",
    "GlobalAveragePooling2D": "global_average_pooling2d",
    "Flatten": "flatten",
    "Dense": "dense",
    "Activation": "activation",
    "ReLU": "re_lu",
    "Softmax": "softmax",
    "Dropout": "dropout",
    "BatchNormalization": "batch_normalization",
    "RandomCrop": "random_crop",
}

# Each layer type's PyTorch tensors: (attribute of the torch module, convkit's weight suffix),
# in convkit's order. `--mapping` prints this table and STEMS; tests/interop.rs checks both
# against the Rust side's (pytorch.rs, the layer rules), so a layer type added there without
# its mapping here fails a test.
TORCH_PARTS = {
    "Conv2D": [("weight", "weight"), ("bias", "bias")],
    "MaxPooling2D": [],
    "AveragePooling2D": [],
    "GlobalMaxPooling2D": [],
    "GlobalAveragePooling2D": [],
    "Flatten": [],
    "Dense": [("weight", "weight"), ("bias", "bias")],
    "Activation": [],
    "ReLU": [],
    "Softmax": [],
    "Dropout": [],
    "RandomCrop": [],
    "BatchNormalization": [
        ("weight", "gamma"),
        ("bias", "beta"),
        ("running_mean", "moving_mean"),
        ("running_var", "moving_variance"),
    ],
}


class RandomCrop(torch.nn.Module):
    """convkit's RandomCrop on NCHW images: a random window per image in training, the centre
    window in eval mode."""

    def __init__(self, height, width):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, x):
        n, _, h, w = x.shape
        if not self.training:
            top, left = (h - self.height) // 2, (w - self.width) // 2
            return x[:, :, top:top + self.height, left:left + self.width]
        tops = torch.randint(0, h - self.height + 1, (n,)).tolist()
        lefts = torch.randint(0, w - self.width + 1, (n,)).tolist()
        return torch.stack([x[i, :, t:t + self.height, l:l + self.width] for i, (t, l) in enumerate(zip(tops, lefts))])


class ChannelsLastFlatten(torch.nn.Module):
    """Keras' Flatten of an NCHW tensor: (H, W, C) order, so Dense kernels keep their meaning."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)


def activation(name):
    return {
        "linear": None,
        "relu": torch.nn.ReLU(),
        "sigmoid": torch.nn.Sigmoid(),
        "tanh": torch.nn.Tanh(),
        "softmax": torch.nn.Softmax(dim=1),
    }[name]


def layer_names(layers):
    """Each layer's name: its own, or Keras' automatic one (conv2d, conv2d_1, ...)."""
    counts, names = {}, []
    for layer in layers:
        stem = STEMS[layer["type"]]
        n = counts.get(stem, 0)
        counts[stem] = n + 1
        names.append(layer.get("name") or (stem if n == 0 else f"{stem}_{n}"))
    return names


def same_padding(size, kernel, stride):
    """TensorFlow's `same`: (before, after), the odd one after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def build(spec, tensors):
    """The torch.nn.Sequential for a convkit spec (dict), with `tensors` (name → tensor) loaded."""
    h, w, c = spec["input_shape"]
    modules = []

    def take(name, shape):
        if name not in tensors:
            raise ValueError(f"tensor `{name}` is missing from the checkpoint")
        t = tensors[name]
        if list(t.shape) != list(shape):
            raise ValueError(f"tensor `{name}`: expected shape {list(shape)}, found {list(t.shape)}")
        return torch.nn.Parameter(t.clone(), requires_grad=False)

    def load_parts(module, kind, name, shapes):
        """`module`'s tensors from the checkpoint, as TORCH_PARTS maps them, with their shapes."""
        for attr, suffix in TORCH_PARTS[kind]:
            t = take(f"{name}.{suffix}", shapes[attr])
            setattr(module, attr, t.data if attr.startswith("running_") else t)

    flat = None
    for layer, name in zip(spec["layers"], layer_names(spec["layers"])):
        kind = layer["type"]
        if kind == "Conv2D":
            (kh, kw), (sh, sw) = layer["kernel_size"], layer.get("strides", [1, 1])
            if layer.get("padding", "valid") == "same":
                top, bottom = same_padding(h, kh, sh)
                left, right = same_padding(w, kw, sw)
                modules.append(torch.nn.ZeroPad2d((left, right, top, bottom)))
                h, w = h + top + bottom, w + left + right
            conv = torch.nn.Conv2d(c, layer["filters"], (kh, kw), stride=(sh, sw))
            load_parts(conv, kind, name, {"weight": [layer["filters"], c, kh, kw], "bias": [layer["filters"]]})
            modules.append(conv)
            h, w, c = (h - kh) // sh + 1, (w - kw) // sw + 1, layer["filters"]
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            kh, kw = layer["pool_size"]
            sh, sw = layer.get("strides") or layer["pool_size"]
            pool = torch.nn.MaxPool2d if kind == "MaxPooling2D" else torch.nn.AvgPool2d
            modules.append(pool((kh, kw), stride=(sh, sw)))
            h, w = (h - kh) // sh + 1, (w - kw) // sw + 1
        elif kind in ("GlobalMaxPooling2D", "GlobalAveragePooling2D"):
            pool = torch.nn.AdaptiveMaxPool2d if kind == "GlobalMaxPooling2D" else torch.nn.AdaptiveAvgPool2d
            modules.extend([pool(1), torch.nn.Flatten()])
            flat = c
        elif kind == "Flatten":
            modules.append(ChannelsLastFlatten())
            flat = h * w * c
        elif kind == "Dense":
            inputs = flat if flat is not None else h * w * c
            dense = torch.nn.Linear(inputs, layer["units"])
            load_parts(dense, kind, name, {"weight": [layer["units"], inputs], "bias": [layer["units"]]})
            modules.append(dense)
            flat = layer["units"]
        elif kind in ("Activation", "ReLU", "Softmax"):
            pass  # its activation follows, as a Conv2D's or Dense's does
        elif kind == "Dropout":
            modules.append(torch.nn.Dropout(layer["rate"]))
        elif kind == "RandomCrop":
            modules.append(RandomCrop(layer["height"], layer["width"]))
            h, w = layer["height"], layer["width"]
        elif kind == "BatchNormalization":
            channels = flat if flat is not None else c
            norm = (torch.nn.BatchNorm1d if flat is not None else torch.nn.BatchNorm2d)(
                channels,
                eps=layer.get("epsilon", 1e-3),
                momentum=1.0 - layer.get("momentum", 0.99),
            )
            load_parts(norm, kind, name, {attr: [channels] for attr, _ in TORCH_PARTS[kind]})
            modules.append(norm)
        else:
            raise ValueError(f"layer `{name}`: convkit_torch does not know the layer type {kind}")
        act = {"ReLU": "relu", "Softmax": "softmax"}.get(kind, layer.get("activation", "linear"))
        if kind in ("Conv2D", "Dense", "Activation", "ReLU", "Softmax") and act != "linear":
            modules.append(activation(act))
    # A model that ends in logits (a linear last layer, Keras' from_logits) gets the head
    # convkit's loss and `predict` apply: softmax over two or more classes, else sigmoid.
    if act == "linear":
        modules.append(torch.nn.Softmax(dim=1) if flat is not None and flat >= 2 else torch.nn.Sigmoid())
    return torch.nn.Sequential(*modules)


def read(path):
    """`(spec, tensors, classes)` of a convkit checkpoint file or run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "convkit.spec" not in metadata:
            raise ValueError(f"{path}: no convkit.spec in the safetensors metadata: not a convkit checkpoint")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{path}: tensor `{name}`: expected float32, found {t.dtype}")
    spec = json.loads(metadata["convkit.spec"])
    classes = json.loads(metadata.get("convkit.data", "{}")).get("classes", [])
    return spec, tensors, classes


def load(path):
    """`(model, classes)` from a convkit checkpoint file or run folder; the model is in eval mode."""
    spec, tensors, classes = read(path)
    try:
        model = build(spec, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model.eval(), classes


def main(argv):
    """For each (CHECKPOINT, INPUT, OUTPUT) triple: the probabilities of INPUT's images; with
    `--mapping`, the layer types this module maps, as JSON: type → stem and tensor parts."""
    if argv[1:] == ["--mapping"]:
        print(json.dumps({kind: {"stem": STEMS[kind], "parts": parts} for kind, parts in TORCH_PARTS.items()}))
        return
    if len(argv) < 4 or (len(argv) - 1) % 3:
        sys.exit("usage: python convkit_torch.py CHECKPOINT INPUT.f32 OUTPUT.f32 [CHECKPOINT INPUT OUTPUT ...]")
    for checkpoint, inputs, outputs in zip(*[iter(argv[1:])] * 3):
        spec, _, _ = read(checkpoint)
        model, _ = load(checkpoint)
        h, w, c = spec["input_shape"]
        x = torch.frombuffer(bytearray(Path(inputs).read_bytes()), dtype=torch.float32)
        with torch.no_grad():
            p = model(x.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()).flatten().tolist()
        Path(outputs).write_bytes(struct.pack(f"<{len(p)}f", *p))


if __name__ == "__main__":
    main(sys.argv)
