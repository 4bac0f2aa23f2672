//! A tiny line-based preprocessor for the WGSL in `shaders/`.
//!
//! WGSL has no way to share code between files or to compile variants of one kernel, and we
//! want neither Rust-generated WGSL nor one copy per variant. So a shader may use, each on a
//! line of its own:
//!
//! - `#include "path"`: the text of another file of `shaders/` (relative to it), itself
//!   preprocessed with the same defines;
//! - `#ifdef NAME` / `#ifndef NAME` / `#else` / `#endif`: keep lines when a define is
//!   (or is not) set; blocks nest.
//!
//! Defines come from the [`PipelineKey`](super::pipelines::PipelineKey) of the variant being
//! built. Every other line passes through untouched, so the output stays readable WGSL.

/// What went wrong while preprocessing; a bug in a shader file, caught by the unit tests.
#[derive(Debug, PartialEq, Eq)]
pub struct PreprocessError(pub String);

impl std::fmt::Display for PreprocessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Expands `source` (named `name` in messages) with `defines` set, resolving `#include`s
/// through `lookup` (path → file text).
pub fn preprocess(
    name: &str,
    source: &str,
    defines: &[&str],
    lookup: &dyn Fn(&str) -> Option<&'static str>,
) -> Result<String, PreprocessError> {
    let mut out = String::with_capacity(source.len() + 1024);
    expand(name, source, defines, lookup, &mut out, 0)?;
    Ok(out)
}

fn expand(
    name: &str,
    source: &str,
    defines: &[&str],
    lookup: &dyn Fn(&str) -> Option<&'static str>,
    out: &mut String,
    depth: usize,
) -> Result<(), PreprocessError> {
    if depth > 8 {
        return Err(PreprocessError(format!(
            "{name}: includes nested too deeply"
        )));
    }
    // One entry per open #if block: (this branch is kept, the enclosing block is kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(on, _)| on);
    for (i, line) in source.lines().enumerate() {
        let at = || format!("{name}:{}", i + 1);
        let trimmed = line.trim_start();
        let mut words = trimmed.split_whitespace();
        match words.next() {
            Some(d @ ("#ifdef" | "#ifndef")) => {
                let Some(sym) = words.next() else {
                    return Err(PreprocessError(format!("{}: {d} without a name", at())));
                };
                let outer = active(&stack);
                let set = defines.contains(&sym);
                stack.push((outer && (set == (d == "#ifdef")), outer));
            }
            Some("#else") => {
                let Some(top) = stack.last_mut() else {
                    return Err(PreprocessError(format!("{}: #else without #ifdef", at())));
                };
                top.0 = top.1 && !top.0;
            }
            Some("#endif") => {
                if stack.pop().is_none() {
                    return Err(PreprocessError(format!("{}: #endif without #ifdef", at())));
                }
            }
            Some("#include") => {
                if !active(&stack) {
                    continue;
                }
                let path = trimmed["#include".len()..].trim().trim_matches('"');
                let text = lookup(path)
                    .ok_or_else(|| PreprocessError(format!("{}: no shader file `{path}`", at())))?;
                expand(path, text, defines, lookup, out, depth + 1)?;
            }
            Some(w) if w.starts_with('#') => {
                return Err(PreprocessError(format!("{}: unknown directive {w}", at())));
            }
            _ => {
                if active(&stack) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    if !stack.is_empty() {
        return Err(PreprocessError(format!("{name}: unterminated #ifdef")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(path: &str) -> Option<&'static str> {
        (path == "inc.wgsl").then_some("#ifdef A\nfrom_inc_a\n#endif\nfrom_inc\n")
    }

    #[test]
    fn keeps_the_right_branches_and_includes() {
        let src = "top\n#ifdef A\na\n#ifndef B\nnot_b\n#else\nb\n#endif\n#else\nnot_a\n#endif\n\
                   #include \"inc.wgsl\"\nend\n";
        let run = |d: &[&str]| preprocess("t", src, d, &lookup).unwrap();
        assert_eq!(run(&["A"]), "top\na\nnot_b\nfrom_inc_a\nfrom_inc\nend\n");
        assert_eq!(run(&["A", "B"]), "top\na\nb\nfrom_inc_a\nfrom_inc\nend\n");
        assert_eq!(run(&[]), "top\nnot_a\nfrom_inc\nend\n");
        assert_eq!(run(&["B"]), "top\nnot_a\nfrom_inc\nend\n");
    }

    #[test]
    fn reports_malformed_input() {
        assert!(preprocess("t", "#ifdef A\n", &[], &lookup).is_err());
        assert!(preprocess("t", "#endif\n", &[], &lookup).is_err());
        assert!(preprocess("t", "#include \"nope\"\n", &[], &lookup).is_err());
        assert!(preprocess("t", "#pragma x\n", &[], &lookup).is_err());
    }
}
