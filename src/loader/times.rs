//! How long loading a model took, phase by phase ([`LoadTimes`]).
//!
//! The phases follow the load path in order, each timed where its work happens:
//!
//! - **download**: fetching from the Hub (file transfers, and the repository's file list of
//!   a GGUF repository when online): [`super::hub`]. Zero for a local path or when every file
//!   came from the cache.
//! - **map**: opening the files: config, tokenizer, memory-mapping the weights and parsing
//!   the safetensors / GGUF headers ([`super::checkpoint`]).
//! - **repack**: re-laying the weights out for the kernels: FP8 → Q8_0 ([`super::fp8`]),
//!   GPTQ, AWQ and compressed-tensors → Q4_0, Q4_1 or Q8_0 ([`super::quantization`]),
//!   `--quantize`, the CPU backend's interleaved rows and norm vectors widened to f32, the GPU
//!   backend's word-aligned blocks.
//! - **upload**: writing the weights into GPU buffers (zero on the CPU, which reads the map
//!   in place).
//! - **total**: from the start of loading until the model is ready to run. It also holds what
//!   no phase names (opening the GPU device and compiling its kernels, the memory checks), so
//!   the phases add up to at most the total.
//!
//! With a memory map every tensor becomes readable at the same moment, the end of `map`, so
//! there is no separate "first weight readable" instant to report.

use std::fmt;
use std::time::Duration;

/// The time each phase of loading took (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadTimes {
    /// Fetching from the Hub.
    pub download: Duration,
    /// Opening the files and parsing their headers.
    pub map: Duration,
    /// Converting and re-laying weights out for the backend.
    pub repack: Duration,
    /// Writing weights into GPU buffers.
    pub upload: Duration,
    /// Start of loading to ready.
    pub total: Duration,
}

impl LoadTimes {
    /// The phases by name, total last: the names `wick_load_seconds{phase=…}` and the JSON
    /// reports use.
    pub fn phases(&self) -> [(&'static str, Duration); 5] {
        [
            ("download", self.download),
            ("map", self.map),
            ("repack", self.repack),
            ("upload", self.upload),
            ("total", self.total),
        ]
    }

    /// The sum of the named phases (at most [`LoadTimes::total`] once loading is done).
    pub fn phase_sum(&self) -> Duration {
        self.download + self.map + self.repack + self.upload
    }

    /// The phases in seconds as a JSON object (`{"download": 0.0, …, "total": 1.2}`).
    pub fn to_json(&self) -> serde_json::Value {
        self.phases()
            .iter()
            .map(|(name, d)| (name.to_string(), d.as_secs_f64().into()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// One line: `download 0.00 s, map 0.05 s, repack 0.12 s, upload 0.00 s, total 0.31 s`.
impl fmt::Display for LoadTimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, d)) in self.phases().iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {:.2} s", d.as_secs_f64())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_named_once_in_order() {
        let t = LoadTimes {
            download: Duration::from_millis(1500),
            map: Duration::from_millis(20),
            repack: Duration::from_millis(300),
            upload: Duration::from_millis(4),
            total: Duration::from_secs(2),
        };
        assert_eq!(
            t.to_string(),
            "download 1.50 s, map 0.02 s, repack 0.30 s, upload 0.00 s, total 2.00 s"
        );
        assert_eq!(t.phase_sum(), Duration::from_millis(1824));
        let j = t.to_json();
        assert_eq!(j["repack"], 0.3);
        assert_eq!(j["total"], 2.0);
        assert_eq!(j.as_object().unwrap().len(), 5);
    }
}
