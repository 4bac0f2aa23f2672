//! `resolve_model` against a Hub stand-in on 127.0.0.1.
//!
//! The server speaks the parts of the Hub protocol hf-hub relies on: files under
//! `/{owner}/{name}/resolve/{revision}/{file}` with `x-repo-commit` and `etag`, range requests
//! (`bytes=0-0` to learn the size from `Content-Range`), weight files answered with a redirect
//! to a content store carrying `x-linked-etag` (as the Hub does for LFS files), and 404s with
//! `x-error-code`, and the file list at `/api/models/{owner}/{name}/revision/{revision}`. It
//! logs every request so tests can check what went over the wire.

#![cfg(feature = "hub")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use wick::loader::hub::{resolve_model, resolve_model_timed, HubOptions, ModelKind, ResolvedModel};
use wick::Error;

const COMMIT: &str = "5f1c0d2e7a9b3c4d5e6f708192a3b4c5d6e7f809";
const REPO: &str = "Qwen/Qwen3-tiny-test";
const SHARDED: &str = "Qwen/Qwen3-tiny-sharded";
const GGUF_REPO: &str = "Qwen/Qwen3-tiny-GGUF";
const GGUF_FILE: &str = "qwen3-tiny-q8_0.gguf";
const EVIL: &str = "Qwen/escaping-index";
/// A GGUF repository with one file per quantization: Q8_0 whole, Q4_0 split in three parts
/// (by llama.cpp's Python writer, see `gguf_split.py`), and a projector that is not a model.
const QUANTS: &str = "Qwen/Qwen3-tiny-quants-GGUF";
/// The same with part 2 of the split model absent.
const BROKEN_SPLIT: &str = "Qwen/Qwen3-tiny-broken-split-GGUF";
const SPLIT_PARTS: [&str; 3] = [
    "Qwen3-tiny-Q4_0-00001-of-00003.gguf",
    "Qwen3-tiny-Q4_0-00002-of-00003.gguf",
    "Qwen3-tiny-Q4_0-00003-of-00003.gguf",
];
const NO_COMMIT_HEADER: &str = "Qwen/no-commit-header";
/// Only a README: neither a checkpoint nor GGUF files.
const EVIL_NO_CONFIG: &str = "Qwen/readme-only";
const CHECKPOINT_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];
/// Set in the child process of `hf_endpoint_and_hf_home_from_the_process_environment`.
const CHILD_MARKER: &str = "WICK_HUB_TEST_CHILD";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()))
}

/// Makes the process environment hermetic once, before any test talks to a server: no proxy
/// (ureq would route 127.0.0.1 through it, as it ignores NO_PROXY), no Hub settings or token
/// from the developer's shell, and HF_HOME in an empty temporary directory so nothing outside
/// it is read.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os(CHILD_MARKER).is_some() {
            return;
        }
        for key in PROXY_VARS.iter().chain(HUB_VARS.iter()) {
            std::env::remove_var(key);
        }
        let home = std::env::temp_dir().join(format!("wick-hub-home-{}", std::process::id()));
        std::env::set_var("HF_HOME", home);
    });
}

const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
];
const HUB_VARS: [&str; 8] = [
    "HF_ENDPOINT",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "XDG_CACHE_HOME",
];

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("wick-hub-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stable content hash for etags (FNV-1a, twice with different seeds, plus the length).
fn etag_of(bytes: &[u8]) -> String {
    let fnv = |seed: u64| {
        bytes.iter().fold(seed, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}{:08x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x8422_2325_cbf2_9ce4),
        bytes.len()
    )
}

struct File {
    bytes: Arc<Vec<u8>>,
    etag: String,
}

#[derive(Default)]
struct HubRepo {
    files: BTreeMap<String, File>,
    /// Leave out `x-repo-commit`, as a plain web server would.
    no_commit_header: bool,
}

impl HubRepo {
    fn add(&mut self, name: &str, bytes: Vec<u8>) {
        let etag = etag_of(&bytes);
        self.files.insert(
            name.to_string(),
            File {
                bytes: Arc::new(bytes),
                etag,
            },
        );
    }
}

/// The Hub stand-in. Its threads live until the test process exits.
struct HubServer {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl HubServer {
    fn start() -> HubServer {
        let mut repos = BTreeMap::new();

        let mut tiny = HubRepo::default();
        for name in CHECKPOINT_FILES {
            tiny.add(name, fixture(&format!("qwen3-tiny/{name}")));
        }
        // Present on the server but not part of a checkpoint: must never be requested.
        tiny.add("oracle.json", fixture("qwen3-tiny/oracle.json"));
        repos.insert(REPO.to_string(), tiny);

        let mut sharded = HubRepo::default();
        for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            sharded.add(name, fixture(&format!("qwen3-tiny/{name}")));
        }
        let (first, second) = shard_contents();
        sharded.add("model-00001-of-00002.safetensors", first);
        sharded.add("model-00002-of-00002.safetensors", second);
        let index = r#"{"metadata": {"total_size": 3}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}}"#;
        sharded.add("model.safetensors.index.json", index.as_bytes().to_vec());
        repos.insert(SHARDED.to_string(), sharded);

        let mut gguf = HubRepo::default();
        gguf.add(GGUF_FILE, fixture(GGUF_FILE));
        gguf.add("qwen3-tiny-q4_0.gguf", b"not requested".to_vec());
        repos.insert(GGUF_REPO.to_string(), gguf);

        let mut evil = HubRepo::default();
        for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            evil.add(name, b"{}".to_vec());
        }
        let index = r#"{"weight_map": {"w": "../../../escaped.safetensors"}}"#;
        evil.add("model.safetensors.index.json", index.as_bytes().to_vec());
        repos.insert(EVIL.to_string(), evil);

        let mut quants = HubRepo::default();
        let mut broken = HubRepo::default();
        quants.add("Qwen3-tiny-Q8_0.gguf", fixture("qwen3-tiny-q8_0.gguf"));
        quants.add("mmproj-Qwen3-tiny-F16.gguf", b"not a model".to_vec());
        quants.add("README.md", b"# tiny\n".to_vec());
        for (i, part) in SPLIT_PARTS.iter().enumerate() {
            let bytes = std::fs::read(split_fixture().join(part)).unwrap();
            if i != 1 {
                broken.add(part, bytes.clone());
            }
            quants.add(part, bytes);
        }
        repos.insert(QUANTS.to_string(), quants);
        let mut readme = HubRepo::default();
        readme.add("README.md", b"# nothing\n".to_vec());
        repos.insert(EVIL_NO_CONFIG.to_string(), readme);
        repos.insert(BROKEN_SPLIT.to_string(), broken);

        let mut bare = HubRepo {
            no_commit_header: true,
            ..HubRepo::default()
        };
        bare.add("config.json", b"{}".to_vec());
        repos.insert(NO_COMMIT_HEADER.to_string(), bare);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new((repos, url.clone()));
        let server_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = Arc::clone(&state);
                let log = Arc::clone(&server_log);
                std::thread::spawn(move || serve(stream, &state.0, &state.1, &log));
            }
        });
        HubServer { url, log }
    }

    /// The requests seen so far, as `GET /path [range]`.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// The Q4_0 fixture split into three parts by llama.cpp's own Python writer, once per test
/// process.
fn split_fixture() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wick-hub-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf_split.py");
        let status = Command::new("python3")
            .arg(script)
            .arg(fixtures().join("qwen3-tiny-q4_0.gguf"))
            .arg(dir.join("Qwen3-tiny-Q4_0.gguf"))
            .arg("10")
            .status()
            .expect("python3 runs (with llama.cpp's `gguf` package: pip install gguf)");
        assert!(status.success(), "gguf_split.py failed");
        for part in SPLIT_PARTS {
            assert!(dir.join(part).is_file(), "{part} not written");
        }
        dir
    })
}

/// The two shards of the sharded repository: the halves of the fixture's weights.
fn shard_contents() -> (Vec<u8>, Vec<u8>) {
    let mut first = fixture("qwen3-tiny/model.safetensors");
    let second = first.split_off(first.len() / 2);
    (first, second)
}

struct Response {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Arc<Vec<u8>>,
    range: Option<(usize, usize)>,
}

impl Response {
    fn not_found(code: &str, commit: bool) -> Response {
        let mut headers = vec![("x-error-code", code.to_string())];
        if commit {
            headers.push(("x-repo-commit", COMMIT.to_string()));
        }
        Response {
            status: "404 Not Found",
            headers,
            body: Arc::new(format!("{code}\n").into_bytes()),
            range: None,
        }
    }

    /// The file's bytes, or the part a `Range: bytes=a-[b]` header asks for.
    fn file(file: &File, range: Option<&str>) -> Response {
        let size = file.bytes.len();
        let mut response = Response {
            status: "200 OK",
            headers: vec![("etag", format!("\"{}\"", file.etag))],
            body: Arc::clone(&file.bytes),
            range: None,
        };
        if let Some(range) = range {
            let parsed = range.strip_prefix("bytes=").and_then(|r| {
                let (start, end) = r.split_once('-')?;
                let start: usize = start.parse().ok()?;
                let end = match end {
                    "" => size.checked_sub(1)?,
                    end => end.parse::<usize>().ok()?.min(size.checked_sub(1)?),
                };
                (start <= end).then_some((start, end))
            });
            match parsed {
                Some((start, end)) => {
                    response.status = "206 Partial Content";
                    response
                        .headers
                        .push(("content-range", format!("bytes {start}-{end}/{size}")));
                    response.range = Some((start, end + 1));
                }
                None => {
                    response.status = "416 Range Not Satisfiable";
                    response.headers = vec![("content-range", format!("bytes */{size}"))];
                    response.body = Arc::new(Vec::new());
                }
            }
        }
        response
    }
}

fn serve(
    stream: TcpStream,
    repos: &BTreeMap<String, HubRepo>,
    base: &str,
    log: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    log.lock().unwrap().push(match &range {
        Some(range) => format!("{method} {target} {range}"),
        None => format!("{method} {target}"),
    });

    let response = route(&target, range.as_deref(), repos, base);
    let body = match response.range {
        Some((start, end)) => &response.body[start..end],
        None => &response.body[..],
    };
    let mut head = format!("HTTP/1.1 {}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut stream = reader.into_inner();
    // The client may hang up early (it reads one byte of a `bytes=0-0` answer, say).
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
}

fn route(
    target: &str,
    range: Option<&str>,
    repos: &BTreeMap<String, HubRepo>,
    base: &str,
) -> Response {
    // The content store behind the Hub's redirects: `/cdn/<etag>`.
    if let Some(etag) = target.strip_prefix("/cdn/") {
        let file = repos
            .values()
            .flat_map(|repo| repo.files.values())
            .find(|file| file.etag == etag);
        return match file {
            Some(file) => Response::file(file, range),
            None => Response::not_found("EntryNotFound", false),
        };
    }
    // The file list: `/api/models/{owner}/{name}/revision/{revision}`.
    if let Some(rest) = target.strip_prefix("/api/models/") {
        let segments: Vec<&str> = rest.splitn(4, '/').collect();
        let [owner, name, "revision", revision] = segments.as_slice() else {
            return Response::not_found("RepoNotFound", false);
        };
        let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
            return Response::not_found("RepoNotFound", false);
        };
        if *revision != "main" && *revision != COMMIT {
            return Response::not_found("RevisionNotFound", false);
        }
        let siblings: Vec<_> = repo
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        return Response {
            status: "200 OK",
            headers: vec![("content-type", "application/json".to_string())],
            body: Arc::new(body.into_bytes()),
            range: None,
        };
    }
    // `/{owner}/{name}/resolve/{revision}/{file...}`
    let segments: Vec<&str> = target.trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", revision, file] = segments.as_slice() else {
        return Response::not_found("RepoNotFound", false);
    };
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return Response::not_found("RepoNotFound", false);
    };
    if *revision != "main" && *revision != COMMIT {
        return Response::not_found("RevisionNotFound", false);
    }
    let Some(file) = repo.files.get(*file) else {
        return Response::not_found("EntryNotFound", true);
    };
    let mut response = if target.ends_with(".safetensors") || target.ends_with(".gguf") {
        // Large files live in LFS: the Hub redirects to the store and names the blob in
        // `x-linked-etag`.
        Response {
            status: "302 Found",
            headers: vec![
                ("location", format!("{base}/cdn/{}", file.etag)),
                ("x-linked-etag", format!("\"{}\"", file.etag)),
                ("x-linked-size", file.bytes.len().to_string()),
            ],
            body: Arc::new(Vec::new()),
            range: None,
        }
    } else {
        Response::file(file, range)
    };
    if !repo.no_commit_header {
        response.headers.push(("x-repo-commit", COMMIT.to_string()));
    }
    response
}

fn options(server: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: Some(server.to_string()),
        cache_dir: Some(cache.to_path_buf()),
        token: Some(String::new()),
        progress: false,
        ..HubOptions::default()
    }
}

fn hub_message(result: wick::Result<ResolvedModel>, model: &str) -> String {
    match result {
        Err(Error::Hub { model: m, message }) => {
            assert_eq!(m, model);
            message
        }
        other => panic!("expected a Hub error for {model}, got {other:?}"),
    }
}

fn snapshot_dir(cache: &Path, repo: &str) -> PathBuf {
    cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

#[test]
fn downloads_into_the_hugging_face_cache_layout() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("layout");

    let (model, network) = resolve_model_timed(REPO, &options(&server.url, &cache.0)).unwrap();
    assert!(network > std::time::Duration::ZERO, "the download is timed");

    let snapshot = snapshot_dir(&cache.0, REPO);
    assert_eq!(model.dir, snapshot);
    assert_eq!(model.kind, ModelKind::SafetensorsDir);
    let repo_dir = cache.0.join("models--Qwen--Qwen3-tiny-test");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    for name in CHECKPOINT_FILES {
        let path = snapshot.join(name);
        assert!(
            fixture(&format!("qwen3-tiny/{name}")) == std::fs::read(&path).unwrap(),
            "{name} differs from the fixture"
        );
        // Snapshot entries link to blobs named by etag, as huggingface_hub lays them out.
        #[cfg(unix)]
        {
            let link = std::fs::read_link(&path).unwrap();
            let etag = etag_of(&fixture(&format!("qwen3-tiny/{name}")));
            assert_eq!(link, Path::new("../../blobs").join(&etag), "{name}");
            assert!(repo_dir.join("blobs").join(&etag).is_file());
        }
    }
    assert!(!snapshot.join("oracle.json").exists());

    let requests = server.requests();
    for name in CHECKPOINT_FILES {
        let path = format!("/{REPO}/resolve/main/{name}");
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path} "))),
            "{path} not requested: {requests:#?}"
        );
    }
    assert!(requests.iter().any(|r| r.starts_with("GET /cdn/")));
    assert!(!requests.iter().any(|r| r.contains("oracle")));
    assert!(!requests.iter().any(|r| r.contains("index.json")));

    // Everything is cached now: neither an online nor an offline resolve asks the server,
    // and no time is spent downloading.
    server.clear();
    assert_eq!(
        resolve_model_timed(REPO, &options(&server.url, &cache.0)).unwrap(),
        (model.clone(), std::time::Duration::ZERO)
    );
    let offline = HubOptions {
        offline: true,
        ..options(&server.url, &cache.0)
    };
    assert_eq!(resolve_model(REPO, &offline).unwrap(), model);
    assert_eq!(server.requests(), Vec::<String>::new());
}

#[test]
fn offline_with_an_empty_cache_names_the_cache() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("offline-empty");
    let opts = HubOptions {
        offline: true,
        ..options(&server.url, &cache.0)
    };
    let message = hub_message(resolve_model(REPO, &opts), REPO);
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("not in the Hub cache"), "{message}");
    assert!(
        message.contains(&cache.0.display().to_string()),
        "{message}"
    );
    assert!(server.requests().is_empty());
}

#[test]
fn unknown_repository_is_a_hub_error_naming_it() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("unknown");
    let message = hub_message(
        resolve_model("Qwen/does-not-exist", &options(&server.url, &cache.0)),
        "Qwen/does-not-exist",
    );
    assert!(message.contains("repository not found"), "{message}");
    assert!(message.contains("404"), "{message}");
    assert!(message.contains(&server.url), "{message}");
}

#[test]
fn unknown_revision_is_reported() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("revision");
    let opts = HubOptions {
        revision: Some("v9".into()),
        ..options(&server.url, &cache.0)
    };
    let message = hub_message(resolve_model(REPO, &opts), REPO);
    assert!(message.contains("revision `v9` not found"), "{message}");
}

#[test]
fn pinned_commit_is_fetched_and_then_found_offline() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("pinned");
    let pinned = HubOptions {
        revision: Some(COMMIT.into()),
        ..options(&server.url, &cache.0)
    };
    let model = resolve_model(REPO, &pinned).unwrap();
    assert_eq!(model.dir, snapshot_dir(&cache.0, REPO));
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains(&format!("/resolve/{COMMIT}/config.json"))),
        "{requests:#?}"
    );

    // A cache filled from `main` also serves the commit `main` pointed at, offline.
    let cache = TempDir::new("pinned-offline");
    resolve_model(REPO, &options(&server.url, &cache.0)).unwrap();
    server.clear();
    let offline_pinned = HubOptions {
        offline: true,
        revision: Some(COMMIT.into()),
        ..options(&server.url, &cache.0)
    };
    assert_eq!(
        resolve_model(REPO, &offline_pinned).unwrap().dir,
        snapshot_dir(&cache.0, REPO)
    );
    assert!(server.requests().is_empty());
}

#[test]
fn sharded_checkpoint_fetches_every_shard_once() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("sharded");
    let model = resolve_model(SHARDED, &options(&server.url, &cache.0)).unwrap();
    let snapshot = snapshot_dir(&cache.0, SHARDED);
    assert_eq!(model.dir, snapshot);
    let (first, second) = shard_contents();
    assert!(std::fs::read(snapshot.join("model-00001-of-00002.safetensors")).unwrap() == first);
    assert!(std::fs::read(snapshot.join("model-00002-of-00002.safetensors")).unwrap() == second);
    assert!(snapshot.join("model.safetensors.index.json").is_file());
    assert!(!snapshot.join("generation_config.json").exists());
    let requests = server.requests();
    let shard_requests = requests
        .iter()
        .filter(|r| r.starts_with("GET /Qwen/Qwen3-tiny-sharded/resolve/main/model-0000"))
        .count();
    // Each shard: one metadata probe and one transfer.
    assert_eq!(shard_requests, 4, "{requests:#?}");

    // The files the repository lacks (generation_config.json, model.safetensors) were
    // recorded, so a second run asks nothing, online or offline.
    server.clear();
    assert_eq!(
        resolve_model(SHARDED, &options(&server.url, &cache.0)).unwrap(),
        model
    );
    let offline = HubOptions {
        offline: true,
        ..options(&server.url, &cache.0)
    };
    assert_eq!(resolve_model(SHARDED, &offline).unwrap(), model);
    assert_eq!(server.requests(), Vec::<String>::new());
}

#[test]
fn index_naming_a_file_outside_the_repository_is_rejected() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("evil");
    match resolve_model(EVIL, &options(&server.url, &cache.0)) {
        Err(Error::Json { path, message }) => {
            assert!(path.ends_with("model.safetensors.index.json"));
            assert!(
                message.contains("../../../escaped.safetensors"),
                "{message}"
            );
        }
        other => panic!("expected a JSON error, got {other:?}"),
    }
    assert!(!server.requests().iter().any(|r| r.contains("escaped")));
}

#[test]
fn gguf_file_option_fetches_only_that_file() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("gguf");
    let opts = HubOptions {
        gguf_file: Some(GGUF_FILE.into()),
        ..options(&server.url, &cache.0)
    };
    let model = resolve_model(GGUF_REPO, &opts).unwrap();
    let snapshot = snapshot_dir(&cache.0, GGUF_REPO);
    assert_eq!(model.dir, snapshot);
    assert_eq!(model.kind, ModelKind::Gguf(snapshot.join(GGUF_FILE)));
    assert!(std::fs::read(snapshot.join(GGUF_FILE)).unwrap() == fixture(GGUF_FILE));
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .filter(|r| !r.starts_with("GET /cdn/"))
            .all(|r| r.contains(&format!("/resolve/main/{GGUF_FILE}"))),
        "{requests:#?}"
    );

    let missing = HubOptions {
        gguf_file: Some("qwen3-tiny-q2_k.gguf".into()),
        ..options(&server.url, &cache.0)
    };
    let message = hub_message(resolve_model(GGUF_REPO, &missing), GGUF_REPO);
    assert!(message.contains("qwen3-tiny-q2_k.gguf"), "{message}");
    assert!(message.contains("404"), "{message}");
}

#[test]
fn unreachable_endpoint_names_the_url() {
    setup();
    let cache = TempDir::new("unreachable");
    // Port 1 on the loopback interface: nothing listens there, the connection is refused.
    let message = hub_message(
        resolve_model(REPO, &options("http://127.0.0.1:1", &cache.0)),
        REPO,
    );
    assert!(
        message.contains("http://127.0.0.1:1/Qwen/Qwen3-tiny-test/resolve/main/config.json"),
        "{message}"
    );
    assert!(message.contains("cannot reach"), "{message}");
}

#[test]
fn server_without_hub_headers_is_explained() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("no-commit");
    let message = hub_message(
        resolve_model(NO_COMMIT_HEADER, &options(&server.url, &cache.0)),
        NO_COMMIT_HEADER,
    );
    assert!(message.contains("x-repo-commit"), "{message}");
    assert!(message.contains(&server.url), "{message}");
}

#[test]
fn endpoint_and_cache_come_from_an_injected_environment() {
    setup();
    let server = HubServer::start();
    let home = TempDir::new("env-injected");
    let home_str = home.0.display().to_string();
    let opts = HubOptions::from_env_with(|key| match key {
        "HF_ENDPOINT" => Some(format!("{}/", server.url)),
        "HF_HOME" => Some(home_str.clone()),
        "HF_HUB_DISABLE_PROGRESS_BARS" => Some("1".into()),
        _ => None,
    });
    assert_eq!(opts.cache_dir, Some(home.0.join("hub")));
    assert!(!opts.progress);
    let model = resolve_model(REPO, &opts).unwrap();
    assert_eq!(model.dir, snapshot_dir(&home.0.join("hub"), REPO));
    assert!(!server.requests().is_empty());
}

/// `HF_ENDPOINT` and `HF_HOME` set in the real process environment: a child process (this
/// test binary, running only `child_resolves_with_the_process_environment`) so no other test
/// sees them.
#[test]
fn hf_endpoint_and_hf_home_from_the_process_environment() {
    setup();
    let server = HubServer::start();
    let home = TempDir::new("env-process");
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "child_resolves_with_the_process_environment",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, "1")
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", &home.0);
    for key in PROXY_VARS.iter().chain(HUB_VARS.iter()) {
        if *key != "HF_ENDPOINT" && *key != "HF_HOME" {
            child.env_remove(key);
        }
    }
    let output = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );
    assert!(snapshot_dir(&home.0.join("hub"), REPO)
        .join("model.safetensors")
        .is_file());
    assert!(server
        .requests()
        .iter()
        .any(|r| r.starts_with(&format!("GET /{REPO}/resolve/main/config.json"))));
}

/// Run by `hf_endpoint_and_hf_home_from_the_process_environment` in a child process.
#[test]
#[ignore = "run in a child process by hf_endpoint_and_hf_home_from_the_process_environment"]
fn child_resolves_with_the_process_environment() {
    // Run directly (without the parent's server and environment) this would talk to the real
    // Hub, which it must not.
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let home = PathBuf::from(std::env::var("HF_HOME").unwrap());
    let opts = HubOptions {
        progress: false,
        ..HubOptions::default()
    };
    let model = resolve_model(REPO, &opts).unwrap();
    assert_eq!(model.dir, snapshot_dir(&home.join("hub"), REPO));
}

/// `wick run` on the stand-in's tiny repository with `HF_HOME` at `home`. With `limit`, no
/// file the process writes can grow past that many bytes (RLIMIT_FSIZE, SIGXFSZ ignored):
/// the write that would cross it fails with EFBIG, as one fails with ENOSPC on a full disk.
#[cfg(unix)]
fn wick_run(server: &HubServer, home: &Path, limit: Option<u64>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wick"));
    cmd.args(["run", REPO, "--prompt", "Hi", "--max-tokens", "1"])
        .args(["--device", "cpu", "--threads", "1"])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", home)
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1");
    for key in PROXY_VARS.iter().chain(HUB_VARS.iter()) {
        if !["HF_ENDPOINT", "HF_HOME", "HF_HUB_DISABLE_PROGRESS_BARS"].contains(key) {
            cmd.env_remove(key);
        }
    }
    if let Some(limit) = limit {
        // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit).
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

/// The disk fills up while the weights download: the run fails with an error naming the
/// cache, and nothing in the snapshot passes for the file. The next run fetches the rest and
/// the file is whole.
#[cfg(unix)]
#[test]
fn a_disk_that_fills_up_while_downloading_leaves_no_file_passing_for_whole() {
    setup();
    let server = HubServer::start();
    let home = TempDir::new("disk-full");
    let weights = fixture("qwen3-tiny/model.safetensors");
    // Room for the tokenizer (11 MB), not for the weights (19.6 MB).
    let limit = 14_000_000u64;
    assert!(weights.len() as u64 > limit);

    let out = wick_run(&server, &home.0, Some(limit));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let cache = home.0.join("hub");
    assert!(
        stderr.contains(&format!("writing into the Hub cache {}", cache.display())),
        "{stderr}"
    );
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let snapshot = snapshot_dir(&cache, REPO);
    assert!(snapshot.join("tokenizer.json").is_file());
    assert!(!snapshot.join("model.safetensors").exists());
    // The bytes that made it are kept only under a `.part` name.
    let blobs = cache.join("models--Qwen--Qwen3-tiny-test/blobs");
    let etag = etag_of(&weights);
    assert!(!blobs.join(&etag).exists());
    let part = std::fs::metadata(blobs.join(format!("{etag}.part"))).unwrap();
    assert_eq!(part.len(), limit);

    server.clear();
    let out = wick_run(&server, &home.0, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(std::fs::read(snapshot.join("model.safetensors")).unwrap() == weights);
    assert!(!blobs.join(format!("{etag}.part")).exists());
    // Only the weights were fetched again, from where the first run stopped.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /cdn/") && r.ends_with(&format!("bytes={limit}-"))),
        "{requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("tokenizer.json")),
        "{requests:#?}"
    );
}

#[test]
fn local_paths_are_returned_as_is() {
    setup();
    let dir = fixtures().join("qwen3-tiny");
    assert!(dir.join("config.json").is_file(), "fixture dir missing");
    let spec = dir.to_str().unwrap();
    assert_eq!(
        resolve_model(spec, &HubOptions::default()).unwrap(),
        ResolvedModel {
            dir: dir.clone(),
            kind: ModelKind::SafetensorsDir
        }
    );

    let gguf = fixtures().join(GGUF_FILE);
    assert!(gguf.is_file(), "fixture {} missing", gguf.display());
    assert_eq!(
        resolve_model(gguf.to_str().unwrap(), &HubOptions::default()).unwrap(),
        ResolvedModel {
            dir: fixtures(),
            kind: ModelKind::Gguf(gguf.clone())
        }
    );

    // A file that is neither: the error says what to pass instead.
    match resolve_model(
        dir.join("config.json").to_str().unwrap(),
        &HubOptions::default(),
    ) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, dir.join("config.json"));
            assert!(source.to_string().contains("directory holding config.json"));
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn missing_local_paths_are_not_looked_up_on_the_hub() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("local-missing");
    for spec in [
        "./no/such/model",
        "/no/such/model",
        "../model",
        "Qwen/Qwen3-tiny-test/model.gguf",
        "qwen3-tiny.gguf",
    ] {
        match resolve_model(spec, &options(&server.url, &cache.0)) {
            Err(Error::Io { path, source }) => {
                assert_eq!(path, PathBuf::from(spec));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
                assert!(source.to_string().contains("owner/name"), "{source}");
            }
            other => panic!("{spec}: expected a not-found error, got {other:?}"),
        }
    }
    for bad in ["Qwen3-tiny-test", "Qwen/Qwen3 tiny", "Qwen/-x"] {
        let message = hub_message(resolve_model(bad, &options(&server.url, &cache.0)), bad);
        assert!(message.contains("not a valid Hub id"), "{message}");
    }
    assert!(server.requests().is_empty());
}

#[test]
fn downloads_report_their_bytes_to_a_progress_callback() {
    use wick::loader::{LoadProgress, Progress};
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("progress");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let opts = HubOptions {
        on_progress: Some(Progress::new(move |p| sink.lock().unwrap().push(p.clone()))),
        ..options(&server.url, &cache.0)
    };
    resolve_model(REPO, &opts).unwrap();
    let seen = seen.lock().unwrap();
    for name in CHECKPOINT_FILES {
        let size = fixture(&format!("qwen3-tiny/{name}")).len() as u64;
        let reports: Vec<(u64, u64)> = seen
            .iter()
            .filter_map(|p| match p {
                LoadProgress::Download { file, done, total }
                    if file == name || file.ends_with(&format!("/{name}")) =>
                {
                    Some((*done, *total))
                }
                _ => None,
            })
            .collect();
        assert_eq!(reports.last(), Some(&(size, size)), "{name}: {reports:?}");
        assert!(
            reports.windows(2).all(|w| w[0].0 <= w[1].0),
            "{name}: {reports:?}"
        );
    }
}

/// The bytes of every tensor of a GGUF model, by name.
fn gguf_tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let file = wick::loader::gguf::GgufFile::open(path).unwrap();
    file.tensors()
        .iter()
        .map(|t| (t.name.clone(), file.tensor_data(t).as_slice().to_vec()))
        .collect()
}

#[test]
fn quantization_tag_picks_the_file_and_a_split_model_comes_whole() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("quant-tag");
    let snapshot = snapshot_dir(&cache.0, QUANTS);

    // Any case; the split model is fetched part by part and opened from its first part.
    let model = resolve_model(&format!("{QUANTS}:q4_0"), &options(&server.url, &cache.0)).unwrap();
    assert_eq!(model.dir, snapshot);
    assert_eq!(model.kind, ModelKind::Gguf(snapshot.join(SPLIT_PARTS[0])));
    for part in SPLIT_PARTS {
        assert!(snapshot.join(part).is_file(), "{part} not downloaded");
    }
    let requests = server.requests();
    assert!(requests
        .iter()
        .any(|r| r.starts_with(&format!("GET /api/models/{QUANTS}/revision/main"))));
    for other in ["Q8_0", "mmproj", "README"] {
        assert!(
            !requests.iter().any(|r| r.contains(other)),
            "{other} requested: {requests:#?}"
        );
    }
    // One model: the same tensors, byte for byte, as the file before it was split, and
    // the same configuration.
    let whole = fixtures().join("qwen3-tiny-q4_0.gguf");
    let (split, unsplit) = (
        gguf_tensors(&snapshot.join(SPLIT_PARTS[0])),
        gguf_tensors(&whole),
    );
    assert_eq!(split.len(), unsplit.len());
    assert!(split == unsplit, "tensor bytes differ after the split");
    let open = |p: &Path| {
        wick::loader::gguf::GgufFile::open(p)
            .unwrap()
            .model_config()
            .unwrap()
    };
    assert_eq!(
        format!("{:?}", open(&snapshot.join(SPLIT_PARTS[0]))),
        format!("{:?}", open(&whole))
    );

    // A single-file quantization; `Q4` names none (tags match whole).
    let q8 = resolve_model(&format!("{QUANTS}:Q8_0"), &options(&server.url, &cache.0)).unwrap();
    assert_eq!(
        q8.kind,
        ModelKind::Gguf(snapshot.join("Qwen3-tiny-Q8_0.gguf"))
    );
    let message = hub_message(
        resolve_model(&format!("{QUANTS}:Q4"), &options(&server.url, &cache.0)),
        QUANTS,
    );
    assert!(
        message.contains("no GGUF file for quantization `Q4`"),
        "{message}"
    );
    assert!(message.contains("Qwen3-tiny-Q8_0.gguf"), "{message}");
    assert!(message.contains(SPLIT_PARTS[0]), "{message}");
    assert!(!message.contains("mmproj"), "{message}");

    // Offline, the cached snapshot is the file list.
    server.clear();
    let offline = HubOptions {
        offline: true,
        ..options(&server.url, &cache.0)
    };
    let again = resolve_model(&format!("{QUANTS}:Q4_0"), &offline).unwrap();
    assert_eq!(again.kind, model.kind);
    assert!(server.requests().is_empty());
}

#[test]
fn gguf_repository_without_a_tag_gets_a_default() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("quant-default");
    // No config.json, so not a safetensors checkpoint: Q4_K_M is absent, Q4_0 is next.
    let model = resolve_model(QUANTS, &options(&server.url, &cache.0)).unwrap();
    let snapshot = snapshot_dir(&cache.0, QUANTS);
    assert_eq!(model.kind, ModelKind::Gguf(snapshot.join(SPLIT_PARTS[0])));

    // A repository with neither config.json nor a GGUF file still says config.json is missing.
    let message = hub_message(
        resolve_model(EVIL_NO_CONFIG, &options(&server.url, &cache.0)),
        EVIL_NO_CONFIG,
    );
    assert!(message.contains("config.json"), "{message}");
}

#[test]
fn split_model_missing_a_part_is_refused_before_downloading() {
    setup();
    let server = HubServer::start();
    let cache = TempDir::new("quant-broken");
    let message = hub_message(
        resolve_model(
            &format!("{BROKEN_SPLIT}:Q4_0"),
            &options(&server.url, &cache.0),
        ),
        BROKEN_SPLIT,
    );
    assert!(message.contains("lacks part 2"), "{message}");
    assert!(!server.requests().iter().any(|r| r.contains("/resolve/")));

    // Malformed tags are refused before anything is asked.
    for spec in [
        format!("{QUANTS}:"),
        format!("{QUANTS}:Q4 0"),
        format!("{QUANTS}:a/b"),
    ] {
        assert!(
            resolve_model(&spec, &options(&server.url, &cache.0)).is_err(),
            "{spec}"
        );
    }
}
