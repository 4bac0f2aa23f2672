//! `/v1/embeddings`: OpenAI's embeddings endpoint, served by an engine started with
//! `--task embed` ([`crate::engine::embed`]).
//!
//! ```text
//! {"input": "text" | ["text", …] | [id, …] | [[id, …], …],
//!  "model": …, "encoding_format": "float" | "base64", "dimensions": 1..=C, "user": …}
//!   → {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": […]}],
//!      "model": …, "usage": {"prompt_tokens": n, "total_tokens": n}}
//! ```
//!
//! Texts are tokenized as the model's tokenizer does by default (Qwen3-Embedding's appends
//! `<|endoftext|>`); token ids are used as given. Every input is checked before any is
//! queued: an empty input, an id outside the vocabulary or an input longer than the context
//! answers 400 naming `input` (and which one). `base64` is the little-endian f32 bytes,
//! which is what OpenAI's SDKs decode. `dimensions` truncates and normalizes again
//! (Matryoshka).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::AppState;
use crate::engine::embed::truncate;
use crate::engine::Task;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Most tokens over all inputs of one request (OpenAI's limit is 300 000).
pub const MAX_TOTAL_TOKENS: usize = 300_000;

/// One input: text to tokenize, or token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Tokenized with the model's tokenizer, special tokens included.
    Text(String),
    /// Used as given.
    Ids(Vec<u32>),
}

/// A checked `/v1/embeddings` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    /// `model`, if given.
    pub model: Option<String>,
    /// The inputs, in order.
    pub inputs: Vec<Input>,
    /// `encoding_format: "base64"`.
    pub base64: bool,
    /// `dimensions`, checked against the model's width by the handler.
    pub dimensions: Option<usize>,
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

fn ids(items: &[Value], what: &str) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid(
            "input",
            format!("{what} is an empty list of token ids"),
        ));
    }
    items
        .iter()
        .map(|v| {
            token_id(v).ok_or_else(|| {
                ApiError::invalid(
                    "input",
                    format!("{what}: token ids are integers from 0 to 4294967295, got {v}"),
                )
            })
        })
        .collect()
}

/// Parses and checks a body (everything but what needs the model).
pub fn parse(body: &Value) -> Result<EmbeddingsRequest, ApiError> {
    let obj: &Map<String, Value> = super::request::object(body)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let input = obj
        .get("input")
        .ok_or_else(|| ApiError::invalid("input", "`input` is required"))?;
    let inputs = match input {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("input", "`input` is an empty list"))
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(Input::Text(s.clone())),
                    _ => Err(ApiError::invalid(
                        "input",
                        format!("input[{i}]: a list of strings holds only strings"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(a) => ids(a, &format!("input[{i}]")).map(Input::Ids),
                    _ => Err(ApiError::invalid(
                        "input",
                        format!("input[{i}]: a list of token-id lists holds only lists"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => vec![Input::Ids(ids(items, "input")?)],
        },
        _ => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string, a list of strings, a list of token ids or a list \
                 of token-id lists",
            ))
        }
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("{} inputs; at most {MAX_INPUTS} per request", inputs.len()),
        ));
    }
    if let Some(i) = inputs
        .iter()
        .position(|x| matches!(x, Input::Text(s) if s.is_empty()))
    {
        return Err(ApiError::invalid(
            "input",
            format!("input[{i}] is an empty string"),
        ));
    }
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(v) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", got {v}"),
            ))
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 => Some(usize::try_from(d).unwrap_or(usize::MAX)),
            _ => {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("`dimensions` must be a positive integer, got {v}"),
                ))
            }
        },
    };
    match obj.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => return Err(ApiError::invalid("user", "`user` must be a string")),
    }
    Ok(EmbeddingsRequest {
        model,
        inputs,
        base64,
        dimensions,
    })
}

/// Standard base64 (RFC 4648, with padding) of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `embedding` field: a list of floats, or base64 of their little-endian bytes.
fn encode(v: &[f32], base64_format: bool) -> Value {
    if base64_format {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(base64(&bytes))
    } else {
        json!(v)
    }
}

/// The handler's work after the body is parsed: check against the model, tokenize off the
/// async workers, queue every input, wait for all within the request time limit.
pub async fn run(st: Arc<AppState>, req: EmbeddingsRequest) -> Result<Response, ApiError> {
    let loaded = st.ready()?;
    st.check_model(req.model.as_deref())?;
    let engine = loaded.engine.clone();
    let info = engine.info();
    if info.task != Task::Embed {
        return Err(ApiError::bad_request(
            "this server generates text; /v1/embeddings needs a model served with \
             `--task embed` (an embedding model such as Qwen3-Embedding is detected by itself)",
        ));
    }
    let hidden = info.hidden_size;
    if let Some(d) = req.dimensions {
        if d > hidden {
            return Err(ApiError::invalid(
                "dimensions",
                format!("`dimensions` must be between 1 and {hidden} for this model, got {d}"),
            ));
        }
    }
    let _guard = st.enter();
    // Admission first: a request the queue cannot take costs no thread and no tokenizing.
    // The inputs of one request are admitted together, as one.
    engine.admit(1)?;
    let submitter = engine.clone();
    let inputs = req.inputs;
    let handles = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let max_len = submitter.info().max_model_len;
        let mut all = Vec::with_capacity(inputs.len());
        let mut total = 0usize;
        for (i, input) in inputs.into_iter().enumerate() {
            let ids = match input {
                Input::Text(text) => submitter.tokenize_input(&text)?,
                Input::Ids(ids) => ids,
            };
            submitter
                .check_ids(&ids, &format!("input[{i}]: token id"))
                .map_err(|e| match e {
                    crate::Error::InvalidRequest(m) => ApiError::invalid("input", m),
                    other => other.into(),
                })?;
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "input",
                    format!("input[{i}] has no tokens"),
                ));
            }
            if ids.len() >= max_len {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        "input",
                        format!(
                            "input[{i}] has {} tokens; this model takes at most {} per input",
                            ids.len(),
                            max_len - 1
                        ),
                    )
                });
            }
            total += ids.len();
            if total > MAX_TOTAL_TOKENS {
                return Err(ApiError::invalid(
                    "input",
                    format!("more than {MAX_TOTAL_TOKENS} tokens over all inputs of a request"),
                ));
            }
            all.push(ids);
        }
        Ok((submitter.embed_batch(all)?, total))
    })
    .await
    .map_err(ApiError::internal)??;
    let (handles, total) = handles;
    let limit = st.opts.request_timeout;
    let all = futures_util::future::try_join_all(handles.into_iter().map(|h| h.wait()));
    let embeddings = match tokio::time::timeout(limit, all).await {
        Err(_) => return Err(ApiError::timeout(limit.as_secs().max(1))),
        Ok(r) => r?,
    };
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let v = match req.dimensions {
                Some(d) if d < e.embedding.len() => truncate(&e.embedding, d),
                _ => e.embedding.clone(),
            };
            json!({"object": "embedding", "index": index, "embedding": encode(&v, req.base64)})
        })
        .collect();
    let model = st
        .model_names()
        .into_iter()
        .next()
        .unwrap_or_else(|| loaded.model_name.clone());
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn parses_every_input_shape() {
        let p = |v: Value| parse(&v).map(|r| r.inputs);
        assert_eq!(
            p(json!({"input": "a"})).unwrap(),
            vec![Input::Text("a".into())]
        );
        assert_eq!(
            p(json!({"input": ["a", "b"]})).unwrap(),
            vec![Input::Text("a".into()), Input::Text("b".into())]
        );
        assert_eq!(
            p(json!({"input": [1, 2]})).unwrap(),
            vec![Input::Ids(vec![1, 2])]
        );
        assert_eq!(
            p(json!({"input": [[1], [2, 3]]})).unwrap(),
            vec![Input::Ids(vec![1]), Input::Ids(vec![2, 3])]
        );
        for bad in [
            json!({}),
            json!({"input": ""}),
            json!({"input": []}),
            json!({"input": [[]]}),
            json!({"input": ["a", ""]}),
            json!({"input": ["a", 1]}),
            json!({"input": [1, -2]}),
            json!({"input": [1.5]}),
            json!({"input": [[1], 2]}),
            json!({"input": {"text": "a"}}),
            json!({"input": 7}),
        ] {
            let e = parse(&bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
        }
        let many = vec![json!("x"); MAX_INPUTS + 1];
        assert!(parse(&json!({ "input": many })).is_err());
    }

    #[test]
    fn checks_the_other_fields() {
        let r = parse(
            &json!({"input": "a", "encoding_format": "base64", "dimensions": 8,
                              "user": "u", "model": "m"}),
        )
        .unwrap();
        assert!(r.base64);
        assert_eq!(r.dimensions, Some(8));
        assert_eq!(r.model.as_deref(), Some("m"));
        for (bad, param) in [
            (
                json!({"input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "a", "dimensions": 0}), "dimensions"),
            (json!({"input": "a", "dimensions": -3}), "dimensions"),
            (json!({"input": "a", "dimensions": "8"}), "dimensions"),
            (json!({"input": "a", "user": 5}), "user"),
            (json!({"input": "a", "model": 5}), "model"),
        ] {
            assert_eq!(parse(&bad).unwrap_err().param.as_deref(), Some(param));
        }
    }
}
