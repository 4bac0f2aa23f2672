//! Text in and out of the model: everything between a request's strings and token ids.
//!
//! - [`tokenizer`]: Hugging Face tokenizers (no C dependencies) and streaming UTF-8-safe
//!   decoding.
//! - [`chat_template`]: the model's Jinja chat template (minijinja, Python-compatible), with
//!   added-token strings in messages encoded as text.
//! - [`reply`]: one reply's per-token pipeline: stop ids → detokenizer → [`stops`] →
//!   [`reasoning`] split, with the reply's text.
//! - [`stops`]: stop strings in a streamed reply.
//! - [`reasoning`]: `<think>…</think>` split from the answer, streaming.
//! - [`tool_calls`]: Qwen3's `<tool_call>` blocks parsed out of a streamed answer.
//!
//! The three streaming parsers hold text back until the next tokens decide it (a stop
//! string, a `<think>` tag, a `<tool_call>` tag split across tokens); they share
//! [`partial_tag_suffix`].
//!
//! ```
//! use wick::text::partial_tag_suffix;
//!
//! assert_eq!(partial_tag_suffix("answer <thi", "<think>"), 4);
//! assert_eq!(partial_tag_suffix("answer", "<think>"), 0);
//! ```

pub mod chat_template;
pub mod reasoning;
pub mod reply;
pub mod stops;
pub mod tokenizer;
pub mod tool_calls;

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `tag`: text
/// that could be the start of `tag`, completed by what comes next. Only suffixes starting
/// at a char boundary count (a tag starts with a whole character).
pub fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && tag.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_tag_suffix_counts_only_proper_prefixes_at_char_boundaries() {
        assert_eq!(partial_tag_suffix("a <", "<think>"), 1);
        assert_eq!(partial_tag_suffix("a <think", "<think>"), 6);
        // The whole tag is not a partial one.
        assert_eq!(partial_tag_suffix("a <think>", "<think>"), 0);
        assert_eq!(partial_tag_suffix("", "<think>"), 0);
        // "é" and "ã" share their first byte: no suffix starts mid-character.
        assert_eq!(partial_tag_suffix("xã", "é!"), 0);
        assert_eq!(partial_tag_suffix("xé", "é!"), "é".len());
    }
}
