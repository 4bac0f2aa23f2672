//! Kernels, their variants, and the cache of compiled pipelines.
//!
//! A [`PipelineKey`] names one compiled variant: the kernel, the weight format it reads (for
//! kernels that read weights), whether it uses subgroup operations, and how it widens f16. The key alone decides
//! which `shaders/` file is used and which `#ifdef`s are set, so the same key drives
//! preprocessing, the pipeline cache, and the naga tests of every variant (validation, and
//! translation to MSL and HLSL as wgpu's Metal and DX12 back ends do it).
//!
//! Every kernel has the same two bind groups: group 0 holds its storage buffers (the
//! read-only ones first, as listed by [`Kernel::bindings`]), group 1 a slot of the
//! per-dispatch uniform parameters, bound with a dynamic offset.

use std::collections::HashMap;

use super::preprocess::{preprocess, PreprocessError};
use crate::quant::DType;

/// The WGSL sources, by path relative to `shaders/`.
const SHADERS: &[(&str, &str)] = &[
    ("embed.wgsl", include_str!("../../../shaders/embed.wgsl")),
    (
        "rms_norm.wgsl",
        include_str!("../../../shaders/rms_norm.wgsl"),
    ),
    (
        "matmul_vec.wgsl",
        include_str!("../../../shaders/matmul_vec.wgsl"),
    ),
    (
        "matmul_mat.wgsl",
        include_str!("../../../shaders/matmul_mat.wgsl"),
    ),
    (
        "qk_norm_rope.wgsl",
        include_str!("../../../shaders/qk_norm_rope.wgsl"),
    ),
    (
        "kv_write.wgsl",
        include_str!("../../../shaders/kv_write.wgsl"),
    ),
    (
        "attention.wgsl",
        include_str!("../../../shaders/attention.wgsl"),
    ),
    (
        "silu_mul.wgsl",
        include_str!("../../../shaders/silu_mul.wgsl"),
    ),
    (
        "gather_rows.wgsl",
        include_str!("../../../shaders/gather_rows.wgsl"),
    ),
    ("sample.wgsl", include_str!("../../../shaders/sample.wgsl")),
    (
        "attention_reduce.wgsl",
        include_str!("../../../shaders/attention_reduce.wgsl"),
    ),
    (
        "include/weight_float.wgsl",
        include_str!("../../../shaders/include/weight_float.wgsl"),
    ),
    (
        "include/reduce.wgsl",
        include_str!("../../../shaders/include/reduce.wgsl"),
    ),
    (
        "matmul_vec_quant.wgsl",
        include_str!("../../../shaders/matmul_vec_quant.wgsl"),
    ),
    (
        "matmul_mat_quant.wgsl",
        include_str!("../../../shaders/matmul_mat_quant.wgsl"),
    ),
    (
        "embed_quant.wgsl",
        include_str!("../../../shaders/embed_quant.wgsl"),
    ),
    (
        "include/matmul_x.wgsl",
        include_str!("../../../shaders/include/matmul_x.wgsl"),
    ),
    (
        "include/half.wgsl",
        include_str!("../../../shaders/include/half.wgsl"),
    ),
    (
        "include/weight_quant.wgsl",
        include_str!("../../../shaders/include/weight_quant.wgsl"),
    ),
    (
        "include/weight_kscale.wgsl",
        include_str!("../../../shaders/include/weight_kscale.wgsl"),
    ),
    (
        "include/weight_q8_0.wgsl",
        include_str!("../../../shaders/include/weight_q8_0.wgsl"),
    ),
    (
        "include/weight_q4_0.wgsl",
        include_str!("../../../shaders/include/weight_q4_0.wgsl"),
    ),
    (
        "include/weight_q4_1.wgsl",
        include_str!("../../../shaders/include/weight_q4_1.wgsl"),
    ),
    (
        "include/weight_q4_k.wgsl",
        include_str!("../../../shaders/include/weight_q4_k.wgsl"),
    ),
    (
        "include/weight_q5_k.wgsl",
        include_str!("../../../shaders/include/weight_q5_k.wgsl"),
    ),
    (
        "include/weight_q6_k.wgsl",
        include_str!("../../../shaders/include/weight_q6_k.wgsl"),
    ),
];

/// The text of `shaders/<path>`.
pub fn shader_file(path: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(p, _)| *p == path).map(|(_, s)| *s)
}

/// Weight formats the GPU kernels read: the float formats through `include/weight_float.wgsl`,
/// the block-quantized ones through `include/weight_quant.wgsl` (repacked at upload by
/// [`super::repack`]).
pub const WEIGHT_DTYPES: [DType; 9] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
];

/// One compute kernel (one entry point `main` in one `shaders/` file family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `embed.wgsl`: token ids → embedding rows.
    Embed,
    /// `rms_norm.wgsl`.
    RmsNorm,
    /// `matmul_vec.wgsl`: few tokens.
    MatmulVec,
    /// `matmul_vec.wgsl` with `NORM`: RMSNorm of x folded in front of the product.
    MatmulVecNorm,
    /// `matmul_vec.wgsl` with `SILU`: x = silu(gate) · up folded in front of the product.
    MatmulVecSilu,
    /// `matmul_mat.wgsl`: many tokens.
    MatmulMat,
    /// `qk_norm_rope.wgsl`.
    QkNormRope,
    /// `kv_write.wgsl`.
    KvWrite,
    /// `attention.wgsl`.
    Attention,
    /// `attention.wgsl` with `DECODE`: q/k norm, RoPE and the KV write folded in (one new
    /// token per sequence).
    AttentionDecode,
    /// `attention.wgsl` with `SPLIT`: one part of a long context per workgroup
    /// (flash-decoding), partial results out.
    AttentionSplit,
    /// `attention.wgsl` with `DECODE` and `SPLIT`: the folded decode kernel, one part of a
    /// long context per workgroup.
    AttentionDecodeSplit,
    /// `attention_reduce.wgsl`: combines the partial results of [`Kernel::AttentionSplit`]
    /// and [`Kernel::AttentionDecodeSplit`].
    AttentionReduce,
    /// `silu_mul.wgsl`.
    SiluMul,
    /// `gather_rows.wgsl`.
    GatherRows,
    /// `sample.wgsl`: one token id per row of logits.
    Sample,
}

/// How a kernel accesses one storage binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

use Access::{Read, ReadWrite};

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 16] = [
        Kernel::Embed,
        Kernel::RmsNorm,
        Kernel::MatmulVec,
        Kernel::MatmulVecNorm,
        Kernel::MatmulVecSilu,
        Kernel::MatmulMat,
        Kernel::QkNormRope,
        Kernel::KvWrite,
        Kernel::Attention,
        Kernel::AttentionDecode,
        Kernel::AttentionSplit,
        Kernel::AttentionDecodeSplit,
        Kernel::AttentionReduce,
        Kernel::SiluMul,
        Kernel::GatherRows,
        Kernel::Sample,
    ];

    /// The storage bindings of group 0, in binding order.
    pub fn bindings(self) -> &'static [Access] {
        match self {
            Kernel::Embed => &[Read, Read, ReadWrite],
            Kernel::RmsNorm => &[Read, Read, ReadWrite],
            Kernel::MatmulVec | Kernel::MatmulVecSilu | Kernel::MatmulMat => {
                &[Read, Read, ReadWrite]
            }
            // The norm weight comes last so that `out` keeps binding 2 in every variant.
            Kernel::MatmulVecNorm => &[Read, Read, ReadWrite, Read],
            Kernel::QkNormRope => &[Read, Read, Read, Read, ReadWrite],
            Kernel::KvWrite => &[Read, Read, ReadWrite, ReadWrite],
            Kernel::Attention | Kernel::AttentionSplit => &[Read, Read, Read, Read, ReadWrite],
            Kernel::AttentionReduce => &[Read, ReadWrite],
            Kernel::AttentionDecode | Kernel::AttentionDecodeSplit => &[
                Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite,
            ],
            Kernel::SiluMul => &[Read, ReadWrite],
            Kernel::GatherRows => &[Read, Read, ReadWrite],
            Kernel::Sample => &[Read, Read, ReadWrite, Read],
        }
    }

    /// Whether the kernel reads a weight segment (and so has a weight-format variant).
    pub fn reads_weight(self) -> bool {
        matches!(
            self,
            Kernel::Embed
                | Kernel::MatmulVec
                | Kernel::MatmulVecNorm
                | Kernel::MatmulVecSilu
                | Kernel::MatmulMat
        )
    }

    /// Whether the kernel reads or writes the KV cache (and so has an f16-cache variant).
    pub fn uses_kv(self) -> bool {
        matches!(
            self,
            Kernel::KvWrite
                | Kernel::Attention
                | Kernel::AttentionDecode
                | Kernel::AttentionSplit
                | Kernel::AttentionDecodeSplit
        )
    }

    /// Whether the kernel has a subgroup variant.
    pub fn has_subgroup_variant(self) -> bool {
        matches!(
            self,
            Kernel::MatmulVec | Kernel::MatmulVecNorm | Kernel::MatmulVecSilu
        )
    }

    /// Size in bytes of the kernel's uniform parameter struct.
    pub fn params_size(self) -> usize {
        use super::params::*;
        match self {
            Kernel::Embed => size_of::<EmbedParams>(),
            Kernel::RmsNorm => size_of::<RmsNormParams>(),
            Kernel::MatmulVec
            | Kernel::MatmulVecNorm
            | Kernel::MatmulVecSilu
            | Kernel::MatmulMat => size_of::<MatmulParams>(),
            Kernel::QkNormRope => size_of::<QkNormRopeParams>(),
            Kernel::KvWrite => size_of::<KvWriteParams>(),
            Kernel::Attention => size_of::<AttentionParams>(),
            Kernel::AttentionDecode => size_of::<AttentionDecodeParams>(),
            Kernel::AttentionSplit => size_of::<AttentionSplitParams>(),
            Kernel::AttentionDecodeSplit => size_of::<AttentionDecodeSplitParams>(),
            Kernel::AttentionReduce => size_of::<AttentionReduceParams>(),
            Kernel::SiluMul => size_of::<SiluMulParams>(),
            Kernel::GatherRows => size_of::<GatherRowsParams>(),
            Kernel::Sample => size_of::<SampleParams>(),
        }
    }

    fn stem(self) -> &'static str {
        match self {
            Kernel::Embed => "embed",
            Kernel::RmsNorm => "rms_norm",
            Kernel::MatmulVec | Kernel::MatmulVecNorm | Kernel::MatmulVecSilu => "matmul_vec",
            Kernel::MatmulMat => "matmul_mat",
            Kernel::QkNormRope => "qk_norm_rope",
            Kernel::KvWrite => "kv_write",
            Kernel::Attention
            | Kernel::AttentionDecode
            | Kernel::AttentionSplit
            | Kernel::AttentionDecodeSplit => "attention",
            Kernel::AttentionReduce => "attention_reduce",
            Kernel::SiluMul => "silu_mul",
            Kernel::GatherRows => "gather_rows",
            Kernel::Sample => "sample",
        }
    }
}

/// One compiled variant of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The kernel.
    pub kernel: Kernel,
    /// The weight format read, for kernels that read weights.
    pub weight: Option<DType>,
    /// Use subgroup operations.
    pub subgroup: bool,
    /// Widen f16 with `unpack2x16float` (the device has f16-in-f32 support); else with
    /// integer operations. Only meaningful for F16 weights and block formats (whose scales
    /// are f16), and for the f16 KV cache (also packed with `pack2x16float`).
    pub f16_in_f32: bool,
    /// The KV cache holds half-precision values, two per word (`KV_F16`).
    pub kv_f16: bool,
}

impl PipelineKey {
    /// The plain variant of a kernel that reads no weight.
    pub fn plain(kernel: Kernel) -> Self {
        PipelineKey {
            kernel,
            weight: None,
            subgroup: false,
            f16_in_f32: false,
            kv_f16: false,
        }
    }

    /// A kernel over the KV cache, for a cache of half-precision values or not.
    pub fn kv(kernel: Kernel, kv_f16: bool, f16_in_f32: bool) -> Self {
        debug_assert!(kernel.uses_kv());
        PipelineKey {
            kv_f16,
            f16_in_f32: kv_f16 && f16_in_f32,
            ..PipelineKey::plain(kernel)
        }
    }

    /// Every variant that exists, for validation.
    pub fn all() -> Vec<PipelineKey> {
        let mut keys = Vec::new();
        for kernel in Kernel::ALL {
            let weights: Vec<Option<DType>> = if kernel.reads_weight() {
                WEIGHT_DTYPES.iter().copied().map(Some).collect()
            } else {
                vec![None]
            };
            let subgroups: &[bool] = if kernel.has_subgroup_variant() {
                &[false, true]
            } else {
                &[false]
            };
            for &weight in &weights {
                // Half-precision bits to widen: F16 elements, or the scales of a block format.
                let f16_variants: &[bool] =
                    if weight.is_some_and(|w| w == DType::F16 || w.is_quantized()) {
                        &[false, true]
                    } else {
                        &[false]
                    };
                for &subgroup in subgroups {
                    for &f16_in_f32 in f16_variants {
                        keys.push(PipelineKey {
                            kernel,
                            weight,
                            subgroup,
                            f16_in_f32,
                            kv_f16: false,
                        });
                    }
                }
            }
            if kernel.uses_kv() {
                for f16_in_f32 in [false, true] {
                    keys.push(PipelineKey::kv(kernel, true, f16_in_f32));
                }
            }
        }
        keys
    }

    /// The `shaders/` file of this variant: float weights share the kernel's plain file,
    /// block-quantized formats read eight elements at a time in `<op>_quant.wgsl`.
    pub fn file(&self) -> String {
        if self.weight.is_some_and(DType::is_quantized) {
            format!("{}_quant.wgsl", self.kernel.stem())
        } else {
            format!("{}.wgsl", self.kernel.stem())
        }
    }

    /// The `#ifdef` names this variant sets.
    pub fn defines(&self) -> Vec<&'static str> {
        let mut d = Vec::new();
        match self.weight {
            Some(DType::F32) => d.push("W_F32"),
            Some(DType::F16) => d.push("W_F16"),
            Some(DType::BF16) => d.push("W_BF16"),
            Some(DType::Q8_0) => d.push("W_Q8_0"),
            Some(DType::Q4_0) => d.push("W_Q4_0"),
            Some(DType::Q4_1) => d.push("W_Q4_1"),
            Some(DType::Q4_K) => d.push("W_Q4_K"),
            Some(DType::Q5_K) => d.push("W_Q5_K"),
            Some(DType::Q6_K) => d.push("W_Q6_K"),
            None => {}
        }
        match self.kernel {
            Kernel::MatmulVecNorm => d.push("NORM"),
            Kernel::MatmulVecSilu => d.push("SILU"),
            Kernel::AttentionDecode => d.push("DECODE"),
            Kernel::AttentionSplit => d.push("SPLIT"),
            Kernel::AttentionDecodeSplit => d.extend(["DECODE", "SPLIT"]),
            _ => {}
        }
        if self.subgroup {
            d.push("SUBGROUP");
        }
        if self.f16_in_f32 {
            d.push("F16_IN_F32");
        }
        if self.kv_f16 {
            d.push("KV_F16");
        }
        d
    }

    /// The preprocessed WGSL of this variant.
    pub fn source(&self) -> Result<String, PreprocessError> {
        let file = self.file();
        let text = shader_file(&file)
            .ok_or_else(|| PreprocessError(format!("no shader file `{file}`")))?;
        preprocess(&file, text, &self.defines(), &shader_file)
    }

    /// A label for debuggers and error messages.
    pub fn label(&self) -> String {
        let mut s = self.kernel.stem().to_string();
        match self.kernel {
            Kernel::MatmulVecNorm => s.push_str("_norm"),
            Kernel::MatmulVecSilu => s.push_str("_silu"),
            Kernel::AttentionDecode => s.push_str("_decode"),
            Kernel::AttentionSplit => s.push_str("_split"),
            Kernel::AttentionDecodeSplit => s.push_str("_decode_split"),
            _ => {}
        }
        if let Some(w) = self.weight {
            s.push('_');
            s.push_str(&w.name().to_ascii_lowercase());
        }
        if self.subgroup {
            s.push_str("_subgroup");
        }
        if self.kv_f16 {
            s.push_str("_kvf16");
        }
        if self.f16_in_f32 {
            s.push_str("_unpack");
        }
        s
    }
}

/// A compiled pipeline with the layout of its group 0.
pub struct Pipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of group 0 (shared by every pipeline with the same bindings).
    pub group0: wgpu::BindGroupLayout,
}

/// Compiles pipelines on first use and keeps them.
pub struct Pipelines {
    group0_layouts: HashMap<&'static [Access], wgpu::BindGroupLayout>,
    /// Layout of group 1: one uniform slot with a dynamic offset.
    pub params_layout: wgpu::BindGroupLayout,
    cache: HashMap<PipelineKey, Pipeline>,
}

impl Pipelines {
    /// An empty cache for `device`.
    pub fn new(device: &wgpu::Device) -> Self {
        let params_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wick params"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        Pipelines {
            group0_layouts: HashMap::new(),
            params_layout,
            cache: HashMap::new(),
        }
    }

    /// The pipeline for `key`, compiling it the first time.
    pub fn get(&mut self, device: &wgpu::Device, key: PipelineKey) -> &Pipeline {
        if !self.cache.contains_key(&key) {
            let bindings = key.kernel.bindings();
            let group0 = self
                .group0_layouts
                .entry(bindings)
                .or_insert_with(|| {
                    let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
                        .iter()
                        .enumerate()
                        .map(|(i, a)| wgpu::BindGroupLayoutEntry {
                            binding: i as u32,
                            visibility: wgpu::ShaderStages::COMPUTE,
                            ty: wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage {
                                    read_only: *a == Read,
                                },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            count: None,
                        })
                        .collect();
                    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: None,
                        entries: &entries,
                    })
                })
                .clone();
            // The sources are checked by the unit tests; a failure here is a bug in a shader.
            let source = key
                .source()
                .unwrap_or_else(|e| panic!("shader {}: {e}", key.label()));
            let label = key.label();
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&label),
                bind_group_layouts: &[Some(&group0), Some(&self.params_layout)],
                immediate_size: 0,
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            self.cache.insert(key, Pipeline { pipeline, group0 });
        }
        &self.cache[&key]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validator with exactly the capabilities `key` may assume.
    fn validator(key: &PipelineKey) -> naga::valid::Validator {
        use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags};
        let subgroup = key.subgroup;
        let mut caps = Capabilities::empty();
        if subgroup {
            caps |= Capabilities::SUBGROUP;
        }
        if key.f16_in_f32 {
            caps |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        }
        let mut v = naga::valid::Validator::new(ValidationFlags::all(), caps);
        if subgroup {
            v.subgroup_stages(ShaderStages::COMPUTE)
                .subgroup_operations(
                    SubgroupOperationSet::BASIC | SubgroupOperationSet::ARITHMETIC,
                );
        }
        v
    }

    /// The preprocessed source of a variant, parsed and validated with only the capabilities
    /// the variant may assume; panics with the variant's label and naga's message.
    fn validated(key: &PipelineKey) -> (naga::Module, naga::valid::ModuleInfo) {
        let label = key.label();
        let src = key.source().unwrap_or_else(|e| panic!("{label}: {e}"));
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&src)));
        let info = validator(key)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&src)));
        (module, info)
    }

    /// Every variant preprocesses, parses and validates with only the capabilities it is
    /// allowed to use (so a plain variant needs neither subgroups nor f16 support), its
    /// uniform struct has the size of the Rust mirror, and its storage bindings are those
    /// the bind group layout declares.
    #[test]
    fn every_shader_variant_validates() {
        let keys = PipelineKey::all();
        assert!(keys.len() >= 20, "{} variants", keys.len());
        for key in keys {
            let label = key.label();
            let (module, _) = validated(&key);
            assert!(
                module.entry_points.iter().any(|e| e.name == "main"),
                "{label}: no entry point `main`"
            );
            // The uniform block's size equals the Rust struct's.
            let uniforms: Vec<_> = module
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == naga::AddressSpace::Uniform)
                .collect();
            assert_eq!(uniforms.len(), 1, "{label}: one uniform block");
            let ty = &module.types[uniforms[0].1.ty];
            let size = ty.inner.size(module.to_ctx()) as usize;
            assert_eq!(size, key.kernel.params_size(), "{label}: params size");
            // The storage bindings of group 0 match Kernel::bindings.
            let mut storage: Vec<(u32, Access)> = module
                .global_variables
                .iter()
                .filter_map(|(_, g)| match (g.space, &g.binding) {
                    (naga::AddressSpace::Storage { access }, Some(b)) if b.group == 0 => {
                        let a = if access.contains(naga::StorageAccess::STORE) {
                            ReadWrite
                        } else {
                            Read
                        };
                        Some((b.binding, a))
                    }
                    _ => None,
                })
                .collect();
            storage.sort_by_key(|(b, _)| *b);
            let want: Vec<(u32, Access)> = key
                .kernel
                .bindings()
                .iter()
                .enumerate()
                .map(|(i, a)| (i as u32, *a))
                .collect();
            assert_eq!(storage, want, "{label}: group 0 bindings");
        }
    }

    /// The MSL version the Metal writer targets: 2.3, which wgpu picks on macOS 11, the
    /// oldest macOS of the Apple-silicon Macs (their GPUs have the SIMD-group operations the
    /// subgroup variants use; wgpu picks a newer version on a newer macOS).
    const MSL_VERSION: (u8, u8) = (2, 3);

    /// The HLSL shader models a variant is written for: 6.0 (the least wgpu's DX12 back end
    /// accepts from DXC, and the first with wave operations) for every variant, and 5.1 (what
    /// it uses when it falls back to FXC, and then exposes no subgroups) for the variants
    /// without subgroup operations.
    fn hlsl_shader_models(key: &PipelineKey) -> &'static [naga::back::hlsl::ShaderModel] {
        use naga::back::hlsl::ShaderModel;
        if key.subgroup {
            &[ShaderModel::V6_0]
        } else {
            &[ShaderModel::V6_0, ShaderModel::V5_1]
        }
    }

    /// The module's MSL, with the resource slots wgpu-hal's Metal back end assigns for our
    /// pipeline layout: buffers numbered through the groups in order (group 0's storage
    /// buffers, then group 1's uniform slot), then the buffer of runtime-array sizes; and the
    /// checks wgpu asks for by default (bounds checks, loop bounding, zeroed workgroup memory).
    fn write_msl(
        key: &PipelineKey,
        module: &naga::Module,
        info: &naga::valid::ModuleInfo,
    ) -> Result<String, String> {
        use naga::back::msl;
        use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
        let bindings = key.kernel.bindings();
        let mut resources = msl::BindingMap::new();
        for (i, access) in bindings.iter().enumerate() {
            let target = msl::BindTarget {
                buffer: Some(i as msl::Slot),
                mutable: *access == ReadWrite,
                ..Default::default()
            };
            resources.insert(
                naga::ResourceBinding {
                    group: 0,
                    binding: i as u32,
                },
                target,
            );
        }
        let params = naga::ResourceBinding {
            group: 1,
            binding: 0,
        };
        let params_slot = bindings.len() as msl::Slot;
        resources.insert(
            params,
            msl::BindTarget {
                buffer: Some(params_slot),
                ..Default::default()
            },
        );
        let entry = msl::EntryPointResources {
            resources,
            immediates_buffer: None,
            sizes_buffer: Some(params_slot + 1),
        };
        let options = msl::Options {
            lang_version: MSL_VERSION,
            per_entry_point_map: msl::EntryPointResourceMap::from([("main".to_string(), entry)]),
            fake_missing_bindings: false,
            bounds_check_policies: BoundsCheckPolicies {
                index: BoundsCheckPolicy::Restrict,
                buffer: BoundsCheckPolicy::Restrict,
                image_load: BoundsCheckPolicy::Restrict,
                binding_array: BoundsCheckPolicy::Unchecked,
            },
            zero_initialize_workgroup_memory: true,
            force_loop_bounding: true,
            emit_int_div_checks: true,
            ..Default::default()
        };
        let pipeline = msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
            vertex_pulling_transform: true,
            ..Default::default()
        };
        let (text, translation) =
            msl::write_string(module, info, &options, &pipeline).map_err(|e| format!("{e:?}"))?;
        // A missing binding fails the entry point, not the writer: wgpu-hal checks both.
        match translation.entry_point_names.as_slice() {
            [Ok(_)] => Ok(text),
            other => Err(format!("entry points {other:?}")),
        }
    }

    /// The module's HLSL for `shader_model`, with the registers wgpu-hal's DX12 back end
    /// assigns for our pipeline layout (all in space 0): read-only storage buffers as SRVs
    /// t0.., read-write ones as UAVs u0.., the dynamic-offset uniform slot as the root CBV
    /// b0, and b1 for the constants that carry `num_workgroups` (wgpu-core asks for them in
    /// every pipeline layout); and the checks wgpu asks for by default.
    fn write_hlsl(
        key: &PipelineKey,
        module: &naga::Module,
        info: &naga::valid::ModuleInfo,
        shader_model: naga::back::hlsl::ShaderModel,
    ) -> Result<String, String> {
        use naga::back::hlsl;
        let mut binding_map = hlsl::BindingMap::new();
        let (mut srv, mut uav) = (0, 0);
        for (i, access) in key.kernel.bindings().iter().enumerate() {
            let counter = match access {
                Read => &mut srv,
                ReadWrite => &mut uav,
            };
            let target = hlsl::BindTarget {
                register: *counter,
                ..Default::default()
            };
            *counter += 1;
            binding_map.insert(
                naga::ResourceBinding {
                    group: 0,
                    binding: i as u32,
                },
                target,
            );
        }
        binding_map.insert(
            naga::ResourceBinding {
                group: 1,
                binding: 0,
            },
            hlsl::BindTarget {
                register: 0,
                restrict_indexing: true,
                ..Default::default()
            },
        );
        let options = hlsl::Options {
            shader_model,
            binding_map,
            fake_missing_bindings: false,
            special_constants_binding: Some(hlsl::BindTarget {
                register: 1,
                ..Default::default()
            }),
            zero_initialize_workgroup_memory: true,
            restrict_indexing: true,
            force_loop_bounding: true,
            ..Default::default()
        };
        let pipeline = hlsl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
        };
        let mut text = String::new();
        let reflection = hlsl::Writer::new(&mut text, &options, &pipeline)
            .write(module, info, None)
            .map_err(|e| format!("{e:?}"))?;
        match reflection.entry_point_names.as_slice() {
            [Ok(_)] => Ok(text),
            other => Err(format!("entry points {other:?}")),
        }
    }

    /// Every variant also translates, as wgpu would translate it, to the Metal Shading
    /// Language (Metal on macOS and iOS) and to HLSL (DX12 on Windows), so a shader that
    /// naga cannot write for Metal or DX12 fails here rather than when a Mac or a Windows
    /// machine first builds its pipeline. Translation only: the Metal and DXC compilers that
    /// would compile the output do not run on Linux.
    #[test]
    fn every_shader_variant_translates_to_msl_and_hlsl() {
        let (mut msl_count, mut hlsl_count) = (0, 0);
        for key in PipelineKey::all() {
            let label = key.label();
            let (module, info) = validated(&key);
            // wgpu resolves pipeline-overridable constants first (we set none).
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, "main")),
                &Default::default(),
            )
            .unwrap_or_else(|e| panic!("{label}: overrides: {e}"));
            let msl = write_msl(&key, &module, &info)
                .unwrap_or_else(|e| panic!("{label}: MSL {MSL_VERSION:?}: {e}"));
            assert!(msl.contains("kernel void"), "{label}: MSL without a kernel");
            msl_count += 1;
            for &model in hlsl_shader_models(&key) {
                let hlsl = write_hlsl(&key, &module, &info, model)
                    .unwrap_or_else(|e| panic!("{label}: HLSL {model:?}: {e}"));
                assert!(
                    hlsl.contains("[numthreads("),
                    "{label}: HLSL without numthreads"
                );
                hlsl_count += 1;
            }
        }
        eprintln!(
            "{msl_count} variants to MSL, {hlsl_count} (variant, shader model) pairs to HLSL"
        );
    }
}
