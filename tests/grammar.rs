//! Constrained decoding through the engine on the tiny random-weight Qwen3 (which never
//! writes valid JSON by itself): every reply matches its grammar, batched with
//! unconstrained requests, with thinking on and off, and within a small token budget.

mod common;

use serde_json::{json, Value};
use wick::engine::{Engine, EngineOptions, Prompt, Request, RequestStream};
use wick::generate::FinishReason;
use wick::grammar::Grammar;
use wick::runtime::{Device, Runtime, RuntimeOptions};
use wick::sampler::SamplingParams;
use wick::text::chat_template::RenderOptions;

fn engine(device: Device) -> Engine {
    let opts = RuntimeOptions {
        device,
        threads: 2,
        max_model_len: 1024,
        ..RuntimeOptions::default()
    };
    let rt = Runtime::load(common::fixture("qwen3-tiny").to_str().unwrap(), &opts).unwrap();
    rt.start_engine(&EngineOptions::default()).unwrap()
}

fn chat(thinking: Option<bool>) -> Prompt {
    Prompt::Chat {
        messages: vec![json!({"role": "user", "content": "Describe a person as JSON."})],
        render: RenderOptions {
            enable_thinking: thinking,
            ..RenderOptions::default()
        },
    }
}

fn params(grammar: Option<Grammar>, max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: 0.8,
        seed: Some(seed),
        grammar,
        ..SamplingParams::default()
    }
}

/// The reply's content and finish reason.
fn finish(stream: RequestStream) -> (String, Option<String>, FinishReason) {
    let c = stream.wait(|_| {}).expect("the request completes");
    (c.content, c.reasoning, c.finish_reason)
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "address", "active"],
        "additionalProperties": false
    })
}

/// Checks the parts of `schema()` that matter here (the full JSON Schema check runs in the
/// server's client tests with Python's `jsonschema`).
fn check_person(v: &Value) {
    assert!(v["name"].is_string(), "{v}");
    let age = v["age"].as_i64().expect("integer age");
    assert!((0..=150).contains(&age), "{v}");
    let tags = v["tags"].as_array().expect("tags");
    assert!((1..=3).contains(&tags.len()), "{v}");
    assert!(tags
        .iter()
        .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or(""))));
    let zip = v["address"]["zip"].as_str().expect("zip");
    assert!(
        zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()),
        "{v}"
    );
    assert!(
        v["address"]["city"].is_string() && v["active"].is_boolean(),
        "{v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 5, "{v}");
}

/// `budgets`: the max_tokens of the requests with thinking off, on, off, unset.
fn schema_replies_parse(device: Device, budgets: [usize; 4]) {
    let engine = engine(device);
    let g = Grammar::JsonSchema {
        schema: schema(),
        whitespace: None,
    };
    // Thinking off, on (the model may open a <think> block), and a small budget; batched with
    // an unconstrained request.
    let mut streams = Vec::new();
    let thinking = [Some(false), Some(true), Some(false), None];
    for (i, (thinking, max)) in thinking.into_iter().zip(budgets).enumerate() {
        let req = Request {
            prompt: chat(thinking),
            params: params(Some(g.clone()), max, i as u64),
        };
        streams.push(engine.submit(req).unwrap());
    }
    let free = engine
        .submit(Request {
            prompt: chat(Some(false)),
            params: params(None, 30, 9),
        })
        .unwrap();
    for s in streams {
        let (content, _reasoning, reason) = finish(s);
        let v: Value = serde_json::from_str(&content)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {content:?}"));
        check_person(&v);
        assert_eq!(reason, FinishReason::Stop);
    }
    let (text, _, _) = finish(free);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[test]
fn schema_replies_parse_cpu() {
    schema_replies_parse(Device::Cpu, [200, 200, 48, 64]);
}

#[cfg(feature = "gpu")]
#[test]
fn schema_replies_parse_gpu() {
    // Shorter replies: lavapipe is slow. The masks go to the GPU's sampler here.
    schema_replies_parse(Device::Gpu, [80, 80, 48, 64]);
}

/// With thinking on, the reasoning runs until the budget left is what the answer needs; the
/// answer then has no room to spare, so it must not open anything the grammar does not need
/// (an optional array item, one more key of an open object): the reply still parses and
/// ends as stopped, whatever the seed.
#[test]
fn a_reasoned_answer_fits_the_budget_left() {
    let engine = engine(Device::Cpu);
    // The shape of a Pydantic model (the OpenAI SDK's parse()): an optional array of objects
    // with required keys, an enum, an optional number; the top level open to more keys.
    let schema = json!({
        "type": "object",
        "properties": {
            "steps": {"type": "array", "maxItems": 3, "items": {
                "type": "object",
                "properties": {"explanation": {"type": "string", "maxLength": 40}, "output": {"type": "integer"}},
                "required": ["explanation", "output"]
            }},
            "final_answer": {"enum": ["even", "odd"]},
            "confidence": {"anyOf": [{"type": "number"}, {"type": "null"}]}
        },
        "required": ["steps", "final_answer"]
    });
    let streams: Vec<_> = (1..=8)
        .map(|seed| {
            let g = Grammar::JsonSchema {
                schema: schema.clone(),
                whitespace: None,
            };
            engine
                .submit(Request {
                    prompt: Prompt::Chat {
                        messages: vec![
                            json!({"role": "user", "content": "Is 7 odd? Show your steps."}),
                        ],
                        render: RenderOptions {
                            enable_thinking: Some(true),
                            ..RenderOptions::default()
                        },
                    },
                    params: params(Some(g), 160, seed),
                })
                .unwrap()
        })
        .collect();
    let mut reasoned = 0;
    for s in streams {
        let (content, reasoning, reason) = finish(s);
        reasoned += usize::from(reasoning.is_some_and(|r| !r.is_empty()));
        let v: Value = serde_json::from_str(&content)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {content:?}"));
        assert!(
            v["steps"].is_array() && v["final_answer"].is_string(),
            "{v}"
        );
        assert_eq!(reason, FinishReason::Stop, "{content:?}");
    }
    assert!(reasoned >= 4, "only {reasoned} of 8 replies reasoned first");
}

#[test]
fn regex_choice_and_grammars() {
    let engine = engine(Device::Cpu);
    let run = |g: Grammar, max: usize| {
        let s = engine
            .submit(Request {
                prompt: chat(Some(false)),
                params: params(Some(g), max, 3),
            })
            .unwrap();
        finish(s).0
    };
    let phone = run(
        Grammar::Regex {
            pattern: r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}".into(),
        },
        40,
    );
    assert!(
        phone.len() == 14 && phone.as_bytes()[0] == b'(' && phone.as_bytes()[9] == b'-',
        "{phone:?}"
    );
    let choices = vec!["positive".to_string(), "negative".into(), "neutral".into()];
    let c = run(
        Grammar::Choice {
            choices: choices.clone(),
        },
        20,
    );
    assert!(choices.contains(&c), "{c:?}");
    let gbnf = r#"
        # a small arithmetic language
        root   ::= expr
        expr   ::= term ( [+-] term )*
        term   ::= number | "(" expr ")"
        number ::= [0-9]{1,3}
    "#;
    let e = run(Grammar::from_grammar_text(gbnf).unwrap(), 30);
    assert!(
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit() || "+-()".contains(c)),
        "{e:?}"
    );
    let lark = r#"start: "yes" | "no""#;
    let y = run(Grammar::from_grammar_text(lark).unwrap(), 10);
    assert!(y == "yes" || y == "no", "{y:?}");
    let obj = run(Grammar::JsonObject, 60);
    assert!(
        serde_json::from_str::<Value>(&obj).unwrap().is_object(),
        "{obj}"
    );
}

#[test]
fn a_bad_grammar_is_refused_before_it_runs() {
    let engine = engine(Device::Cpu);
    for g in [
        Grammar::Regex {
            pattern: "(unclosed".into(),
        },
        Grammar::Lark {
            grammar: "start: undefined_rule".into(),
        },
        Grammar::JsonSchema {
            schema: json!({"type": "no-such-type"}),
            whitespace: None,
        },
    ] {
        let Err(err) = engine.submit(Request {
            prompt: chat(Some(false)),
            params: params(Some(g.clone()), 10, 0),
        }) else {
            panic!("{g:?} was accepted");
        };
        assert!(
            matches!(
                err,
                wick::Error::InvalidParam {
                    param: "grammar",
                    ..
                }
            ),
            "{g:?}: {err}"
        );
    }
    assert!(Grammar::from_grammar_text("root ::= (\"a\"").is_err());
}

#[test]
fn the_reasoning_stays_free_and_the_answer_follows_the_schema() {
    // The model is pushed to open a <think> block (a bias on `<think>`): the reasoning runs
    // free, then `</think>` is forced in time for the answer to finish within the budget.
    let engine = engine(Device::Cpu);
    let think = engine.text().tokenizer.token_to_id("<think>").unwrap();
    let mut p = params(
        Some(Grammar::JsonSchema {
            schema: schema(),
            whitespace: None,
        }),
        150,
        5,
    );
    p.logit_bias = vec![(think, 100.0)];
    let s = engine
        .submit(Request {
            prompt: chat(Some(true)),
            params: p,
        })
        .unwrap();
    let (content, reasoning, reason) = finish(s);
    assert!(
        reasoning.is_some_and(|r| !r.is_empty()),
        "the reply reasoned first"
    );
    check_person(&serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content:?}")));
    assert_eq!(reason, FinishReason::Stop);
}
