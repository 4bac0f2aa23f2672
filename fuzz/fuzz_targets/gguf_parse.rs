//! Fuzz target: `GgufFile::parse` on arbitrary bytes must return `Ok` or `Err`, never panic,
//! read out of bounds or allocate without bound. When a file parses, the rest of the loading
//! path runs too: config, tensor set (names, Llama row reordering) and dequantization of the
//! small tensors.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use wick::loader::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse(Arc::new(data.to_vec()), "fuzz.gguf") else {
        return;
    };
    let _ = file.chat_template();
    let _ = file.get_str_array("tokenizer.ggml.tokens");
    let Ok(config) = file.model_config() else {
        return;
    };
    let Ok(set) = file.tensor_set(&config) else {
        return;
    };
    for name in set.names() {
        let t = set.get(name).expect("listed name");
        // Keeps each run fast; size validation is what matters, not large loops.
        if t.numel() <= 1 << 16 {
            let _ = t.to_f32();
        }
    }
});
