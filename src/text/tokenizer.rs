//! Text ⇄ token ids, and incremental decoding for streaming.
//!
//! [`Tokenizer`] wraps the Hugging Face `tokenizers` implementation, so a `tokenizer.json`
//! gives exactly the ids transformers would (Qwen3 uses byte-level BPE and adds no BOS).
//! [`StreamDecoder`] turns a stream of generated ids into text pieces that never split a
//! UTF-8 character, and whose concatenation equals [`Tokenizer::decode`] of all the ids.
//!
//! ```no_run
//! use std::sync::Arc;
//! use wick::text::tokenizer::Tokenizer;
//!
//! # fn main() -> wick::Result<()> {
//! let tokenizer = Arc::new(Tokenizer::from_file("tokenizer.json")?);
//! let ids = tokenizer.encode("Hello world", false)?;
//! assert_eq!(tokenizer.decode(&ids, false)?, "Hello world");
//!
//! let mut stream = tokenizer.stream_decoder(false);
//! let mut text = String::new();
//! for &id in &ids {
//!     text += &stream.push(id)?;
//! }
//! text += &stream.finish()?;
//! assert_eq!(text, "Hello world");
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A text tokenizer: encoding, decoding and vocabulary look-ups.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids of added tokens flagged `special` (`<|im_end|>`, ...), cached because the
    /// library rebuilds its added-token map on every query.
    special_ids: HashSet<u32>,
    /// Every added-token string (`<|im_start|>`, `<think>`, ...), longest first: what
    /// [`Tokenizer::mark_literals`] keeps from becoming control tokens.
    added: Vec<String>,
}

/// Words the BPE model keeps the merges of. `tokenizers` keeps 10,000 by default and never
/// evicts: a server meeting new words (names, numbers, a small model's odd output) fills it
/// over its first thousands of requests, at up to a kilobyte a word, which reads as a leak
/// in a long run's resident memory. A cached word saves its merges, microseconds; 2,048 keeps
/// the common words of a conversation for a couple of megabytes at most.
pub const WORD_CACHE_WORDS: usize = 2048;

/// First placeholder code point (Supplementary Private Use Area-A); placeholder `i` stands
/// for added-token string `i`.
const PLACEHOLDER_BASE: u32 = 0xF0000;

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_ids.len())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::json(path, e))?;
        Ok(Self::from_inner(inner))
    }

    /// Wraps an already built `tokenizers` tokenizer (e.g. one assembled from GGUF metadata).
    ///
    /// Truncation and padding are switched off: a runtime must see every prompt token. The
    /// BPE word cache is bounded to [`WORD_CACHE_WORDS`] words.
    pub fn from_inner(mut inner: tokenizers::Tokenizer) -> Self {
        inner.with_padding(None);
        let mut model = inner.get_model().clone();
        model.resize_cache(WORD_CACHE_WORDS);
        inner.with_model(model);
        // Disabling truncation cannot fail (only enabling it validates parameters).
        let _ = inner.with_truncation(None);
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let mut added: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|c| !c.is_empty())
            .collect();
        added.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        added.dedup();
        added.truncate(0xFFFD);
        Self {
            inner,
            special_ids,
            added,
        }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text` to ids. Special-token strings in the text (`<|im_start|>`) become their
    /// ids. `add_special_tokens` runs the post-processor (BOS/EOS templates); Qwen3's adds
    /// nothing, and chat prompts are encoded with `false`, as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `text` (untrusted: a message, a tool result, a tool definition) with every added-token
    /// string replaced by a placeholder, so that after the chat template has put it into a
    /// prompt, [`Tokenizer::encode_marked`] encodes it as the characters it is and never as
    /// the control token (a user could otherwise write `<|im_end|><|im_start|>system` and
    /// forge a turn). `keep` names strings left alone. `None` when there is nothing to
    /// replace.
    pub fn mark_literals(&self, text: &str, keep: &[&str]) -> Option<String> {
        let mut next = Some(self.first_added(text, keep)?);
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some((p, i)) = next {
            out.push_str(&rest[..p]);
            out.push(char::from_u32(PLACEHOLDER_BASE + i as u32).unwrap_or('\u{FFFD}'));
            rest = &rest[p + self.added[i].len()..];
            next = self.first_added(rest, keep);
        }
        out.push_str(rest);
        Some(out)
    }

    /// The earliest added-token string in `text` not in `keep`, as (byte position, index
    /// in `added`); at one position the longest string (listed first).
    fn first_added(&self, text: &str, keep: &[&str]) -> Option<(usize, usize)> {
        self.added
            .iter()
            .enumerate()
            .filter(|(_, a)| !keep.contains(&a.as_str()))
            .filter_map(|(i, a)| text.find(a.as_str()).map(|p| (p, i)))
            .min()
    }

    /// Encodes a rendered chat prompt in which [`Tokenizer::mark_literals`] placed
    /// placeholders: the text between them as [`Tokenizer::encode`] does (the template's
    /// markers become their ids), each placeholder as the characters of its string.
    pub fn encode_marked(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut start = 0;
        for (at, c) in text.char_indices() {
            let Some(i) = (c as u32).checked_sub(PLACEHOLDER_BASE) else {
                continue;
            };
            let Some(literal) = self.added.get(i as usize) else {
                continue;
            };
            ids.extend(self.encode(&text[start..at], false)?);
            ids.extend(self.encode_as_text(literal)?);
            start = at + c.len_utf8();
        }
        ids.extend(self.encode(&text[start..], false)?);
        Ok(ids)
    }

    /// Encodes `text` with no added token matched: each occurrence of one is cut after its
    /// first character, and the pieces are encoded one by one.
    fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let cut = match self.first_added(rest, &[]).map(|(p, _)| p) {
                // Past the first character of the earliest occurrence.
                Some(p) => p + rest[p..].chars().next().map_or(1, char::len_utf8),
                None => rest.len(),
            };
            ids.extend(self.encode(&rest[..cut], false)?);
            rest = &rest[cut..];
        }
        Ok(ids)
    }

    /// Decodes ids to text. Ids outside the vocabulary decode to nothing, as in Hugging Face
    /// `tokenizers` (a model's embedding table is often larger than its vocabulary).
    /// Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of a token string (`"<|im_end|>"`, or a vocabulary entry in byte-level form).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, in the vocabulary's own form (`"Ġworld"` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included (151 669 for Qwen3, whose embedding table
    /// has 151 936 rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is an added token flagged special (control tokens such as `<|im_end|>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Starts incremental decoding of a generated sequence.
    ///
    /// Takes the tokenizer through an `Arc` so the decoder can live in a request's state
    /// next to the engine's own handle on the tokenizer.
    pub fn stream_decoder(self: &Arc<Self>, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(Arc::clone(self), skip_special_tokens)
    }
}

/// Incremental detokenizer: feed ids one at a time, get back the text they complete.
///
/// Byte-level BPE tokens can end in the middle of a multi-byte character, and some
/// decoders change a token's text depending on what precedes it, so decoding ids one by one
/// and concatenating is wrong. Instead the decoder keeps a short window of ids: `prefix`
/// (already emitted, kept as context) and the ids not yet emitted. Each push decodes the
/// window with and without the new ids and emits the difference, unless the result ends in
/// U+FFFD — an incomplete character, held back until later ids complete it.
#[derive(Debug)]
pub struct StreamDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// Window of ids: `ids[..read_offset]` is emitted text kept as context,
    /// `ids[read_offset..]` is not emitted yet.
    ids: Vec<u32>,
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder for a fresh sequence.
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            read_offset: 0,
        }
    }

    /// Adds one generated id and returns the text it completes (often empty).
    /// The returned text never contains a partial UTF-8 character.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.decode_window()?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(delta) = new_text.strip_prefix(prefix_text.as_str()) else {
            // The context changed how earlier ids decode; wait and let `finish` settle it.
            return Ok(String::new());
        };
        let delta = delta.to_string();
        // The ids just emitted become the context for the next window.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Flushes whatever is held back (an incomplete character at the end of generation is
    /// emitted as U+FFFD, as [`Tokenizer::decode`] would) and resets the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let (prefix_text, new_text) = self.decode_window()?;
        let delta = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(delta) => delta.to_string(),
            // Only reachable with decoders whose output for earlier ids depends on later
            // ones; emitting the text past the common prefix is the best that can be done.
            None => {
                let common = common_prefix_len(&prefix_text, &new_text);
                new_text[common..].to_string()
            }
        };
        self.ids.clear();
        self.read_offset = 0;
        Ok(delta)
    }

    /// Decodes `(context, context + pending)`.
    fn decode_window(&self) -> Result<(String, String)> {
        let skip = self.skip_special_tokens;
        let prefix_text = self.tokenizer.decode(&self.ids[..self.read_offset], skip)?;
        let new_text = self.tokenizer.decode(&self.ids, skip)?;
        Ok((prefix_text, new_text))
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Arc<Tokenizer> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/qwen3-tiny/tokenizer.json"
        );
        assert!(
            Path::new(path).exists(),
            "fixture missing: {path} (the shared fixtures must be checked out next to the crate)"
        );
        Arc::new(Tokenizer::from_file(path).expect("load tokenizer.json"))
    }

    #[test]
    fn qwen3_vocabulary_and_special_tokens() {
        let tok = tiny();
        assert_eq!(tok.vocab_size(), 151_669);
        let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|> in vocab");
        assert_eq!(im_end, 151_645);
        assert!(tok.is_special(im_end));
        assert_eq!(tok.id_to_token(im_end).as_deref(), Some("<|im_end|>"));
        // `<think>` is an added token but not a special one: it must survive
        // `skip_special_tokens` so reasoning can be parsed from decoded text.
        let think = tok.token_to_id("<think>").expect("<think> in vocab");
        assert!(!tok.is_special(think));
        assert!(!tok.is_special(9707));
    }

    #[test]
    fn skip_special_tokens_drops_control_tokens_only() {
        let tok = tiny();
        let ids = tok
            .encode("<|im_start|>user\nhi<|im_end|>\n<think>", false)
            .unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi\n<think>");
    }

    #[test]
    fn out_of_vocab_ids_decode_to_nothing() {
        let tok = tiny();
        assert_eq!(
            tok.decode(&[9707, 151_900, 1879], false).unwrap(),
            "Hello world"
        );
        let mut stream = tok.stream_decoder(false);
        let mut text = String::new();
        for id in [9707, 151_900, 1879] {
            text += &stream.push(id).unwrap();
        }
        text += &stream.finish().unwrap();
        assert_eq!(text, "Hello world");
    }

    #[test]
    fn stream_holds_back_split_characters() {
        let tok = tiny();
        // "𓀀" (U+13000) has no token of its own: its four bytes span several tokens.
        let ids = tok.encode("𓀀", false).unwrap();
        assert!(ids.len() > 1, "expected a split emoji, got {ids:?}");
        let mut stream = tok.stream_decoder(false);
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(stream.push(id).unwrap(), "");
        }
        assert_eq!(stream.push(ids[ids.len() - 1]).unwrap(), "𓀀");
        assert_eq!(stream.finish().unwrap(), "");
    }

    #[test]
    fn stream_flushes_incomplete_character_at_finish() {
        let tok = tiny();
        let ids = tok.encode("a𓀀", false).unwrap();
        let truncated = &ids[..ids.len() - 1];
        let mut stream = tok.stream_decoder(false);
        let mut text = String::new();
        for &id in truncated {
            text += &stream.push(id).unwrap();
        }
        assert_eq!(text, "a");
        text += &stream.finish().unwrap();
        assert_eq!(text, tok.decode(truncated, false).unwrap());
        assert!(text.ends_with('\u{FFFD}'));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn malformed_file_is_a_json_error() {
        let dir = std::env::temp_dir().join(format!("wick-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, b"{\"model\": 3}").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(err, Error::Json { .. }), "{err}");
    }
}
