//! The ResNet image encoder (He et al., 2015, "Deep Residual Learning for Image Recognition"):
//! torchvision's layout and weight names, plus the Caffe/MSRA and TensorFlow-converted variants
//! (stride in the first 1x1 conv, asymmetric stem and pool padding) that Open-NSFW needs.
//!
//! candle-transformers' `resnet` is not reused: it keeps batch-norm at run time, has fixed
//! widths and paddings, and returns only logits. Here batch-norm is folded into the preceding
//! conv at load time, so the forward pass is conv + bias, relu, add and max-pool only, in plain
//! candle ops that run on every device (`forward_reference`). On the CPU in f32, `forward` runs
//! the whole network channels-last on `concierge_kernels::conv` instead: every conv one packed
//! GEMM with its bias, relu and residual fused, weights packed once at load.
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use concierge_kernels::conv::{self, Buffers, ConvSpec, Nhwc, PackedConv};
use concierge_kernels::gemm::Act;
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::imageproc::Resize;

/// The residual block: two 3x3 convs, or 1x1 -> 3x3 -> 1x1 with 4x expansion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    /// Output channels per stage width.
    pub fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// The order of the colour channels the model was trained on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    /// Caffe models (Open-NSFW among them).
    Bgr,
}

/// A ResNet's architecture and input conventions, read from the `config.json` beside the
/// weights. Only `block` and `layers` are required; everything else defaults to torchvision.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage (`layer1` .. `layer4`), e.g. `[3, 4, 6, 3]` for ResNet-50.
    pub layers: [usize; 4],
    /// Scales the stage widths 64/128/256/512 (before the bottleneck's expansion): 0.5 gives
    /// ResNet-50-1by2 (stage outputs 128/256/512/1024). The scaled widths must be whole.
    #[serde(default = "one")]
    pub width_multiplier: f64,
    /// Output channels of `conv1` (64 in torchvision, and in the thin Open-NSFW too).
    #[serde(default = "sixty_four")]
    pub stem_channels: usize,
    /// Put a bottleneck's down-sampling stride in its first 1x1 conv (Caffe/MSRA, Open-NSFW)
    /// instead of the 3x3 (torchvision, "ResNet v1.5").
    #[serde(default)]
    pub stride_in_1x1: bool,
    /// Explicit zero padding `[top, bottom, left, right]` before the 7x7 stride-2 `conv1`, which
    /// then pads nothing itself (TensorFlow graphs pad asymmetrically). None: 3 on every side.
    #[serde(default)]
    pub stem_pad: Option<[usize; 4]>,
    /// Explicit -inf padding `[top, bottom, left, right]` before the 3x3 stride-2 max-pool.
    /// None: 1 on every side.
    #[serde(default)]
    pub pool_pad: Option<[usize; 4]>,
    /// Classes of the `fc` head; None: the checkpoint has no head (an encoder only).
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Batch-norm epsilon used when folding.
    #[serde(default = "bn_eps")]
    pub bn_eps: f64,

    // Preprocessing, carried for the serving side (the model itself takes a ready tensor):
    // the input the model expects is `(pixel / 255 * scale - mean) / std` per channel, in
    // `channel_order`, from an image resized as `resize` says and centre-cropped to
    // `input_size` x `input_size`. Fields not listed here (e.g. `labels`) are ignored.
    /// Side of the square input the model was trained at (the centre crop).
    #[serde(default = "two_twenty_four")]
    pub input_size: usize,
    /// How the image is resized before the crop: `{"shorter_side": 256}` or `{"exact": [256,
    /// 256]}` (Caffe models, Open-NSFW among them, squash to 256x256). None: torchvision's
    /// shorter side to `input_size * 256 / 224`. See `imageproc::Preprocess::from_config`.
    #[serde(default)]
    pub resize: Option<Resize>,
    /// Per-channel mean, in `channel_order` and in units of `scale`.
    #[serde(default = "imagenet_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation, as `mean`.
    #[serde(default = "imagenet_std")]
    pub std: [f32; 3],
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// The pixel range before mean/std: 1.0 (torchvision: pixels in [0, 1]) or 255.0 (Caffe).
    #[serde(default = "one_f32")]
    pub scale: f32,
}

fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn sixty_four() -> usize {
    64
}
fn bn_eps() -> f64 {
    1e-5
}
fn two_twenty_four() -> usize {
    224
}
fn imagenet_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn imagenet_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

impl ResNetConfig {
    /// torchvision's defaults for a block kind and depth, with the 1000-class ImageNet head.
    pub fn new(block: BlockKind, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers,
            width_multiplier: 1.0,
            stem_channels: 64,
            stride_in_1x1: false,
            stem_pad: None,
            pool_pad: None,
            num_classes: Some(1000),
            bn_eps: bn_eps(),
            input_size: 224,
            resize: None,
            mean: imagenet_mean(),
            std: imagenet_std(),
            channel_order: ChannelOrder::Rgb,
            scale: 1.0,
        }
    }

    pub fn resnet18() -> Self {
        Self::new(BlockKind::Basic, [2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::new(BlockKind::Basic, [3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 6, 3])
    }
    pub fn resnet101() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 23, 3])
    }
    pub fn resnet152() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 8, 36, 3])
    }

    /// Reads a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| bad(format!("expected a ResNet config (block, layers, width_multiplier, ...): {e}")))?;
        cfg.stage_widths().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    /// Each stage's inner width (the bottleneck's 3x3 channels; a basic block's only width).
    pub fn stage_widths(&self) -> Result<[usize; 4]> {
        let mut out = [0; 4];
        for (w, base) in out.iter_mut().zip([64usize, 128, 256, 512]) {
            let scaled = base as f64 * self.width_multiplier;
            if scaled < 1.0 || (scaled - scaled.round()).abs() > 1e-6 {
                return Err(ModelError::Unsupported(format!(
                    "width_multiplier {} makes a stage {scaled} channels wide; the widths 64/128/256/512 \
                     times the multiplier must be whole numbers",
                    self.width_multiplier
                )));
            }
            *w = scaled.round() as usize;
        }
        Ok(out)
    }

    /// Each stage's output channels (the inner width times the block's expansion).
    pub fn stage_channels(&self) -> Result<[usize; 4]> {
        Ok(self.stage_widths()?.map(|w| w * self.block.expansion()))
    }

    /// Channels of the pooled vector and the feature map.
    pub fn feature_dim(&self) -> Result<usize> {
        Ok(self.stage_channels()?[3])
    }
}

/// A conv's channels, square kernel, stride and symmetric padding.
#[derive(Debug, Clone, Copy)]
struct ConvShape {
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    /// The zero padding `[top, bottom, left, right]` of the channels-last conv, which also
    /// takes over an explicit pad done before the candle conv (the stem's `stem_pad`).
    fast_pad: [usize; 4],
}

impl ConvShape {
    /// A k x k conv padded (k - 1) / 2 on each side, as every conv in a block is.
    fn same(c_in: usize, c_out: usize, k: usize, stride: usize) -> Self {
        let padding = (k - 1) / 2;
        Self { c_in, c_out, k, stride, padding, fast_pad: [padding; 4] }
    }
}

/// A conv with batch-norm folded in: always a bias, never a separate normalisation.
#[derive(Debug, Clone)]
struct ConvBias {
    conv: Conv2d,
    /// The same weights packed for the channels-last CPU path (f32 on the CPU only).
    packed: Option<Arc<PackedConv>>,
}

impl ConvBias {
    /// Loads `{conv}.weight` `[c_out, c_in, k, k]` and folds batch-norm `{bn}.*` into it; or,
    /// for an already-folded checkpoint (no `{bn}.*`), takes `{conv}.bias` as it is.
    fn load(vb: &VarBuilder, conv: &str, bn: &str, shape: ConvShape, eps: f64) -> Result<Self> {
        let ConvShape { c_in, c_out, k, stride, padding, .. } = shape;
        let weight = tensor(vb, &format!("{conv}.weight"), &[c_out, c_in, k, k])?;
        let conv_bias = format!("{conv}.bias");
        let bias = if vb.contains_tensor(&conv_bias) { Some(tensor(vb, &conv_bias, &[c_out])?) } else { None };
        let has_bn = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .any(|s| vb.contains_tensor(&format!("{bn}.{s}")));
        let (weight, bias) = match (has_bn, bias) {
            (false, Some(b)) => (weight, b),
            (false, None) => {
                return Err(missing(vb, &format!(
                    "{bn}.running_mean (the batch-norm after {conv}; a checkpoint with batch-norm \
                     folded in has {conv}.bias instead)"
                )))
            }
            (true, bias) => {
                let [gamma, beta, mean, var] = ["weight", "bias", "running_mean", "running_var"]
                    .map(|s| tensor(vb, &format!("{bn}.{s}"), &[c_out]));
                let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
                // y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
                let s = (gamma / (var + eps)?.sqrt()?)?;
                let weight = weight.broadcast_mul(&s.reshape((c_out, 1, 1, 1))?)?;
                let shifted = match bias {
                    Some(b) => (b - mean)?,
                    None => mean.neg()?,
                };
                (weight, ((shifted * s)? + beta)?)
            }
        };
        let cfg = Conv2dConfig { stride, padding, ..Default::default() };
        let dtype = vb.dtype();
        let packed = if vb.device().is_cpu() && dtype == DType::F32 {
            let spec = ConvSpec { c_in, c_out, kh: k, kw: k, stride, pad: shape.fast_pad };
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(PackedConv::new(spec, &w, &bias.to_vec1::<f32>()?)))
        } else {
            None
        };
        Ok(Self { conv: Conv2d::new(weight.to_dtype(dtype)?, Some(bias.to_dtype(dtype)?), cfg), packed })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(x)?)
    }

    /// The channels-last conv; `ResNet::fast` says every conv has one.
    fn packed(&self) -> &PackedConv {
        self.packed.as_deref().expect("a packed conv on the fast path")
    }
}

/// See `ResNet::forward_fast`: 512 puts the 56x56 and 28x28 stages of a 224x224 input there.
const PER_IMAGE_PIXELS: usize = 512;

/// A weight in f32 (folding is done at full precision), checked against the shape the
/// config implies; the error names the tensor.
fn tensor(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    if !vb.contains_tensor(name) {
        return Err(missing(vb, name));
    }
    let t = vb.get_unchecked_dtype(name, DType::F32)?;
    if t.dims() != shape {
        return Err(candle_core::Error::Msg(format!(
            "tensor {}{name} has shape {:?}; the config implies {shape:?}",
            prefix(vb),
            t.dims()
        ))
        .into());
    }
    Ok(t)
}

fn prefix(vb: &VarBuilder) -> String {
    let p = vb.prefix();
    if p.is_empty() { p } else { p + "." }
}

fn missing(vb: &VarBuilder, what: &str) -> ModelError {
    candle_core::Error::Msg(format!("tensor {}{what} is missing", prefix(vb))).into()
}

#[derive(Debug, Clone)]
struct Block {
    conv1: ConvBias,
    conv2: ConvBias,
    /// The bottleneck's closing 1x1.
    conv3: Option<ConvBias>,
    downsample: Option<ConvBias>,
    span: tracing::Span,
}

impl Block {
    /// `layer{stage}.{index}`: `c_in` channels in, `width` inner, `width * expansion` out.
    fn load(vb: &VarBuilder, cfg: &ResNetConfig, name: &str, c_in: usize, width: usize, stride: usize) -> Result<Self> {
        let eps = cfg.bn_eps;
        let c_out = width * cfg.block.expansion();
        // (index, c_in, c_out, kernel, stride)
        let conv = |i: usize, cin: usize, cout: usize, k: usize, s: usize| {
            let shape = ConvShape::same(cin, cout, k, s);
            ConvBias::load(vb, &format!("{name}.conv{i}"), &format!("{name}.bn{i}"), shape, eps)
        };
        let (conv1, conv2, conv3) = match cfg.block {
            BlockKind::Basic => (conv(1, c_in, width, 3, stride)?, conv(2, width, width, 3, 1)?, None),
            BlockKind::Bottleneck => {
                let (s1, s3) = if cfg.stride_in_1x1 { (stride, 1) } else { (1, stride) };
                (conv(1, c_in, width, 1, s1)?, conv(2, width, width, 3, s3)?, Some(conv(3, width, c_out, 1, 1)?))
            }
        };
        let downsample = if stride != 1 || c_in != c_out {
            let (c, b) = (format!("{name}.downsample.0"), format!("{name}.downsample.1"));
            Some(ConvBias::load(vb, &c, &b, ConvShape::same(c_in, c_out, 1, stride), eps)?)
        } else {
            None
        };
        let span = tracing::span!(tracing::Level::TRACE, "resnet-block", name);
        Ok(Self { conv1, conv2, conv3, downsample, span })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut y = self.conv2.forward(&self.conv1.forward(x)?.relu()?)?;
        if let Some(c3) = &self.conv3 {
            y = c3.forward(&y.relu()?)?;
        }
        let skip = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        Ok((y + skip)?.relu()?)
    }

    /// Output height and width for an input of `(h, w)`.
    fn out_hw(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (h, w) = self.conv1.packed().spec().out_hw(h, w);
        self.conv2.packed().spec().out_hw(h, w)
    }

    /// `forward`, channels-last; the block's input and temporaries go back to `bufs`.
    fn forward_fast(&self, x: Nhwc, bufs: &mut Buffers) -> Nhwc {
        let _enter = self.span.enter();
        let mut y = self.conv1.packed().forward(&x, Act::Relu, None, false, bufs);
        let last = match &self.conv3 {
            Some(c3) => {
                let y2 = self.conv2.packed().forward(&y, Act::Relu, None, false, bufs);
                bufs.give(std::mem::replace(&mut y, y2).data);
                c3
            }
            None => &self.conv2,
        };
        let skip = match &self.downsample {
            Some(d) => {
                let s = d.packed().forward(&x, Act::None, None, false, bufs);
                bufs.give(x.data);
                s
            }
            None => x,
        };
        // relu(conv(y) + bias + skip) in the GEMM's write-out.
        let out = last.packed().forward(&y, Act::Relu, Some(&skip), true, bufs);
        bufs.give(y.data);
        bufs.give(skip.data);
        out
    }
}

/// What the encoder returns for a batch.
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    /// Global average pool of `features`: `[B, C]`.
    pub pooled: Tensor,
    /// The last stage's feature map `[B, C, h, w]` (for cross-attention).
    pub features: Tensor,
    /// `fc(pooled)` `[B, num_classes]`, when the checkpoint has a head.
    pub logits: Option<Tensor>,
}

/// A ResNet with batch-norm folded into its convs.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBias,
    stem_pad: Option<[usize; 4]>,
    pool_pad: [usize; 4],
    blocks: Vec<Block>,
    fc: Option<Linear>,
    cfg: ResNetConfig,
    /// Every conv has its packed channels-last copy (weights f32 on the CPU).
    fast: bool,
}

impl ResNet {
    /// Loads torchvision-named weights (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...,
    /// `layer2.0.downsample.{0,1}.*`, `fc.{weight,bias}`), folding every batch-norm. A missing
    /// tensor or one of the wrong shape is an error naming it.
    pub fn load(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        let widths = cfg.stage_widths()?;
        // With an explicit stem_pad the conv pads nothing itself.
        let padding = if cfg.stem_pad.is_some() { 0 } else { 3 };
        let fast_pad = cfg.stem_pad.unwrap_or([3; 4]);
        let stem_shape = ConvShape { c_in: 3, c_out: cfg.stem_channels, k: 7, stride: 2, padding, fast_pad };
        let stem = ConvBias::load(&vb, "conv1", "bn1", stem_shape, cfg.bn_eps)?;
        let mut blocks = Vec::new();
        let mut c_in = cfg.stem_channels;
        for (stage, (&n, &width)) in cfg.layers.iter().zip(&widths).enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Block::load(&vb, cfg, &format!("layer{}.{i}", stage + 1), c_in, width, stride)?);
                c_in = width * cfg.block.expansion();
            }
        }
        let fc = match cfg.num_classes {
            Some(n) => {
                let w = tensor(&vb, "fc.weight", &[n, c_in])?.to_dtype(vb.dtype())?;
                let b = tensor(&vb, "fc.bias", &[n])?.to_dtype(vb.dtype())?;
                Some(Linear::new(w, Some(b)))
            }
            None => None,
        };
        let pool_pad = cfg.pool_pad.unwrap_or([1; 4]);
        let convs = blocks.iter().flat_map(|b| [Some(&b.conv1), Some(&b.conv2), b.conv3.as_ref(), b.downsample.as_ref()]);
        let fast = std::iter::once(&stem).chain(convs.flatten()).all(|c| c.packed.is_some());
        Ok(Self { stem, stem_pad: cfg.stem_pad, pool_pad, blocks, fc, cfg: cfg.clone(), fast })
    }

    /// Loads `config.json` and `model.safetensors` from a folder. Weight errors name the file.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = dir.join("config.json");
        let weights = dir.join("model.safetensors");
        for (p, what) in [
            (&config, "a ResNet config (block, layers, ...)"),
            (&weights, "the weights, named as torchvision names them"),
        ] {
            if !p.is_file() {
                return Err(ModelError::MissingFile { path: p.clone(), expected: what.into() });
            }
        }
        Self::from_files(&config, &weights, device, dtype)
    }

    /// Loads a ResNet config file and its safetensors weights. Weight errors name the file.
    pub fn from_files(config: &Path, weights: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (config, weights) = (config.to_path_buf(), weights.to_path_buf());
        let cfg = ResNetConfig::from_file(&config)?;
        // SAFETY: memory-mapped read-only; checkpoint folders are replaced, never edited in place.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| ModelError::BadFile { path: weights.clone(), reason: e.to_string() })?;
        let model = Self::load(vb, &cfg).map_err(|e| match e {
            ModelError::Candle(c) => ModelError::BadFile {
                path: weights.clone(),
                reason: format!("does not match {}: {c}", config.display()),
            },
            other => other,
        })?;
        let dim = cfg.feature_dim()?;
        tracing::info!(weights = %weights.display(), ?cfg.block, ?cfg.layers, dim, ?device, ?dtype, "resnet loaded");
        Ok(model)
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Whether `forward` runs the channels-last CPU kernels (weights f32 on the CPU).
    pub fn has_cpu_fast_path(&self) -> bool {
        self.fast
    }

    /// Runs NCHW `[B, 3, H, W]` images (already preprocessed as the config says) through the
    /// network: channels-last on the packed CPU kernels for f32 on the CPU, otherwise as
    /// [`Self::forward_reference`].
    pub fn forward(&self, images: &Tensor) -> Result<ResNetOutput> {
        if self.fast && images.device().is_cpu() && images.dtype() == DType::F32 {
            return concierge_kernels::on_cpu_pool(|| self.forward_fast(images));
        }
        self.forward_reference(images)
    }

    /// `forward` in plain candle ops (NCHW), on any device and dtype: what the CPU fast path is
    /// tested against.
    pub fn forward_reference(&self, images: &Tensor) -> Result<ResNetOutput> {
        let x = match self.stem_pad {
            Some(p) => pad(images, p, 0.0)?,
            None => images.clone(),
        };
        let x = self.stem.forward(&x)?.relu()?;
        let mut x = pad(&x, self.pool_pad, f64::NEG_INFINITY)?.max_pool2d_with_stride(3, 2)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let pooled = x.mean((2, 3))?;
        let logits = match &self.fc {
            Some(fc) => Some(fc.forward(&pooled)?),
            None => None,
        };
        Ok(ResNetOutput { pooled, features: x, logits })
    }

    fn forward_fast(&self, images: &Tensor) -> Result<ResNetOutput> {
        let (b, c, h, w) = images.dims4()?;
        let stem = self.stem.packed().spec();
        let [t, bo, l, r] = stem.pad;
        // Windows that do not fit are an error, as on the reference path (never a panic).
        let fits = |h: usize, w: usize, k: usize, [t, b, l, r]: [usize; 4]| h + t + b >= k && w + l + r >= k;
        if c != stem.c_in || !fits(h, w, stem.kh, stem.pad) {
            return Err(ModelError::Unsupported(format!(
                "images are {:?}; this ResNet takes [B, {}, H, W] with H + {} and W + {} at least {}",
                images.dims(), stem.c_in, t + bo, l + r, stem.kh
            )));
        }
        let (sh, sw) = stem.out_hw(h, w);
        if !fits(sh, sw, 3, self.pool_pad) {
            return Err(ModelError::Unsupported(format!("images of {h}x{w} are too small for the max-pool")));
        }
        // The front of the network (stem, pool, and the blocks whose output has at least
        // PER_IMAGE_PIXELS pixels) runs image by image: those GEMMs have rows enough, and one
        // image's activations stay in cache where a batch's would stream through memory every
        // layer. The rest, small maps and big weights, runs on the whole batch.
        let [pt, pb, pl, pr] = self.pool_pad;
        let mut size = ((sh + pt + pb - 3) / 2 + 1, (sw + pl + pr - 3) / 2 + 1);
        let mut front = 0;
        for block in &self.blocks {
            let next = block.out_hw(size);
            if next.0 * next.1 < PER_IMAGE_PIXELS {
                break;
            }
            (front, size) = (front + 1, next);
        }
        let input = images.flatten_all()?.to_vec1::<f32>()?;
        let plane = c * h * w;
        let mut bufs = Buffers::default();
        let mut batch: Option<Nhwc> = None;
        for i in 0..b {
            let image = Nhwc::from_nchw(&input[i * plane..(i + 1) * plane], 1, c, h, w);
            let y = self.stem.packed().forward(&image, Act::Relu, None, false, &mut bufs);
            let mut x = conv::max_pool(&y, 3, 2, self.pool_pad, &mut bufs);
            bufs.give(y.data);
            for block in &self.blocks[..front] {
                x = block.forward_fast(x, &mut bufs);
            }
            if b == 1 {
                batch = Some(x);
                break;
            }
            let len = x.data.len();
            let all = batch.get_or_insert_with(|| Nhwc::new(b, x.h, x.w, x.c, bufs.take(b * len)));
            all.data[i * len..(i + 1) * len].copy_from_slice(&x.data);
            bufs.give(x.data);
        }
        let mut x = batch.expect("a batch of at least one image");
        for block in &self.blocks[front..] {
            x = block.forward_fast(x, &mut bufs);
        }
        let dev = images.device();
        let pooled = Tensor::from_vec(conv::global_avg_pool(&x), (b, x.c), dev)?;
        let features = Tensor::from_vec(x.to_nchw(), (b, x.c, x.h, x.w), dev)?;
        let logits = match &self.fc {
            Some(fc) => Some(fc.forward(&pooled)?),
            None => None,
        };
        Ok(ResNetOutput { pooled, features, logits })
    }
}

/// Pads the last two dims by `[top, bottom, left, right]` with `value` (device-agnostic: a
/// concatenation, since candle pads only with zeros or edge values).
fn pad(x: &Tensor, [top, bottom, left, right]: [usize; 4], value: f64) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, before, after) in [(2, top, bottom), (3, left, right)] {
        if before + after == 0 {
            continue;
        }
        if value == 0.0 {
            x = x.pad_with_zeros(dim, before, after)?;
            continue;
        }
        let block = |n: usize| -> Result<Tensor> {
            let mut dims = x.dims().to_vec();
            dims[dim] = n;
            Ok(Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())?)
        };
        let mut parts = Vec::with_capacity(3);
        if before > 0 {
            parts.push(block(before)?);
        }
        parts.push(x.clone());
        if after > 0 {
            parts.push(block(after)?);
        }
        x = Tensor::cat(&parts, dim)?;
    }
    Ok(x)
}
