//! A [`Tokenizer`] built from a GGUF file's `tokenizer.ggml.*` metadata, so that a single
//! `.gguf` file is enough to chat: no `tokenizer.json` needed.
//!
//! llama.cpp tokenizes a `gpt2`-type (byte-level BPE) vocabulary in three steps, and each maps
//! onto a piece of the `tokenizers` library:
//!
//! 1. Special tokens are cut out of the text first: control, user-defined and unknown tokens
//!    (with special parsing on, as for chat prompts). Here they are *added tokens*, control
//!    and unknown ones flagged `special` (dropped by `skip_special_tokens`), user-defined ones
//!    (Qwen3's `<think>`, `<tool_call>`) not. The flags follow the file, so they can differ
//!    from the model's `tokenizer.json`: llama.cpp's converter marks every `<|...|>` token
//!    control, Qwen3's FIM tokens included.
//! 2. The remaining text is split into words by a list of regexes applied in turn: each regex
//!    splits every piece the previous one produced, and text it does not match stays a piece
//!    of its own. The list is chosen by the pre-tokenizer name `tokenizer.ggml.pre` (the table
//!    in llama.cpp's `llama-vocab.cpp`). Here: a `Sequence` of `Split(regex, Isolated)`.
//! 3. Each word's bytes are mapped to GPT-2's printable byte alphabet (`ByteLevel`, without
//!    its own regex) and merged by BPE, the earlier a merge in `tokenizer.ggml.merges` the
//!    higher its priority.
//!
//! Pre-tokenizers this module knows ([`SUPPORTED_PRE_TOKENIZERS`]); any other name is refused
//! rather than guessed, since a wrong split gives plausible but wrong ids:
//!
//! | `tokenizer.ggml.pre` | regexes, in order | notes |
//! |---|---|---|
//! | `qwen2`, `deepseek-r1-qwen` | Qwen2's: contractions, letters with one optional leading non-letter, **single** digits, punctuation runs with trailing newlines, newline runs, whitespace | Qwen2/2.5/3 |
//! | `smollm` | `\p{N}` (every digit alone), then GPT-2's | SmolLM/SmolLM2; GPT-2's regex alone would keep `" 123"` as one word |
//! | `gpt-2` | GPT-2's: contractions, ` ?letters`, ` ?digits`, ` ?punctuation`, whitespace | |
//! | `llama-bpe` | Qwen2's with digits in runs of up to three | Llama 3; a word that is a vocabulary entry is taken whole, before merges; BOS added by default |
//!
//! Contractions are matched case-insensitively for ASCII only (`'S`, `'Ll`), as llama.cpp does.
//!
//! BOS/EOS follow `tokenizer.ggml.add_bos_token` / `add_eos_token` through a
//! `TemplateProcessing` post-processor, so they are added only when
//! [`Tokenizer::encode`] is asked to add special tokens. Qwen3 and SmolLM2 files add neither.
//!
//! Tokens of type *unused* (Qwen3's `[PAD151669]`…, which pad the vocabulary to the embedding
//! table's size) are left out, so they decode to nothing, as in llama.cpp, and the vocabulary
//! size equals the one of the model's `tokenizer.json`. Decoding does not apply llama.cpp's
//! optional `clean_spaces` rule (dropping spaces before punctuation); neither do Hugging Face
//! `tokenizers`.
//!
//! ```no_run
//! use wick::loader::gguf::GgufFile;
//! use wick::loader::gguf_tokenizer::tokenizer_from_gguf;
//!
//! let file = GgufFile::open("qwen3-0.6b-q4_k_m.gguf")?;
//! let tokenizer = tokenizer_from_gguf(&file)?;
//! let ids = tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n", false)?;
//! assert_eq!(tokenizer.decode(&ids, false)?, "<|im_start|>user\nHello<|im_end|>\n");
//! # Ok::<(), wick::Error>(())
//! ```

use std::fmt;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;
use crate::text::tokenizer::Tokenizer;

/// The `tokenizer.ggml.pre` names [`build_tokenizer`] accepts.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] =
    &["qwen2", "deepseek-r1-qwen", "smollm", "gpt-2", "llama-bpe"];

/// GPT-2's word split: the English contractions, then runs of letters, of digits or of
/// other non-space characters, each with at most one leading space, then whitespace. A
/// whitespace run followed by a word leaves its last space to that word (`\s+(?!\S)`
/// backtracks by one). The final `\s+` only matches a lone whitespace character before a
/// word, which llama.cpp's version (without it) keeps as an unmatched piece: same split.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Qwen2's split (tiktoken's cl100k style): contractions in either case; letters with at
/// most one leading character that is not a letter, digit or newline (so `"_foo"` and
/// `" foo"` are one word); single digits; punctuation runs with one optional leading space
/// and trailing newlines; newline runs with the whitespace before them; other whitespace.
const QWEN2_REGEX: &str = r"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split: Qwen2's, except that digits go in runs of up to three.
const LLAMA3_REGEX: &str = r"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every digit on its own (SmolLM's first stage).
const SINGLE_DIGIT_REGEX: &str = r"\p{N}";

/// How one pre-tokenizer family splits text and what it implies for BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizer {
    Qwen2,
    SmolLm,
    Gpt2,
    Llama3,
}

impl PreTokenizer {
    /// The family of a `tokenizer.ggml.pre` name, `None` if unknown.
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            "smollm" => Self::SmolLm,
            "gpt-2" => Self::Gpt2,
            "llama-bpe" => Self::Llama3,
            _ => return None,
        })
    }

    /// The split regexes, applied in this order.
    fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Qwen2 => &[QWEN2_REGEX],
            Self::SmolLm => &[SINGLE_DIGIT_REGEX, GPT2_REGEX],
            Self::Gpt2 => &[GPT2_REGEX],
            Self::Llama3 => &[LLAMA3_REGEX],
        }
    }

    /// Whether a word found whole in the vocabulary is taken as one token before any merge
    /// (Llama 3's vocabulary holds words its merges cannot build).
    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    /// Whether BOS is added when the file has no `tokenizer.ggml.add_bos_token`.
    fn default_add_bos(self) -> bool {
        self == Self::Llama3
    }
}

/// The kinds of `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Decodes a GGUF token type; 0 ("undefined", written by old converters) counts as normal.
    fn from_gguf(value: i32) -> Option<Self> {
        Some(match value {
            0 | 1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// The tokenizer part of a GGUF file's metadata, as plain data (see the module docs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: the tokenizer kind; only `gpt2` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (`qwen2`, `smollm`, ...); empty if absent.
    pub pre: String,
    /// `tokenizer.ggml.tokens`: token strings, indexed by id. Normal tokens are in byte-level
    /// form (`"Ġworld"`), control and user-defined ones in plain text (`"<|im_end|>"`).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte. Empty means all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: BPE merges as `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// Whether encoding with special tokens puts BOS first (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Whether encoding with special tokens puts EOS last (`tokenizer.ggml.add_eos_token`).
    pub add_eos: bool,
}

impl fmt::Debug for GgufVocab {
    // The token and merge lists hold ~150k strings each: show their sizes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufVocab")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("tokens", &self.tokens.len())
            .field("token_types", &self.token_types.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// Reads the tokenizer metadata of `file`.
///
/// When `tokenizer.ggml.add_bos_token` is absent, BOS is added only for pre-tokenizers whose
/// models expect it (`llama-bpe`), as llama.cpp does; `add_eos_token` defaults to false.
/// Fails if the file has no tokenizer, if a key has the wrong type, or if a `gpt2` tokenizer
/// lacks its merges. Whether the tokenizer is supported is [`build_tokenizer`]'s business.
pub fn vocab_from_gguf(file: &GgufFile) -> Result<GgufVocab> {
    let path = file.path().display();
    let Some(model) = file.get_str("tokenizer.ggml.model")? else {
        return Err(Error::Tokenizer(format!(
            "{path}: the file has no tokenizer (`tokenizer.ggml.model` is missing)"
        )));
    };
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::Tokenizer(format!("{path}: `tokenizer.ggml.tokens` is missing")))?
        .to_vec();
    let merges = match file.get_str_array("tokenizer.ggml.merges")? {
        Some(merges) => merges.to_vec(),
        None if model == "gpt2" => {
            return Err(Error::Tokenizer(format!(
                "{path}: BPE tokenizer without `tokenizer.ggml.merges`"
            )))
        }
        None => Vec::new(),
    };
    let token_types = file
        .get_i32_array("tokenizer.ggml.token_type")?
        .map(<[i32]>::to_vec)
        .unwrap_or_default();
    let pre = file
        .get_str("tokenizer.ggml.pre")?
        .unwrap_or_default()
        .to_string();
    let default_add_bos = PreTokenizer::from_name(&pre).is_some_and(PreTokenizer::default_add_bos);
    Ok(GgufVocab {
        model: model.to_string(),
        pre,
        tokens,
        token_types,
        merges,
        bos: file.get_u32("tokenizer.ggml.bos_token_id")?,
        eos: file.get_u32("tokenizer.ggml.eos_token_id")?,
        pad: file.get_u32("tokenizer.ggml.padding_token_id")?,
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos),
        add_eos: file
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
    })
}

/// Builds the tokenizer of a GGUF file: [`vocab_from_gguf`] then [`build_tokenizer`].
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    build_tokenizer(&vocab_from_gguf(file)?).map_err(|e| match e {
        Error::Tokenizer(message) => {
            Error::Tokenizer(format!("{}: {message}", file.path().display()))
        }
        other => other,
    })
}

/// Builds a byte-level BPE [`Tokenizer`] that gives llama.cpp's ids for `vocab`.
///
/// Refuses, with an error naming the value, a tokenizer model other than `gpt2`, a
/// pre-tokenizer not in [`SUPPORTED_PRE_TOKENIZERS`], unknown token types, malformed merges or
/// merges over unknown tokens, and BOS/EOS that must be added but are missing or out of range.
/// Among tokens with the same string, encoding produces the last one (as llama.cpp does) and
/// the others decode to nothing.
pub fn build_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer> {
    let fail = |message: String| Error::Tokenizer(message);
    if vocab.model != "gpt2" {
        return Err(fail(format!(
            "tokenizer model `{}` (tokenizer.ggml.model) is not supported: only `gpt2` \
             (byte-level BPE) is",
            vocab.model
        )));
    }
    if vocab.pre.is_empty() {
        return Err(fail(format!(
            "the file names no pre-tokenizer (tokenizer.ggml.pre is missing); supported: {}",
            SUPPORTED_PRE_TOKENIZERS.join(", ")
        )));
    }
    let pre = PreTokenizer::from_name(&vocab.pre).ok_or_else(|| {
        fail(format!(
            "unknown pre-tokenizer `{}` (tokenizer.ggml.pre); supported: {}",
            vocab.pre,
            SUPPORTED_PRE_TOKENIZERS.join(", ")
        ))
    })?;
    if u32::try_from(vocab.tokens.len()).is_err() {
        return Err(fail(format!("{} tokens is too many", vocab.tokens.len())));
    }
    if !vocab.token_types.is_empty() && vocab.token_types.len() != vocab.tokens.len() {
        return Err(fail(format!(
            "{} token types for {} tokens",
            vocab.token_types.len(),
            vocab.tokens.len()
        )));
    }

    // Every token but the unused ones goes into the BPE vocabulary under its own id, special
    // ones included: the added-token table then finds them there and keeps their ids.
    let mut bpe_vocab = Vocab::with_capacity(vocab.tokens.len());
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, text) in vocab.tokens.iter().enumerate() {
        let raw_type = vocab.token_types.get(id).copied().unwrap_or(1);
        let token_type = TokenType::from_gguf(raw_type).ok_or_else(|| {
            fail(format!(
                "token {id} (`{text}`) has unknown type {raw_type} (tokenizer.ggml.token_type)"
            ))
        })?;
        if token_type == TokenType::Unused || text.is_empty() {
            continue;
        }
        // Cannot truncate: the length was checked against u32 above.
        bpe_vocab.insert(text.clone(), id as u32);
        match token_type {
            TokenType::Control | TokenType::Unknown => {
                special.push(AddedToken::from(text.clone(), true).normalized(false));
            }
            TokenType::UserDefined => {
                user_defined.push(AddedToken::from(text.clone(), false).normalized(false));
            }
            TokenType::Normal | TokenType::Byte | TokenType::Unused => {}
        }
    }

    let merges = vocab
        .merges
        .iter()
        .enumerate()
        .map(|(rank, merge)| {
            split_merge(merge).ok_or_else(|| {
                fail(format!(
                    "merge {rank} `{merge}` is not two tokens separated by a space"
                ))
            })
        })
        .collect::<Result<Merges>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| fail(format!("invalid BPE vocabulary: {e}")))?;

    let mut steps = Vec::with_capacity(pre.regexes().len() + 1);
    for regex in pre.regexes() {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| fail(format!("pre-tokenizer regex {regex:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::from(split));
    }
    // The words are already split: the byte-level step only maps bytes to its alphabet.
    steps.push(ByteLevel::new(false, false, false).into());

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_pre_tokenizer(Some(Sequence::new(steps)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(bos_eos_processor(vocab)?));
    inner.add_special_tokens(&special);
    inner.add_tokens(&user_defined);
    Ok(Tokenizer::from_inner(inner))
}

/// Splits a merge `"left right"` at its separating space. The search starts after the first
/// character, as llama.cpp's does, so a left part that is itself a space is allowed.
fn split_merge(merge: &str) -> Option<(String, String)> {
    let (at, _) = merge.char_indices().skip(1).find(|&(_, c)| c == ' ')?;
    let (left, right) = (&merge[..at], &merge[at + 1..]);
    (!right.is_empty()).then(|| (left.to_string(), right.to_string()))
}

/// The post-processor that puts BOS before and EOS after each sequence, as the file asks.
fn bos_eos_processor(vocab: &GgufVocab) -> Result<TemplateProcessing> {
    let bos = added_special(vocab, "bos", vocab.add_bos, vocab.bos)?;
    let eos = added_special(vocab, "eos", vocab.add_eos, vocab.eos)?;
    let bos_piece: &[&str] = if bos.is_some() { &["bos"] } else { &[] };
    let eos_piece: &[&str] = if eos.is_some() { &["eos"] } else { &[] };
    let single = [bos_piece, &["$A"], eos_piece].concat();
    let pair = [
        bos_piece,
        &["$A"],
        eos_piece,
        bos_piece,
        &["$B:1"],
        eos_piece,
    ]
    .concat();
    let special_tokens: Vec<SpecialToken> = bos.into_iter().chain(eos).collect();
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|builder| builder.try_pair(pair))
        .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))
}

/// The template entry for BOS or EOS (`name`) if the file asks to add it, checked against the
/// vocabulary. Templates refer to it by `name`, not by its text, which could contain the `:`
/// or leading `$` of the template syntax.
fn added_special(
    vocab: &GgufVocab,
    name: &str,
    wanted: bool,
    id: Option<u32>,
) -> Result<Option<SpecialToken>> {
    if !wanted {
        return Ok(None);
    }
    let id = id.ok_or_else(|| {
        Error::Tokenizer(format!(
            "tokenizer.ggml.add_{name}_token is true but tokenizer.ggml.{name}_token_id is missing"
        ))
    })?;
    let text = vocab.tokens.get(id as usize).ok_or_else(|| {
        Error::Tokenizer(format!(
            "tokenizer.ggml.{name}_token_id {id} is outside the vocabulary ({} tokens)",
            vocab.tokens.len()
        ))
    })?;
    SpecialToken::new(name.to_string(), vec![id], vec![text.clone()])
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{name} token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary over `a`, `b`, `c`, `1`, `2`, space (`Ġ`), a control token
    /// `<s>` (id 0), a user-defined `<u>`, an unused `[PAD]`, and the words `ab`, `abc`, `12`,
    /// `Ġab`; merges build `ab`, `Ġab` and `12`, but not `abc`.
    fn toy(pre: &str) -> GgufVocab {
        let tokens = [
            "<s>", "a", "b", "c", "1", "2", "Ġ", "ab", "abc", "12", "Ġab", "<u>", "[PAD]",
        ];
        let types = [3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 5];
        GgufVocab {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            token_types: types.to_vec(),
            merges: vec!["a b".into(), "Ġ ab".into(), "1 2".into()],
            bos: Some(0),
            eos: Some(0),
            ..GgufVocab::default()
        }
    }

    fn encode(vocab: &GgufVocab, text: &str, add_special: bool) -> Vec<u32> {
        build_tokenizer(vocab)
            .unwrap()
            .encode(text, add_special)
            .unwrap()
    }

    #[test]
    fn digits_split_one_by_one_for_smollm_and_qwen2_only() {
        assert_eq!(encode(&toy("gpt-2"), "12", false), [9]);
        assert_eq!(encode(&toy("llama-bpe"), "12", false), [9]);
        assert_eq!(encode(&toy("smollm"), "12", false), [4, 5]);
        assert_eq!(encode(&toy("qwen2"), "12", false), [4, 5]);
        // SmolLM: the space before a digit is a word of its own.
        assert_eq!(encode(&toy("smollm"), "ab 1", false), [7, 6, 4]);
        assert_eq!(encode(&toy("smollm"), "a ab", false), [1, 10]);
    }

    #[test]
    fn llama3_takes_whole_vocabulary_words_before_merging() {
        assert_eq!(encode(&toy("llama-bpe"), "abc", false), [8]);
        assert_eq!(encode(&toy("gpt-2"), "abc", false), [7, 3]);
    }

    #[test]
    fn added_tokens_keep_their_ids_and_unused_ones_are_dropped() {
        let vocab = toy("qwen2");
        let tok = build_tokenizer(&vocab).unwrap();
        assert_eq!(tok.encode("<s>ab<u>c", false).unwrap(), [0, 7, 11, 3]);
        assert!(tok.is_special(0) && !tok.is_special(11));
        assert_eq!(tok.decode(&[0, 7, 11], true).unwrap(), "ab<u>");
        assert_eq!(tok.token_to_id("[PAD]"), None);
        assert_eq!(tok.decode(&[12, 7], false).unwrap(), "ab");
        assert_eq!(tok.vocab_size(), 12);
    }

    #[test]
    fn bos_and_eos_follow_the_flags() {
        let mut vocab = toy("qwen2");
        assert_eq!(encode(&vocab, "ab", true), [7]);
        vocab.add_bos = true;
        assert_eq!(encode(&vocab, "ab", true), [0, 7]);
        assert_eq!(encode(&vocab, "ab", false), [7]);
        vocab.add_eos = true;
        assert_eq!(encode(&vocab, "ab", true), [0, 7, 0]);
        vocab.bos = None;
        let err = build_tokenizer(&vocab).unwrap_err().to_string();
        assert!(err.contains("bos_token_id is missing"), "{err}");
        vocab.bos = Some(13);
        let err = build_tokenizer(&vocab).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn malformed_vocabularies_are_errors() {
        let mut vocab = toy("qwen2");
        vocab.merges.push("abc".into());
        let err = build_tokenizer(&vocab).unwrap_err().to_string();
        assert!(err.contains("merge 3 `abc`"), "{err}");

        let mut vocab = toy("qwen2");
        vocab.merges.push("c c".into());
        let err = build_tokenizer(&vocab).unwrap_err().to_string();
        assert!(err.contains("invalid BPE vocabulary"), "{err}");

        let mut vocab = toy("qwen2");
        vocab.token_types[3] = 9;
        let err = build_tokenizer(&vocab).unwrap_err().to_string();
        assert!(err.contains("token 3 (`c`) has unknown type 9"), "{err}");

        let mut vocab = toy("qwen2");
        vocab.token_types.pop();
        assert!(build_tokenizer(&vocab).is_err());
    }

    #[test]
    fn merges_split_after_the_first_character() {
        assert_eq!(split_merge("a b"), Some(("a".into(), "b".into())));
        assert_eq!(split_merge("  b"), Some((" ".into(), "b".into())));
        assert_eq!(split_merge("é b c"), Some(("é".into(), "b c".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
    }
}
