//! OpenAI request bodies → engine requests, with every field checked and errors that name the
//! field.
//!
//! Parsing is by hand over `serde_json::Value` rather than derived structs so that a wrong
//! type or value answers 400 with `param` set to the field, fields of the OpenAI or vLLM
//! APIs that wick does not implement are refused with 400 naming them (never silently
//! ignored), other unknown fields are ignored as OpenAI-compatible servers do, and the thinking switch is found in every spelling clients
//! use: `chat_template_kwargs.enable_thinking`, a top-level `enable_thinking`, the same two
//! inside a literal `extra_body` object, and `reasoning_effort: "none"`.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::Prompt;
use crate::grammar::{tool_call_grammar, CallStart, Grammar};
use crate::sampler::SamplingParams;
use crate::text::chat_template::RenderOptions;

/// Most choices per request.
pub const MAX_N: usize = 16;
/// Most tokens in `logit_bias` (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most tool definitions.
pub const MAX_TOOLS: usize = 128;

/// Whether a value of an unimplemented field asks for nothing.
type Harmless = fn(&Value) -> bool;

/// Fields of the OpenAI or vLLM APIs that wick does not implement, with the values that
/// ask for nothing (which are accepted). Anything else is refused with 400 naming the field
/// rather than silently ignored.
const UNSUPPORTED: &[(&str, Harmless)] = &[
    ("best_of", |v| v.as_u64() == Some(1)),
    ("use_beam_search", |v| v == &Value::Bool(false)),
    ("length_penalty", |v| v.as_f64() == Some(1.0)),
    ("early_stopping", |v| v == &Value::Bool(false)),
    ("prompt_logprobs", |v| v.as_u64() == Some(0)),
    ("min_tokens", |v| v.as_u64() == Some(0)),
    ("bad_words", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("allowed_token_ids", |v| {
        v.as_array().is_some_and(Vec::is_empty)
    }),
    ("truncate_prompt_tokens", |_| false),
    ("skip_special_tokens", |v| v == &Value::Bool(true)),
    ("spaces_between_special_tokens", |v| v == &Value::Bool(true)),
    ("include_stop_str_in_output", |v| v == &Value::Bool(false)),
    ("functions", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("function_call", |v| v.as_str() == Some("none")),
    ("audio", |_| false),
    ("modalities", |v| {
        v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
    }),
    ("prediction", |_| false),
    ("web_search_options", |_| false),
    ("parallel_tool_calls", |v| v == &Value::Bool(true)),
    ("continue_final_message", |v| v == &Value::Bool(false)),
    ("chat_template", |_| false),
    ("documents", |_| false),
    ("suffix", |v| v.as_str() == Some("")),
    ("echo", |v| v == &Value::Bool(false)),
];

/// Refuses the first field the server would otherwise ignore (see [`UNSUPPORTED`]).
fn refuse_unsupported(f: &Fields) -> Result<(), ApiError> {
    for (name, harmless) in UNSUPPORTED {
        if let Some(v) = f.get(name) {
            if !harmless(v) {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported by this server"),
                ));
            }
        }
    }
    Ok(())
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The model the client named (`None` when omitted).
    pub model: Option<String>,
    /// One prompt per choice group (completions may send several prompts).
    pub prompts: Vec<Prompt>,
    /// Sampling; `max_tokens` is `None` when the client gave none (the server fills it in).
    pub params: SamplingParams,
    /// Choices per prompt.
    pub n: usize,
    /// Server-sent events.
    pub stream: bool,
    /// A usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    pub logprobs: bool,
    /// Tools were given and may be called: parse `<tool_call>` blocks.
    pub tools: bool,
    /// `tool_choice` forces a call: the reply starts with this text (already in the prompt),
    /// which the tool-call parser must see first.
    pub forced_tool_prefix: Option<String>,
    /// Send the reasoning (`include_reasoning` / `return_reasoning`, true by default).
    pub include_reasoning: bool,
    /// The field `params.grammar` came from, to name it in errors.
    pub grammar_field: &'static str,
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn f32(&self, k: &str) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x as f32))
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a number"))),
        }
    }
    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64))
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be an integer"))),
        }
    }
    fn count(&self, k: &str) -> Result<Option<usize>, ApiError> {
        match self.int(k)? {
            None => Ok(None),
            Some(x) if x >= 0 => Ok(Some(x as usize)),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must not be negative"))),
        }
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must be true or false"))),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must be a string"))),
        }
    }
    fn object(&self, k: &str) -> Result<Option<&Map<String, Value>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(ApiError::invalid(k, format!("`{k}` must be an object"))),
        }
    }
}

/// A token id, if `v` is one (ids past the vocabulary are caught by the engine).
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// The request body as an object.
pub fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

/// Sampling fields shared by both endpoints, over `defaults`. Their ranges are checked by
/// [`validate`] once the endpoint has mapped every field; only OpenAI's limits that are
/// narrower than the library's are checked here.
fn sampling(f: &Fields, defaults: &SamplingParams) -> Result<SamplingParams, ApiError> {
    refuse_unsupported(f)?;
    let mut p = defaults.clone();
    // Not given: the endpoint's default (see `response::run`).
    p.max_tokens = None;
    if let Some(t) = f.f32("temperature")? {
        // OpenAI's limit; the library takes any temperature >= 0.
        if t > 2.0 {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 2, not {t}"),
            ));
        }
        p.temperature = t;
    }
    if let Some(t) = f.f32("top_p")? {
        p.top_p = t;
    }
    if let Some(k) = f.int("top_k")? {
        if k < -1 {
            return Err(ApiError::invalid(
                "top_k",
                "`top_k` must be -1 (off), 0 (off) or positive",
            ));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(m) = f.f32("min_p")? {
        p.min_p = m;
    }
    if let Some(x) = f.f32("presence_penalty")? {
        p.presence_penalty = x;
    }
    if let Some(x) = f.f32("frequency_penalty")? {
        p.frequency_penalty = x;
    }
    if let Some(x) = f.f32("repetition_penalty")? {
        p.repetition_penalty = x;
    }
    if let Some(s) = f.int("seed")? {
        p.seed = Some(s as u64);
    }
    for k in ["max_completion_tokens", "max_tokens"] {
        if let Some(m) = f.count(k)? {
            p.max_tokens = Some(m);
            break;
        }
    }
    p.stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop", "`stop` must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if p.stop.len() > 16 {
        return Err(ApiError::invalid("stop", "`stop` takes up to 16 strings"));
    }
    if let Some(Value::Array(a)) = f.get("stop_token_ids") {
        p.stop_token_ids = a
            .iter()
            .map(token_id)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop_token_ids", "`stop_token_ids` must be token ids")
            })?;
    }
    if let Some(b) = f.bool("ignore_eos")? {
        p.ignore_eos = b;
    }
    if let Some(bias) = f.object("logit_bias")? {
        if bias.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens"),
            ));
        }
        for (k, v) in bias {
            let id = k.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids, not `{k}`"),
                )
            })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`logit_bias` values must be numbers in [-100, 100] (token {k})"),
                    )
                })?;
            p.logit_bias.push((id, b as f32));
        }
    }
    if p.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("`stop_token_ids` takes at most {MAX_STOP_TOKEN_IDS} ids"),
        ));
    }
    if p.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("a stop string may be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(p)
}

/// The structured-output fields, in every spelling: OpenAI's `response_format`, vLLM's
/// `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (also inside a
/// literal `extra_body`) and its newer `structured_outputs` object. At most one may ask
/// for something. Returns the grammar and the field it came from.
fn structured_output(f: &Fields) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let extra = f.object("extra_body")?.map(Fields);
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    for src in std::iter::once(f).chain(extra.as_ref()) {
        let whitespace = src.str("guided_whitespace_pattern")?.map(str::to_string);
        if let Some(b) = src.get("guided_decoding_backend") {
            if !b.is_string() {
                return Err(ApiError::invalid(
                    "guided_decoding_backend",
                    "`guided_decoding_backend` must be a string",
                ));
            }
        }
        if let Some(rf) = src.get("response_format") {
            if let Some(g) = response_format(rf)? {
                found.push((g, "response_format"));
            }
        }
        if let Some(v) = src.get("guided_json") {
            found.push((
                json_schema_grammar(v, "guided_json", whitespace.clone())?,
                "guided_json",
            ));
        }
        if let Some(v) = src.get("guided_regex") {
            let pattern = v.as_str().ok_or_else(|| {
                ApiError::invalid("guided_regex", "`guided_regex` must be a string")
            })?;
            found.push((
                Grammar::Regex {
                    pattern: pattern.into(),
                },
                "guided_regex",
            ));
        }
        if let Some(v) = src.get("guided_choice") {
            found.push((choice_grammar(v, "guided_choice")?, "guided_choice"));
        }
        if let Some(v) = src.get("guided_grammar") {
            found.push((grammar_text(v, "guided_grammar")?, "guided_grammar"));
        }
        if let Some(so) = src.object("structured_outputs")? {
            let so = Fields(so);
            let ws = so
                .str("whitespace_pattern")?
                .map(str::to_string)
                .or(whitespace.clone());
            if let Some(v) = so.get("json") {
                found.push((
                    json_schema_grammar(v, "structured_outputs", ws)?,
                    "structured_outputs",
                ));
            }
            if let Some(v) = so.get("regex") {
                let pattern = v.as_str().ok_or_else(|| {
                    ApiError::invalid(
                        "structured_outputs",
                        "`structured_outputs.regex` must be a string",
                    )
                })?;
                found.push((
                    Grammar::Regex {
                        pattern: pattern.into(),
                    },
                    "structured_outputs",
                ));
            }
            if let Some(v) = so.get("choice") {
                found.push((
                    choice_grammar(v, "structured_outputs")?,
                    "structured_outputs",
                ));
            }
            if let Some(v) = so.get("grammar") {
                found.push((grammar_text(v, "structured_outputs")?, "structured_outputs"));
            }
            if so.bool("json_object")? == Some(true) {
                found.push((Grammar::JsonObject, "structured_outputs"));
            }
            for k in ["structural_tag"] {
                if so.get(k).is_some() {
                    return Err(ApiError::invalid(
                        "structured_outputs",
                        format!("`structured_outputs.{k}` is not supported by this server"),
                    ));
                }
            }
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, n)| *n).collect();
        return Err(ApiError::invalid(
            found[1].1,
            format!(
                "give one structured output at most, not {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(found.pop())
}

/// `response_format`: `text` (nothing), `json_object`, or `json_schema` with its schema.
fn response_format(v: &Value) -> Result<Option<Grammar>, ApiError> {
    let bad = |m: &str| ApiError::invalid("response_format", m);
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`response_format` must be an object with a `type`"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::JsonObject)),
        "json_schema" => {
            let js = v
                .get("json_schema")
                .filter(|j| j.is_object())
                .ok_or_else(|| {
                    bad("`response_format.json_schema` must be an object with a `schema`")
                })?;
            let schema = js
                .get("schema")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(
                    "`response_format.json_schema.schema` must be a JSON schema object",
                ));
            }
            Ok(Some(Grammar::JsonSchema {
                schema,
                whitespace: None,
            }))
        }
        other => Err(bad(&format!(
            "`response_format.type` must be text, json_object or json_schema, not {other}"
        ))),
    }
}

/// A JSON schema given as an object or as JSON text.
fn json_schema_grammar(
    v: &Value,
    field: &str,
    whitespace: Option<String>,
) -> Result<Grammar, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid(field, format!("`{field}` is not valid JSON: {e}")))?,
        Value::Object(_) | Value::Bool(_) => v.clone(),
        _ => {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` must be a JSON schema"),
            ))
        }
    };
    Ok(Grammar::JsonSchema { schema, whitespace })
}

fn choice_grammar(v: &Value, field: &str) -> Result<Grammar, ApiError> {
    let choices = v
        .as_array()
        .filter(|a| !a.is_empty())
        .and_then(|a| {
            a.iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("`{field}` must be a non-empty list of strings"),
            )
        })?;
    Ok(Grammar::Choice { choices })
}

fn grammar_text(v: &Value, field: &str) -> Result<Grammar, ApiError> {
    let text = v
        .as_str()
        .ok_or_else(|| ApiError::invalid(field, format!("`{field}` must be a string")))?;
    Grammar::from_grammar_text(text).map_err(|e| match e {
        crate::Error::InvalidParam { message, .. } => ApiError::invalid(field, message),
        other => ApiError::from(other),
    })
}

/// Checks the mapped sampling fields with [`SamplingParams::validate`] (the one check of
/// their ranges) and names a bad one as the client spelled it: `logprobs_field` is where the
/// endpoint reads the number of top logprobs from.
fn validate(f: &Fields, p: &SamplingParams, logprobs_field: &str) -> Result<(), ApiError> {
    p.validate().map_err(|e| match e {
        crate::Error::InvalidParam { param, message } => {
            let name = match param {
                "max_tokens" if f.get("max_completion_tokens").is_some() => "max_completion_tokens",
                "logprobs" => logprobs_field,
                other => other,
            };
            ApiError::invalid(name, message)
        }
        other => ApiError::from(other),
    })
}

fn n_stream(f: &Fields, parsed: &mut Parsed) -> Result<(), ApiError> {
    parsed.n = f.count("n")?.unwrap_or(1);
    if parsed.n == 0 || parsed.n > MAX_N {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {MAX_N}"),
        ));
    }
    parsed.stream = f.bool("stream")?.unwrap_or(false);
    if let Some(o) = f.object("stream_options")? {
        parsed.include_usage = Fields(o).bool("include_usage")?.unwrap_or(false);
    }
    parsed.model = f.str("model")?.map(str::to_string);
    Ok(())
}

/// A message's content: a string, or a list of text parts joined.
fn content_text(v: &Value, i: usize) -> Result<Value, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::Null | Value::String(_) => Ok(v.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) | (None, Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &param,
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ))
                    }
                }
            }
            Ok(Value::String(text))
        }
        _ => Err(ApiError::invalid(
            &param,
            "content must be a string or a list of text parts",
        )),
    }
}

/// Checks and normalises `messages` for the template.
fn messages(f: &Fields) -> Result<Vec<Value>, ApiError> {
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must be a non-empty list",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must be a non-empty list",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                "a message must be an object",
            ));
        };
        let role = obj.get("role").and_then(Value::as_str).unwrap_or("");
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            _ => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    "role must be system, developer, user, assistant or tool",
                ))
            }
        };
        let mut msg = obj.clone();
        msg.insert("role".into(), Value::String(role.into()));
        let content = content_text(obj.get("content").unwrap_or(&Value::Null), i)?;
        if content.is_null() && role != "assistant" {
            return Err(ApiError::invalid(
                &format!("messages[{i}].content"),
                "content is required",
            ));
        }
        msg.insert(
            "content".into(),
            if content.is_null() {
                Value::String(String::new())
            } else {
                content
            },
        );
        // A reply's reasoning sent back under vLLM's current name reaches the template under
        // the name it reads.
        if !msg.contains_key("reasoning_content") {
            if let Some(r @ Value::String(_)) = obj.get("reasoning") {
                msg.insert("reasoning_content".into(), r.clone());
            }
        }
        // The template expects tool-call arguments as objects; OpenAI sends JSON strings.
        if let Some(Value::Array(calls)) = msg.get_mut("tool_calls") {
            for c in calls.iter_mut() {
                if let Some(Value::String(a)) = c.pointer("/function/arguments") {
                    if let Ok(parsed) = serde_json::from_str::<Value>(a) {
                        c["function"]["arguments"] = parsed;
                    }
                }
            }
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// The thinking switch in any spelling, and other template variables.
fn render_options(f: &Fields) -> Result<RenderOptions, ApiError> {
    let mut r = RenderOptions::default();
    let mut sources = vec![Fields(f.0)];
    let extra_body = f.object("extra_body")?;
    if let Some(e) = extra_body {
        sources.push(Fields(e));
    }
    for src in &sources {
        if let Some(kw) = src.object("chat_template_kwargs")? {
            for (k, v) in kw {
                r.extra.insert(k.clone(), v.clone());
            }
            if let Some(b) = kw.get("enable_thinking") {
                r.enable_thinking = Some(b.as_bool().ok_or_else(|| {
                    ApiError::invalid(
                        "chat_template_kwargs.enable_thinking",
                        "must be true or false",
                    )
                })?);
            }
        }
        if r.enable_thinking.is_none() {
            r.enable_thinking = src.bool("enable_thinking")?;
        }
        if r.enable_thinking.is_none() {
            match src.str("reasoning_effort")? {
                Some("none") => r.enable_thinking = Some(false),
                Some("minimal" | "low" | "medium" | "high") => r.enable_thinking = Some(true),
                Some(other) => {
                    return Err(ApiError::invalid(
                        "reasoning_effort",
                        format!("`reasoning_effort` must be none, minimal, low, medium or high, not {other}"),
                    ))
                }
                None => {}
            }
        }
    }
    if r.enable_thinking.is_some() {
        r.extra.remove("enable_thinking");
    }
    Ok(r)
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &Value, defaults: &SamplingParams) -> Result<Parsed, ApiError> {
    let f = Fields(object(body)?);
    let msgs = messages(&f)?;
    let mut render = render_options(&f)?;
    let mut params = sampling(&f, defaults)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.count("top_logprobs")?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    params.logprobs = logprobs.then_some(top.unwrap_or(0));
    validate(&f, &params, "top_logprobs")?;
    let mut tools = false;
    if let Some(t) = f.get("tools") {
        let Value::Array(list) = t else {
            return Err(ApiError::invalid("tools", "`tools` must be a list"));
        };
        if list.len() > MAX_TOOLS {
            return Err(ApiError::invalid(
                "tools",
                format!("at most {MAX_TOOLS} tools per request"),
            ));
        }
        let choice_none = matches!(f.get("tool_choice"), Some(Value::String(s)) if s == "none");
        if !list.is_empty() && !choice_none {
            for (i, tool) in list.iter().enumerate() {
                if tool
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .is_none()
                {
                    return Err(ApiError::invalid(
                        &format!("tools[{i}]"),
                        "a tool needs function.name",
                    ));
                }
            }
            render.tools = Some(list.clone());
            tools = true;
        }
    }
    let forced_tool_prefix = tool_choice(&f, render.tools.as_deref().unwrap_or(&[]))?;
    let include_reasoning = include_reasoning(&f)?;
    let mut grammar_field = "response_format";
    let structured = structured_output(&f)?;
    let usable_tools = render.tools.clone().unwrap_or_default();
    if let Some(prefix) = &forced_tool_prefix {
        // The call follows an empty thinking block, as the template writes it for
        // `enable_thinking: false`; a forced reply has no room for reasoning.
        render.enable_thinking = Some(false);
        render.assistant_prefix = Some(prefix.clone());
        // The rest of the call is held to the functions' parameter schemas.
        let named = f
            .get("tool_choice")
            .and_then(|c| c.pointer("/function/name"))
            .and_then(Value::as_str);
        let start = match named {
            Some(name) => CallStart::Named(name),
            None => CallStart::Opened,
        };
        params.grammar = Some(tool_call_grammar(&usable_tools, start));
        grammar_field = "tools";
    } else if let Some((g, field)) = structured {
        params.grammar = Some(g);
        grammar_field = field;
    } else if usable_tools
        .iter()
        .any(|t| t.pointer("/function/strict") == Some(&Value::Bool(true)))
    {
        // `strict` tools under `auto`: free text, or a call whose arguments match.
        params.grammar = Some(tool_call_grammar(&usable_tools, CallStart::Free));
        grammar_field = "tools";
    }
    let mut parsed = Parsed {
        model: None,
        prompts: vec![Prompt::Chat {
            messages: msgs,
            render,
        }],
        params,
        n: 1,
        stream: false,
        include_usage: false,
        logprobs,
        tools,
        forced_tool_prefix,
        include_reasoning,
        grammar_field,
    };
    n_stream(&f, &mut parsed)?;
    Ok(parsed)
}

/// `include_reasoning` (vLLM) or `return_reasoning`, at the top level or in a literal
/// `extra_body`: whether the reply carries the reasoning.
fn include_reasoning(f: &Fields) -> Result<bool, ApiError> {
    let extra = f.object("extra_body")?.map(Fields);
    for src in std::iter::once(f).chain(extra.as_ref()) {
        for name in ["include_reasoning", "return_reasoning"] {
            if let Some(b) = src.bool(name)? {
                return Ok(b);
            }
        }
    }
    Ok(true)
}

/// Checks `tool_choice` against the usable `tools` and returns the text a forced call starts
/// with: `required` opens a `<tool_call>` block, a named function also writes the name, so the
/// model can only fill in the arguments. `auto`, `none` and no `tool_choice` force nothing.
fn tool_choice(f: &Fields, tools: &[Value]) -> Result<Option<String>, ApiError> {
    const OPEN: &str = "<tool_call>\n";
    let invalid = |m: String| Err(ApiError::invalid("tool_choice", m));
    let Some(c) = f.get("tool_choice") else {
        return Ok(None);
    };
    match c {
        Value::String(s) if s == "none" || s == "auto" => Ok(None),
        Value::String(s) if s == "required" => {
            if tools.is_empty() {
                return invalid("`tool_choice: required` needs a non-empty `tools` list".into());
            }
            Ok(Some(OPEN.into()))
        }
        Value::Object(_) => {
            let Some(name) = c.pointer("/function/name").and_then(Value::as_str) else {
                return invalid("`tool_choice` must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}".into());
            };
            let known = tools
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name));
            if !known {
                return invalid(format!(
                    "`tool_choice` names `{name}`, which is not in `tools`"
                ));
            }
            let name = Value::from(name).to_string();
            Ok(Some(format!("{OPEN}{{\"name\": {name}, \"arguments\": ")))
        }
        _ => invalid("`tool_choice` must be none, auto, required or a function".into()),
    }
}

/// `POST /v1/completions`.
pub fn completion(body: &Value, defaults: &SamplingParams) -> Result<Parsed, ApiError> {
    let f = Fields(object(body)?);
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of those",
        )
    };
    let prompts: Vec<Prompt> = match f.get("prompt") {
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if !a.is_empty() => {
            if a.iter().all(Value::is_string) {
                a.iter()
                    .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
                    .collect()
            } else if a.iter().all(Value::is_u64) {
                vec![Prompt::Ids(
                    a.iter()
                        .map(token_id)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(bad)?,
                )]
            } else {
                a.iter()
                    .map(|p| {
                        p.as_array()
                            .and_then(|ids| ids.iter().map(token_id).collect::<Option<Vec<_>>>())
                            .map(Prompt::Ids)
                            .ok_or_else(bad)
                    })
                    .collect::<Result<_, _>>()?
            }
        }
        _ => return Err(bad()),
    };
    if prompts.len() > MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!("at most {MAX_N} prompts per request"),
        ));
    }
    let mut params = sampling(&f, defaults)?;
    let top = f.count("logprobs")?;
    params.logprobs = top;
    validate(&f, &params, "logprobs")?;
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    let mut grammar_field = "response_format";
    if let Some((g, field)) = structured_output(&f)? {
        params.grammar = Some(g);
        grammar_field = field;
    }
    let mut parsed = Parsed {
        model: None,
        prompts,
        params,
        n: 1,
        stream: false,
        include_usage: false,
        logprobs: top.is_some(),
        tools: false,
        forced_tool_prefix: None,
        include_reasoning: true,
        grammar_field,
    };
    n_stream(&f, &mut parsed)?;
    if parsed.prompts.len() * parsed.n > MAX_N {
        return Err(ApiError::invalid(
            "n",
            format!("prompts × n must be at most {MAX_N}"),
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn reasoning_is_dropped_on_request_and_read_back_under_either_name() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(chat(&base, &d()).unwrap().include_reasoning);
        for body in [
            json!({"include_reasoning": false}),
            json!({"return_reasoning": false}),
            json!({"extra_body": {"include_reasoning": false}}),
        ] {
            let mut b = base.clone();
            for (k, v) in body.as_object().unwrap() {
                b[k] = v.clone();
            }
            assert!(!chat(&b, &d()).unwrap().include_reasoning, "{body}");
        }
        let mut b = base.clone();
        b["include_reasoning"] = json!("no");
        assert_eq!(
            chat(&b, &d()).unwrap_err().param.as_deref(),
            Some("include_reasoning")
        );

        // A previous reply's reasoning, sent back as `reasoning`, reaches the template as
        // `reasoning_content`; an explicit `reasoning_content` wins.
        let turns = json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning": "greet back"},
            {"role": "assistant", "content": "x", "reasoning": "a", "reasoning_content": "b"},
        ]});
        let p = chat(&turns, &d()).unwrap();
        let Prompt::Chat { messages, .. } = &p.prompts[0] else {
            unreachable!()
        };
        assert_eq!(messages[1]["reasoning_content"], "greet back");
        assert_eq!(messages[2]["reasoning_content"], "b");
    }

    #[test]
    fn thinking_switch_in_every_spelling() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            match &chat(&b, &d()).unwrap().prompts[0] {
                Prompt::Chat { render, .. } => render.enable_thinking,
                _ => unreachable!(),
            }
        };
        assert_eq!(
            with("chat_template_kwargs", json!({"enable_thinking": false})),
            Some(false)
        );
        assert_eq!(with("enable_thinking", json!(false)), Some(false));
        assert_eq!(
            with("extra_body", json!({"enable_thinking": false})),
            Some(false)
        );
        assert_eq!(
            with(
                "extra_body",
                json!({"chat_template_kwargs": {"enable_thinking": false}})
            ),
            Some(false)
        );
        assert_eq!(with("reasoning_effort", json!("none")), Some(false));
        assert_eq!(with("reasoning_effort", json!("high")), Some(true));
        assert_eq!(with("n", json!(1)), None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}),
                "top_p",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "n": 0}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stop": 5}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
                "top_logprobs",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
                "tools[0]",
            ),
        ];
        for (body, param) in cases {
            let e = chat(&body, &d()).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        let e = completion(&json!({"prompt": {"a": 1}}), &d()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn content_parts_and_fields_are_mapped() {
        let p = chat(
            &json!({
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "temperature": 0.5, "top_k": -1, "max_completion_tokens": 7, "stop": "x",
                "seed": 3, "n": 2, "logprobs": true, "top_logprobs": 2, "stream": true,
                "stream_options": {"include_usage": true}
            }),
            &d(),
        )
        .unwrap();
        let Prompt::Chat { messages, .. } = &p.prompts[0] else {
            unreachable!()
        };
        assert_eq!(messages[0]["content"], "ab");
        assert_eq!(
            (p.params.temperature, p.params.top_k, p.params.max_tokens),
            (0.5, 0, Some(7))
        );
        assert_eq!(
            (p.params.stop.clone(), p.params.seed, p.params.logprobs),
            (vec!["x".to_string()], Some(3), Some(2))
        );
        assert!(p.stream && p.include_usage && p.n == 2 && p.logprobs);
    }

    #[test]
    fn structured_outputs_in_every_spelling() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let chat_with = |extra: Value| {
            let mut b = json!({"messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            chat(&b, &d())
        };
        let as_schema = Grammar::JsonSchema {
            schema: schema.clone(),
            whitespace: None,
        };
        let cases = [
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Some(as_schema.clone()),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(Grammar::JsonObject),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "text"}}),
                None,
                "response_format",
            ),
            (
                json!({"guided_json": schema}),
                Some(as_schema.clone()),
                "guided_json",
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some(as_schema.clone()),
                "guided_json",
            ),
            (
                json!({"extra_body": {"guided_regex": "[0-9]+"}}),
                Some(Grammar::Regex {
                    pattern: "[0-9]+".into(),
                }),
                "guided_regex",
            ),
            (
                json!({"guided_choice": ["a", "b"]}),
                Some(Grammar::Choice {
                    choices: vec!["a".into(), "b".into()],
                }),
                "guided_choice",
            ),
            (
                json!({"guided_grammar": "root ::= \"a\" | \"b\""}),
                Some(Grammar::Lark {
                    grammar: "start: \"a\" | \"b\"\n".into(),
                }),
                "guided_grammar",
            ),
            (
                json!({"structured_outputs": {"choice": ["x"]}}),
                Some(Grammar::Choice {
                    choices: vec!["x".into()],
                }),
                "structured_outputs",
            ),
            (
                json!({"guided_json": schema, "guided_whitespace_pattern": "[ ]?"}),
                Some(Grammar::JsonSchema {
                    schema: schema.clone(),
                    whitespace: Some("[ ]?".into()),
                }),
                "guided_json",
            ),
        ];
        for (extra, want, field) in cases {
            let p = chat_with(extra.clone()).unwrap();
            assert_eq!(p.params.grammar, want, "{extra}");
            if want.is_some() {
                assert_eq!(p.grammar_field, field, "{extra}");
            }
        }
        // Completions take them too.
        let p = completion(&json!({"prompt": "x", "guided_regex": "a+"}), &d()).unwrap();
        assert!(p.params.grammar.is_some());
        // Bad values name their field; two at once are refused.
        for (extra, field) in [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice"),
            (
                json!({"guided_grammar": "root ::= (\"a\""}),
                "guided_grammar",
            ),
            (
                json!({"structured_outputs": {"structural_tag": {}}}),
                "structured_outputs",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
        ] {
            let e = chat_with(extra.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn forced_and_strict_tool_calls_get_a_grammar() {
        let tools = json!([
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
            {"type": "function", "function": {"name": "g", "strict": true, "parameters": {"type": "object"}}}
        ]);
        let with = |choice: Value| {
            chat(
                &json!({"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice}),
                &d(),
            )
            .unwrap()
        };
        let lark = |p: &Parsed| match &p.params.grammar {
            Some(Grammar::Lark { grammar }) => grammar.clone(),
            other => panic!("{other:?}"),
        };
        let required = with(json!("required"));
        assert!(
            lark(&required).contains("\"const\":\"f\""),
            "{}",
            lark(&required)
        );
        assert!(lark(&required).contains("</tool_call>"));
        let named = with(json!({"type": "function", "function": {"name": "f"}}));
        assert!(
            lark(&named).contains("\"required\":[\"x\"]"),
            "{}",
            lark(&named)
        );
        assert!(!lark(&named).contains("\"const\""));
        // `auto` with a strict tool: text, or a call that matches.
        let auto = with(json!("auto"));
        assert!(lark(&auto).starts_with("start: TEXT | TEXT call"));
        assert_eq!(auto.grammar_field, "tools");
        let none = with(json!("none"));
        assert!(none.params.grammar.is_none());
    }

    #[test]
    fn tool_choice_forces_the_reply_to_open_a_call() {
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
        let with = |choice: Value, tools: &Value| {
            chat(
                &json!({"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice}),
                &d(),
            )
        };
        let render = |p: &Parsed| match &p.prompts[0] {
            Prompt::Chat { render, .. } => render.clone(),
            _ => unreachable!(),
        };
        let auto = with(json!("auto"), &tools).unwrap();
        assert!(auto.tools && auto.forced_tool_prefix.is_none());
        assert_eq!(render(&auto).assistant_prefix, None);
        let none = with(json!("none"), &tools).unwrap();
        assert!(!none.tools && none.forced_tool_prefix.is_none());

        let required = with(json!("required"), &tools).unwrap();
        assert_eq!(
            required.forced_tool_prefix.as_deref(),
            Some("<tool_call>\n")
        );
        let r = render(&required);
        assert_eq!(r.assistant_prefix.as_deref(), Some("<tool_call>\n"));
        assert_eq!(r.enable_thinking, Some(false));

        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let p = with(named.clone(), &tools).unwrap();
        assert_eq!(
            p.forced_tool_prefix.as_deref(),
            Some("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ")
        );

        let bad = [
            (
                json!({"type": "function", "function": {"name": "nope"}}),
                tools.clone(),
            ),
            (json!("required"), json!([])),
            (named, json!([])),
            (json!("sometimes"), tools.clone()),
            (json!(3), tools.clone()),
            (json!({"type": "function"}), tools.clone()),
        ];
        for (choice, tools) in bad {
            let e = with(choice.clone(), &tools).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (400, Some("tool_choice")),
                "{choice}"
            );
        }
    }
}
