//! One reply as it is generated: token ids in, final text out.
//!
//! [`Reply`] is the per-token pipeline of every request the engine runs: stop ids → streaming detokenizer → stop
//! strings → reasoning split, with the reply's accumulators (ids, content, reasoning,
//! logprobs). [`Reply::on_token`] takes each sampled token and returns the text it made
//! final and whether the reply ends there; [`Reply::finish`] flushes what the stages still
//! hold back.

use std::sync::Arc;

use super::reasoning::{Delta, ReasoningParser};
use super::stops::StopMatcher;
use super::tokenizer::{StreamDecoder, Tokenizer};
use crate::generate::FinishReason;
use crate::sampler::{SamplingParams, TokenLogprobs};

/// What one token did to the reply.
#[derive(Debug, Default)]
pub struct TokenOutcome {
    /// Text this token made final; `None` for a stop id, which ends the reply unseen.
    pub delta: Option<Delta>,
    /// The reply ends with this token.
    pub finish: Option<FinishReason>,
}

/// One reply's per-token pipeline and accumulators (see the module docs).
pub struct Reply {
    /// Ids that end the reply: the model's end-of-sequence ids (unless ignored) and the
    /// request's stop ids.
    stop_ids: Vec<u32>,
    /// Most tokens the reply may have.
    max_new: usize,
    decoder: StreamDecoder,
    stops: StopMatcher,
    parser: ReasoningParser,
    token_ids: Vec<u32>,
    content: String,
    reasoning: String,
    logprobs: Vec<TokenLogprobs>,
}

impl Reply {
    /// A reply to a request with `params`, of at most `max_new` tokens; `start_in_reasoning`
    /// when the prompt leaves a `<think>` block open.
    pub fn new(
        tokenizer: &Arc<Tokenizer>,
        params: &SamplingParams,
        eos_token_ids: &[u32],
        start_in_reasoning: bool,
        max_new: usize,
    ) -> Self {
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(eos_token_ids);
        }
        Reply {
            stop_ids,
            max_new,
            decoder: tokenizer.stream_decoder(true),
            stops: StopMatcher::new(&params.stop),
            parser: ReasoningParser::new(start_in_reasoning),
            token_ids: Vec::new(),
            content: String::new(),
            reasoning: String::new(),
            logprobs: Vec::new(),
        }
    }

    /// Takes the next generated token (and its logprobs, if the request asked for them).
    /// Errors only when the token cannot be detokenized.
    pub fn on_token(
        &mut self,
        id: u32,
        logprobs: Option<TokenLogprobs>,
    ) -> crate::Result<TokenOutcome> {
        self.token_ids.push(id);
        self.logprobs.extend(logprobs);
        if self.stop_ids.contains(&id) {
            return Ok(TokenOutcome {
                delta: None,
                finish: Some(FinishReason::Stop),
            });
        }
        let text = self.decoder.push(id)?;
        let outcome = self.stops.push(&text);
        let delta = self.parser.push(&outcome.emit);
        self.collect(&delta);
        let finish = if outcome.stopped {
            Some(FinishReason::Stop)
        } else if self.token_ids.len() >= self.max_new {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(TokenOutcome {
            delta: Some(delta),
            finish,
        })
    }

    /// Ends the reply: returns what the detokenizer, the stop matcher and the reasoning
    /// parser still held. After a stop string, whatever followed it is dropped.
    pub fn finish(&mut self) -> Delta {
        let mut tail = String::new();
        if self.stops.matched().is_none() {
            match self.decoder.finish() {
                Ok(rest) => tail = self.stops.push(&rest).emit,
                Err(e) => tracing::warn!("detokenizing the end of a reply: {e}"),
            }
            tail.push_str(&self.stops.finish());
        }
        let mut delta = self.parser.push(&tail);
        let last = self.parser.finish();
        delta.reasoning.push_str(&last.reasoning);
        delta.content.push_str(&last.content);
        self.collect(&delta);
        delta
    }

    fn collect(&mut self, delta: &Delta) {
        self.reasoning.push_str(&delta.reasoning);
        self.content.push_str(&delta.content);
    }

    /// The generated ids, including a final stop id if one was sampled.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The answer so far.
    pub fn content(&self) -> &str {
        &self.content
    }

    /// The per-token logprobs so far (empty unless the request asked for them).
    pub fn logprobs(&self) -> &[TokenLogprobs] {
        &self.logprobs
    }

    /// The finished reply's parts: ids, answer, reasoning (`None` when there was none) and
    /// logprobs.
    pub fn into_parts(self) -> ReplyParts {
        ReplyParts {
            token_ids: self.token_ids,
            content: self.content,
            reasoning: (!self.reasoning.is_empty()).then_some(self.reasoning),
            logprobs: self.logprobs,
        }
    }
}

/// What a finished [`Reply`] produced.
#[derive(Clone, Debug, Default)]
pub struct ReplyParts {
    /// The generated ids, including a final stop id if one was sampled.
    pub token_ids: Vec<u32>,
    /// The answer.
    pub content: String,
    /// The thinking, if the model produced any.
    pub reasoning: Option<String>,
    /// Per-token logprobs, when requested.
    pub logprobs: Vec<TokenLogprobs>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/qwen3-tiny/tokenizer.json");
        assert!(path.exists(), "fixture {} is missing", path.display());
        Arc::new(Tokenizer::from_file(path).unwrap())
    }

    /// Feeds `text`'s ids one by one; returns the concatenated deltas (finish included), the
    /// finish reason and the reply's parts.
    fn run(
        text: &str,
        params: &SamplingParams,
        eos: &[u32],
        max_new: usize,
    ) -> (Delta, Option<FinishReason>, ReplyParts) {
        let tok = tokenizer();
        let ids = tok.encode(text, false).unwrap();
        let mut reply = Reply::new(&tok, params, eos, false, max_new);
        let mut seen = Delta::default();
        let mut finish = None;
        for &id in &ids {
            let outcome = reply.on_token(id, None).unwrap();
            if let Some(d) = outcome.delta {
                seen.reasoning += &d.reasoning;
                seen.content += &d.content;
            }
            if outcome.finish.is_some() {
                finish = outcome.finish;
                break;
            }
        }
        let d = reply.finish();
        seen.reasoning += &d.reasoning;
        seen.content += &d.content;
        (seen, finish, reply.into_parts())
    }

    #[test]
    fn reasoning_content_and_a_stop_string_split_across_tokens() {
        let params = SamplingParams {
            stop: vec!["STOP".into()],
            ..SamplingParams::default()
        };
        let text = "<think>\nhmm, café\n</think>\n\nHello wörld STOP and more";
        let (seen, finish, parts) = run(text, &params, &[], 1000);
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(seen.reasoning, "\nhmm, café\n");
        assert_eq!(seen.content, "Hello wörld ");
        assert_eq!(parts.content, seen.content);
        assert_eq!(parts.reasoning.as_deref(), Some("\nhmm, café\n"));
    }

    #[test]
    fn stop_ids_and_the_token_limit_end_the_reply() {
        let tok = tokenizer();
        let ids = tok.encode("one two three four", false).unwrap();
        assert!(ids.len() >= 4);
        let (seen, finish, parts) = run("one two three four", &SamplingParams::default(), &[], 2);
        assert_eq!(finish, Some(FinishReason::Length));
        assert_eq!(parts.token_ids, ids[..2]);
        assert_eq!(seen.content, tok.decode(&ids[..2], true).unwrap());
        assert_eq!(parts.reasoning, None);

        // The third token as an end-of-sequence id: kept in the ids, never in the text.
        let eos = [ids[2]];
        let (seen, finish, parts) = run("one two three four", &SamplingParams::default(), &eos, 99);
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(parts.token_ids, ids[..3]);
        assert_eq!(seen.content, tok.decode(&ids[..2], true).unwrap());
        // Unless the request ignores it.
        let ignore = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let (seen, finish, _) = run("one two three four", &ignore, &eos, 99);
        assert_eq!(finish, None);
        assert_eq!(seen.content, "one two three four");
    }
}
