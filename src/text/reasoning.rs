//! Separating a Qwen3 model's thinking from its answer.
//!
//! With thinking on, Qwen3 generates `<think>\n…\n</think>\n\nanswer`; some templates put
//! the opening `<think>` in the prompt, so generation starts inside the reasoning. With
//! thinking off the prompt already ends in an empty think block and everything generated is
//! the answer. [`ReasoningParser`] splits streamed text into [`Delta`]s of reasoning and
//! content; [`split_reasoning`] does the same on a whole text, with the same result.
//!
//! The rules follow vLLM's Qwen3 reasoning parser, except for whitespace after `</think>`:
//!
//! - Before `<think>` (and when there is none), text is content, unless the parser starts
//!   in reasoning.
//! - Text between `<think>` and `</think>` is reasoning, verbatim: the newlines Qwen3 puts
//!   inside the tags stay, as in vLLM (the chat template strips them when the reasoning is
//!   sent back as `reasoning_content`).
//! - After the first `</think>` everything is content, verbatim, except that leading
//!   whitespace (Qwen3's `\n\n`) is dropped; vLLM keeps it.
//! - The tags never appear in either output, even when a tag arrives split across pushes.
//!   Only the first `<think>` and the first `</think>` are tags.
//! - If generation ends inside an unclosed think block, what was generated is reasoning
//!   (the answer was cut off by the token limit).
//!
//! ```
//! use wick::text::reasoning::{split_reasoning, ReasoningParser};
//!
//! let mut parser = ReasoningParser::new(false);
//! let mut reasoning = String::new();
//! let mut content = String::new();
//! for piece in ["<thi", "nk>\nhmm\n</th", "ink>\n\nHi", "!"] {
//!     let delta = parser.push(piece);
//!     reasoning += &delta.reasoning;
//!     content += &delta.content;
//! }
//! let delta = parser.finish();
//! reasoning += &delta.reasoning;
//! content += &delta.content;
//! assert_eq!((reasoning.as_str(), content.as_str()), ("\nhmm\n", "Hi!"));
//!
//! let whole = split_reasoning("<think>\nhmm\n</think>\n\nHi!", false);
//! assert_eq!(whole, (Some("\nhmm\n".to_string()), "Hi!".to_string()));
//! ```

use super::partial_tag_suffix;

/// Opens the reasoning block.
pub const THINK_START: &str = "<think>";
/// Closes the reasoning block.
pub const THINK_END: &str = "</think>";

/// Text produced by one step of the parser, split by kind. Either part may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Thinking text (OpenAI-compatible servers send it as `reasoning_content`).
    pub reasoning: String,
    /// Answer text.
    pub content: String,
}

impl Delta {
    /// True when the step produced no text at all.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

/// Where the parser is in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Content, no reasoning block seen yet: watching for `<think>`.
    BeforeThink,
    /// Inside the reasoning block: watching for `</think>`.
    Thinking,
    /// After `</think>`: content, still dropping the whitespace that follows the tag.
    AfterThinkLeading,
    /// After `</think>` and the first non-whitespace character: content, verbatim.
    Answer,
}

/// Streaming splitter of reasoning and content.
///
/// Text that might be the beginning of a tag is held back until the next push decides
/// it, so each [`Delta`] is final.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    phase: Phase,
    /// Held-back tail of the input that is a proper prefix of the tag being watched for.
    pending: String,
}

impl ReasoningParser {
    /// A parser for a fresh generation. `start_in_reasoning` says the prompt already ends
    /// with an open `<think>`, so the first generated text is reasoning.
    pub fn new(start_in_reasoning: bool) -> Self {
        Self {
            phase: if start_in_reasoning {
                Phase::Thinking
            } else {
                Phase::BeforeThink
            },
            pending: String::new(),
        }
    }

    /// True while the parser is inside the reasoning block.
    pub fn in_reasoning(&self) -> bool {
        self.phase == Phase::Thinking
    }

    /// Feeds newly generated text and returns what can be attributed so far.
    pub fn push(&mut self, text: &str) -> Delta {
        let mut delta = Delta::default();
        let mut buf = std::mem::take(&mut self.pending);
        buf.push_str(text);
        let mut rest = buf.as_str();
        while !rest.is_empty() {
            match self.phase {
                Phase::BeforeThink | Phase::Thinking => {
                    let (tag, out, next) = if self.phase == Phase::BeforeThink {
                        (THINK_START, &mut delta.content, Phase::Thinking)
                    } else {
                        (THINK_END, &mut delta.reasoning, Phase::AfterThinkLeading)
                    };
                    if let Some(at) = rest.find(tag) {
                        out.push_str(&rest[..at]);
                        rest = &rest[at + tag.len()..];
                        self.phase = next;
                    } else {
                        let keep = partial_tag_suffix(rest, tag);
                        out.push_str(&rest[..rest.len() - keep]);
                        self.pending = rest[rest.len() - keep..].to_string();
                        rest = "";
                    }
                }
                Phase::AfterThinkLeading => {
                    rest = rest.trim_start();
                    if !rest.is_empty() {
                        self.phase = Phase::Answer;
                    }
                }
                Phase::Answer => {
                    delta.content.push_str(rest);
                    rest = "";
                }
            }
        }
        delta
    }

    /// Ends the stream: releases held-back text (a tag that never completed is plain text)
    /// and returns it.
    pub fn finish(&mut self) -> Delta {
        let pending = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::BeforeThink => Delta {
                content: pending,
                ..Delta::default()
            },
            Phase::Thinking => Delta {
                reasoning: pending,
                ..Delta::default()
            },
            // Nothing is held back once the think block is closed.
            Phase::AfterThinkLeading | Phase::Answer => Delta::default(),
        }
    }
}

/// Splits a complete output into `(reasoning, content)`, with the same rules as
/// [`ReasoningParser`]. Reasoning is `None` when the output had no reasoning block
/// (no `<think>`, and `start_in_reasoning` false).
pub fn split_reasoning(text: &str, start_in_reasoning: bool) -> (Option<String>, String) {
    let (before, thinking) = if start_in_reasoning {
        ("", text)
    } else {
        match text.split_once(THINK_START) {
            Some((before, thinking)) => (before, thinking),
            None => return (None, text.to_string()),
        }
    };
    match thinking.split_once(THINK_END) {
        Some((reasoning, after)) => (
            Some(reasoning.to_string()),
            format!("{before}{}", after.trim_start()),
        ),
        None => (Some(thinking.to_string()), before.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `pieces` through a parser and concatenates the output.
    fn stream(pieces: &[&str], start_in_reasoning: bool) -> (String, String) {
        let mut parser = ReasoningParser::new(start_in_reasoning);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces {
            let delta = parser.push(piece);
            reasoning += &delta.reasoning;
            content += &delta.content;
        }
        let delta = parser.finish();
        reasoning += &delta.reasoning;
        content += &delta.content;
        (reasoning, content)
    }

    fn expected(text: &str, start_in_reasoning: bool) -> (String, String) {
        let (reasoning, content) = split_reasoning(text, start_in_reasoning);
        (reasoning.unwrap_or_default(), content)
    }

    const CASES: &[(&str, bool)] = &[
        (
            "<think>\nLet me think.\n</think>\n\nThe answer is 42.",
            false,
        ),
        ("\nLet me think.\n</think>\n\nThe answer is 42.", true),
        ("<think>\n\n</think>\n\nHi", false),
        ("Plain answer, no thinking.", false),
        ("Plain answer with </think> mention.", false),
        (
            "Intro <think>x < y and </thi</think>\n \tafter <think> stays",
            false,
        ),
        ("<think>\ncut off mid-thought <", false),
        ("<think>\ncut off mid-tag </thi", false),
        ("answer with a dangling <thin", false),
        ("<think>思考 🙂</think>\n\n答案 🚀\n", false),
        ("<<think>>a<</think>>b", false),
        ("", false),
        ("", true),
        ("<think></think>", false),
    ];

    #[test]
    fn split_qwen3_output() {
        assert_eq!(
            split_reasoning("<think>\nhmm\n</think>\n\nHello", false),
            (Some("\nhmm\n".into()), "Hello".into())
        );
        assert_eq!(
            split_reasoning("hmm</think>\n\nHello", true),
            (Some("hmm".into()), "Hello".into())
        );
        assert_eq!(split_reasoning("Hello", false), (None, "Hello".into()));
        assert_eq!(
            split_reasoning("<think>\nunfinished", false),
            (Some("\nunfinished".into()), String::new())
        );
        assert_eq!(
            split_reasoning("a <think>b</think> c", false),
            (Some("b".into()), "a c".into())
        );
        assert_eq!(
            split_reasoning("</think>\n\nx</think>", true),
            (Some(String::new()), "x</think>".into())
        );
    }

    #[test]
    fn tags_split_at_every_byte() {
        for &(text, start) in CASES {
            let want = expected(text, start);
            // Two cuts anywhere (on char boundaries) split every tag every possible way.
            let cuts: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for (ai, &a) in cuts.iter().enumerate() {
                for &b in &cuts[ai..] {
                    let pieces = [&text[..a], &text[a..b], &text[b..]];
                    assert_eq!(
                        stream(&pieces, start),
                        want,
                        "text {text:?} (start_in_reasoning={start}) cut at {a}, {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        for &(text, start) in CASES {
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(stream(&pieces, start), expected(text, start), "{text:?}");
        }
    }

    #[test]
    fn random_chunkings_match_split() {
        // A fixed LCG keeps the chunkings reproducible without a dependency.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % bound
        };
        for &(text, start) in CASES {
            for _ in 0..200 {
                let mut pieces = Vec::new();
                let mut at = 0;
                while at < text.len() {
                    let mut end = (at + 1 + next(12)).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    pieces.push(&text[at..end]);
                    at = end;
                }
                assert_eq!(
                    stream(&pieces, start),
                    expected(text, start),
                    "{text:?} as {pieces:?}"
                );
            }
        }
    }

    #[test]
    fn deltas_are_final_and_tag_free() {
        let mut parser = ReasoningParser::new(false);
        assert_eq!(parser.push("<th"), Delta::default());
        assert!(!parser.in_reasoning());
        assert_eq!(
            parser.push("ink>\nstep</"),
            Delta {
                reasoning: "\nstep".into(),
                content: String::new()
            }
        );
        assert!(parser.in_reasoning());
        assert_eq!(parser.push("think>\n"), Delta::default());
        assert_eq!(parser.push("\n"), Delta::default());
        assert_eq!(
            parser.push("Done"),
            Delta {
                reasoning: String::new(),
                content: "Done".into()
            }
        );
        assert!(parser.finish().is_empty());
    }
}
