//! The one table between GGUF tensor names and Hugging Face tensor names.
//!
//! The model looks weights up by their Hugging Face names (`model.layers.3.mlp.up_proj.weight`);
//! GGUF files use llama.cpp's shorter names (`blk.3.ffn_up.weight`). Qwen3 and Llama share
//! the same set, so one table serves both. Every GGUF name a supported file may hold is here;
//! anything else is refused by the loader rather than silently dropped, because an
//! unrecognised tensor usually means a model feature wick does not implement.
//!
//! ```
//! use wick::loader::names::{gguf_to_hf, hf_to_gguf};
//! assert_eq!(gguf_to_hf("blk.7.attn_q.weight").as_deref(), Some("model.layers.7.self_attn.q_proj.weight"));
//! assert_eq!(hf_to_gguf("model.norm.weight").as_deref(), Some("output_norm.weight"));
//! assert_eq!(gguf_to_hf("blk.0.attn_qkv.weight"), None);
//! ```

/// Tensors outside the transformer blocks: (GGUF name, Hugging Face name).
pub const GLOBAL: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Tensors of block `i`, without the `blk.{i}.` / `model.layers.{i}.` prefix and without the
/// `.weight` / `.bias` suffix: (GGUF stem, Hugging Face stem).
pub const PER_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// GGUF tensors that some files of these architectures carry and wick cannot honour, with the
/// reason given to the user. Refusing beats ignoring: each changes the model's output.
pub const UNSUPPORTED: &[(&str, &str)] = &[(
    "rope_freqs.weight",
    "per-dimension RoPE frequency factors (Llama 3.1-style RoPE scaling) are not implemented",
)];

const SUFFIXES: &[&str] = &["weight", "bias"];

/// The Hugging Face name of GGUF tensor `name`, or `None` if the table does not know it.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = parse_layer(layer)?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if !SUFFIXES.contains(&suffix) {
        return None;
    }
    let (_, hf) = PER_LAYER.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The GGUF name of Hugging Face tensor `name`, or `None` if the table does not know it.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL.iter().find(|(_, h)| *h == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = parse_layer(layer)?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if !SUFFIXES.contains(&suffix) {
        return None;
    }
    let (g, _) = PER_LAYER.iter().find(|(_, h)| *h == stem)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The Hugging Face name of a tensor of a checkpoint saved from the bare model
/// (`Qwen3Model`, as Qwen3-Embedding is published: `layers.0.mlp.up_proj.weight`,
/// `embed_tokens.weight`, `norm.weight`): the same name under `model.`. Other names are
/// returned as they are.
///
/// ```
/// use wick::loader::names::with_model_prefix;
/// assert_eq!(with_model_prefix("layers.2.self_attn.q_proj.weight"), "model.layers.2.self_attn.q_proj.weight");
/// assert_eq!(with_model_prefix("model.norm.weight"), "model.norm.weight");
/// assert_eq!(with_model_prefix("lm_head.weight"), "lm_head.weight");
/// ```
pub fn with_model_prefix(name: &str) -> String {
    let bare = ["embed_tokens.", "layers.", "norm."];
    if bare.iter().any(|p| name.starts_with(p)) {
        format!("model.{name}")
    } else {
        name.to_string()
    }
}

/// The block index of a per-layer tensor name in either convention (`blk.3.…`,
/// `model.layers.3.…`), or `None` for tensors outside the blocks.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    parse_layer(rest.split_once('.')?.0)
}

/// Why GGUF tensor `name` is refused, if it is one of the known [`UNSUPPORTED`] extras.
pub fn unsupported_reason(name: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(g, _)| *g == name)
        .map(|(_, why)| *why)
}

/// A layer index in canonical decimal: digits only, no sign, no leading zero. Keeping the
/// mapping one-to-one means `blk.01` and `blk.1` cannot both become layer 1.
fn parse_layer(s: &str) -> Option<usize> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_maps_both_ways() {
        for (g, h) in GLOBAL {
            assert_eq!(gguf_to_hf(g).as_deref(), Some(*h));
            assert_eq!(hf_to_gguf(h).as_deref(), Some(*g));
        }
        for (g, h) in PER_LAYER {
            for layer in [0, 9, 27] {
                let gn = format!("blk.{layer}.{g}.weight");
                let hn = format!("model.layers.{layer}.{h}.weight");
                assert_eq!(gguf_to_hf(&gn).as_deref(), Some(hn.as_str()));
                assert_eq!(hf_to_gguf(&hn).as_deref(), Some(gn.as_str()));
                assert_eq!(layer_index(&gn), Some(layer));
                assert_eq!(layer_index(&hn), Some(layer));
            }
        }
    }

    #[test]
    fn refuses_names_outside_the_table() {
        for bad in [
            "blk.0.attn_qkv.weight",
            "blk.01.attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk..attn_q.weight",
            "blk.0.attn_q.scale",
            "blk.0.attn_q",
            "blk.0",
            "token_embd.bias",
            "rope_freqs.weight",
            "",
        ] {
            assert_eq!(gguf_to_hf(bad), None, "{bad}");
        }
        assert_eq!(hf_to_gguf("model.layers.x.mlp.up_proj.weight"), None);
        assert!(unsupported_reason("rope_freqs.weight").is_some());
    }

    #[test]
    fn biases_map_like_weights() {
        assert_eq!(
            gguf_to_hf("blk.2.attn_v.bias").as_deref(),
            Some("model.layers.2.self_attn.v_proj.bias")
        );
    }
}
