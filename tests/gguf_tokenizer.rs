//! Golden tests of the tokenizer built from GGUF metadata alone (`wick::loader::gguf_tokenizer`).
//!
//! Oracles: for the Qwen3 fixtures, Hugging Face `tokenizers` on the model's `tokenizer.json`
//! (`qwen3-tiny/text_oracle.json`, `qwen3-tiny/oracle.json`, and the file itself); for the
//! real SmolLM2 Q4_1 file (path in `WICK_SMOLLM2_GGUF`), llama.cpp's own tokenizer
//! (`smollm2-q4_1.oracle.json`, special tokens parsed). The GGUF metadata is read with
//! `wick::loader::gguf::GgufFile`.

use std::path::Path;

use serde_json::Value;
use wick::loader::gguf::GgufFile;
use wick::loader::gguf_tokenizer::{build_tokenizer, tokenizer_from_gguf, vocab_from_gguf};
use wick::text::tokenizer::Tokenizer;

mod common;

use common::{fixture, smollm2};

fn load_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn list<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key]
        .as_array()
        .unwrap_or_else(|| panic!("oracle has no `{key}` list"))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids list")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

fn str_field<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key]
        .as_str()
        .unwrap_or_else(|| panic!("oracle entry has no string `{key}`: {entry}"))
}

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    tokenizer_from_gguf(&file).unwrap_or_else(|e| panic!("tokenizer of {}: {e}", path.display()))
}

/// Every check of a Qwen3 GGUF against Hugging Face `tokenizers`.
fn check_qwen3(gguf: &str) {
    let tok = gguf_tokenizer(&fixture(gguf));
    let reference = Tokenizer::from_file(fixture("qwen3-tiny/tokenizer.json")).unwrap();

    // The 18 strings of the text oracle: ids and decoded text.
    let text_oracle = load_json(&fixture("qwen3-tiny/text_oracle.json"));
    let entries = list(&text_oracle, "tokenizer");
    assert_eq!(entries.len(), 18, "text oracle changed shape");
    for entry in entries {
        let text = str_field(entry, "text");
        let expected = ids(&entry["ids"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            expected,
            "{gguf}: {text:?}"
        );
        // Qwen3 files set add_bos_token = false and no add_eos_token: nothing is added.
        assert_eq!(
            tok.encode(text, true).unwrap(),
            expected,
            "{gguf}: {text:?}"
        );
        assert_eq!(
            tok.decode(&expected, false).unwrap(),
            str_field(entry, "decoded"),
            "{gguf}: decode {expected:?}"
        );
        assert_eq!(
            tok.decode(&expected, true).unwrap(),
            reference.decode(&expected, true).unwrap(),
            "{gguf}: decode {expected:?} without special tokens"
        );
    }

    // The chat prompts of the model oracle, rendered by transformers, and their ids.
    let oracle = load_json(&fixture("qwen3-tiny/oracle.json"));
    let mut prompts = 0;
    for case in list(&oracle, "cases") {
        let name = str_field(case, "name");
        let expected = ids(&case["input_ids"]);
        if let Some(prompt) = case["prompt"].as_str() {
            assert_eq!(reference.encode(prompt, false).unwrap(), expected, "{name}");
            assert_eq!(
                tok.encode(prompt, false).unwrap(),
                expected,
                "{gguf}: {name}"
            );
            prompts += 1;
        } else {
            // The long case stores no prompt text: its 1500 ids decode to a text (cut mid-way
            // through the oracle's), on which both tokenizers must agree.
            let text = reference.decode(&expected, false).unwrap();
            assert_eq!(
                tok.encode(&text, false).unwrap(),
                reference.encode(&text, false).unwrap(),
                "{gguf}: {name}"
            );
        }
    }
    assert_eq!(prompts, 3, "oracle.json should hold three chat prompts");

    // Same vocabulary, same special tokens: the unused `[PAD…]` rows that fill the embedding
    // table to 151 936 are not tokens.
    assert_eq!(tok.vocab_size(), reference.vocab_size());
    assert_eq!(tok.vocab_size(), 151_669);
    // Special flags follow the GGUF token types, as in llama.cpp: llama.cpp's converter marks
    // every `<|...|>` token control, so the six FIM/repo tokens that `tokenizer.json` leaves
    // non-special are special here (they are dropped by `skip_special_tokens`).
    let mut only_gguf_special = Vec::new();
    for id in 151_640..151_936 {
        assert_eq!(tok.id_to_token(id), reference.id_to_token(id), "id {id}");
        match (tok.is_special(id), reference.is_special(id)) {
            (true, false) => only_gguf_special.push(tok.id_to_token(id).unwrap()),
            (gguf, json) => assert_eq!(gguf, json, "id {id}"),
        }
    }
    assert_eq!(
        only_gguf_special,
        [
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>"
        ]
    );
    assert_eq!(
        tok.decode(&[9707, 151_700, 1879], false).unwrap(),
        "Hello world"
    );
    for token in [
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
    ] {
        assert_eq!(
            tok.token_to_id(token),
            reference.token_to_id(token),
            "{token}"
        );
    }
}

#[test]
fn qwen3_q8_0_gguf_tokenizer_matches_tokenizer_json() {
    check_qwen3("qwen3-tiny-q8_0.gguf");
}

#[test]
fn qwen3_q4_0_gguf_tokenizer_matches_tokenizer_json() {
    check_qwen3("qwen3-tiny-q4_0.gguf");
}

#[test]
fn qwen3_q4_k_m_gguf_tokenizer_matches_tokenizer_json() {
    check_qwen3("qwen3-tiny256-q4_k_m.gguf");
}

#[test]
fn smollm2_gguf_tokenizer_matches_llama_cpp() {
    let path = smollm2();
    let file = GgufFile::open(&path).unwrap();
    let vocab = vocab_from_gguf(&file).unwrap();
    assert_eq!(
        (vocab.model.as_str(), vocab.pre.as_str()),
        ("gpt2", "smollm")
    );
    // llama.cpp's `add_special` then adds nothing either, so ids with and without it agree.
    assert!(!vocab.add_bos && !vocab.add_eos);
    assert_eq!((vocab.bos, vocab.eos), (Some(1), Some(2)));
    let tok = build_tokenizer(&vocab).unwrap();

    let oracle = load_json(&fixture("smollm2-q4_1.oracle.json"));
    let note = str_field(&oracle, "tokenizer_note");
    assert!(
        note.contains("special tokens parsed"),
        "the oracle's tokenization mode changed: {note}"
    );
    let entries = list(&oracle, "tokenizer");
    assert!(entries.len() >= 17, "oracle has {} strings", entries.len());
    for entry in entries {
        let text = str_field(entry, "text");
        let expected = ids(&entry["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), expected, "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), expected, "{text:?}");
        // Byte-level BPE is lossless, and every special token here decodes to its text.
        assert_eq!(tok.decode(&expected, false).unwrap(), text, "{expected:?}");
    }

    let chat = &oracle["chat"];
    let prompt = str_field(chat, "prompt");
    assert_eq!(tok.encode(prompt, false).unwrap(), ids(&chat["prompt_ids"]));

    // Control tokens are special (dropped when skipping), and 49 152 tokens, none unused.
    assert_eq!(tok.vocab_size(), 49_152);
    assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(33));
    assert_eq!(
        tok.decode(&ids(&chat["prompt_ids"]), true).unwrap(),
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\
         user\nWhat is the capital of France?\nassistant\n"
    );
}

#[test]
fn unknown_pre_tokenizer_is_refused_by_name() {
    let file = GgufFile::open(fixture("qwen3-tiny-q4_0.gguf")).unwrap();
    let mut vocab = vocab_from_gguf(&file).unwrap();
    vocab.pre = "tekken".into();
    let err = build_tokenizer(&vocab).unwrap_err().to_string();
    assert!(err.contains("`tekken`"), "{err}");
    assert!(err.contains("qwen2") && err.contains("smollm"), "{err}");

    vocab.pre.clear();
    let err = build_tokenizer(&vocab).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.pre"), "{err}");
}

#[test]
fn non_bpe_tokenizer_model_is_refused_by_name() {
    let file = GgufFile::open(fixture("qwen3-tiny-q4_0.gguf")).unwrap();
    let mut vocab = vocab_from_gguf(&file).unwrap();
    vocab.model = "llama".into();
    let err = build_tokenizer(&vocab).unwrap_err().to_string();
    assert!(err.contains("`llama`") && err.contains("gpt2"), "{err}");
}
