//! Resolving `--model` to files on disk: a local path, or a Hugging Face Hub id downloaded
//! into the standard Hub cache.
//!
//! [`resolve_model`] takes what the user typed:
//!
//! - an existing directory (a Hugging Face checkpoint: `config.json`, `tokenizer.json`,
//!   `model.safetensors`...) or an existing `.gguf` file, returned as is;
//! - otherwise a Hub id `owner/name`. The files wick needs are fetched with `hf-hub` into the
//!   cache Python's `huggingface_hub` uses (`$HF_HOME/hub`, by default
//!   `~/.cache/huggingface/hub`, laid out as `models--owner--name/{blobs,snapshots,refs}`), so
//!   downloads are shared both ways. The result is the snapshot directory, which looks exactly
//!   like a local checkpoint directory.
//!
//! Which files: `config.json`, `generation_config.json` (if the repository has one),
//! `tokenizer.json`, `tokenizer_config.json`, and the weights — `model.safetensors`, or
//! `model.safetensors.index.json` and every shard it names. With [`HubOptions::gguf_file`]
//! set, only that one GGUF file.
//!
//! **GGUF repositories** hold one file per quantization (`Qwen3-0.6B-Q8_0.gguf`,
//! `Qwen3-0.6B-Q4_K_M.gguf`, …). `owner/name:QUANT` (as llama.cpp's `-hf` takes it) picks
//! the file whose name carries that quantization (any case; `Q4_K` does not match `Q4_K_M`);
//! `owner/name` alone, for a repository without `config.json`, picks Q4_K_M, else Q4_0, else
//! Q8_0, else the first GGUF file, and says which in a warning. A model split into
//! `NAME-00001-of-0000N.gguf` … is downloaded whole. The file list comes from the Hub's
//! `api/models/owner/name/revision/REV` (offline: from the cached snapshot).
//!
//! Files already in the cache are used without asking the Hub again (pin
//! [`HubOptions::revision`] to a commit to be sure what you get). Offline
//! ([`HubOptions::offline`], or `HF_HUB_OFFLINE=1`) nothing is requested at all and a missing
//! file is an error naming the cache directory.
//!
//! Environment variables, as `huggingface_hub` reads them: `HF_ENDPOINT` (a mirror),
//! `HF_HOME` / `HF_HUB_CACHE` / `XDG_CACHE_HOME` (where the cache is), `HF_HUB_OFFLINE`,
//! `HF_TOKEN` (else the token file `$HF_HOME/token` written by `huggingface-cli login`, or
//! `HF_TOKEN_PATH`), and `HF_HUB_DISABLE_PROGRESS_BARS`.
//!
//! ```no_run
//! use wick::loader::hub::{resolve_model, HubOptions, ModelKind};
//!
//! let model = resolve_model("Qwen/Qwen3-0.6B", &HubOptions::from_env())?;
//! assert!(matches!(model.kind, ModelKind::SafetensorsDir));
//! println!("config at {}", model.dir.join("config.json").display());
//! # Ok::<(), wick::Error>(())
//! ```

#![cfg_attr(not(feature = "hub"), allow(dead_code))]

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::IsTerminal;
#[cfg(feature = "hub")]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

#[cfg(feature = "hub")]
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
#[cfg(feature = "hub")]
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The Hub used when neither [`HubOptions::endpoint`] nor `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The branch fetched when [`HubOptions::revision`] is not set.
pub const DEFAULT_REVISION: &str = "main";

/// The Hub files of a safetensors checkpoint, besides the weights.
const CONFIG_FILES: [(&str, Need); 4] = [
    ("config.json", Need::Required),
    ("generation_config.json", Need::Optional),
    ("tokenizer.json", Need::Required),
    ("tokenizer_config.json", Need::Required),
];

const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// How to reach the Hub and where to keep what it sends.
///
/// A field left `None` (and `offline: false`, `progress: true`) defers to the environment when
/// [`resolve_model`] runs; [`HubOptions::from_env`] reads the environment up front instead,
/// so the values can be shown or overridden.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubOptions {
    /// Never touch the network: use the cache or fail. `HF_HUB_OFFLINE=1` also turns it on.
    pub offline: bool,
    /// The Hub's base URL, e.g. `https://huggingface.co` or a mirror; `None`: `HF_ENDPOINT`,
    /// else [`DEFAULT_ENDPOINT`].
    pub endpoint: Option<String>,
    /// The Hub cache (the directory holding `models--owner--name`); `None`: `HF_HUB_CACHE`,
    /// else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Branch, tag or commit to fetch; `None`: [`DEFAULT_REVISION`].
    pub revision: Option<String>,
    /// Access token for private or gated repositories; `None`: `HF_TOKEN`, else the token file;
    /// `Some("")`: no token, whatever the environment holds.
    pub token: Option<String>,
    /// Fetch only this GGUF file of the repository (a path inside it) instead of a
    /// safetensors checkpoint.
    pub gguf_file: Option<String>,
    /// Draw a progress bar while downloading (only when stderr is a terminal).
    pub progress: bool,
    /// Report each download's bytes to this callback (instead of the bar).
    pub on_progress: Option<super::Progress>,
}

impl Default for HubOptions {
    /// Everything from the environment at resolve time, with progress bars.
    fn default() -> Self {
        HubOptions {
            offline: false,
            endpoint: None,
            cache_dir: None,
            revision: None,
            token: None,
            gguf_file: None,
            progress: true,
            on_progress: None,
        }
    }
}

impl HubOptions {
    /// Options read from the process environment (see the module docs for the variables).
    pub fn from_env() -> Self {
        Self::from_env_with(process_env)
    }

    /// Options read from an environment given as a lookup function, so callers and tests can
    /// supply their own.
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Self {
        HubOptions::default().or_env(get)
    }

    /// Fills what is unset from the environment. Idempotent, so options from [`from_env`]
    /// pass through [`resolve_model`] unchanged.
    ///
    /// [`from_env`]: HubOptions::from_env
    fn or_env(mut self, get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        // As huggingface_hub does: HF_HUB_OFFLINE forces offline whatever the caller asked.
        self.offline |= get("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        self.progress &= !get("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_truthy(&v));
        if self.endpoint.is_none() {
            self.endpoint = get("HF_ENDPOINT");
        }
        let hf_home = get("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home_dir(&get).map(|home| home.join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        if self.cache_dir.is_none() {
            self.cache_dir = get("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| hf_home.as_ref().map(|home| home.join("hub")));
        }
        if self.token.is_none() {
            self.token = get("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| hf_home.as_ref().map(|home| home.join("token")))?;
                let token = std::fs::read_to_string(path).ok()?;
                Some(token.trim().to_string()).filter(|t| !t.is_empty())
            });
        }
        self
    }
}

/// What kind of checkpoint a [`ResolvedModel`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// A Hugging Face directory: `config.json`, tokenizer files and safetensors weights.
    SafetensorsDir,
    /// One GGUF file holding weights, configuration and tokenizer.
    Gguf(PathBuf),
}

/// A model located on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The checkpoint directory: the local directory given, the Hub snapshot directory
    /// (`.../models--owner--name/snapshots/<commit>`), or the directory of a local GGUF file.
    pub dir: PathBuf,
    /// Whether to load `dir` as a safetensors checkpoint or one GGUF file.
    pub kind: ModelKind,
}

/// Resolves `spec` (a local directory, a local `.gguf` file, or a Hub id `owner/name`) to files
/// on disk, downloading from the Hub what the cache lacks.
///
/// Unset fields of `opts` are taken from the environment (see [`HubOptions`]). Errors name the
/// model and say what to do: a path that does not exist, a malformed id, a repository or file
/// the Hub does not have, a file missing from the cache when offline, a network failure
/// (with the URL).
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<ResolvedModel> {
    resolve_model_timed(spec, opts).map(|(resolved, _)| resolved)
}

/// [`resolve_model`], and the time spent on the network: file transfers and the file list
/// of a GGUF repository (zero for a local path, or when the cache held everything).
pub fn resolve_model_timed(spec: &str, opts: &HubOptions) -> Result<(ResolvedModel, Duration)> {
    let (repo_id, quant) = match classify(spec)? {
        Spec::Local(resolved) => return Ok((resolved, Duration::ZERO)),
        Spec::Hub(id, quant) => (id, quant),
    };
    let opts = opts.clone().or_env(process_env);
    let hub = HubRepo::open(repo_id, &opts)?;
    let resolved = resolve_on(&hub, &opts, quant)?;
    Ok((resolved, hub.network.get()))
}

/// Resolves a Hub id once its repository is open.
fn resolve_on(hub: &HubRepo, opts: &HubOptions, quant: Option<&str>) -> Result<ResolvedModel> {
    if let Some(file) = &opts.gguf_file {
        let path = hub.require(file)?;
        return Ok(ResolvedModel {
            dir: snapshot_root(&path, file),
            kind: ModelKind::Gguf(path),
        });
    }
    if quant.is_some() {
        return fetch_gguf(hub, &gguf_models(&hub.list()?), quant);
    }
    // A repository of GGUF files has no config.json.
    if hub.fetch("config.json")?.is_none() {
        let models = hub.list().map(|f| gguf_models(&f)).unwrap_or_default();
        if models.is_empty() {
            return Err(hub.missing("config.json"));
        }
        return fetch_gguf(hub, &models, None);
    }
    fetch_checkpoint(hub)
}

/// The quantizations picked, in this order, when a GGUF repository is named without one
/// (llama.cpp's default is Q4_K_M too).
const DEFAULT_QUANTS: [&str; 3] = ["Q4_K_M", "Q4_0", "Q8_0"];

/// Downloads the GGUF model of the repository that carries quantization `quant` (or the
/// default one) and returns its first file.
fn fetch_gguf(hub: &HubRepo, models: &[GgufModel], quant: Option<&str>) -> Result<ResolvedModel> {
    if models.is_empty() {
        return Err(hub.error(format!(
            "the repository has no .gguf file (revision `{}`{})",
            hub.revision,
            if hub.is_online() {
                ""
            } else {
                ", as far as the cache knows"
            }
        )));
    }
    let available = || {
        models
            .iter()
            .map(|m| m.parts[0].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match quant {
        Some(q) => models
            .iter()
            .find(|m| names_quant(&m.stem, q))
            .ok_or_else(|| {
                hub.error(format!(
                    "no GGUF file for quantization `{q}` (revision `{}`); the repository has: {}",
                    hub.revision,
                    available()
                ))
            })?,
        None => {
            let m = DEFAULT_QUANTS
                .iter()
                .find_map(|q| models.iter().find(|m| names_quant(&m.stem, q)))
                .unwrap_or(&models[0]);
            // A warning, so that the default log level shows which file a bare id gave.
            tracing::warn!(
                "{}: no quantization given, using {} (the repository has {}; pick one with \
                 {}:QUANT)",
                hub.id,
                m.parts[0],
                available(),
                hub.id
            );
            m
        }
    };
    if let Some(missing) = &chosen.missing {
        return Err(hub.error(format!(
            "the split model {} lacks part {missing}",
            chosen.parts[0]
        )));
    }
    let mut first = None;
    for part in &chosen.parts {
        let path = hub.require(part)?;
        first.get_or_insert((snapshot_root(&path, part), path));
    }
    let (dir, path) = first.expect("a model has at least one file");
    Ok(ResolvedModel {
        dir,
        kind: ModelKind::Gguf(path),
    })
}

/// One GGUF model of a repository: a file, or the parts of a split file.
#[derive(Debug, PartialEq)]
struct GgufModel {
    /// The path without `.gguf` and without the split suffix.
    stem: String,
    /// Its files, the first part first.
    parts: Vec<String>,
    /// The number of a part the listing lacks, if any.
    missing: Option<u32>,
}

/// The GGUF models among a repository's files (multimodal projectors left out), sorted.
fn gguf_models(files: &[String]) -> Vec<GgufModel> {
    let mut models: Vec<GgufModel> = Vec::new();
    let mut split: std::collections::BTreeMap<String, (u32, BTreeSet<u32>)> = Default::default();
    let mut names: Vec<&String> = files.iter().filter(|f| has_gguf_extension(f)).collect();
    names.sort();
    for name in names {
        let file = name.rsplit('/').next().unwrap_or(name);
        if file.to_ascii_lowercase().contains("mmproj") {
            continue;
        }
        match super::gguf::split_suffix(name) {
            Some((stem, (k, n))) => {
                let entry = split
                    .entry(stem.to_string())
                    .or_insert((n, BTreeSet::new()));
                if entry.0 == n {
                    entry.1.insert(k);
                }
            }
            None => models.push(GgufModel {
                stem: name[..name.len() - 5].to_string(),
                parts: vec![name.clone()],
                missing: None,
            }),
        }
    }
    for (stem, (n, present)) in split {
        models.push(GgufModel {
            parts: (1..=n)
                .map(|k| format!("{stem}-{k:05}-of-{n:05}.gguf"))
                .collect(),
            missing: (1..=n).find(|k| !present.contains(k)),
            stem,
        });
    }
    models.sort_by(|a, b| a.stem.cmp(&b.stem));
    models
}

/// Whether a GGUF path (without `.gguf`) names quantization `quant`: the tag appears, in any
/// case, between separators (`-`, `.`, `/` or the ends; `_` belongs to the tag, so `Q4_K`
/// does not match `Q4_K_M`).
fn names_quant(stem: &str, quant: &str) -> bool {
    let (stem, quant) = (stem.to_ascii_lowercase(), quant.to_ascii_lowercase());
    let sep = |c: Option<char>| c.is_none_or(|c| matches!(c, '-' | '.' | '/'));
    stem.match_indices(&quant)
        .any(|(i, m)| sep(stem[..i].chars().next_back()) && sep(stem[i + m.len()..].chars().next()))
}

/// Fetches the files of a safetensors checkpoint and returns their snapshot directory.
fn fetch_checkpoint(hub: &HubRepo) -> Result<ResolvedModel> {
    // Files fetched from a branch land in the snapshot of the commit the branch pointed at
    // when each was fetched. If the branch moved in between (or the cache held an older
    // snapshot), a second pass fetches what the newest snapshot lacks.
    for _attempt in 0..2 {
        let files = checkpoint_files(hub)?;
        let roots: BTreeSet<PathBuf> = files
            .iter()
            .map(|(name, path)| snapshot_root(path, name))
            .collect();
        if let [dir] = Vec::from_iter(roots).as_slice() {
            return Ok(ResolvedModel {
                dir: dir.clone(),
                kind: ModelKind::SafetensorsDir,
            });
        }
    }
    Err(hub.error(format!(
        "the files of revision `{}` span several snapshots in {}: the repository changed \
         while downloading; try again",
        hub.revision,
        hub.repo_dir.display()
    )))
}

/// The (Hub file name, local path) of every file of the checkpoint.
fn checkpoint_files(hub: &HubRepo) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for (name, need) in CONFIG_FILES {
        let found = match need {
            Need::Required => Some(hub.require(name)?),
            Need::Optional => hub.fetch(name)?,
        };
        if let Some(path) = found {
            files.push((name.to_string(), path));
        }
    }
    if let Some(path) = hub.fetch(SINGLE_WEIGHTS)? {
        files.push((SINGLE_WEIGHTS.to_string(), path));
        return Ok(files);
    }
    let index = match hub.fetch(WEIGHTS_INDEX)? {
        Some(index) => index,
        None => {
            return Err(hub.missing(&format!("{SINGLE_WEIGHTS}` or `{WEIGHTS_INDEX}")));
        }
    };
    for shard in shard_names(&index)? {
        let path = hub.require(&shard)?;
        files.push((shard, path));
    }
    files.push((WEIGHTS_INDEX.to_string(), index));
    Ok(files)
}

/// The shard files named by a `model.safetensors.index.json`, each once, sorted.
fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::json(index, "no `weight_map` object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::json(index, format!("`weight_map.{tensor}` is not a file name"))
        })?;
        // The index comes from the network: a name escaping the snapshot must not become a
        // path we write to.
        if !is_plain_relative(file) {
            return Err(Error::json(
                index,
                format!("`weight_map.{tensor}` names `{file}`, which is not a file inside the repository"),
            ));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(Error::json(index, "`weight_map` is empty"));
    }
    Ok(shards)
}

/// What the user's `--model` string denotes.
enum Spec<'a> {
    /// An existing local checkpoint.
    Local(ResolvedModel),
    /// A well-formed Hub id, and the GGUF quantization after `:` if one was given.
    Hub(&'a str, Option<&'a str>),
}

fn classify(spec: &str) -> Result<Spec<'_>> {
    let path = Path::new(spec);
    if spec.is_empty() {
        return Err(Error::Hub {
            model: String::new(),
            message: "empty model: give a local directory, a .gguf file or a Hub id owner/name"
                .into(),
        });
    }
    if path.is_dir() {
        return Ok(Spec::Local(ResolvedModel {
            dir: path.to_path_buf(),
            kind: ModelKind::SafetensorsDir,
        }));
    }
    if path.is_file() {
        if !has_gguf_extension(spec) {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is a file but not a .gguf; for a safetensors checkpoint give the directory \
                     holding config.json",
                ),
            ));
        }
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return Ok(Spec::Local(ResolvedModel {
            dir,
            kind: ModelKind::Gguf(path.to_path_buf()),
        }));
    }
    if looks_like_path(spec) {
        // Not a Hub lookup: the user meant a file, and asking the Hub would only hide the typo.
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or directory (a Hub id has the form owner/name)",
            ),
        ));
    }
    if let Some((id, quant)) = spec.rsplit_once(':') {
        validate_repo_id(id)?;
        let ok = !quant.is_empty()
            && quant.len() <= 64
            && quant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(Error::Hub {
                model: spec.to_string(),
                message: format!(
                    "`{quant}` after `:` is not a quantization name (owner/name:QUANT, e.g. \
                     Qwen/Qwen3-0.6B-GGUF:Q8_0)"
                ),
            });
        }
        return Ok(Spec::Hub(id, Some(quant)));
    }
    validate_repo_id(spec)?;
    Ok(Spec::Hub(spec, None))
}

/// Whether a string that names nothing on disk was meant as a path rather than a Hub id.
fn looks_like_path(spec: &str) -> bool {
    let bytes = spec.as_bytes();
    let windows_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    spec.starts_with(['/', '.', '~'])
        || spec.contains('\\')
        || windows_drive
        || has_gguf_extension(spec)
        || spec.matches('/').count() > 1
}

fn has_gguf_extension(spec: &str) -> bool {
    Path::new(spec)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Checks the `owner/name` form with the Hub's rules: word characters, `-` and `.`, not at
/// either end, no `--` or `..`, at most 96 characters.
fn validate_repo_id(id: &str) -> Result<()> {
    let problem = if id.len() > 96 {
        Some("is longer than 96 characters")
    } else if id.contains("--") || id.contains("..") {
        Some("contains `--` or `..`")
    } else {
        match id.split_once('/') {
            None => Some("lacks the owner: a Hub id has the form owner/name"),
            Some((owner, name)) if !is_id_part(owner) || !is_id_part(name) => Some(
                "is not of the form owner/name (letters, digits, `-`, `_`, `.`; not starting or \
                 ending with `-` or `.`)",
            ),
            Some(_) => None,
        }
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::Hub {
            model: id.to_string(),
            message: format!(
                "not a local file or directory, and not a valid Hub id: `{id}` {problem}"
            ),
        }),
    }
}

fn is_id_part(part: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    part.chars().all(|c| word(c) || c == '-' || c == '.')
        && part.starts_with(word)
        && part.ends_with(word)
}

/// A relative path made only of normal components (no `..`, no root, no `\`).
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Whether a revision can go into a URL and a cache path as is.
fn is_valid_revision(rev: &str) -> bool {
    is_plain_relative(rev)
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// Whether a file is needed or merely welcome.
#[derive(Clone, Copy)]
enum Need {
    Required,
    Optional,
}

/// Where a file stands in the cache.
enum Cached {
    /// In the snapshot.
    Present(PathBuf),
    /// Recorded as absent from the repository at this commit (`.no_exist`, as
    /// `huggingface_hub` writes it).
    KnownMissing,
    /// Unknown: never fetched at this revision.
    Unknown,
}

/// How one download failed.
enum Failure {
    /// The repository exists but has no such file.
    NotFound,
    /// Anything else, described.
    Other(String),
}

/// One Hub repository at one revision, with its cache folder.
struct HubRepo {
    id: String,
    revision: String,
    endpoint: String,
    cache_dir: PathBuf,
    /// `cache_dir/models--owner--name`.
    repo_dir: PathBuf,
    /// `None` when offline.
    #[cfg(feature = "hub")]
    api: Option<ApiRepo>,
    progress: bool,
    on_progress: Option<super::Progress>,
    /// Time spent on the network so far ([`resolve_model_timed`]).
    network: Cell<Duration>,
}

impl HubRepo {
    fn open(id: &str, opts: &HubOptions) -> Result<HubRepo> {
        let error = |message: String| Error::Hub {
            model: id.to_string(),
            message,
        };
        let revision = opts
            .revision
            .clone()
            .unwrap_or_else(|| DEFAULT_REVISION.to_string());
        if !is_valid_revision(&revision) {
            return Err(error(format!("`{revision}` is not a valid revision")));
        }
        if let Some(file) = &opts.gguf_file {
            if !is_plain_relative(file) {
                return Err(error(format!(
                    "GGUF file `{file}` is not a path inside the repository"
                )));
            }
        }
        let endpoint = opts
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let endpoint = endpoint.trim().trim_end_matches('/').to_string();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(error(format!(
                "endpoint `{endpoint}` (HF_ENDPOINT) is not an http:// or https:// URL"
            )));
        }
        let cache_dir = opts.cache_dir.clone().ok_or_else(|| {
            error("cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE".into())
        })?;
        // hf-hub links snapshot files to blobs by relative symlinks computed from the two
        // paths; an absolute cache makes the returned directory independent of the cwd.
        let cache_dir = std::path::absolute(&cache_dir).map_err(|e| Error::io(&cache_dir, e))?;
        // huggingface_hub's folder for a model repository.
        let repo_dir = cache_dir.join(format!("models--{}", id.replace('/', "--")));
        #[cfg(feature = "hub")]
        let api = if opts.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
                .with_endpoint(endpoint.clone())
                // Our own token lookup replaces hf-hub's, which only knows `<cache>/../token`.
                .with_token(opts.token.clone().filter(|t| !t.is_empty()))
                .with_progress(false)
                .with_user_agent("wick", env!("CARGO_PKG_VERSION"))
                .build()
                .map_err(|e| error(format!("cannot set up the HTTP client: {e}")))?;
            let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.clone());
            Some(api.repo(repo))
        };
        Ok(HubRepo {
            id: id.to_string(),
            revision,
            endpoint,
            cache_dir,
            repo_dir,
            #[cfg(feature = "hub")]
            api,
            progress: opts.progress && std::io::stderr().is_terminal(),
            on_progress: opts.on_progress.clone(),
            network: Cell::new(Duration::ZERO),
        })
    }

    fn error(&self, message: String) -> Error {
        Error::Hub {
            model: self.id.clone(),
            message,
        }
    }

    /// The error for a required file that is neither in the cache nor (online) on the Hub.
    fn missing(&self, file: &str) -> Error {
        #[cfg(not(feature = "hub"))]
        return self.error(format!(
            "`{file}` (revision `{}`) is not in the Hub cache {} (looked in {}), and this build \
             of wick cannot download (it was built without the `hub` feature): download it \
             with another tool or pass a local path",
            self.revision,
            self.cache_dir.display(),
            self.repo_dir.display(),
        ));
        #[cfg(feature = "hub")]
        match &self.api {
            None => self.error(format!(
                "`{file}` (revision `{}`) is not in the Hub cache {} (looked in {}); offline mode \
                 is on (--offline or HF_HUB_OFFLINE), so run once with network access to \
                 download it",
                self.revision,
                self.cache_dir.display(),
                self.repo_dir.display(),
            )),
            Some(api) => self.error(format!(
                "the repository has no `{file}` at revision `{}` ({} answered 404)",
                self.revision,
                api.url(file)
            )),
        }
    }

    /// Whether files can be downloaded.
    fn is_online(&self) -> bool {
        #[cfg(feature = "hub")]
        return self.api.is_some();
        #[cfg(not(feature = "hub"))]
        return false;
    }

    /// The repository's files at the revision: asked of the Hub, or offline (and in a build
    /// without downloads) the files of the cached snapshot.
    fn list(&self) -> Result<Vec<String>> {
        #[cfg(feature = "hub")]
        if let Some(api) = &self.api {
            let url = format!(
                "{}/api/models/{}/revision/{}",
                self.endpoint, self.id, self.revision
            );
            let start = std::time::Instant::now();
            let answer = api.info();
            self.network.set(self.network.get() + start.elapsed());
            return match answer {
                Ok(info) => Ok(info
                    .siblings
                    .into_iter()
                    .map(|s| s.rfilename)
                    .filter(|f| is_plain_relative(f))
                    .collect()),
                Err(e) => Err(self.error(match self.describe(e, &url) {
                    Failure::NotFound => format!("repository not found ({url} answered 404)"),
                    Failure::Other(message) => message,
                })),
            };
        }
        let Some(commit) = self.cached_commit() else {
            return Err(self.error(format!(
                "nothing of revision `{}` is in the Hub cache {} (looked in {}), so its files \
                 are unknown; run once with network access",
                self.revision,
                self.cache_dir.display(),
                self.repo_dir.display(),
            )));
        };
        let root = self.repo_dir.join("snapshots").join(commit);
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.exists() {
                    if let Ok(rel) = path.strip_prefix(&root) {
                        files.push(rel.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        }
        Ok(files)
    }

    /// The local path of a file the checkpoint cannot do without.
    fn require(&self, file: &str) -> Result<PathBuf> {
        self.fetch(file)?.ok_or_else(|| self.missing(file))
    }

    /// The local path of `file`, downloading it if needed; `None` if the repository does not
    /// have it (or, offline, if the cache does not).
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>> {
        match self.cached(file) {
            Cached::Present(path) => {
                tracing::debug!(model = %self.id, file, path = %path.display(), "found in the Hub cache");
                return Ok(Some(path));
            }
            Cached::KnownMissing => return Ok(None),
            Cached::Unknown => {}
        }
        self.download(file)
    }

    /// Not in this build: nothing is downloaded.
    #[cfg(not(feature = "hub"))]
    fn download(&self, _file: &str) -> Result<Option<PathBuf>> {
        Ok(None)
    }

    /// Downloads `file` into the cache; `None` if the repository does not have it, or when
    /// offline.
    #[cfg(feature = "hub")]
    fn download(&self, file: &str) -> Result<Option<PathBuf>> {
        let Some(api) = &self.api else {
            return Ok(None);
        };
        let url = api.url(file);
        tracing::info!(model = %self.id, %url, "downloading");
        let start = std::time::Instant::now();
        // hf-hub unwraps a few things about the server's answers (a redirect without a
        // Location, for one); a misbehaving server must give an error, not a crash.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if let Some(p) = &self.on_progress {
                api.download_with_progress(file, Reporter::new(p.clone()))
            } else if self.progress {
                api.download_with_progress(file, Bar::new())
            } else {
                api.download_with_progress(file, ())
            }
        }));
        self.network.set(self.network.get() + start.elapsed());
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(self.error(format!("{url}: unexpected answer from the server {what}")));
            }
        };
        match result {
            Ok(path) => Ok(Some(path)),
            Err(e) => match self.describe(e, &url) {
                Failure::NotFound => {
                    self.remember_missing(file);
                    Ok(None)
                }
                Failure::Other(message) => Err(self.error(message)),
            },
        }
    }

    /// Looks `file` up in the snapshot `revision` points at, without any network.
    fn cached(&self, file: &str) -> Cached {
        let Some(commit) = self.cached_commit() else {
            return Cached::Unknown;
        };
        let path = self.repo_dir.join("snapshots").join(&commit).join(file);
        // `exists` follows the symlink, so a snapshot entry whose blob is gone counts as absent.
        if path.exists() {
            Cached::Present(path)
        } else if self.no_exist_path(&commit, file).exists() {
            Cached::KnownMissing
        } else {
            Cached::Unknown
        }
    }

    /// The commit the cache associates with the revision: `refs/<revision>`, or the revision
    /// itself when it is a commit with a snapshot.
    fn cached_commit(&self) -> Option<String> {
        if let Ok(commit) = std::fs::read_to_string(self.repo_dir.join("refs").join(&self.revision))
        {
            let commit = commit.trim();
            if is_plain_relative(commit) && !commit.contains('/') {
                return Some(commit.to_string());
            }
        }
        let is_commit =
            self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        (is_commit
            && self
                .repo_dir
                .join("snapshots")
                .join(&self.revision)
                .is_dir())
        .then(|| self.revision.clone())
    }

    fn no_exist_path(&self, commit: &str, file: &str) -> PathBuf {
        self.repo_dir.join(".no_exist").join(commit).join(file)
    }

    /// Records that the repository lacks `file`, so later runs (and offline ones) need not ask.
    /// Only possible once a file of the revision is cached, which tells the commit.
    fn remember_missing(&self, file: &str) {
        let Some(commit) = self.cached_commit() else {
            return;
        };
        let marker = self.no_exist_path(&commit, file);
        let written = marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&marker, b""));
        if let Err(e) = written {
            // Only an optimisation: the next run asks the Hub again.
            tracing::debug!(path = %marker.display(), error = %e, "cannot record a missing file");
        }
    }

    /// Turns an hf-hub error into a user-facing message.
    #[cfg(feature = "hub")]
    fn describe(&self, err: ApiError, url: &str) -> Failure {
        let endpoint = &self.endpoint;
        match err {
            ApiError::RequestError(err) => {
                let text = err.to_string();
                let Some(response) = (*err).into_response() else {
                    // No HTTP answer: connection, DNS, TLS or proxy trouble. The text has the URL.
                    return Failure::Other(format!("cannot reach {endpoint}: {text}"));
                };
                let status = response.status();
                let code = response.header("x-error-code").unwrap_or("").to_string();
                match (status, code.as_str()) {
                    (_, "RepoNotFound") => Failure::Other(format!(
                        "repository not found at {endpoint} (HTTP {status} for {url}); check the \
                         id, and if the repository is private or gated set HF_TOKEN"
                    )),
                    (_, "RevisionNotFound") => Failure::Other(format!(
                        "revision `{}` not found (HTTP {status} for {url})",
                        self.revision
                    )),
                    (404, _) => Failure::NotFound,
                    (401 | 403, _) => Failure::Other(format!(
                        "access denied (HTTP {status} for {url}): the repository may be gated or \
                         private; accept its terms on the Hub and set HF_TOKEN"
                    )),
                    _ => Failure::Other(format!("{url}: HTTP {status}")),
                }
            }
            ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => {
                Failure::Other(format!(
                    "{url}: the answer lacks a valid `{header}` header; is {endpoint} a Hugging \
                     Face Hub (HF_ENDPOINT)?"
                ))
            }
            ApiError::IoError(e) => Failure::Other(format!(
                "writing into the Hub cache {}: {e}",
                self.cache_dir.display()
            )),
            ApiError::LockAcquisition(path) => Failure::Other(format!(
                "another process is downloading into the cache (lock {} is held); wait for it \
                 to finish",
                path.display()
            )),
            ApiError::TooManyRetries(inner) => self.describe(*inner, url),
            other => Failure::Other(format!("{url}: {other}")),
        }
    }
}

/// The path of the snapshot directory holding `path`, the local copy of repository file `name`.
fn snapshot_root(path: &Path, name: &str) -> PathBuf {
    let mut root = path.to_path_buf();
    for _ in Path::new(name).components() {
        root.pop();
    }
    root
}

/// A download progress bar on stderr.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let style = indicatif::ProgressStyle::with_template(
            "{msg:30!} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        Bar(indicatif::ProgressBar::new(0).with_style(style))
    }
}

#[cfg(feature = "hub")]
impl hf_hub::api::Progress for Bar {
    // hf-hub calls `init` again when it (re)starts a transfer, then `update` with the bytes
    // already on disk, so `init` resets the position.
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

/// Download progress reported to a [`super::Progress`] callback.
struct Reporter {
    to: super::Progress,
    file: String,
    done: u64,
    total: u64,
}

impl Reporter {
    fn new(to: super::Progress) -> Self {
        Reporter {
            to,
            file: String::new(),
            done: 0,
            total: 0,
        }
    }

    fn report(&self) {
        self.to.report(super::LoadProgress::Download {
            file: self.file.clone(),
            done: self.done,
            total: self.total,
        });
    }
}

#[cfg(feature = "hub")]
impl hf_hub::api::Progress for Reporter {
    // As for `Bar`: `init` starts (or restarts) a transfer.
    fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size as u64;
        self.done = 0;
        self.report();
    }

    fn update(&mut self, size: usize) {
        self.done += size as u64;
        self.report();
    }

    fn finish(&mut self) {}
}

fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// `huggingface_hub`'s reading of boolean variables.
fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

fn home_dir(get: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    get("HOME")
        .or_else(|| get("USERPROFILE"))
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn hub_ids_are_validated() {
        for good in [
            "Qwen/Qwen3-0.6B",
            "unsloth/Qwen3-8B-GGUF",
            "a_b/c.d-e",
            "x/y",
        ] {
            assert!(validate_repo_id(good).is_ok(), "{good}");
        }
        for bad in [
            "Qwen3-0.6B",
            "Qwen/",
            "/Qwen3",
            "Qwen/Qwen3 0.6B",
            "Qwen/-x",
            "Qwen/x.",
            "Qwen/a--b",
            "Qwen/a..b",
            "Qwen/a?b",
        ] {
            match validate_repo_id(bad) {
                Err(Error::Hub { model, message }) => {
                    assert_eq!(model, bad);
                    assert!(message.contains(bad), "{message}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(validate_repo_id(&format!("o/{}", "n".repeat(95))).is_err());
    }

    #[test]
    fn paths_are_told_from_ids() {
        for path in [
            "./model",
            "../m",
            "/models/qwen",
            "~/models/qwen",
            "C:\\models",
            "qwen.gguf",
            "dir/qwen3.GGUF",
            "a/b/c",
        ] {
            assert!(looks_like_path(path), "{path}");
        }
        for id in ["Qwen/Qwen3-0.6B", "unsloth/Qwen3-8B-GGUF"] {
            assert!(!looks_like_path(id), "{id}");
        }
    }

    #[test]
    fn repository_paths_cannot_escape() {
        assert!(is_plain_relative("model-00001-of-00002.safetensors"));
        assert!(is_plain_relative("q4/model.gguf"));
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "a\\b"] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
        assert!(is_valid_revision("main"));
        assert!(is_valid_revision("refs/pr/1"));
        assert!(!is_valid_revision("main?x=1"));
        assert!(!is_valid_revision("../main"));
    }

    #[test]
    fn environment_is_read_like_huggingface_hub() {
        let opts = HubOptions::from_env_with(env(&[
            ("HF_ENDPOINT", "http://mirror.example"),
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_OFFLINE", "True"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(opts.endpoint.as_deref(), Some("http://mirror.example"));
        assert_eq!(opts.cache_dir, Some(PathBuf::from("/data/hf/hub")));
        assert!(opts.offline);
        assert!(opts.progress);
        assert_eq!(opts.token.as_deref(), Some("hf_abc"));

        let opts = HubOptions::from_env_with(env(&[
            ("HOME", "/home/u"),
            ("HF_HUB_OFFLINE", "0"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("HF_TOKEN_PATH", "/nonexistent/token"),
        ]));
        assert_eq!(opts.endpoint, None);
        assert_eq!(
            opts.cache_dir,
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert!(!opts.offline);
        assert!(!opts.progress);
        assert_eq!(opts.token, None);

        let opts =
            HubOptions::from_env_with(env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]));
        assert_eq!(opts.cache_dir, Some(PathBuf::from("/xdg/huggingface/hub")));
        let opts = HubOptions::from_env_with(env(&[("HF_HUB_CACHE", "/cache"), ("HF_HOME", "/h")]));
        assert_eq!(opts.cache_dir, Some(PathBuf::from("/cache")));
        assert_eq!(HubOptions::from_env_with(env(&[])).cache_dir, None);
    }

    #[test]
    fn explicit_options_win_over_the_environment() {
        let opts = HubOptions {
            endpoint: Some("http://127.0.0.1:9".into()),
            cache_dir: Some("/c".into()),
            token: Some("t".into()),
            ..HubOptions::default()
        };
        let filled = opts.clone().or_env(env(&[
            ("HF_ENDPOINT", "http://other"),
            ("HF_HOME", "/h"),
            ("HF_TOKEN", "u"),
        ]));
        assert_eq!(filled, opts);
        // and reading the environment twice changes nothing
        let once = HubOptions::from_env_with(env(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "1")]));
        assert_eq!(once.clone().or_env(env(&[])), once);
    }

    #[test]
    fn quantization_tags_match_whole() {
        assert!(names_quant("Qwen3-0.6B-Q8_0", "q8_0"));
        assert!(names_quant("Qwen3-0.6B-Q4_K_M", "Q4_K_M"));
        assert!(!names_quant("Qwen3-0.6B-Q4_K_M", "Q4_K"));
        assert!(!names_quant("Qwen3-0.6B-Q4_K_M", "K_M"));
        assert!(names_quant("Q4_K_M/Qwen3-0.6B-Q4_K_M", "Q4_K_M"));
        assert!(names_quant("qwen3-0.6b.Q6_K", "Q6_K"));
        assert!(names_quant("Qwen3-0.6B-UD-Q4_K_XL", "UD-Q4_K_XL"));
        assert!(!names_quant("Qwen3-0.6B-BF16", "F16"));
    }

    #[test]
    fn gguf_models_group_split_parts_and_skip_projectors() {
        let files: Vec<String> = [
            "README.md",
            "b-Q8_0.gguf",
            "a-Q4_0-00002-of-00002.gguf",
            "a-Q4_0-00001-of-00002.gguf",
            "big/c-F16-00001-of-00003.gguf",
            "big/c-F16-00003-of-00003.gguf",
            "mmproj-F16.gguf",
        ]
        .map(String::from)
        .to_vec();
        let models = gguf_models(&files);
        assert_eq!(
            models,
            [
                GgufModel {
                    stem: "a-Q4_0".into(),
                    parts: vec![
                        "a-Q4_0-00001-of-00002.gguf".into(),
                        "a-Q4_0-00002-of-00002.gguf".into()
                    ],
                    missing: None,
                },
                GgufModel {
                    stem: "b-Q8_0".into(),
                    parts: vec!["b-Q8_0.gguf".into()],
                    missing: None,
                },
                GgufModel {
                    stem: "big/c-F16".into(),
                    parts: (1..=3)
                        .map(|k| format!("big/c-F16-0000{k}-of-00003.gguf"))
                        .collect(),
                    missing: Some(2),
                },
            ]
        );
    }

    #[test]
    fn hub_ids_may_carry_a_quantization() {
        assert!(matches!(
            classify("Qwen/Qwen3-0.6B-GGUF:Q8_0"),
            Ok(Spec::Hub("Qwen/Qwen3-0.6B-GGUF", Some("Q8_0")))
        ));
        assert!(matches!(
            classify("Qwen/Qwen3-0.6B"),
            Ok(Spec::Hub("Qwen/Qwen3-0.6B", None))
        ));
        for bad in [
            "Qwen/Qwen3-0.6B-GGUF:",
            "Qwen/Qwen3-0.6B-GGUF:Q8 0",
            "Qwen3:Q8_0",
            "Qwen/a--b:Q8_0",
        ] {
            assert!(classify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_root_strips_the_file_path() {
        let snap = Path::new("/c/models--a--b/snapshots/abc");
        assert_eq!(
            snapshot_root(&snap.join("config.json"), "config.json"),
            snap
        );
        assert_eq!(snapshot_root(&snap.join("q4/m.gguf"), "q4/m.gguf"), snap);
    }
}
