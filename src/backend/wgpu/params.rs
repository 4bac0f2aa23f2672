//! The uniform parameter block of each kernel, mirrored field for field from its `.wgsl`.
//!
//! Every dispatch gets its own copy in a slot of a uniform buffer (bound with a dynamic
//! offset), so a step can record all its dispatches before anything is uploaded. The structs
//! are padded to 16 bytes; the size of each is asserted here and checked against the size
//! naga computes for the WGSL struct in the shader validation test.

use bytemuck::{Pod, Zeroable};

/// `shaders/embed.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct EmbedParams {
    /// T.
    pub num_tokens: u32,
    /// C.
    pub cols: u32,
    /// Row stride of the table segment, in elements.
    pub ks: u32,
    /// First token id held by the segment.
    pub row0: u32,
    /// Token ids held by the segment.
    pub seg_rows: u32,
    /// Offset of `token_ids[T]` in the batch words.
    pub tokens_off: u32,
    /// Padding.
    pub _pad: [u32; 2],
}

/// `shaders/rms_norm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RmsNormParams {
    /// Rows to normalise.
    pub rows: u32,
    /// C.
    pub cols: u32,
    /// Epsilon.
    pub eps: f32,
    /// Padding.
    pub _pad: u32,
}

/// `shaders/matmul_vec*.wgsl` and `shaders/matmul_mat*.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MatmulParams {
    /// T.
    pub num_tokens: u32,
    /// K.
    pub k: u32,
    /// N: row stride of the output (all rows of the stacked weight).
    pub n: u32,
    /// Row stride of the weight segment, in elements.
    pub ks: u32,
    /// Rows of W in the segment.
    pub seg_rows: u32,
    /// Output column of the segment's first row.
    pub col0: u32,
    /// 1 to add into the output, 0 to overwrite it.
    pub accumulate: u32,
    /// RMSNorm epsilon of the `NORM` variant (else unused).
    pub eps: f32,
}

/// `shaders/qk_norm_rope.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct QkNormRopeParams {
    /// T.
    pub num_tokens: u32,
    /// H.
    pub num_heads: u32,
    /// Hkv.
    pub num_kv_heads: u32,
    /// D.
    pub head_dim: u32,
    /// (H+2Hkv)·D.
    pub qkv_width: u32,
    /// Epsilon of the q/k norms.
    pub eps: f32,
    /// 1 when the q norm weight is bound.
    pub has_q_norm: u32,
    /// 1 when the k norm weight is bound.
    pub has_k_norm: u32,
    /// Offset of `positions[T]` in the batch words.
    pub positions_off: u32,
    /// Padding.
    pub _pad: [u32; 3],
}

/// `shaders/kv_write.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct KvWriteParams {
    /// T.
    pub num_tokens: u32,
    /// H·D.
    pub q_dim: u32,
    /// Hkv·D.
    pub kv_dim: u32,
    /// (H+2Hkv)·D.
    pub qkv_width: u32,
    /// Offset of `slot_mapping[T]` in the batch words.
    pub slots_off: u32,
    /// Padding.
    pub _pad: [u32; 3],
}

/// `shaders/attention.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionParams {
    /// T.
    pub num_tokens: u32,
    /// H.
    pub num_heads: u32,
    /// Hkv.
    pub num_kv_heads: u32,
    /// D.
    pub head_dim: u32,
    /// (H+2Hkv)·D.
    pub qkv_width: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Offset of `positions[T]` in the batch words.
    pub positions_off: u32,
    /// Offset of `row_seq[T]` in the batch words.
    pub row_seq_off: u32,
    /// Offset of `block_tables[S, stride]` in the batch words.
    pub block_tables_off: u32,
    /// Entries per sequence in the block tables.
    pub block_table_stride: u32,
    /// 1/sqrt(D).
    pub scale: f32,
    /// Padding.
    pub _pad: u32,
}

/// `shaders/attention.wgsl` with `DECODE`: [`AttentionParams`] and what the folded q/k
/// norm, RoPE and KV write need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionDecodeParams {
    /// T.
    pub num_tokens: u32,
    /// H.
    pub num_heads: u32,
    /// Hkv.
    pub num_kv_heads: u32,
    /// D.
    pub head_dim: u32,
    /// (H+2Hkv)·D.
    pub qkv_width: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Offset of `positions[T]` in the batch words.
    pub positions_off: u32,
    /// Offset of `row_seq[T]` in the batch words.
    pub row_seq_off: u32,
    /// Offset of `block_tables[S, stride]` in the batch words.
    pub block_tables_off: u32,
    /// Entries per sequence in the block tables.
    pub block_table_stride: u32,
    /// 1/sqrt(D).
    pub scale: f32,
    /// Epsilon of the q/k norms.
    pub eps: f32,
    /// 1 when the q norm weight is bound.
    pub has_q_norm: u32,
    /// 1 when the k norm weight is bound.
    pub has_k_norm: u32,
    /// Offset of `slot_mapping[T]` in the batch words.
    pub slots_off: u32,
    /// Padding.
    pub _pad: u32,
}

/// `shaders/attention.wgsl` with `SPLIT`: [`AttentionParams`] and how the context is split.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionSplitParams {
    /// T.
    pub num_tokens: u32,
    /// H.
    pub num_heads: u32,
    /// Hkv.
    pub num_kv_heads: u32,
    /// D.
    pub head_dim: u32,
    /// (H+2Hkv)·D.
    pub qkv_width: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Offset of `positions[T]` in the batch words.
    pub positions_off: u32,
    /// Offset of `row_seq[T]` in the batch words.
    pub row_seq_off: u32,
    /// Offset of `block_tables[S, stride]` in the batch words.
    pub block_tables_off: u32,
    /// Entries per sequence in the block tables.
    pub block_table_stride: u32,
    /// 1/sqrt(D).
    pub scale: f32,
    /// Context positions per split.
    pub split_span: u32,
    /// Splits per (token, head).
    pub num_splits: u32,
    /// Padding.
    pub _pad: [u32; 3],
}

/// `shaders/attention.wgsl` with `DECODE` and `SPLIT`: [`AttentionDecodeParams`] and how
/// the context is split.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionDecodeSplitParams {
    /// The folded decode kernel's parameters (its padding word is unused).
    pub decode: AttentionDecodeParams,
    /// Context positions per split.
    pub split_span: u32,
    /// Splits per (token, head).
    pub num_splits: u32,
    /// Padding.
    pub _pad: [u32; 2],
}

/// `shaders/attention_reduce.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionReduceParams {
    /// T.
    pub num_tokens: u32,
    /// H.
    pub num_heads: u32,
    /// D.
    pub head_dim: u32,
    /// Splits per (token, head).
    pub num_splits: u32,
}

/// `shaders/silu_mul.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SiluMulParams {
    /// Rows to compute.
    pub rows: u32,
    /// F.
    pub ffn: u32,
    /// Padding.
    pub _pad: [u32; 2],
}

/// `shaders/gather_rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GatherRowsParams {
    /// R.
    pub num_rows: u32,
    /// C.
    pub cols: u32,
    /// Offset of `logits_rows[R]` in the batch words.
    pub logits_rows_off: u32,
    /// Padding.
    pub _pad: u32,
}

/// `shaders/sample.wgsl` (the per-row choices are a storage array of
/// [`RowSampling`](crate::backend::RowSampling)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SampleParams {
    /// R.
    pub num_rows: u32,
    /// V: the row stride of the logits.
    pub vocab: u32,
    /// Padding.
    pub _pad: [u32; 2],
}

const _: () = {
    assert!(size_of::<EmbedParams>() == 32);
    assert!(size_of::<RmsNormParams>() == 16);
    assert!(size_of::<MatmulParams>() == 32);
    assert!(size_of::<QkNormRopeParams>() == 48);
    assert!(size_of::<KvWriteParams>() == 32);
    assert!(size_of::<AttentionParams>() == 48);
    assert!(size_of::<AttentionDecodeParams>() == 64);
    assert!(size_of::<SiluMulParams>() == 16);
    assert!(size_of::<GatherRowsParams>() == 16);
    assert!(size_of::<SampleParams>() == 16);
    assert!(size_of::<AttentionSplitParams>() == 64);
    assert!(size_of::<AttentionReduceParams>() == 16);
    assert!(size_of::<AttentionDecodeSplitParams>() == 80);
};
