#!/usr/bin/env python3
"""Reference outputs for the text x image cross-attention fusion test (models/tests/fusion.rs).

    pip install torch safetensors   # CPU is enough; plain PyPI wheels
    python3 scripts/make_fusion_fixture.py models/tests/fixtures

Made with torch 2.15.0 and safetensors 0.8.0 (Python 3.11). Writes models/tests/fixtures/fusion-tiny/:

  config.json           concierge's FusionConfig (hidden 32, image_channels 48, heads 4, ffn 64,
                        layer_norm_eps 1e-5)
  model.safetensors     the reference module's state_dict (float32, PyTorch names: image_proj.*,
                        attn.in_proj_weight/bias, attn.out_proj.*, norm1.*, ffn.0.*, ffn.2.*, norm2.*)
  reference.safetensors float32 tensors:
      text [3, 7, 32], image [3, 18, 48] (2 images x 3x3 positions per row), image_mask [3, 18]
          (1 = real, 0 = padding: row 1's last 9 positions are padding and hold large random
          garbage, so a kernel that reads them fails), output [3, 7, 32];
      probe [3, 7, 32], grad_text [3, 7, 32], grad_image [3, 18, 48]: the gradients of
          sum(output * probe) with respect to text and image (zero at the padded positions), to
          check candle's backward pass through every op of the block;
      features [3, 48, 3, 3] (a ResNet-shaped feature map: batch, channels, h, w),
          feature_positions [3, 9, 48] (features flattened as CrossAttentionFusion::positions
          must: permute to [B, h*w, C], row-major over (h, w)), feature_output [3, 7, 32] (the
          block on text and feature_positions, no mask).

The module is the reference below, built on nn.MultiheadAttention (batch_first). All weights are
random from a fixed seed; the LayerNorm weights and biases and the attention biases are
randomised too (PyTorch initialises them to 1 / 0), so every tensor is exercised. Outputs and
gradients are computed in float64 then cast to float32, so the reference's own rounding is far
below the test's tolerance. A row whose keys are all padding gives NaN in PyTorch; the fixture
has none (the Rust test checks that case on its own).
"""
import json
import os
import sys

import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

HIDDEN, IMAGE_CHANNELS, HEADS, FFN, EPS = 32, 48, 4, 64, 1e-5
BATCH, TEXT_LEN, IMAGES, GRID = 3, 7, 2, 3


class Fusion(nn.Module):
    def __init__(s, hidden, image_channels, heads, ffn, eps=1e-5):
        super().__init__()
        s.image_proj = nn.Linear(image_channels, hidden)
        s.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        s.norm1 = nn.LayerNorm(hidden, eps=eps)
        s.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        s.norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(s, text, image, key_padding_mask=None):
        kv = s.image_proj(image)
        a, _ = s.attn(text, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        x = s.norm1(text + a)
        return s.norm2(x + s.ffn(x))


def main(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Fusion(HIDDEN, IMAGE_CHANNELS, HEADS, FFN, EPS)
    with torch.no_grad():
        for norm in (model.norm1, model.norm2):
            norm.weight.copy_(torch.rand(HIDDEN, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(HIDDEN, generator=gen) * 0.2)
        model.attn.in_proj_bias.copy_(torch.randn(3 * HIDDEN, generator=gen) * 0.1)
        model.attn.out_proj.bias.copy_(torch.randn(HIDDEN, generator=gen) * 0.1)
    model.eval()

    n = IMAGES * GRID * GRID
    text = torch.randn(BATCH, TEXT_LEN, HIDDEN, generator=gen)
    image = torch.randn(BATCH, n, IMAGE_CHANNELS, generator=gen)
    mask = torch.ones(BATCH, n)
    mask[1, n // 2:] = 0  # row 1 has one image; the second image's positions are padding
    image[1, n // 2:] = torch.randn(n // 2, IMAGE_CHANNELS, generator=gen) * 50  # garbage there
    probe = torch.randn(BATCH, TEXT_LEN, HIDDEN, generator=gen)
    features = torch.randn(BATCH, IMAGE_CHANNELS, GRID, GRID, generator=gen).abs()  # post-ReLU-like

    m64 = model.double()
    t64 = text.double().requires_grad_(True)
    i64 = image.double().requires_grad_(True)
    output = m64(t64, i64, key_padding_mask=(mask == 0))
    (output * probe.double()).sum().backward()
    assert torch.isfinite(output).all()
    with torch.no_grad():
        feature_positions = features.double().flatten(2).permute(0, 2, 1)  # [B, h*w, C]
        feature_output = m64(text.double(), feature_positions)

    folder = os.path.join(out_dir, "fusion-tiny")
    os.makedirs(folder, exist_ok=True)
    config = {"hidden": HIDDEN, "image_channels": IMAGE_CHANNELS, "heads": HEADS, "ffn": FFN, "layer_norm_eps": EPS}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    reference = {
        "text": text, "image": image, "image_mask": mask, "output": output.detach(),
        "probe": probe, "grad_text": t64.grad, "grad_image": i64.grad,
        "features": features, "feature_positions": feature_positions, "feature_output": feature_output,
    }
    save_file({k: v.float().contiguous() for k, v in reference.items()}, os.path.join(folder, "reference.safetensors"))
    print(f"fusion-tiny: output {tuple(output.shape)}, |output|max {output.abs().max():.3f}, "
          f"|grad_text|max {t64.grad.abs().max():.3f}, |grad_image|max {i64.grad.abs().max():.3f}, "
          f"grad_image at padding {i64.grad[1, n // 2:].abs().max():.1e}")


if __name__ == "__main__":
    print("torch", torch.__version__, "safetensors", safetensors.__version__)
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
