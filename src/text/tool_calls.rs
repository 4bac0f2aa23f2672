//! Qwen3's tool calls, pulled out of the streamed answer.
//!
//! Qwen3's chat template asks the model to answer a tool request with
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (one block per call). The
//! parser takes the answer delta by delta, passes ordinary text through at once, holds back
//! only text that could be the start of `<tool_call>` (a tag may be split anywhere, also inside
//! a UTF-8 character's delta boundaries), and turns each closed block into a [`ToolCall`]. A
//! block whose body is not a JSON object with a `name` is given back as text, so nothing the
//! model wrote is lost, but without its tags: the markup never reaches the content.

use serde_json::Value;

use super::partial_tag_suffix;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One function call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as a JSON string (what OpenAI's API returns).
    pub arguments: String,
}

/// What one push produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ToolDelta {
    /// Answer text outside tool-call blocks.
    pub content: String,
    /// Calls closed by this delta.
    pub calls: Vec<ToolCall>,
}

/// Streaming splitter of answer text and tool calls.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    buf: String,
    inside: bool,
}

/// Parses a block's body; `None` when it is not a call.
fn parse_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

impl ToolCallParser {
    /// A parser at the start of an answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the answer.
    pub fn push(&mut self, text: &str) -> ToolDelta {
        self.buf.push_str(text);
        let mut out = ToolDelta::default();
        loop {
            if self.inside {
                let Some(end) = self.buf.find(CLOSE) else {
                    return out;
                };
                let body = self.buf[..end].to_string();
                self.buf.drain(..end + CLOSE.len());
                self.inside = false;
                match parse_call(&body) {
                    Some(call) => out.calls.push(call),
                    None => out.content.push_str(body.trim_matches('\n')),
                }
            } else if let Some(start) = self.buf.find(OPEN) {
                out.content.push_str(&self.buf[..start]);
                self.buf.drain(..start + OPEN.len());
                self.inside = true;
            } else {
                let keep = partial_tag_suffix(&self.buf, OPEN);
                let cut = self.buf.len() - keep;
                out.content.push_str(&self.buf[..cut]);
                self.buf.drain(..cut);
                return out;
            }
        }
    }

    /// Ends the answer: whatever is held back (a partial tag, an unclosed block) is text.
    pub fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        if self.inside {
            // An unclosed block that parses is still a call (generation may stop at the
            // closing tag's stop condition); anything else is text.
            match parse_call(&self.buf) {
                Some(call) => out.calls.push(call),
                None => out.content.push_str(self.buf.trim_matches('\n')),
            }
        } else {
            out.content.push_str(&self.buf);
        }
        self.buf.clear();
        self.inside = false;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let mut p = ToolCallParser::new();
        let (mut text, mut calls) = (String::new(), Vec::new());
        for piece in pieces {
            let d = p.push(piece);
            assert!(
                !d.content.contains("<tool_call") && !d.content.contains("</tool_call"),
                "markup leaked: {:?}",
                d.content
            );
            text.push_str(&d.content);
            calls.extend(d.calls);
        }
        let d = p.finish();
        text.push_str(&d.content);
        calls.extend(d.calls);
        (text, calls)
    }

    const STREAM: &str = "Let me check. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                          {\"city\": \"Zürich\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \
                          \"arguments\": {}}\n</tool_call>";

    fn want() -> Vec<ToolCall> {
        vec![
            ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Zürich"}"#.into(),
            },
            ToolCall {
                name: "now".into(),
                arguments: "{}".into(),
            },
        ]
    }

    #[test]
    fn calls_are_found_with_the_stream_split_at_every_byte() {
        let s = STREAM;
        for i in 0..=s.len() {
            for j in i..=s.len() {
                if !s.is_char_boundary(i) || !s.is_char_boundary(j) {
                    continue;
                }
                let (text, calls) = run(&[&s[..i], &s[i..j], &s[j..]]);
                assert_eq!(calls, want(), "split at {i}, {j}");
                assert_eq!(text, "Let me check. \n", "split at {i}, {j}");
            }
        }
        // One character at a time.
        let chars: Vec<String> = s.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&pieces).1, want());
    }

    #[test]
    fn plain_text_and_lookalikes_pass_through() {
        assert_eq!(
            run(&["a < b and <tool", "s> too"]).0,
            "a < b and <tools> too"
        );
        assert_eq!(run(&["ends with <tool_c"]).0, "ends with <tool_c");
        let (text, calls) = run(&["a <tool_call>\nnot json\n</tool_call> b"]);
        assert_eq!(text, "a not json b");
        assert!(calls.is_empty());
        let (text, calls) = run(&["<tool_call>\n{\"name\": \"f\", \"argum"]);
        assert_eq!(text, "{\"name\": \"f\", \"argum");
        assert!(calls.is_empty());
    }

    #[test]
    fn an_unclosed_call_at_the_end_still_counts() {
        let (text, calls) = run(&["<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}"]);
        assert_eq!(text, "");
        assert_eq!(calls[0].arguments, r#"{"x":1}"#);
    }
}
