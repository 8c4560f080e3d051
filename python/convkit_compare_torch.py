"""PyTorch as `convkit compare`'s yardstick rows: the same model, initial weights, batches
and epochs as every engine, trained with torch.optim, timed the same way.

    python convkit_compare_torch.py IN_DIR OUT.json [--tuned]

Without ``--tuned``: PyTorch eager with NCHW tensors, the row a tutorial's reader runs. With
it: what an informed user turns on, channels_last tensors, a fused optimizer where torch.optim
has one (Adam and SGD), and ``torch.compile`` of the model (forward and backward) when it
compiles here; compiling happens on a warm-up step before the clock starts, whose weights are
then put back, and its time is reported in the row's device column, not in the epoch.
``CONVKIT_TORCH_COMPILE=0`` leaves ``torch.compile`` out (the tests use it: compiling takes
about a minute).

IN_DIR is written by `convkit compare-worker --backends pytorch`:

- ``initial.safetensors``: the convkit checkpoint of the initial weights (its spec, optimizer
  and loss in the metadata);
- ``train.u8``, ``test.u8``: images, ``N×H×W×C`` bytes; ``train-labels.u32``,
  ``test-labels.u32``: little-endian class indices;
- ``orders.u32``: the training order of each epoch, ``epochs × N`` indices, as convkit's
  ``fit`` shuffles them;
- ``settings.json``: batch size, epochs, repeats, and what the report needs.

It writes OUT.json in the shape of convkit's ``EngineRun`` (``backend`` ``pytorch``), and the
weights after one SGD step on the first batch as a convkit checkpoint beside it. The images are
normalised as ``x / 255``, as compare's are. torch.optim's rules are PyTorch's: Adam and RMSprop
add ε outside the square root where Keras 3 adds it inside (for RMSprop) or scales it (Adam),
a difference far below compare's tolerances.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convkit_torch import build, read  # noqa: E402


def load_images(path, shape):
    x = np.fromfile(path, dtype=np.uint8).reshape(-1, *shape)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def load_u32(path):
    return torch.from_numpy(np.fromfile(path, dtype="<u4").astype(np.int64))


def optimizer(params, rule, fused=False):
    """torch.optim's rule for convkit's; `fused` picks the fused kernel where there is one."""
    name = rule["name"]
    fast = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(
            params, lr=rule["learning_rate"], betas=(rule["beta_1"], rule["beta_2"]), eps=rule["epsilon"], **fast
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=rule["learning_rate"], alpha=rule["rho"], eps=rule["epsilon"],
            momentum=rule["momentum"], centered=rule["centered"],
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=rule["learning_rate"], momentum=rule["momentum"], nesterov=rule["nesterov"], **fast
        )
    raise ValueError(f"unknown optimizer {name}")


def model_from(spec, tensors):
    """The network up to the logits (the head's softmax or sigmoid left out), trainable."""
    model = build(spec, tensors)
    if isinstance(model[-1], (torch.nn.Softmax, torch.nn.Sigmoid)):
        model = model[:-1]
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def loss_fn(logits, y):
    if logits.shape[1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def predicted(logits):
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def probabilities(logits):
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def named_tensors(model, spec):
    """convkit's names for the model's parameters and batch-norm statistics, in order."""
    from convkit_torch import layer_names

    names = []
    for layer, name in zip(spec["layers"], layer_names(spec["layers"])):
        if layer["type"] in ("Conv2D", "Dense"):
            names += [f"{name}.weight", f"{name}.bias"]
        elif layer["type"] == "BatchNormalization":
            names += [f"{name}.gamma", f"{name}.beta", f"{name}.moving_mean", f"{name}.moving_variance"]
    values = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            values += [m.weight, m.bias]
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            values += [m.weight, m.bias, m.running_mean, m.running_var]
    return dict(zip(names, values))


def tune(model, train_x, train_y, batch, loss):
    """The tuned row's model: channels_last, and compiled where torch.compile works here.

    Returns the model to train and a description of what was turned on, with the seconds the
    compile took (on warm-up steps whose weight changes are put back)."""
    model = model.to(memory_format=torch.channels_last)
    notes = ["channels_last"]
    if os.environ.get("CONVKIT_TORCH_COMPILE", "1") == "0":
        return model, notes + ["torch.compile left out (CONVKIT_TORCH_COMPILE=0)"]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)
    start = time.perf_counter()
    try:
        # Each batch size compiles once: the full batches' and, when the epoch's last batch is
        # shorter, that one's too, so no compile falls inside the timed epoch.
        for size in sorted({batch, len(train_y) % batch} - {0}):
            x = train_x[:size].contiguous(memory_format=torch.channels_last)
            loss(compiled(x), train_y[:size]).backward()
    except Exception as e:  # noqa: BLE001 (any compiler failure: the row runs eager and says so)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        model.load_state_dict(initial)
        return model, notes + [f"torch.compile failed here ({first[:120]}), eager"]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    return compiled, notes + [f"torch.compile ({seconds:.1f} s to compile, not counted)"]


def main(in_dir, out_json, tuned=False):
    in_dir, out_json = Path(in_dir), Path(out_json)
    settings = json.loads((in_dir / "settings.json").read_text())
    torch.set_num_threads(settings["threads"])
    spec, tensors, _ = read(in_dir / "initial.safetensors")
    from safetensors import safe_open

    with safe_open(str(in_dir / "initial.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    rule = json.loads(metadata["convkit.compile"])["optimizer"]
    h, w, c = spec["input_shape"]
    train_x, test_x = load_images(in_dir / "train.u8", (h, w, c)), load_images(in_dir / "test.u8", (h, w, c))
    train_y, test_y = load_u32(in_dir / "train-labels.u32"), load_u32(in_dir / "test-labels.u32")
    n, batch = len(train_y), settings["batch_size"]
    orders = load_u32(in_dir / "orders.u32").reshape(settings["epochs"], n)

    # Probabilities at initialisation, and one SGD step (lr 0.01) on the first batch in
    # dataset order, as every engine's worker does.
    model = model_from(spec, tensors)
    with torch.no_grad():
        init = probabilities(model(test_x[: settings["init_probe"]])).tolist()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn(model(train_x[:batch]), train_y[:batch]).backward()
    sgd.step()
    one_step = out_json.parent / ("pytorch-tuned-one-step.safetensors" if tuned else "pytorch-one-step.safetensors")
    weights = {k: v.detach().contiguous() for k, v in named_tensors(model.eval(), spec).items()}
    save_file(weights, str(one_step), metadata=metadata)

    if tuned:
        train_x = train_x.contiguous(memory_format=torch.channels_last)
        test_x = test_x.contiguous(memory_format=torch.channels_last)
    fused = tuned and rule["name"] in ("adam", "sgd")
    epoch_seconds, first, notes = [], None, ["eager"]
    for repeat in range(max(settings["repeat"], 1)):
        model = model_from(spec, tensors).train()
        if tuned:
            model, tuned_notes = tune(model, train_x, train_y, batch, loss_fn)
            if repeat == 0:  # later repeats reuse the first compile: its time is the one to report
                notes = tuned_notes + (["fused " + rule["name"]] if fused else [])
        opt = optimizer(model.parameters(), rule, fused=fused)
        epoch_loss, epoch_accuracy, trace, window = [], [], [], []
        for epoch in range(settings["epochs"]):
            order = orders[epoch]
            start = time.perf_counter()
            loss_sum, correct = 0.0, 0
            for b in range(0, n, batch):
                idx = order[b : b + batch]
                x, y = train_x[idx], train_y[idx]
                logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                loss_sum += value * len(idx)
                correct += int((predicted(logits.detach()) == y).sum())
                window.append(value)
                if len(window) == settings["loss_trace_every"]:
                    trace.append(sum(window) / len(window))
                    window = []
            epoch_seconds.append(time.perf_counter() - start)
            epoch_loss.append(loss_sum / n)
            epoch_accuracy.append(correct / n)
        if repeat == 0:
            first = (model, epoch_loss, epoch_accuracy, trace)
    model, epoch_loss, epoch_accuracy, trace = first

    model.eval()
    with torch.no_grad():
        # A compiled model compiles its inference graphs here, untimed: batch 256 and the tail.
        for size in sorted({256, len(test_y) % 256} - {0}):
            model(test_x[:size])
    # As the engines' and onnxruntime's rates: the best of three passes, probabilities out.
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            logits = torch.cat([model(test_x[i : i + 256]) for i in range(0, len(test_y), 256)])
            probabilities(logits)
        best = min(best, time.perf_counter() - start)
    inference = len(test_y) / best
    p = probabilities(logits).clamp(1e-7, 1 - 1e-7)
    if logits.shape[1] == 1:
        t = test_y.float()
        test_loss = float(-(t * p[:, 0].log() + (1 - t) * (1 - p[:, 0]).log()).mean())
    else:
        test_loss = float(-p.gather(1, test_y[:, None]).log().mean())
    pred = predicted(logits)
    classes = max(logits.shape[1], 2)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (test_y.numpy(), pred.numpy()), 1)
    run = {
        "backend": "pytorch-tuned" if tuned else "pytorch",
        "device": f"CPU, {torch.get_num_threads()} threads (PyTorch {torch.__version__} {', '.join(notes)})",
        "build_profile": "python",
        "model": spec.get("name", "sequential"),
        "dataset": settings["dataset"],
        "optimizer": rule["name"],
        "batch_size": batch,
        "train_images": n,
        "test_images": len(test_y),
        "init_probabilities": init,
        "one_step_weights": str(one_step),
        "epoch_loss": epoch_loss,
        "epoch_accuracy": epoch_accuracy,
        "loss_trace": trace,
        "loss_trace_every": settings["loss_trace_every"],
        "epoch_seconds": epoch_seconds,
        "test_loss": test_loss,
        "test_accuracy": float((pred == test_y).float().mean()),
        "confusion_matrix": confusion.tolist(),
        "predicted": pred.tolist(),
        "inference_images_per_second": inference,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "flops_per_training_image": settings["flops_per_training_image"],
        "error": None,
    }
    out_json.write_text(json.dumps(run))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] != "--tuned"):
        sys.exit("usage: python convkit_compare_torch.py IN_DIR OUT.json [--tuned]")
    main(sys.argv[1], sys.argv[2], tuned=len(sys.argv) == 4)
