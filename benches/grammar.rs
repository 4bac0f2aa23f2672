//! The per-token cost of a grammar's mask over Qwen3's 151,936-token vocabulary: what a
//! constrained request adds to each decode step, in the states a JSON reply goes through
//! (a whole JSON reply, token by token; criterion reports tokens per second).
//!
//! `cargo bench --bench grammar` (needs `../shared/fixtures/qwen3-tiny`, which carries the
//! real Qwen3 tokenizer).

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use wick::grammar::{Grammar, Grammars, ReplyStart};
use wick::text::tokenizer::Tokenizer;

fn masks(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny");
    let tok = Arc::new(Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer"));
    let grammars = Grammars::new(tok.clone(), 151_936, &[151_645, 151_643]);
    let schema = Grammar::JsonSchema {
        schema: json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"]
        }),
        whitespace: None,
    };
    // A whole reply, token by token: a mask and an accept per token, as a decode step does.
    let reply = r#"{"name": "Ada Lovelace, who wrote the first program for the Analytical Engine", "age": 36}"#;
    let ids = tok.encode(reply, false).expect("encodes");
    let mut g = c.benchmark_group("grammar_mask");
    g.sample_size(20);
    g.throughput(criterion::Throughput::Elements(ids.len() as u64));
    g.bench_function("json_reply_per_token", |b| {
        b.iter_batched(
            || {
                grammars
                    .compile(&schema, ReplyStart::Answer)
                    .expect("compiles")
            },
            |mut con| {
                for &id in &ids {
                    let next = con.next(None).expect("mask");
                    std::hint::black_box(&next);
                    con.accept(id).expect("the reply matches the grammar");
                }
            },
            criterion::BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(benches, masks);
criterion_main!(benches);
