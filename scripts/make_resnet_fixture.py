#!/usr/bin/env python3
"""Reference outputs for the ResNet image-encoder parity test (models/tests/resnet.rs).

    pip install torch torchvision safetensors   # CPU is enough; plain PyPI wheels
    python3 scripts/make_resnet_fixture.py models/tests/fixtures

Made with torch 2.15.0 and torchvision 0.29.2 (Python 3.11). Writes three folders, each with
config.json (concierge's ResNetConfig), model.safetensors (the state_dict, torchvision names) and
reference.safetensors (`input` [2, 3, H, W] and the reference's `pooled`, `features` and `logits`):

  resnet18-tiny      torchvision's own ResNet + BasicBlock, layers [2, 2, 2, 2], thinned (stem 16,
                     stage widths 8/16/32/64) so the fixture stays small; batch-norm unfolded.
  resnet50-tiny      torchvision's ResNet + Bottleneck, layers [3, 4, 6, 3], stage widths
                     4/8/16/32 (outputs 16/32/64/128); batch-norm unfolded.
  resnet-caffe-tiny  a plain-PyTorch bottleneck ResNet written here (not torchvision) with the
                     down-sampling stride in the first 1x1 conv (Caffe/MSRA, as Open-NSFW) and
                     asymmetric explicit paddings before conv1 and the max-pool (as
                     TensorFlow-converted graphs have); saved with batch-norm already folded
                     into conv weight + bias, the way a converted Open-NSFW checkpoint comes.
                     Non-square input, so a swapped padding order shows.

Thinning: torchvision's ResNet hard-codes 64 stem channels and 64..512 stage widths, so the
torchvision models are built full-size and then their stem and stages are rebuilt at the thin
widths with torchvision's own `_make_layer` (BasicBlock/Bottleneck and `forward` untouched).
All weights are random, and every batch-norm gets random weight, bias, running_mean and
running_var, so the loader's folding is exercised. Outputs are computed in eval() mode, in
float64 then cast to float32, so the reference's own rounding is far below the test's tolerance.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BASE_WIDTHS = (64, 128, 256, 512)


class ThinResNet(ResNet):
    """torchvision's ResNet with the stem and stages rebuilt at `stem` and `widths`."""

    def __init__(self, block, layers, stem, widths, num_classes):
        super().__init__(block, layers, num_classes=num_classes)
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CaffeBottleneck(nn.Module):
    """Bottleneck with the stride in conv1 (1x1), as MSRA's Caffe ResNets; torchvision names."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class CaffeResNet(nn.Module):
    """Stem conv and max-pool without built-in padding: explicit (top, bottom, left, right)
    padding before each, zeros for the conv and -inf for the pool."""

    def __init__(self, layers, stem, widths, num_classes, stem_pad, pool_pad):
        super().__init__()
        self.stem_pad, self.pool_pad = stem_pad, pool_pad
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        inplanes = stem
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(CaffeBottleneck(inplanes, w, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = w * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, num_classes)

    def features(self, x):
        t, b, l, r = self.stem_pad
        x = F.relu(self.bn1(self.conv1(F.pad(x, (l, r, t, b)))))
        t, b, l, r = self.pool_pad
        x = F.max_pool2d(F.pad(x, (l, r, t, b), value=float("-inf")), 3, 2)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise_batch_norm(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.2
            m.running_mean.data = torch.randn(c, generator=gen) * 0.2
            m.running_var.data = torch.rand(c, generator=gen) * 1.5 + 0.5


def folded_state_dict(model):
    """conv+bn pairs -> conv.weight and conv.bias (no bn tensors), as a converted checkpoint."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [("conv1", "bn1")]
    for name, m in model.named_modules():
        if isinstance(m, CaffeBottleneck):
            pairs += [(f"{name}.conv{k}", f"{name}.bn{k}") for k in (1, 2, 3)]
            if m.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
    for conv, bn in pairs:
        eps = model.get_submodule(bn).eps
        s = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + eps)
        sd[f"{conv}.weight"] = sd[f"{conv}.weight"] * s[:, None, None, None]
        sd[f"{conv}.bias"] = sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * s
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            del sd[f"{bn}.{suffix}"]
    return sd


def write(out_dir, name, model, config, state_dict, x):
    model.eval()
    with torch.no_grad():
        m64 = model.double()
        feats = m64.features(x.double())
        pooled = feats.mean(dim=(2, 3))
        logits = m64.fc(pooled)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file({k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state_dict.items()},
              os.path.join(folder, "model.safetensors"))
    save_file({"input": x.float().contiguous(), "pooled": pooled.float().contiguous(),
               "features": feats.float().contiguous(), "logits": logits.float().contiguous()},
              os.path.join(folder, "reference.safetensors"))
    print(f"{name}: features {tuple(feats.shape)}, |pooled|max {pooled.abs().max():.3f}, "
          f"|logits|max {logits.abs().max():.3f}")


def main(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    r18 = ThinResNet(BasicBlock, [2, 2, 2, 2], stem=16, widths=(8, 16, 32, 64), num_classes=10)
    randomise_batch_norm(r18, gen)
    cfg18 = {"block": "basic", "layers": [2, 2, 2, 2], "width_multiplier": 0.125, "stem_channels": 16,
             "num_classes": 10, "input_size": 64}
    write(out_dir, "resnet18-tiny", r18, cfg18, r18.state_dict(), torch.randn(2, 3, 64, 64, generator=gen))

    r50 = ThinResNet(Bottleneck, [3, 4, 6, 3], stem=16, widths=(4, 8, 16, 32), num_classes=7)
    randomise_batch_norm(r50, gen)
    cfg50 = {"block": "bottleneck", "layers": [3, 4, 6, 3], "width_multiplier": 0.0625, "stem_channels": 16,
             "num_classes": 7, "input_size": 64}
    write(out_dir, "resnet50-tiny", r50, cfg50, r50.state_dict(), torch.randn(2, 3, 64, 64, generator=gen))

    stem_pad, pool_pad = [2, 3, 1, 3], [0, 1, 1, 1]
    caffe = CaffeResNet([2, 1, 1, 1], stem=16, widths=(8, 16, 32, 64), num_classes=2,
                        stem_pad=stem_pad, pool_pad=pool_pad)
    randomise_batch_norm(caffe, gen)
    caffe.eval()
    cfg_caffe = {"block": "bottleneck", "layers": [2, 1, 1, 1], "width_multiplier": 0.125, "stem_channels": 16,
                 "stride_in_1x1": True, "stem_pad": stem_pad, "pool_pad": pool_pad, "num_classes": 2,
                 "input_size": 64, "mean": [104.0, 117.0, 123.0], "std": [1.0, 1.0, 1.0],
                 "channel_order": "bgr", "scale": 255.0}
    write(out_dir, "resnet-caffe-tiny", caffe, cfg_caffe, folded_state_dict(caffe),
          torch.randn(2, 3, 64, 56, generator=gen))


if __name__ == "__main__":
    print("torch", torch.__version__, "torchvision", torchvision.__version__)
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
