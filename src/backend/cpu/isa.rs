//! The instruction-set tier the CPU kernels use, chosen once per process.
//!
//! Tiers are ordered within an architecture; each one's kernels may use everything below it:
//!
//! | tier | what it adds |
//! |---|---|
//! | `scalar` | the reference every other tier is tested against; any CPU |
//! | `avx2` | AVX2 + FMA + F16C: 256-bit float tiles, `vpmaddubsw` 8-bit dot products |
//! | `avx-vnni` | 256-bit `vpdpbusd` (Alder Lake, Zen 5, Sapphire Rapids…) |
//! | `avx512` | AVX-512 F/BW/VL with VNNI: 512-bit float tiles and `vpdpbusd` (Ice Lake, Sapphire Rapids, Zen 4+) |
//! | `neon` | aarch64's baseline 128-bit SIMD (every ARMv8 core) |
//! | `dotprod` | NEON `sdot` (Cortex-A55/A76+, Apple M1+, Graviton 2+) |
//! | `i8mm` | NEON `smmla` 2×8·8×2 tiles for prompt processing (Cortex-A510/X2+, Apple M2+, Graviton 3+) |
//!
//! An AVX-512 CPU without VNNI (Skylake-X) runs the `avx2` tier. `WICK_ISA=<tier>` forces a
//! lower tier (for comparisons and tests); a tier the CPU lacks falls back to the best one it
//! has, with a warning. `WICK_NO_SIMD=1` is `WICK_ISA=scalar`.

use std::sync::OnceLock;

/// An instruction-set tier (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust: the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX2 + AVX-VNNI.
    AvxVnni,
    /// x86-64 AVX-512 F/BW/VL/VNNI.
    Avx512,
    /// aarch64 NEON.
    Neon,
    /// aarch64 NEON + `sdot`.
    Dotprod,
    /// aarch64 NEON + `sdot` + `smmla`.
    I8mm,
}

impl Isa {
    /// Every tier, lowest first.
    pub const ALL: [Isa; 7] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::AvxVnni,
        Isa::Avx512,
        Isa::Neon,
        Isa::Dotprod,
        Isa::I8mm,
    ];

    /// The name `WICK_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
            Isa::I8mm => "i8mm",
        }
    }

    /// Parses a tier name (case-insensitive; `avxvnni`, `avx512vnni` also accepted).
    pub fn parse(s: &str) -> Option<Isa> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        Some(match s.as_str() {
            "scalar" | "none" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx-vnni" | "avxvnni" => Isa::AvxVnni,
            "avx512" | "avx-512" | "avx512vnni" | "avx512-vnni" => Isa::Avx512,
            "neon" => Isa::Neon,
            "dotprod" | "neon-dotprod" => Isa::Dotprod,
            "i8mm" | "neon-i8mm" => Isa::I8mm,
            _ => return None,
        })
    }

    /// Whether this CPU can run the tier's kernels.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.is_supported() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => {
                Isa::Neon.is_supported() && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => {
                Isa::Dotprod.is_supported() && std::arch::is_aarch64_feature_detected!("i8mm")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every tier this CPU supports, lowest first (always starts with `Scalar`).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best tier this CPU supports.
    pub fn best() -> Isa {
        *Isa::supported().last().expect("scalar is always supported")
    }

    /// Whether the tier is one of x86-64's SIMD tiers (AVX2 and up).
    pub fn is_x86(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::AvxVnni | Isa::Avx512)
    }

    /// Whether the tier is one of aarch64's NEON tiers.
    pub fn is_arm(self) -> bool {
        matches!(self, Isa::Neon | Isa::Dotprod | Isa::I8mm)
    }

    /// The tier the kernels use in this process: the best supported one, or the one
    /// `WICK_ISA` (or `WICK_NO_SIMD=1`) asks for if it is supported.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let best = Isa::best();
            if std::env::var_os("WICK_NO_SIMD").is_some_and(|v| v == "1") {
                return Isa::Scalar;
            }
            let Some(want) = std::env::var("WICK_ISA").ok().filter(|s| !s.is_empty()) else {
                return best;
            };
            match Isa::parse(&want) {
                Some(isa) if isa.is_supported() => isa,
                Some(isa) => {
                    tracing::warn!(
                        "WICK_ISA={} is not supported by this CPU; using {}",
                        isa.name(),
                        best.name()
                    );
                    best
                }
                None => {
                    tracing::warn!(
                        "WICK_ISA={want:?} is not a tier (one of: {}); using {}",
                        Isa::ALL.map(Isa::name).join(", "),
                        best.name()
                    );
                    best
                }
            }
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("AVX512_VNNI"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("sse9"), None);
        assert_eq!(Isa::supported()[0], Isa::Scalar);
        assert!(Isa::current().is_supported());
        assert!(Isa::current() <= Isa::best());
    }
}
