//! Golden tests of the text side (tokenizer, streaming detokenizer, chat template) against
//! `../shared/fixtures/qwen3-tiny`, produced by Hugging Face `tokenizers` and transformers.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use wick::text::chat_template::{ChatTemplate, RenderOptions};
use wick::text::tokenizer::Tokenizer;

fn fixture_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/qwen3-tiny")
        .join(name);
    assert!(
        path.exists(),
        "fixture missing: {} (the shared fixtures must sit next to the crate)",
        path.display()
    );
    path
}

fn load_json(name: &str) -> Value {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_file(fixture_path("tokenizer.json")).expect("load tokenizer.json"))
}

fn template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(fixture_path("tokenizer_config.json"))
        .expect("load tokenizer_config.json")
}

fn entries<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture has no `{key}` list"))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids list")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// Describes where two strings first differ, with escaped context, for readable failures.
fn difference(want: &str, got: &str) -> String {
    let at = want
        .char_indices()
        .zip(got.chars())
        .find(|((_, a), b)| a != b)
        .map_or(want.len().min(got.len()), |((i, _), _)| i);
    let context = |s: &str| {
        let start = s[..at.min(s.len())]
            .char_indices()
            .rev()
            .nth(30)
            .map_or(0, |(i, _)| i);
        s[start..].chars().take(80).collect::<String>()
    };
    format!(
        "first difference at byte {at}\n  want: {:?}…\n  got:  {:?}…\n  full want: {want:?}\n  full got:  {got:?}",
        context(want),
        context(got)
    )
}

/// Runs every case, then fails once listing all the failing ones.
fn check_all(what: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} {what} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn tokenizer_encodes_like_hf_tokenizers() {
    let tok = tokenizer();
    let doc = load_json("text_oracle.json");
    let cases = entries(&doc, "tokenizer");
    assert_eq!(cases.len(), 18, "the oracle has 18 tokenizer strings");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        // Qwen3's post-processor adds nothing, so both settings must give the oracle's ids.
        for add_special_tokens in [false, true] {
            let got = tok.encode(text, add_special_tokens).expect("encode");
            if got != want {
                failures.push(format!(
                    "case {i} {text:?} (add_special_tokens={add_special_tokens}):\n  want {want:?}\n  got  {got:?}"
                ));
            }
        }
    }
    check_all("encode", failures);
}

#[test]
fn tokenizer_decodes_like_hf_tokenizers() {
    let tok = tokenizer();
    let doc = load_json("text_oracle.json");
    let mut failures = Vec::new();
    for (i, case) in entries(&doc, "tokenizer").iter().enumerate() {
        let want = case["decoded"].as_str().expect("decoded");
        // The oracle keeps special tokens (`<|im_start|>` appears in `decoded`).
        let got = tok.decode(&ids(&case["ids"]), false).expect("decode");
        if got != want {
            failures.push(format!("case {i}: {}", difference(want, &got)));
        }
    }
    check_all("decode", failures);
}

/// Streams `ids` one at a time; returns the chunks.
fn stream_chunks(tok: &Arc<Tokenizer>, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let mut stream = tok.stream_decoder(skip_special_tokens);
    let mut chunks: Vec<String> = ids
        .iter()
        .map(|&id| stream.push(id).expect("push"))
        .collect();
    chunks.push(stream.finish().expect("finish"));
    chunks
}

#[test]
fn stream_decoder_reassembles_every_oracle_string() {
    let tok = tokenizer();
    let doc = load_json("text_oracle.json");
    let cases = entries(&doc, "tokenizer");
    let mut sequences: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    // All strings back to back, so multi-byte characters and special tokens meet
    // window boundaries in many places.
    sequences.push(sequences.concat());

    let mut failures = Vec::new();
    for (i, seq) in sequences.iter().enumerate() {
        for skip_special_tokens in [false, true] {
            let want = tok.decode(seq, skip_special_tokens).expect("decode");
            let chunks = stream_chunks(&tok, seq, skip_special_tokens);
            let got = chunks.concat();
            if got != want {
                failures.push(format!(
                    "sequence {i} (skip_special_tokens={skip_special_tokens}): {}",
                    difference(&want, &got)
                ));
            }
            if !want.contains('\u{FFFD}') {
                if let Some(bad) = chunks.iter().find(|c| c.contains('\u{FFFD}')) {
                    failures.push(format!(
                        "sequence {i}: chunk {bad:?} holds a split character (chunks {chunks:?})"
                    ));
                }
            }
        }
    }
    check_all("stream decode", failures);
}

#[test]
fn stream_decoder_never_splits_multibyte_characters() {
    let tok = tokenizer();
    // 𓀀, 🫠, 🪿 and 𝔘 have no token of their own: their bytes are spread over several
    // byte-level tokens, whose one-by-one decode is not valid UTF-8.
    let text = "𓀀🫠 emoji 🪿, 中文, 𝔘 and a lone é";
    let seq: Vec<u32> = text
        .chars()
        .flat_map(|c| tok.encode(&c.to_string(), false).expect("encode"))
        .collect();
    let chunks = stream_chunks(&tok, &seq, false);
    assert_eq!(chunks.concat(), text);
    for chunk in &chunks {
        assert!(!chunk.contains('\u{FFFD}'), "split character in {chunks:?}");
    }
    assert!(
        chunks.iter().filter(|c| c.is_empty()).count() > 1,
        "expected held-back pieces in {chunks:?}"
    );
}

fn options_of(case: &Value) -> RenderOptions {
    RenderOptions {
        add_generation_prompt: case["add_generation_prompt"]
            .as_bool()
            .expect("add_generation_prompt"),
        enable_thinking: case.get("enable_thinking").and_then(Value::as_bool),
        tools: case.get("tools").and_then(Value::as_array).cloned(),
        ..RenderOptions::default()
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let template = template();
    let doc = load_json("text_oracle.json");
    let cases = entries(&doc, "chat_template");
    assert_eq!(cases.len(), 11, "the oracle has 11 template renderings");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().expect("messages");
        let opts = options_of(case);
        let want = case["rendered"].as_str().expect("rendered");
        match template.render(messages, &opts) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!(
                "case {i} (add_generation_prompt={}, enable_thinking={:?}, tools={}): {}",
                opts.add_generation_prompt,
                opts.enable_thinking,
                opts.tools.is_some(),
                difference(want, &got)
            )),
            Err(e) => failures.push(format!("case {i}: render failed: {e}")),
        }
    }
    check_all("chat template", failures);
}

#[test]
fn oracle_prompts_render_and_tokenize() {
    let tok = tokenizer();
    let template = template();
    let doc = load_json("oracle.json");
    let mut failures = Vec::new();
    let mut chats = 0;
    for case in entries(&doc, "cases") {
        let name = case["name"].as_str().expect("name");
        let want_ids = ids(&case["input_ids"]);
        // The long plain-text case records only a description of its text, not the text.
        let Some(messages) = case.get("messages").and_then(Value::as_array) else {
            continue;
        };
        chats += 1;
        let opts = RenderOptions {
            add_generation_prompt: true,
            enable_thinking: case.get("enable_thinking").and_then(Value::as_bool),
            ..RenderOptions::default()
        };
        let want = case["prompt"].as_str().expect("prompt");
        let prompt = template.render(messages, &opts).expect("render");
        if prompt != want {
            failures.push(format!("{name}: prompt {}", difference(want, &prompt)));
        }
        let got_ids = tok.encode(&prompt, false).expect("encode");
        if got_ids != want_ids {
            let at = got_ids
                .iter()
                .zip(&want_ids)
                .position(|(a, b)| a != b)
                .unwrap_or(got_ids.len().min(want_ids.len()));
            failures.push(format!(
                "{name}: input_ids differ at index {at} (lengths: want {}, got {})\n  want {:?}\n  got  {:?}",
                want_ids.len(),
                got_ids.len(),
                &want_ids[at.saturating_sub(3)..(at + 5).min(want_ids.len())],
                &got_ids[at.saturating_sub(3)..(at + 5).min(got_ids.len())],
            ));
        }
    }
    assert_eq!(chats, 3, "oracle.json has three chat cases");
    check_all("oracle prompt", failures);
}

#[test]
fn text_types_can_be_shared_with_server_threads() {
    fn shared<T: Send + Sync>() {}
    fn sent<T: Send>() {}
    shared::<Tokenizer>();
    shared::<ChatTemplate>();
    sent::<wick::text::tokenizer::StreamDecoder>();
    sent::<wick::text::reasoning::ReasoningParser>();
}
