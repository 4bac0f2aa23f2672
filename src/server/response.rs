//! Running a checked request on the engine and answering in OpenAI's shapes, as one JSON
//! document or as server-sent events.
//!
//! The `n` choices (times the prompts, for completions) are submitted as separate engine
//! requests (seeds `seed + i`), and their event streams merged. One producer task turns the
//! merged events into chunks; for a stream it writes them into the SSE body, otherwise it
//! accumulates the answer. When the client disconnects, the body (or the handler future) is
//! dropped, the producer sees its channel close and drops the engine streams, which cancels
//! the requests.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{select_all, Stream, StreamExt};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::request::Parsed;
use super::{AppState, OverloadPolicy};
use crate::engine::{Completion, EngineEvent};
use crate::generate::FinishReason;
use crate::sampler::TokenLogprobs;
use crate::text::tokenizer::Tokenizer;
use crate::text::tool_calls::{ToolCall, ToolCallParser};

/// Which endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// One choice as it accumulates.
#[derive(Default)]
struct Choice {
    content: String,
    reasoning: String,
    tools: Option<ToolCallParser>,
    calls: Vec<ToolCall>,
    logprobs: Vec<Value>,
    /// For completions' logprobs.
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    finish: Option<&'static str>,
    completion: Option<Completion>,
}

type Merged = Pin<Box<dyn Stream<Item = (usize, EngineEvent)> + Send>>;

fn finish_reason(r: FinishReason, calls: bool) -> &'static str {
    match r {
        FinishReason::Stop if calls => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Chat-format logprobs entries for `ids`.
fn chat_logprobs(tok: &Tokenizer, ids: &[u32], lps: &[TokenLogprobs]) -> Vec<Value> {
    ids.iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let t = token_text(tok, id);
            json!({
                "token": t,
                "logprob": lp.chosen_logprob.max(-9999.0),
                "bytes": t.as_bytes(),
                "top_logprobs": lp.top.iter().map(|&(id, l)| {
                    let t = token_text(tok, id);
                    json!({"token": t, "logprob": l.max(-9999.0), "bytes": t.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn tool_call_json(calls: &[ToolCall], first_index: usize) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": first_index + i,
                "id": format!("call_{:016x}", rand::random::<u64>()),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

/// Submits the request's choices and answers.
pub async fn run(st: Arc<AppState>, mut p: Parsed, kind: Kind) -> Result<Response, ApiError> {
    let loaded = st.ready()?;
    let engine = loaded.engine.clone();
    let guard = st.enter();
    // Degrade under load, if asked to.
    let mut degraded = None;
    if let OverloadPolicy::Degrade {
        threshold,
        max_tokens,
    } = st.opts.overload
    {
        if engine.metrics().snapshot().waiting as usize >= threshold {
            let limit = p
                .params
                .max_tokens
                .map_or(max_tokens, |m| m.min(max_tokens));
            p.params.max_tokens = Some(limit);
            p.params.temperature = 0.0;
            degraded = Some(format!("max_tokens={limit},greedy"));
        }
    }
    if p.params.max_tokens.is_none() && kind == Kind::Completion {
        // Chat: up to the context's end; completions: 16, like OpenAI.
        p.params.max_tokens = Some(16);
    }
    if p.tools {
        // Let the model finish its call blocks; the parser takes them out of the content.
        p.params.stop.retain(|s| !s.contains("tool_call"));
    }
    // Admission first: a request the queue cannot take costs no thread and no tokenizing.
    engine.admit(p.prompts.len() * p.n)?;
    // Rendering and tokenizing a long prompt is CPU work: keep it off the async workers,
    // and do it once per prompt for all `n` choices.
    let (prompts, params, n) = (p.prompts.clone(), p.params.clone(), p.n);
    let grammar_field = p.grammar_field;
    let submitter = engine.clone();
    let streams = tokio::task::spawn_blocking(move || -> crate::Result<Vec<_>> {
        let mut streams = Vec::new();
        for prompt in prompts {
            let prepared = submitter.prepare(prompt)?;
            for i in 0..n {
                let mut params = params.clone();
                params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
                streams.push(submitter.submit_prepared(&prepared, params)?);
            }
        }
        Ok(streams)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| match e {
        // A grammar that does not compile: name the field it came from.
        crate::Error::InvalidParam {
            param: "grammar",
            message,
        } => ApiError::invalid(grammar_field, message),
        other => ApiError::from(other),
    })?;
    let merged: Merged = Box::pin(select_all(streams.into_iter().enumerate().map(|(i, s)| {
        futures_util::stream::unfold(s, move |mut s| async move {
            s.next().await.map(|ev| ((i, ev), s))
        })
        .boxed()
    })));
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u64>()
    );
    let ctx = Ctx {
        id,
        created: super::unix_now(),
        model: loaded.model_name.clone(),
        // `include_reasoning: false` drops the reasoning from the reply.
        reasoning_fields: if p.include_reasoning {
            st.opts.reasoning_fields.clone()
        } else {
            Vec::new()
        },
        kind,
        tokenizer: engine.text().tokenizer.clone(),
        choices: p.prompts.len() * p.n,
        n: p.n,
        include_usage: p.include_usage,
        logprobs: p.logprobs,
        tools: p.tools,
        forced_tool_prefix: p.forced_tool_prefix.clone(),
        timeout: st.opts.request_timeout,
    };
    let mut resp = if p.stream {
        stream_response(ctx, merged, guard)
    } else {
        let r = whole_response(ctx, merged).await?;
        drop(guard);
        r
    };
    if let Some(d) = degraded {
        if let Ok(v) = HeaderValue::from_str(&d) {
            resp.headers_mut().insert("x-wick-degraded", v);
        }
    }
    Ok(resp)
}

struct Ctx {
    id: String,
    created: u64,
    model: String,
    /// Fields the reasoning goes in; none: it is dropped.
    reasoning_fields: Vec<String>,
    kind: Kind,
    tokenizer: Arc<Tokenizer>,
    choices: usize,
    n: usize,
    include_usage: bool,
    logprobs: bool,
    tools: bool,
    /// The start of a forced call, written by the prompt rather than by the model.
    forced_tool_prefix: Option<String>,
    timeout: Duration,
}

impl Ctx {
    fn usage(&self, choices: &[Choice]) -> Value {
        let (mut prompt, mut completion, mut cached) = (0, 0, 0);
        for (i, c) in choices.iter().enumerate() {
            let Some(done) = &c.completion else { continue };
            completion += done.usage.completion_tokens;
            // The prompt counts once per prompt, not once per choice.
            if i % self.n == 0 {
                prompt += done.usage.prompt_tokens;
                cached += done.usage.cached_tokens;
            }
        }
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    /// Applies one event to its choice; returns the chunk's `choices[0]` for streaming.
    fn apply(
        &self,
        c: &mut Choice,
        index: usize,
        ev: EngineEvent,
    ) -> Result<Option<Value>, ApiError> {
        match ev {
            EngineEvent::Delta {
                token_ids,
                reasoning,
                content,
                logprobs,
            } => {
                let (content, calls) = match c.tools.as_mut() {
                    Some(parser) => {
                        let d = parser.push(&content);
                        (d.content, d.calls)
                    }
                    None => (content, Vec::new()),
                };
                let dropped = self.kind == Kind::Chat && self.reasoning_fields.is_empty();
                let reasoning = if dropped { String::new() } else { reasoning };
                // A delta of dropped reasoning alone has nothing to send.
                if dropped
                    && reasoning.is_empty()
                    && content.is_empty()
                    && calls.is_empty()
                    && (!self.logprobs || logprobs.is_empty())
                {
                    return Ok(None);
                }
                Ok(Some(self.delta(
                    c, index, &token_ids, reasoning, content, calls, &logprobs,
                )))
            }
            EngineEvent::Finished(done) => {
                let (content, calls) = match c.tools.as_mut() {
                    Some(parser) => {
                        let d = parser.finish();
                        (d.content, d.calls)
                    }
                    None => (String::new(), Vec::new()),
                };
                let mut chunk = None;
                if !content.is_empty() || !calls.is_empty() {
                    chunk = Some(self.delta(c, index, &[], String::new(), content, calls, &[]));
                }
                c.finish = Some(finish_reason(done.finish_reason, !c.calls.is_empty()));
                c.completion = Some(done);
                Ok(chunk)
            }
            EngineEvent::Error(e) => Err(ApiError::internal(e)),
        }
    }

    /// Records a delta in `c` and renders it as a stream chunk's choice.
    #[allow(clippy::too_many_arguments)]
    fn delta(
        &self,
        c: &mut Choice,
        index: usize,
        ids: &[u32],
        reasoning: String,
        content: String,
        calls: Vec<ToolCall>,
        lps: &[TokenLogprobs],
    ) -> Value {
        let mut lp_value = Value::Null;
        if self.logprobs && !lps.is_empty() {
            match self.kind {
                Kind::Chat => {
                    let entries = chat_logprobs(&self.tokenizer, ids, lps);
                    c.logprobs.extend(entries.iter().cloned());
                    lp_value = json!({"content": entries});
                }
                Kind::Completion => {
                    let mut tokens = Vec::new();
                    let mut lp = Vec::new();
                    let mut top = Vec::new();
                    for (&id, l) in ids.iter().zip(lps) {
                        tokens.push(token_text(&self.tokenizer, id));
                        lp.push(l.chosen_logprob.max(-9999.0));
                        let m: Map<String, Value> = l
                            .top
                            .iter()
                            .map(|&(t, v)| (token_text(&self.tokenizer, t), json!(v.max(-9999.0))))
                            .collect();
                        top.push(Value::Object(m));
                    }
                    c.tokens.extend(tokens.iter().cloned());
                    c.token_logprobs.extend(&lp);
                    c.top_logprobs.extend(top.iter().cloned());
                    lp_value = json!({"tokens": tokens, "token_logprobs": lp, "top_logprobs": top});
                }
            }
        }
        match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if !reasoning.is_empty() {
                    for f in &self.reasoning_fields {
                        delta.insert(f.clone(), json!(reasoning));
                    }
                }
                if !content.is_empty() {
                    delta.insert("content".into(), json!(content));
                }
                if !calls.is_empty() {
                    delta.insert(
                        "tool_calls".into(),
                        json!(tool_call_json(&calls, c.calls.len())),
                    );
                }
                c.reasoning.push_str(&reasoning);
                c.content.push_str(&content);
                c.calls.extend(calls);
                json!({"index": index, "delta": delta, "logprobs": lp_value, "finish_reason": null})
            }
            Kind::Completion => {
                // A raw completion's text is everything the model wrote.
                let text = reasoning + &content;
                c.content.push_str(&text);
                json!({"index": index, "text": text, "logprobs": lp_value, "finish_reason": null})
            }
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn new_choices(&self) -> Vec<Choice> {
        (0..self.choices)
            .map(|_| Choice {
                tools: self.tools.then(|| {
                    let mut parser = ToolCallParser::new();
                    if let Some(prefix) = &self.forced_tool_prefix {
                        // Opens the block: nothing comes out until the model closes it.
                        let _ = parser.push(prefix);
                    }
                    parser
                }),
                ..Choice::default()
            })
            .collect()
    }
}

async fn whole_response(ctx: Ctx, mut merged: Merged) -> Result<Response, ApiError> {
    let mut choices = ctx.new_choices();
    let mut open = ctx.choices;
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    while open > 0 {
        let next = tokio::time::timeout_at(deadline, merged.next())
            .await
            .map_err(|_| ApiError::timeout(ctx.timeout.as_secs()))?;
        let Some((i, ev)) = next else {
            return Err(ApiError::internal("the engine stopped during a request"));
        };
        let finished = matches!(ev, EngineEvent::Finished(_));
        ctx.apply(&mut choices[i], i, ev)?;
        if finished {
            open -= 1;
        }
    }
    let usage = ctx.usage(&choices);
    let rendered: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match ctx.kind {
            Kind::Chat => {
                let mut msg = Map::new();
                msg.insert("role".into(), json!("assistant"));
                // OpenAI sends `null` content beside tool calls when there is no text.
                let content = if c.content.is_empty() && !c.calls.is_empty() {
                    Value::Null
                } else {
                    json!(c.content)
                };
                msg.insert("content".into(), content);
                if !c.reasoning.is_empty() {
                    for f in &ctx.reasoning_fields {
                        msg.insert(f.clone(), json!(c.reasoning));
                    }
                }
                if !c.calls.is_empty() {
                    msg.insert("tool_calls".into(), json!(tool_call_json(&c.calls, 0)));
                }
                json!({
                    "index": i,
                    "message": msg,
                    "logprobs": if ctx.logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                    "finish_reason": c.finish,
                })
            }
            Kind::Completion => json!({
                "index": i,
                "text": c.content,
                "logprobs": if ctx.logprobs {
                    json!({"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top_logprobs})
                } else { Value::Null },
                "finish_reason": c.finish,
            }),
        })
        .collect();
    Ok(Json(json!({
        "id": ctx.id,
        "object": if ctx.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": ctx.created,
        "model": ctx.model,
        "choices": rendered,
        "usage": usage,
    }))
    .into_response())
}

fn stream_response(ctx: Ctx, mut merged: Merged, guard: super::InFlight) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let send = |v: Value| Event::default().data(v.to_string());
        let mut choices = ctx.new_choices();
        if ctx.kind == Kind::Chat {
            let first: Vec<Value> = (0..ctx.choices)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            if tx.send(send(ctx.chunk(first))).await.is_err() {
                return;
            }
        }
        let mut open = ctx.choices;
        let deadline = tokio::time::Instant::now() + ctx.timeout;
        while open > 0 {
            let next = tokio::select! {
                n = merged.next() => n,
                _ = tx.closed() => return, // the client left: dropping `merged` cancels
                _ = tokio::time::sleep_until(deadline) => {
                    let e = ApiError::timeout(ctx.timeout.as_secs());
                    let _ = tx.send(send(e.body())).await;
                    return;
                }
            };
            let Some((i, ev)) = next else {
                let _ = tx
                    .send(send(ApiError::internal("the engine stopped").body()))
                    .await;
                return;
            };
            let finished = matches!(ev, EngineEvent::Finished(_));
            match ctx.apply(&mut choices[i], i, ev) {
                Ok(Some(choice)) => {
                    let empty = choice
                        .get("delta")
                        .is_some_and(|d| d.as_object().is_some_and(Map::is_empty))
                        && choice["logprobs"].is_null();
                    if !empty && tx.send(send(ctx.chunk(vec![choice]))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(send(e.body())).await;
                    return;
                }
            }
            if finished {
                open -= 1;
                let last = match ctx.kind {
                    Kind::Chat => {
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": choices[i].finish})
                    }
                    Kind::Completion => {
                        json!({"index": i, "text": "", "logprobs": null, "finish_reason": choices[i].finish})
                    }
                };
                if tx.send(send(ctx.chunk(vec![last]))).await.is_err() {
                    return;
                }
            }
        }
        if ctx.include_usage {
            let mut u = ctx.chunk(Vec::new());
            u["usage"] = ctx.usage(&choices);
            if tx.send(send(u)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(body)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Usage;

    fn ctx(tools: bool) -> Ctx {
        static TOKENIZER: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
        let tokenizer = TOKENIZER.get_or_init(|| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/qwen3-tiny/tokenizer.json");
            Arc::new(Tokenizer::from_file(path).unwrap())
        });
        Ctx {
            id: "chatcmpl-test".into(),
            created: 0,
            model: "m".into(),
            reasoning_fields: vec!["reasoning".into(), "reasoning_content".into()],
            kind: Kind::Chat,
            tokenizer: tokenizer.clone(),
            choices: 1,
            n: 1,
            include_usage: false,
            logprobs: false,
            tools,
            forced_tool_prefix: None,
            timeout: Duration::from_secs(1),
        }
    }

    fn delta(reasoning: &str, content: &str) -> EngineEvent {
        EngineEvent::Delta {
            token_ids: vec![1],
            reasoning: reasoning.into(),
            content: content.into(),
            logprobs: Vec::new(),
        }
    }

    fn finished(reason: FinishReason) -> EngineEvent {
        EngineEvent::Finished(Completion {
            finish_reason: reason,
            usage: Usage::default(),
            token_ids: Vec::new(),
            content: String::new(),
            reasoning: None,
            time_to_first_token: Duration::ZERO,
            total_time: Duration::ZERO,
            preemptions: 0,
            logprobs: Vec::new(),
        })
    }

    /// Streams `answer` cut into `pieces` through a chat choice with tools; returns the
    /// chunks' choices and the finished choice.
    fn stream(answer: &str, cuts: &[usize], tools: bool) -> (Vec<Value>, Choice) {
        stream_in(&ctx(tools), answer, cuts)
    }

    fn stream_in(ctx: &Ctx, answer: &str, cuts: &[usize]) -> (Vec<Value>, Choice) {
        let mut c = ctx.new_choices().remove(0);
        let mut out = Vec::new();
        let mut events = vec![delta("thinking about it", "")];
        let mut prev = 0;
        for &cut in cuts.iter().chain([answer.len()].iter()) {
            events.push(delta("", &answer[prev..cut]));
            prev = cut;
        }
        events.push(finished(FinishReason::Stop));
        for ev in events {
            if let Some(v) = ctx.apply(&mut c, 0, ev).unwrap() {
                out.push(v);
            }
        }
        (out, c)
    }

    const ANSWER: &str = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                          {\"city\": \"Paris\"}}\n</tool_call>";

    #[test]
    fn tool_calls_become_tool_call_deltas_at_every_split() {
        for cut in 0..=ANSWER.len() {
            let (chunks, c) = stream(ANSWER, &[cut], true);
            let content: String = chunks
                .iter()
                .filter_map(|v| v["delta"]["content"].as_str())
                .collect();
            assert_eq!(content, "Checking.\n", "cut at {cut}");
            assert_eq!(chunks[0]["delta"]["reasoning_content"], "thinking about it");
            let calls: Vec<&Value> = chunks
                .iter()
                .filter_map(|v| v["delta"]["tool_calls"].as_array())
                .flatten()
                .collect();
            assert_eq!(calls.len(), 1, "cut at {cut}");
            assert_eq!(calls[0]["index"], 0);
            assert_eq!(calls[0]["type"], "function");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            let args = calls[0]["function"]["arguments"].as_str().unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(args).unwrap(),
                json!({"city": "Paris"})
            );
            assert_eq!(c.finish, Some("tool_calls"));
        }
    }

    #[test]
    fn a_forced_call_is_parsed_with_the_prefix_the_prompt_wrote() {
        let mut ctx = ctx(true);
        ctx.forced_tool_prefix =
            Some("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ".into());
        let rest = "{\"city\": \"Paris\"}}\n</tool_call>";
        for cut in 0..=rest.len() {
            let (chunks, c) = stream_in(&ctx, rest, &[cut]);
            let content: String = chunks
                .iter()
                .filter_map(|v| v["delta"]["content"].as_str())
                .collect();
            assert_eq!(content, "", "cut at {cut}");
            let calls: Vec<&Value> = chunks
                .iter()
                .filter_map(|v| v["delta"]["tool_calls"].as_array())
                .flatten()
                .collect();
            assert_eq!(calls.len(), 1, "cut at {cut}");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            let args = calls[0]["function"]["arguments"].as_str().unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(args).unwrap(),
                json!({"city": "Paris"})
            );
            assert_eq!(c.finish, Some("tool_calls"));
        }
    }

    #[test]
    fn without_tools_the_markup_is_plain_text() {
        let (chunks, c) = stream(ANSWER, &[5], false);
        let content: String = chunks
            .iter()
            .filter_map(|v| v["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, ANSWER);
        assert_eq!(c.finish, Some("stop"));
    }

    #[test]
    fn completions_text_includes_reasoning_and_length_is_reported() {
        let mut ctx = ctx(false);
        ctx.kind = Kind::Completion;
        let mut c = ctx.new_choices().remove(0);
        let a = ctx
            .apply(&mut c, 0, delta("<think>", "x"))
            .unwrap()
            .unwrap();
        assert_eq!(a["text"], "<think>x");
        ctx.apply(&mut c, 0, finished(FinishReason::Length))
            .unwrap();
        assert_eq!(c.finish, Some("length"));
    }
}
