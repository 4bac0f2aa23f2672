//! The chat page and the dashboard in a real browser: headless Chromium, driven over the
//! WebDriver protocol (chromedriver), against the real `wick serve` with an API key.
//!
//! Without `chromium` and `chromedriver` the test says so and passes, unless
//! `WICK_REQUIRE_BROWSER=1` (CI sets it), where their absence fails it. Screenshots of both
//! pages (and of the locked chat page) go to `target/ui-screenshots/`.

// The HTTP client is the bench-serve feature's.
#![cfg(feature = "bench-serve")]

mod server_common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_common::Server;

/// A chat template that opens a think block when thinking is on: the random-weight model
/// never writes `<think>` itself, so with thinking on everything it writes is reasoning.
const THINK_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\
    <|im_end|>\n{% endfor %}<|im_start|>assistant\n\
    {% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}";

/// The first of `names` found in `PATH` or `/usr/bin`, `/usr/lib/chromium`.
fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/bin", "/usr/lib/chromium"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session.
struct Session {
    http: reqwest::Client,
    url: String,
}

impl Session {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("WebDriver request");
        let status = resp.status();
        let v: Value = resp.json().await.expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Clears an input and types `text` into it, as a user would.
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }

    /// Polls `script` (returning a value) until it returns something truthy; that value.
    async fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script, json!([])).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let page = self
                    .js("return document.body.outerHTML.slice(0, 4000);", json!([]))
                    .await;
                panic!("timed out waiting for {what}; the page: {page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self
            .cmd(reqwest::Method::GET, "/screenshot", None)
            .await
            .as_str()
            .expect("screenshot")
            .to_string();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let png = base64_decode(&b64);
        assert_eq!(&png[..4], b"\x89PNG", "not a PNG");
        std::fs::write(&path, png).unwrap();
        path
    }
}

/// Standard base64 (the screenshots' encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(val)
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver and a headless Chromium session, or `None` (after saying why) when
/// either is missing and the browser is not required.
async fn browser() -> Option<(Driver, Session)> {
    let required = std::env::var("WICK_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let (Some(driver), Some(chromium)) = (
        find(&["chromedriver"]),
        find(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        assert!(
            !required,
            "WICK_REQUIRE_BROWSER=1 but chromium or chromedriver is missing \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "SKIPPED: the browser test needs chromium and chromedriver \
             (apt-get install chromium chromium-driver)"
        );
        return None;
    };
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let d = Driver {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{}/status", d.base)).send().await {
            let v: Value = r.json().await.unwrap_or_default();
            if v["value"]["ready"] == true {
                break;
            }
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--no-first-run", "--disable-extensions"],
        },
    }}});
    let r = http
        .post(format!("{}/session", d.base))
        .json(&caps)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let id = v["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
        .to_string();
    let url = format!("{}/session/{id}", d.base);
    Some((d, Session { http, url }))
}

/// Counts `selector`'s matches.
fn count(selector: &str) -> String {
    format!("return document.querySelectorAll('{selector}').length;")
}

#[tokio::test]
async fn chat_and_dashboard_in_headless_chromium() {
    let Some((_driver, b)) = browser().await else {
        return;
    };
    let s = Server::start(&[
        "--kv-cache-mb",
        "64",
        "--api-key",
        "sekret",
        "--slo-p95",
        "1.5",
        "--slo-ttft",
        "0.5",
        "--chat-template",
        THINK_TEMPLATE,
    ])
    .await;
    let t = Duration::from_secs(30);

    // Without the key the chat page is locked and shows nothing.
    b.goto(&s.url("/")).await;
    b.wait_for(
        "the lock",
        "return document.body.dataset.locked === 'true';",
        t,
    )
    .await;
    let shown = b
        .js(
            "return [getComputedStyle(document.querySelector('#lock')).display,
                     getComputedStyle(document.querySelector('#chat')).display];",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(["flex", "none"]), "locked page");
    b.screenshot("locked.png").await;

    // A wrong key is refused; the right one unlocks.
    b.type_into("#lock-key", "wrong").await;
    b.click("#lock-form button[type=submit]").await;
    b.wait_for(
        "the refusal",
        "return document.querySelector('#lock-msg').textContent.includes('refused');",
        t,
    )
    .await;
    b.type_into("#lock-key", "sekret").await;
    b.click("#lock-form button[type=submit]").await;
    b.wait_for(
        "the unlocked page",
        "return document.body.dataset.locked === 'false';",
        t,
    )
    .await;

    // Settings: greedy, short replies.
    b.click("#settings summary").await;
    b.type_into("#temperature", "0").await;
    b.type_into("#max_tokens", "8").await;

    // Turn 1, thinking off: a streamed answer and no reasoning.
    let first = "Tell me about the weather in the mountains in early spring, when the snow \
                 starts to melt and the rivers run high; what should a hiker pack for a day?";
    b.type_into("#input", first).await;
    b.click("#send").await;
    b.wait_for(
        "reply 1",
        "const a = document.querySelectorAll('article.assistant');
         return a.length === 1 && a[0].dataset.state === 'done';",
        t,
    )
    .await;
    let turn1 = b
        .js(
            "const a = document.querySelector('article.assistant');
             return {body: a.querySelector('.body').textContent,
                     reasoningHidden: a.querySelector('details.reasoning').hidden,
                     usage: Object.assign({}, a.querySelector('.usage').dataset)};",
            json!([]),
        )
        .await;
    assert!(
        turn1["body"].as_str().is_some_and(|t| !t.is_empty()),
        "{turn1}"
    );
    assert_eq!(turn1["reasoningHidden"], true, "{turn1}");
    assert_eq!(turn1["usage"]["completionTokens"], "8", "{turn1}");

    // Turn 2, thinking on: the reasoning arrives folded, and most of the prompt is reused.
    b.click("#thinking").await;
    b.type_into("#input", "And in autumn?").await;
    b.click("#send").await;
    b.wait_for(
        "reply 2",
        "const a = document.querySelectorAll('article.assistant');
         return a.length === 2 && a[1].dataset.state === 'done';",
        t,
    )
    .await;
    let turn2 = b
        .js(
            "const a = document.querySelectorAll('article.assistant')[1];
             const d = a.querySelector('details.reasoning');
             return {hidden: d.hidden, open: d.open,
                     reasoning: a.querySelector('.reasoning-body').textContent,
                     summary: d.querySelector('summary').textContent,
                     usage: Object.assign({}, a.querySelector('.usage').dataset),
                     usageText: a.querySelector('.usage').textContent};",
            json!([]),
        )
        .await;
    assert_eq!(
        (&turn2["hidden"], &turn2["open"]),
        (&json!(false), &json!(false)),
        "the reasoning is shown folded: {turn2}"
    );
    assert!(
        turn2["reasoning"].as_str().is_some_and(|r| !r.is_empty()),
        "{turn2}"
    );
    let num = |v: &Value| v.as_str().and_then(|s| s.parse::<u64>().ok()).unwrap();
    let (prompt, cached) = (
        num(&turn2["usage"]["promptTokens"]),
        num(&turn2["usage"]["cachedTokens"]),
    );
    assert!(cached > 0 && cached < prompt, "{turn2}");
    assert!(
        turn2["usageText"]
            .as_str()
            .unwrap()
            .contains(&format!("{cached} reused, {} computed", prompt - cached)),
        "{turn2}"
    );

    // A long reply streams in (text shows while it is still running) and Stop ends it.
    b.click("#thinking").await;
    b.type_into("#max_tokens", "4000").await;
    b.type_into("#input", "Write a long story.").await;
    b.click("#send").await;
    b.wait_for(
        "streamed text before the end",
        "const a = document.querySelectorAll('article.assistant')[2];
         return a && a.dataset.state === 'streaming'
             && a.querySelector('.body').textContent.length > 0;",
        t,
    )
    .await;
    b.click("#stop").await;
    b.wait_for(
        "the stopped reply",
        "const a = document.querySelectorAll('article.assistant')[2];
         return a.dataset.state === 'stopped' && !document.querySelector('#send').disabled;",
        t,
    )
    .await;

    // The Markdown renderer escapes HTML and keeps only safe links.
    let md = b
        .js(
            "return arguments[0].map((s) => Markdown.render(s));",
            json!([[
                "<img src=x onerror=alert(1)>",
                "[a](javascript:alert(1)) [b](https://example.com/?q=\"x\")",
                "```js\nlet x = '<b>';\n```",
                "# T\n**b** *i* `c <i>`\n\n- one\n- two",
            ]]),
        )
        .await;
    assert_eq!(md[0], "<p>&lt;img src=x onerror=alert(1)&gt;</p>");
    assert_eq!(
        md[1],
        "<p>[a](javascript:alert(1)) <a href=\"https://example.com/?q=&quot;x&quot;\" \
         rel=\"noopener noreferrer\" target=\"_blank\">b</a></p>"
    );
    assert_eq!(
        md[2],
        "<pre><code class=\"lang-js\">let x = &#39;&lt;b&gt;&#39;;</code></pre>"
    );
    assert_eq!(
        md[3],
        "<h1>T</h1>\n<p><strong>b</strong> <em>i</em> <code>c &lt;i&gt;</code></p>\n\
         <ul><li>one</li><li>two</li></ul>"
    );
    let chat_png = b.screenshot("chat.png").await;

    // The theme switch: dark, and remembered.
    b.click("#theme").await;
    let theme = b
        .js(
            "return [document.documentElement.dataset.theme, localStorage.getItem('wick.theme')];",
            json!([]),
        )
        .await;
    assert_eq!(theme, json!(["dark", "dark"]));

    // The settings outlive the page.
    b.goto(&s.url("/")).await;
    b.wait_for(
        "the reloaded page",
        "return document.body.dataset.locked === 'false';",
        t,
    )
    .await;
    let kept = b
        .js(
            "return [document.querySelector('#temperature').value,
                     document.querySelector('#max_tokens').value,
                     document.querySelector('#thinking').checked];",
            json!([]),
        )
        .await;
    assert_eq!(kept, json!(["0", "4000", false]));

    // The dashboard during a short load: data points on the charts and the SLO line.
    let bench = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args([
            "bench-serve",
            "--url",
            &s.base,
            "--api-key",
            "sekret",
            "--concurrency",
            "2",
            "--requests",
            "12",
            "--stream",
            "--max-tokens",
            "8",
            "--prompt-len",
            "32",
            "--ignore-eos",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    b.goto(&s.url("/dashboard")).await;
    b.wait_for(
        "the unlocked dashboard",
        "return document.body.dataset.locked === 'false';",
        t,
    )
    .await;
    b.wait_for(
        "latency points",
        "const f = document.querySelector('#chart-e2e');
         return Number(f.querySelector('.key[data-series=e2e_p95]').dataset.points) > 0
             && Number(document.querySelector('#chart-requests').dataset.points) > 2
             && Number(document.querySelector('#chart-tokens .key[data-series=generation_tokens_per_s]').dataset.points) > 2;",
        t,
    )
    .await;
    let out = bench.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bench-serve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One more sample after the load, so the charts hold the whole run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dash = b
        .js(
            "const q = (s) => document.querySelector(s);
             return {e2e: q('#chart-e2e').dataset.thresholdDrawn,
                     threshold: q('#chart-e2e').dataset.threshold,
                     ttft: q('#chart-ttft').dataset.thresholdDrawn,
                     tokens: q('#chart-tokens').dataset.thresholdDrawn,
                     memory: Number(q('#chart-memory').dataset.points),
                     kv: Number(q('#chart-kv').dataset.points),
                     tiles: document.querySelectorAll('.tile').length};",
            json!([]),
        )
        .await;
    assert_eq!(dash["e2e"], "true", "{dash}");
    assert_eq!(dash["threshold"], "1.5", "{dash}");
    assert_eq!(dash["ttft"], "true", "{dash}");
    assert_eq!(
        dash["tokens"],
        Value::Null,
        "no target on that chart: {dash}"
    );
    assert!(dash["memory"].as_u64() > Some(2), "{dash}");
    assert!(dash["kv"].as_u64() > Some(2), "{dash}");
    assert!(dash["tiles"].as_u64() >= Some(8), "{dash}");
    let n = b.js(&count("figure.chart"), json!([])).await;
    assert_eq!(n, 8);
    // Tall enough for every chart in one picture.
    b.post("/window/rect", json!({"width": 1280, "height": 1450}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dash_png = b.screenshot("dashboard.png").await;
    b.cmd(reqwest::Method::DELETE, "", None).await;
    eprintln!(
        "screenshots: {} and {}",
        chat_png.display(),
        dash_png.display()
    );
}
