//! Constrained decoding: a reply held to a JSON schema, a regular expression, a list of
//! choices or a context-free grammar, so that what even a small model writes always parses.
//!
//! - [`Grammar`] is what a request asks for (OpenAI's `response_format`, vLLM's `guided_*`,
//!   a forced tool call).
//! - [`Grammars`] is made once per model: the vocabulary as a token trie, and the grammar
//!   compiler. It is built on the first constrained request (a fraction of a second for
//!   Qwen3's 151,936 tokens), never for a server that gets none.
//! - [`Constraint`] is one request's parser state. Each step the engine asks it for the
//!   tokens allowed next ([`Constraint::next`]), bans the rest before sampling (a token mask
//!   the backend's sampler applies, [`NextToken::mask_words`]), and feeds it the token drawn
//!   ([`Constraint::accept`]).
//!
//! The parser is llguidance (an Earley parser over a lazy lexer, walking the token trie to
//! compute a mask in tens of microseconds); the token trie is built here from wick's own
//! tokenizer, so that a GGUF file's vocabulary works the same as a `tokenizer.json`.
//!
//! Two things are wick's own:
//! - **Reasoning first.** A Qwen3 reply that thinks starts with a free `<think>` block; the
//!   constraint starts after `</think>`. A prompt that leaves the block open starts free; one
//!   that closed it (thinking off) starts constrained; otherwise the first token may be
//!   `<think>` or a token of the grammar.
//! - **A reply that ends in time.** With a token budget (`max_tokens` or the end of the
//!   context) a constrained reply must still parse: when the budget left is about what the
//!   shortest way to finish needs, thinking is closed and the grammar is finished by the
//!   shortest route (closing strings, objects and arrays, the smallest values).
//!
//! GBNF (llama.cpp's grammar format) is translated to llguidance's Lark dialect by
//! [`gbnf_to_lark`]: no maintained crate does that translation.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::text::tokenizer::Tokenizer;

/// What a reply must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON matching a JSON schema (`response_format: {"type": "json_schema"}`,
    /// `guided_json`).
    JsonSchema {
        /// The schema.
        schema: Value,
        /// Whitespace allowed between JSON tokens, as a regular expression; `None`: none
        /// beyond `", "` and `": "` (the layout of Python's `json.dumps`).
        #[serde(default)]
        whitespace: Option<String>,
    },
    /// Text matching a regular expression (`guided_regex`), anchored at both ends.
    Regex {
        /// The expression (Rust `regex` syntax).
        pattern: String,
    },
    /// Exactly one of these strings (`guided_choice`).
    Choice {
        /// The choices.
        choices: Vec<String>,
    },
    /// A context-free grammar in llguidance's Lark dialect (`guided_grammar`); GBNF is
    /// translated by [`gbnf_to_lark`] before it gets here.
    Lark {
        /// The grammar; its start rule is `start`.
        grammar: String,
    },
}

impl Grammar {
    /// A grammar from GBNF (rules written `name ::= ...`, start rule `root`) or Lark text:
    /// GBNF when the text defines a rule with `::=`.
    pub fn from_grammar_text(text: &str) -> Result<Grammar> {
        let grammar = if text.contains("::=") {
            gbnf_to_lark(text)?
        } else {
            text.to_string()
        };
        Ok(Grammar::Lark { grammar })
    }

    /// The grammar in llguidance's terms.
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(&json!({"type": "object"}), None))
            }
            Grammar::JsonSchema { schema, whitespace } => {
                TopLevelGrammar::from_json_schema(with_layout(schema, whitespace.as_deref()))
            }
            Grammar::Regex { pattern } => TopLevelGrammar::from_regex(pattern),
            Grammar::Choice { choices } => {
                let alts: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Grammar::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        }
    }
}

/// `schema` with wick's JSON layout unless it sets its own (`x-guidance`): no free
/// whitespace (a model left free to add whitespace can add it forever), `", "` between items
/// and `": "` after keys.
fn with_layout(schema: &Value, whitespace: Option<&str>) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(m) = &mut schema {
        if !m.contains_key("x-guidance") {
            let mut opts = json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            });
            if let Some(ws) = whitespace {
                opts["whitespace_pattern"] = Value::String(ws.to_string());
                opts["item_separator"] = ",".into();
                opts["key_separator"] = ":".into();
            }
            m.insert("x-guidance".into(), opts);
        }
    }
    schema
}

/// `s` as a Lark string literal.
fn lark_string(s: &str) -> String {
    // JSON string escapes are what Lark's string literals take.
    Value::String(s.to_string()).to_string()
}

/// Where a tool call's grammar starts (see [`tool_call_grammar`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallStart<'a> {
    /// After `<tool_call>\n`, which the prompt wrote (`tool_choice: required`).
    Opened,
    /// After `<tool_call>\n{"name": "NAME", "arguments": `, which the prompt wrote (a named
    /// function).
    Named(&'a str),
    /// At the reply's start: text, then at most one call (`strict` tools under `auto`).
    Free,
}

/// Qwen3's (Hermes') tool-call tags: added tokens, so a grammar names them unquoted.
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// A grammar for a tool call in Qwen3's format, `<tool_call>\n{"name": ..., "arguments":
/// {...}}\n</tool_call>`, with the arguments held to the called function's `parameters`
/// schema. `tools` are OpenAI tool definitions; `start` says how much of the call the prompt
/// already wrote.
pub fn tool_call_grammar(tools: &[Value], start: CallStart) -> Grammar {
    let params = |t: &Value| {
        t.pointer("/function/parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}))
    };
    let call_schema = |t: &Value| {
        let name = t
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        json!({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params(t)},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let layout = |schema: Value| with_layout(&schema, None).to_string();
    let any_call = || layout(json!({"anyOf": tools.iter().map(call_schema).collect::<Vec<_>>()}));
    let grammar = match start {
        CallStart::Opened => format!("start: %json {} \"\\n\" {CALL_CLOSE}", any_call()),
        CallStart::Named(name) => {
            let args = tools
                .iter()
                .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
                .map(params)
                .unwrap_or_else(|| json!({"type": "object"}));
            // The object the prompt opened closes after the arguments.
            format!("start: %json {} \"}}\\n\" {CALL_CLOSE}", layout(args))
        }
        CallStart::Free => format!(
            "start: TEXT | TEXT call\n\
             call: {CALL_OPEN} \"\\n\" %json {} \"\\n\" {CALL_CLOSE}\n\
             TEXT: /(.|\\n)*/",
            any_call()
        ),
    };
    Grammar::Lark { grammar }
}

/// The vocabulary as llguidance sees it: every token's bytes in a trie, added tokens of the
/// form `<...>` as special tokens (reachable from a grammar by name, e.g. `</tool_call>`,
/// never by text), and wick's tokenizer for tokenizing text.
struct TokenEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .inner()
                .encode_fast(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// The bytes of every token id below `vocab` (the model's logits width): byte-level BPE
/// strings mapped back to bytes (GPT-2's table), `<0xAB>` byte-fallback pieces to their
/// byte, `▁` to a space; added tokens `<...>` (and any flagged special) as special tokens;
/// ids the tokenizer does not have as unreachable special tokens.
fn token_bytes(tok: &Tokenizer, vocab: usize) -> Vec<Vec<u8>> {
    let inner = tok.inner();
    let byte_level = decoder_is_byte_level(inner);
    let unicode_to_byte = byte_level_table();
    let added = inner.get_added_tokens_decoder();
    let mut out = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let special = |name: &str| {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(name.as_bytes());
            b
        };
        let bytes = match (added.get(&id), inner.id_to_token(id)) {
            (Some(a), _)
                if a.special || (a.content.starts_with('<') && a.content.ends_with('>')) =>
            {
                special(&a.content)
            }
            (Some(a), _) => a.content.as_bytes().to_vec(),
            (None, Some(piece)) if byte_level => piece
                .chars()
                .map(|c| unicode_to_byte.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_default(),
            (None, Some(piece)) => match byte_fallback(&piece) {
                Some(b) => vec![b],
                None => piece.replace('▁', " ").into_bytes(),
            },
            (None, None) => special(&format!("<[{id}]>")),
        };
        out.push(bytes);
    }
    out
}

/// Whether the tokenizer decodes GPT-2 style byte-level pieces (Qwen, Llama 3, SmolLM2)
/// rather than SentencePiece pieces with byte fallback.
fn decoder_is_byte_level(inner: &tokenizers::Tokenizer) -> bool {
    let decoder = serde_json::to_value(inner.get_decoder()).unwrap_or(Value::Null);
    let text = decoder.to_string();
    text.contains("\"ByteLevel\"") || !text.contains("\"ByteFallback\"")
}

/// `<0xAB>` → 0xAB.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's byte-level table, reversed: the printable stand-in character of each byte.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{FFFD}');
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// The grammar side of one model: the token trie and the compiler, built on first use.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab: usize,
    eos: Vec<u32>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .field("built", &self.factory.get().is_some())
            .finish()
    }
}

/// Token ids the constraint treats specially.
#[derive(Clone, Copy, Debug)]
struct ThinkIds {
    open: u32,
    close: u32,
}

impl Grammars {
    /// The grammar side for a model whose logits are `vocab` wide and whose replies end at
    /// one of `eos`.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize, eos: &[u32]) -> Grammars {
        Grammars {
            tokenizer,
            vocab,
            eos: eos
                .iter()
                .copied()
                .filter(|&e| (e as usize) < vocab)
                .collect(),
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| {
                let words = token_bytes(&self.tokenizer, self.vocab);
                let eos = self.eos.first().copied().unwrap_or(0);
                let info = TokRxInfo::new(self.vocab as u32, eos);
                let mut trie = TokTrie::from(&info, &words);
                if self.eos.len() > 1 {
                    trie = trie.with_eos_tokens(&self.eos);
                }
                let env = TokenEnv {
                    trie,
                    tokenizer: self.tokenizer.clone(),
                };
                let env: llguidance::toktrie::TokEnv = Arc::new(env);
                let mut f = ParserFactory::new_simple(&env)
                    .map_err(|e| format!("cannot build the grammar engine: {e}"))?;
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(|e| Error::Engine(e.clone()))
    }

    /// Compiles `grammar` for one reply. `start` says where the reply begins: free reasoning
    /// (the prompt left `<think>` open), or whether it may open a reasoning block. Errors
    /// ([`Error::InvalidParam`] named `grammar`) say what is wrong with the grammar.
    pub fn compile(&self, grammar: &Grammar, start: ReplyStart) -> Result<Constraint> {
        let factory = self.factory()?;
        let bad = |e: String| Error::InvalidParam {
            param: "grammar",
            message: e,
        };
        let parser = factory
            .create_parser(grammar.top_level())
            .map_err(|e| bad(format!("the grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(bad(format!("the grammar does not compile: {e}")));
        }
        let think = match (
            self.tokenizer.token_to_id("<think>"),
            self.tokenizer.token_to_id("</think>"),
        ) {
            (Some(open), Some(close)) => Some(ThinkIds { open, close }),
            _ => None,
        };
        let phase = match (start, think) {
            (_, None) | (ReplyStart::Answer, _) => Phase::Active,
            (ReplyStart::InReasoning, Some(_)) => Phase::Thinking,
            (ReplyStart::MayReason, Some(_)) => Phase::MayThink,
        };
        Ok(Constraint {
            matcher,
            phase,
            think,
            eos: self.eos.clone(),
            closing: false,
            closers: self.single_byte_tokens(),
            scan: JsonScan::default(),
            env: factory.tok_env().clone(),
            last_estimate: None,
        })
    }

    /// The ids of the one-byte tokens the shortest finish is made of, by byte: JSON's closers
    /// and smallest values (`"`, `}`, `]`, `,`, `0`, `1`, `[`, `{`) and what string formats
    /// need (`.`, `@`, `a`, `-`, `:`, `T`, `Z`), when the vocabulary has them.
    fn single_byte_tokens(&self) -> Vec<(u8, u32)> {
        let Ok(f) = self.factory() else {
            return Vec::new();
        };
        let trie = f.tok_env().tok_trie();
        b"\"}],01[{.@a-:TZ"
            .iter()
            .filter_map(|&b| Some((b, trie.token_id(&[b])?)))
            .collect()
    }
}

/// Where a reply begins, for [`Grammars::compile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStart {
    /// The prompt left a `<think>` block open: the reply reasons first.
    InReasoning,
    /// The model may open a `<think>` block first (a chat prompt with thinking on).
    MayReason,
    /// The answer starts at once (thinking off, or a raw prompt).
    Answer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Inside `<think>`: anything goes until `</think>`.
    Thinking,
    /// The first token: `<think>` or the grammar's.
    MayThink,
    /// The grammar holds.
    Active,
}

/// One reply's constraint: see the module doc.
pub struct Constraint {
    matcher: Matcher,
    phase: Phase,
    think: Option<ThinkIds>,
    eos: Vec<u32>,
    /// Finishing by the shortest route (the budget is nearly spent).
    closing: bool,
    /// One-byte tokens of the shortest finish, by byte.
    closers: Vec<(u8, u32)>,
    /// Whether the answer so far is inside a JSON string.
    scan: JsonScan,
    env: llguidance::toktrie::TokEnv,
    /// Tokens the shortest finish took when last estimated, with the budget left then.
    last_estimate: Option<(usize, usize)>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("phase", &self.phase)
            .field("closing", &self.closing)
            .finish()
    }
}

/// Whether JSON text read so far ends inside a string (quotes counted, escapes skipped).
#[derive(Clone, Debug, Default)]
struct JsonScan {
    in_string: bool,
    escaped: bool,
    last: u8,
    /// How many times `last` came in a row.
    run: usize,
}

impl JsonScan {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.escaped {
                self.escaped = false;
            } else if self.in_string && b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = !self.in_string;
            }
            self.run = if self.last == b { self.run + 1 } else { 1 };
            self.last = b;
        }
    }

    /// Whether the text ends inside a number.
    fn in_number(&self) -> bool {
        !self.in_string && matches!(self.last, b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E')
    }
}

impl NextToken {
    /// The decision as a token mask of `words` u32 words (bit `i % 32` of word `i / 32` set
    /// when token `i` is allowed), for a backend that samples where the logits are; `None`
    /// when every token is allowed.
    pub fn mask_words(&self, words: usize) -> Option<Vec<u32>> {
        match self {
            NextToken::Free => None,
            NextToken::Allowed(mask) => {
                let mut m: Vec<u32> = mask.as_slice().iter().copied().take(words).collect();
                m.resize(words, 0);
                Some(m)
            }
            NextToken::Forced(t) => {
                let mut m = vec![0u32; words];
                if let Some(w) = m.get_mut(*t as usize / 32) {
                    *w |= 1 << (t % 32);
                }
                Some(m)
            }
        }
    }
}

/// What [`Constraint::next`] decided for the next token.
#[derive(Debug)]
pub enum NextToken {
    /// Any token (free reasoning).
    Free,
    /// Only the tokens set in this mask.
    Allowed(SimpleVob),
    /// This token and no other.
    Forced(u32),
}

/// Tokens kept in reserve for finishing: the shortest finish is estimated once the budget
/// left drops below this.
const ESTIMATE_BELOW: usize = 256;

/// Within this many tokens of the shortest finish, it is walked again at every token.
const REWALK_MARGIN: usize = 32;

impl Constraint {
    /// The tokens allowed next, given `budget` tokens left for this reply (`None`:
    /// unbounded). Errors are internal (the parser failed).
    pub fn next(&mut self, budget: Option<usize>) -> Result<NextToken> {
        let internal = |e: anyhow::Error| Error::Engine(format!("grammar: {e}"));
        if self.matcher.is_stopped() {
            return Ok(match self.eos.first() {
                Some(&e) => NextToken::Forced(e),
                None => NextToken::Allowed(self.matcher.compute_mask_or_eos().map_err(internal)?),
            });
        }
        match self.phase {
            Phase::Thinking => {
                // Close the reasoning when what is left is what the answer needs.
                let close = self.think.map(|t| t.close);
                if let (Some(close), Some(left)) = (close, budget) {
                    if left <= ESTIMATE_BELOW && left <= self.finish_estimate(left)? + 2 {
                        return Ok(NextToken::Forced(close));
                    }
                }
                Ok(NextToken::Free)
            }
            Phase::MayThink => {
                let mut mask = self.matcher.compute_mask().map_err(internal)?;
                let room = match budget {
                    Some(left) if left <= ESTIMATE_BELOW => {
                        left > 2 * self.finish_estimate(left)? + 8
                    }
                    _ => true,
                };
                if let (Some(t), true) = (self.think, room) {
                    mask.allow_token(t.open);
                }
                Ok(NextToken::Allowed(mask))
            }
            Phase::Active => {
                let mask = self.matcher.compute_mask().map_err(internal)?;
                if let Some(left) = budget.filter(|&left| left <= ESTIMATE_BELOW) {
                    let need = self.finish_estimate(left)?;
                    self.closing |= left <= need + 1;
                    if self.closing {
                        let step = Self::shortest_step(
                            &self.eos,
                            &self.closers,
                            &mut self.matcher,
                            &mask,
                            &self.scan,
                        );
                        return Ok(match step {
                            Some(t) => NextToken::Forced(t),
                            // The walk's own step, while its finish (and the end of sequence)
                            // fits: it then takes exactly the tokens estimated.
                            None if need < left => match mask.first_bit_set() {
                                Some(t) => NextToken::Forced(t as u32),
                                None => NextToken::Allowed(mask),
                            },
                            // It does not fit: the model's shorter ways on are the only hope.
                            None => NextToken::Allowed(self.least_structure(mask)),
                        });
                    }
                }
                Ok(NextToken::Allowed(mask))
            }
        }
    }

    /// The token the shortest finish takes next, for a parser in `matcher`'s state with
    /// `mask` allowed and `scan` the JSON read so far: an end-of-sequence token if allowed,
    /// else text the grammar forces (a key), else the first allowed closer (`"` first inside
    /// a string, `}` and `]` first outside), else the only allowed token; `None` when there
    /// is a choice (the walk takes the allowed token of lowest id, a short one: ` ` before
    /// ` [{"`).
    fn shortest_step(
        eos: &[u32],
        closers: &[(u8, u32)],
        matcher: &mut Matcher,
        mask: &SimpleVob,
        scan: &JsonScan,
    ) -> Option<u32> {
        if let Some(&e) = eos.iter().find(|&&e| mask.is_allowed(e)) {
            return Some(e);
        }
        if let Some(&t) = matcher.compute_ff_tokens().first() {
            if mask.is_allowed(t) {
                return Some(t);
            }
        }
        // Outside a string `,` comes before `0` so that a number ends rather than grows;
        // inside a number a nonzero digit comes first (a range's canonical form may not end
        // in 0, so `-0.0` can only go on). Inside a string: the closing quote, else the
        // characters formats need (dates, times, e-mail addresses), none more than four
        // times in a row.
        let order: &[u8] = if scan.in_string {
            b"\"@10a-:TZ.}],[{"
        } else if scan.in_number() {
            b"}],10."
        } else {
            b"}],01\"[{"
        };
        for b in order {
            if scan.in_string && scan.last == *b && scan.run >= 4 {
                continue;
            }
            if let Some(&(_, t)) = closers.iter().find(|(c, _)| c == b) {
                if mask.is_allowed(t) {
                    return Some(t);
                }
            }
        }
        (mask.num_set() == 1).then(|| mask.first_bit_set().map(|b| b as u32))?
    }

    /// `mask` without the tokens that open more than one object or array (or more than the
    /// fewest any allowed token opens, if that is more). With the budget nearly spent the
    /// model still chooses among the ways on (`false` or ` ["` in one token), but not one
    /// that commits the reply to more than the grammar needs (` [{"` where ` [` will do:
    /// an object and every one of its required keys), which the finish estimate could not
    /// foresee.
    fn least_structure(&self, mut mask: SimpleVob) -> SimpleVob {
        let opens = |t: usize| {
            let bytes = self.token_bytes(t as u32);
            bytes.iter().filter(|&&b| b == b'{' || b == b'[').count()
        };
        let mut fewest = usize::MAX;
        mask.iter_set_entries(|t| fewest = fewest.min(opens(t)));
        let fewest = fewest.max(1);
        let mut more = Vec::new();
        mask.iter_set_entries(|t| {
            if opens(t) > fewest {
                more.push(t as u32);
            }
        });
        for t in more {
            mask.disallow_token(t);
        }
        mask
    }

    /// Tokens the shortest finish from here takes (walked on a copy of the parser), at most
    /// `limit` + 1. Walked again every few tokens only: the walk costs a mask per token.
    fn finish_estimate(&mut self, limit: usize) -> Result<usize> {
        if let Some((need, at)) = self.last_estimate {
            // A token taken since can lengthen the finish by more than one (` [{"` opens an
            // object whose required keys must all be written), so the figure is reused,
            // grown by one per token, only while the budget is far from it, and at most 8
            // tokens on.
            let since = at.saturating_sub(limit);
            if at >= limit && since < 8 && limit > need + since + REWALK_MARGIN {
                return Ok(need + since);
            }
        }
        let mut probe = self.matcher.deep_clone();
        let mut scan = self.scan.clone();
        let mut steps = 0;
        while steps <= limit && !probe.is_stopped() {
            if probe.is_accepting().unwrap_or(false) {
                break;
            }
            let Ok(mask) = probe.compute_mask() else {
                break;
            };
            let next = Self::shortest_step(&self.eos, &self.closers, &mut probe, &mask, &scan)
                .or_else(|| mask.first_bit_set().map(|b| b as u32));
            let Some(t) = next else { break };
            if self.eos.contains(&t) || probe.consume_token(t).is_err() {
                break;
            }
            scan.feed(self.token_bytes(t));
            steps += 1;
        }
        self.last_estimate = Some((steps, limit));
        Ok(steps)
    }

    fn token_bytes(&self, t: u32) -> &[u8] {
        self.env.tok_trie().token(t)
    }

    /// Records the token the reply took. Returns true when the grammar is complete: the
    /// reply is over (the caller ends it as stopped).
    pub fn accept(&mut self, token: u32) -> Result<bool> {
        let internal = |e: anyhow::Error| Error::Engine(format!("grammar: {e}"));
        match self.phase {
            Phase::Thinking => {
                if self.think.is_some_and(|t| t.close == token) {
                    self.phase = Phase::Active;
                    self.last_estimate = None;
                }
                Ok(false)
            }
            Phase::MayThink if self.think.is_some_and(|t| t.open == token) => {
                self.phase = Phase::Thinking;
                Ok(false)
            }
            _ => {
                self.phase = Phase::Active;
                if self.eos.contains(&token) {
                    return Ok(true);
                }
                self.matcher.consume_token(token).map_err(internal)?;
                self.scan.feed(self.env.tok_trie().token(token));
                Ok(self.matcher.is_stopped())
            }
        }
    }

    /// Applies `next` to a row of logits: banned tokens get -inf.
    pub fn apply(next: &NextToken, logits: &mut [f32]) {
        match next {
            NextToken::Free => {}
            // The same words the backend's sampler reads.
            NextToken::Allowed(mask) => crate::backend::sample::apply_mask(logits, mask.as_slice()),
            NextToken::Forced(t) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if i as u32 != *t {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Translates a GBNF grammar (llama.cpp's format: `name ::= alternatives`, `"literals"`,
/// `[character classes]`, `( groups )`, `* + ? {m,n}`, `.`, `#` comments; the start rule is
/// `root`) into llguidance's Lark dialect.
pub fn gbnf_to_lark(gbnf: &str) -> Result<String> {
    let bad = |m: String| Error::InvalidParam {
        param: "grammar",
        message: format!("GBNF: {m}"),
    };
    let chars: Vec<char> = gbnf.chars().collect();
    let mut i = 0;
    let mut out = String::new();
    let name_of = |n: &str| -> String {
        let n = n.replace('-', "_").to_lowercase();
        if n == "root" {
            "start".to_string()
        } else {
            format!("r_{n}")
        }
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    // Skips spaces and comments; newlines too when `lines` is set.
    let skip = |i: &mut usize, lines: bool| {
        while *i < chars.len() {
            match chars[*i] {
                '#' => {
                    while *i < chars.len() && chars[*i] != '\n' {
                        *i += 1;
                    }
                }
                '\n' | '\r' if lines => *i += 1,
                ' ' | '\t' => *i += 1,
                _ => break,
            }
        }
    };
    let mut have_root = false;
    loop {
        skip(&mut i, true);
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && is_name(chars[i]) {
            i += 1;
        }
        if start == i {
            return Err(bad(format!("expected a rule name at character {i}")));
        }
        let name: String = chars[start..i].iter().collect();
        have_root |= name == "root";
        skip(&mut i, false);
        if chars.get(i..i + 3) != Some(&[':', ':', '=']) {
            return Err(bad(format!("expected `::=` after `{name}`")));
        }
        i += 3;
        out.push_str(&name_of(&name));
        out.push(':');
        // The body runs to the end of the line, or on across lines while inside
        // parentheses or when the next line continues (does not start a new rule).
        let mut depth = 0usize;
        loop {
            skip(&mut i, depth > 0);
            if i >= chars.len() {
                break;
            }
            let c = chars[i];
            match c {
                '\n' | '\r' => {
                    // A following line that is not `name ::=` continues this rule.
                    let mut j = i;
                    while j < chars.len() && chars[j].is_whitespace() {
                        j += 1;
                    }
                    let mut k = j;
                    while k < chars.len() && is_name(chars[k]) {
                        k += 1;
                    }
                    let mut m = k;
                    while m < chars.len() && (chars[m] == ' ' || chars[m] == '\t') {
                        m += 1;
                    }
                    let new_rule = k > j && chars.get(m..m + 3) == Some(&[':', ':', '=']);
                    if j >= chars.len() || new_rule {
                        i = j;
                        break;
                    }
                    i = j;
                }
                '"' => {
                    let mut lit = String::new();
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        if chars[i] == '\\' {
                            let (ch, n) = gbnf_escape(&chars[i..]).ok_or_else(|| {
                                bad(format!("bad escape in a string at character {i}"))
                            })?;
                            lit.push(ch);
                            i += n;
                        } else {
                            lit.push(chars[i]);
                            i += 1;
                        }
                    }
                    if i >= chars.len() {
                        return Err(bad("unterminated string".into()));
                    }
                    i += 1;
                    out.push(' ');
                    out.push_str(&lark_string(&lit));
                }
                '[' => {
                    let mut class = String::from("[");
                    i += 1;
                    if chars.get(i) == Some(&'^') {
                        class.push('^');
                        i += 1;
                    }
                    while i < chars.len() && chars[i] != ']' {
                        if chars[i] == '\\' {
                            let (ch, n) = gbnf_escape(&chars[i..]).ok_or_else(|| {
                                bad(format!("bad escape in a class at character {i}"))
                            })?;
                            push_class_char(&mut class, ch);
                            i += n;
                        } else {
                            let ch = chars[i];
                            if ch == '-' {
                                class.push('-');
                            } else {
                                push_class_char(&mut class, ch);
                            }
                            i += 1;
                        }
                    }
                    if i >= chars.len() {
                        return Err(bad("unterminated character class".into()));
                    }
                    i += 1;
                    class.push(']');
                    out.push_str(&format!(" /{class}/"));
                }
                '.' => {
                    i += 1;
                    out.push_str(" /(?s:.)/");
                }
                '(' => {
                    depth += 1;
                    i += 1;
                    out.push_str(" (");
                }
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| bad(format!("unbalanced `)` at character {i}")))?;
                    i += 1;
                    out.push_str(" )");
                }
                '|' | '*' | '+' | '?' => {
                    i += 1;
                    out.push(' ');
                    out.push(c);
                }
                '{' => {
                    let end = chars[i..]
                        .iter()
                        .position(|&c| c == '}')
                        .ok_or_else(|| bad("unterminated `{m,n}`".into()))?;
                    let body: String = chars[i + 1..i + end].iter().collect();
                    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
                    let ok = body
                        .split(',')
                        .all(|p| p.is_empty() || p.chars().all(|c| c.is_ascii_digit()));
                    if !ok || body.is_empty() || body.split(',').count() > 2 {
                        return Err(bad(format!("bad repetition `{{{body}}}`")));
                    }
                    // llguidance's Lark takes GBNF's counted repetitions as they are.
                    out.push_str(&format!("{{{body}}}"));
                    i += end + 1;
                }
                c if is_name(c) => {
                    let s = i;
                    while i < chars.len() && is_name(chars[i]) {
                        i += 1;
                    }
                    let n: String = chars[s..i].iter().collect();
                    out.push(' ');
                    out.push_str(&name_of(&n));
                }
                other => return Err(bad(format!("unexpected `{other}` at character {i}"))),
            }
        }
        if depth != 0 {
            return Err(bad(format!("unbalanced `(` in rule `{name}`")));
        }
        out.push('\n');
    }
    if !have_root {
        return Err(bad("no `root` rule".into()));
    }
    Ok(out)
}

/// One escape at the start of `s` (`\n`, `\t`, `\r`, `\\`, `\"`, `\]`, `\[`, `\-`, `\xHH`,
/// `\uHHHH`, `\UHHHHHHHH`): the character and how many chars it took.
fn gbnf_escape(s: &[char]) -> Option<(char, usize)> {
    let hex = |n: usize| -> Option<(char, usize)> {
        let h: String = s.get(2..2 + n)?.iter().collect();
        Some((char::from_u32(u32::from_str_radix(&h, 16).ok()?)?, 2 + n))
    };
    match s.get(1)? {
        'n' => Some(('\n', 2)),
        't' => Some(('\t', 2)),
        'r' => Some(('\r', 2)),
        'x' => hex(2),
        'u' => hex(4),
        'U' => hex(8),
        c => Some((*c, 2)),
    }
}

/// Appends `ch` to a regex character class, escaped where the class syntax needs it.
fn push_class_char(class: &mut String, ch: char) {
    match ch {
        '\\' | ']' | '[' | '^' | '-' | '/' => {
            class.push('\\');
            class.push(ch);
        }
        '\n' => class.push_str("\\n"),
        '\r' => class.push_str("\\r"),
        '\t' => class.push_str("\\t"),
        c => class.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_becomes_lark() {
        let gbnf = r#"
            # comment
            root ::= greeting ws name ("!" | "?")?
            greeting ::= "hi" | "hello\n"
            ws ::= [ \t]+
            name ::= [A-Z] [a-z-]{1,8} digits*
            digits ::= [^\]x\\] .
        "#;
        let lark = gbnf_to_lark(gbnf).unwrap();
        let want = "start: r_greeting r_ws r_name ( \"!\" | \"?\" ) ?\n\
                    r_greeting: \"hi\" | \"hello\\n\"\n\
                    r_ws: /[ \\t]/ +\n\
                    r_name: /[A-Z]/ /[a-z-]/{1,8} r_digits *\n\
                    r_digits: /[^\\]x\\\\]/ /(?s:.)/\n";
        assert_eq!(lark, want);
        // A rule may go on over several lines.
        let multi = gbnf_to_lark("root ::= \"a\"\n   | \"b\"\n").unwrap();
        assert_eq!(multi, "start: \"a\" | \"b\"\n");
        for bad in [
            "start ::= \"a\"",
            "root ::= (\"a\"",
            "root ::= \"a",
            "root = \"a\"",
            "root ::= [a-",
            "root ::= x{1,a}",
        ] {
            assert!(gbnf_to_lark(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grammar_text_is_gbnf_or_lark() {
        let g = Grammar::from_grammar_text("root ::= \"x\"").unwrap();
        assert_eq!(
            g,
            Grammar::Lark {
                grammar: "start: \"x\"\n".into()
            }
        );
        let g = Grammar::from_grammar_text("start: \"x\"").unwrap();
        assert_eq!(
            g,
            Grammar::Lark {
                grammar: "start: \"x\"".into()
            }
        );
    }

    #[test]
    fn byte_level_pieces_map_back_to_bytes() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
        assert_eq!(byte_fallback("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_fallback("<0x0>"), None);
    }

    #[test]
    fn json_scan_follows_strings_and_numbers() {
        let mut s = JsonScan::default();
        s.feed(br#"{"a": "x\"y"#);
        assert!(s.in_string);
        s.feed(br#"", "b": 1"#);
        assert!(!s.in_string && s.in_number());
        s.feed(b"1");
        assert_eq!((s.last, s.run), (b'1', 2));
    }

    #[test]
    fn json_schemas_get_wicks_layout_unless_they_set_one() {
        let s = with_layout(&json!({"type": "object"}), None);
        assert_eq!(s["x-guidance"]["item_separator"], ", ");
        let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(with_layout(&own, None), own);
        let ws = with_layout(&json!({}), Some("[ ]?"));
        assert_eq!(ws["x-guidance"]["whitespace_pattern"], "[ ]?");
    }
}
