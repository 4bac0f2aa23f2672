//! Stop strings in a streamed reply: [`StopMatcher`] watches the decoded text for them,
//! holding back text that might turn out to be the start of one.
//!
//! ```
//! use wick::text::stops::StopMatcher;
//!
//! let mut stop = StopMatcher::new(&["\n\n".to_string()]);
//! assert_eq!(stop.push("Hello\n").emit, "Hello"); // "\n" is held back: it may start "\n\n"
//! let out = stop.push("\nignored");
//! assert!(out.stopped);
//! assert_eq!(out.emit, "");
//! ```

use super::partial_tag_suffix;

/// What [`StopMatcher::push`] lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send to the client now.
    pub emit: String,
    /// A stop string was found: `emit` ends just before it and generation should end.
    pub stopped: bool,
}

/// Finds stop strings in text that arrives piece by piece (one detokenized step at a time).
///
/// Text that could be the beginning of a stop string is held back until the next pieces show
/// whether it is; when a stop string completes, only the text before it is emitted (the stop
/// string itself never is, as in the OpenAI API). If several stop strings occur, the one that
/// starts earliest wins. Empty stop strings are ignored.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Received but not yet emitted; always shorter than the longest stop string between calls.
    held: String,
    /// Index into `stops` of the stop string that ended generation.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for these stop strings.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// Feeds the next piece of text. Once stopped, further text is dropped.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);

        // Everything before `held` has been emitted only because no stop string could start
        // there, so searching `held` alone finds the earliest match in the whole stream.
        let mut hit: Option<(usize, usize)> = None; // (byte offset, stop index)
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(at) = self.held.find(stop.as_str()) {
                if hit.is_none_or(|(best, _)| at < best) {
                    hit = Some((at, i));
                }
            }
        }
        if let Some((at, i)) = hit {
            self.held.truncate(at);
            self.matched = Some(i);
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }

        // Hold back the longest end of `held` that could start a stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_tag_suffix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let keep_from = self.held.len() - keep;
        let rest = self.held.split_off(keep_from);
        StopOutcome {
            emit: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// Ends the stream: returns the text still held back (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The stop string that ended generation, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `pieces` and returns the concatenated emitted text (plus `finish`) and whether it
    /// stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut stopped = false;
        for piece in pieces {
            let o = m.push(piece);
            assert!(!stopped || o.emit.is_empty(), "text emitted after a stop");
            out.push_str(&o.emit);
            stopped |= o.stopped;
        }
        out.push_str(&m.finish());
        (out, stopped)
    }

    /// Every way of cutting `text` into two or three pieces at char boundaries.
    fn splits(text: &str) -> Vec<Vec<&str>> {
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut out = Vec::new();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                out.push(vec![&text[..a], &text[a..b], &text[b..]]);
            }
        }
        out
    }

    #[test]
    fn stop_string_split_at_every_position() {
        let text = "Hello, wörld! STOP and more";
        for pieces in splits(text) {
            assert_eq!(
                run(&["STOP"], &pieces),
                ("Hello, wörld! ".to_string(), true),
                "{pieces:?}"
            );
        }
    }

    #[test]
    fn multibyte_stop_strings() {
        for pieces in splits("naïve café! après") {
            assert_eq!(
                run(&["é!"], &pieces),
                ("naïve caf".into(), true),
                "{pieces:?}"
            );
        }
        // "ã" and "é" share their first byte; that must not hold back or match anything.
        for pieces in splits("ãxé") {
            assert_eq!(run(&["é"], &pieces), ("ãx".into(), true), "{pieces:?}");
        }
        for pieces in splits("日本語のテキスト") {
            assert_eq!(
                run(&["テキ"], &pieces),
                ("日本語の".into(), true),
                "{pieces:?}"
            );
        }
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["</s>", "\n\n"], &["a\n\nb</s>"]), ("a".into(), true));
        for pieces in splits("hello world") {
            assert_eq!(
                run(&["world", "lo w"], &pieces),
                ("hel".into(), true),
                "{pieces:?}"
            );
        }
        // "bd" completes inside "abd" while the longer "abc" that started earlier never does.
        for pieces in splits("xabd") {
            assert_eq!(
                run(&["abc", "bd"], &pieces),
                ("xa".into(), true),
                "{pieces:?}"
            );
        }
    }

    #[test]
    fn overlapping_stop_prefixes() {
        for pieces in splits("xxabc") {
            assert_eq!(
                run(&["ab", "abc"], &pieces),
                ("xx".into(), true),
                "{pieces:?}"
            );
        }
        for pieces in splits("xxacaab") {
            assert_eq!(
                run(&["abc", "ab"], &pieces),
                ("xxaca".into(), true),
                "{pieces:?}"
            );
        }
    }

    #[test]
    fn nothing_is_lost_without_a_stop() {
        let text = "abxab aab ab é";
        for pieces in splits(text) {
            assert_eq!(
                run(&["abc", "é!"], &pieces),
                (text.into(), false),
                "{pieces:?}"
            );
        }
        assert_eq!(run(&[], &["any", "thing"]), ("anything".into(), false));
    }

    #[test]
    fn held_text_is_released_once_disambiguated() {
        let mut m = StopMatcher::new(&["abc".to_string()]);
        assert_eq!(m.push("xa").emit, "x");
        assert_eq!(m.push("b").emit, "");
        assert_eq!(m.push("d").emit, "abd");
        assert_eq!(m.push("ab").emit, "");
        assert_eq!(m.finish(), "ab");
        assert_eq!(m.matched(), None);
    }

    #[test]
    fn after_a_stop_nothing_more_is_emitted() {
        let mut m = StopMatcher::new(&["STOP".to_string(), String::new()]);
        let o = m.push("one STOP two");
        assert_eq!((o.emit.as_str(), o.stopped), ("one ", true));
        assert_eq!(m.matched(), Some("STOP"));
        let o = m.push("three");
        assert_eq!((o.emit.as_str(), o.stopped), ("", true));
        assert_eq!(m.finish(), "");
    }
}
