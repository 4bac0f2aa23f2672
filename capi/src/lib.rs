//! wick's C interface: load a model (with a progress callback), chat with a streaming
//! callback, cancel from another thread, free. `include/wick.h` is generated from this file
//! by cbindgen.
//!
//! Every function catches panics and reports them as [`WickStatus::Panic`]; nothing unwinds
//! into C. Errors come back as a status code plus, when the caller passes a non-null
//! `error` pointer, a message the caller frees with [`wick_string_free`].

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use wick::loader::{LoadProgress, Progress};
use wick::runtime::{Device, Runtime, RuntimeOptions};

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WickStatus {
    /// Done.
    Ok = 0,
    /// An argument was null, not UTF-8, or not valid (the message says which).
    InvalidArgument = 1,
    /// The model could not be loaded.
    LoadFailed = 2,
    /// Generation failed (a bad request, a prompt too long, an engine error).
    GenerateFailed = 3,
    /// The reply was cancelled (wick_cancel or the token callback); what was generated is
    /// still returned.
    Cancelled = 4,
    /// An internal error; the model should be freed.
    Panic = 5,
}

/// A loaded model and its conversation engine. Opaque.
pub struct WickModel {
    runtime: Mutex<Runtime>,
    cancel: AtomicBool,
}

/// Progress of loading: `stage` is "download", "quantize" or "load"; `done` of `total`
/// (bytes when downloading, tensors otherwise).
pub type WickProgressFn =
    Option<unsafe extern "C" fn(stage: *const c_char, done: u64, total: u64, user: *mut c_void)>;

/// One piece of a reply as it is generated: new answer text and new thinking text (either
/// may be empty), NUL-terminated UTF-8 valid for the call only. Return false to stop the
/// reply.
pub type WickTokenFn = Option<
    unsafe extern "C" fn(
        content: *const c_char,
        reasoning: *const c_char,
        user: *mut c_void,
    ) -> bool,
>;

/// Options of wick_load; start from wick_load_options_default().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WickLoadOptions {
    /// CPU threads; 0 = one per CPU the process may use.
    pub threads: u32,
    /// Longest conversation (prompt + reply) in tokens.
    pub max_model_len: u32,
    /// Use a GPU when one is usable (only in a library built with the `gpu` feature).
    pub use_gpu: bool,
}

/// Options of wick_chat; start from wick_chat_options_default().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WickChatOptions {
    /// Qwen3's thinking switch.
    pub enable_thinking: bool,
    /// Most new tokens.
    pub max_tokens: u32,
    /// Sampling temperature; 0 = greedy. Negative: the model's default.
    pub temperature: f32,
    /// Seed of the sampler; 0 = a random one.
    pub seed: u64,
}

/// The defaults: every CPU, 8192 tokens, no GPU.
#[no_mangle]
pub extern "C" fn wick_load_options_default() -> WickLoadOptions {
    WickLoadOptions {
        threads: 0,
        max_model_len: 8192,
        use_gpu: false,
    }
}

/// The defaults: thinking on, 2048 new tokens, the model's sampling.
#[no_mangle]
pub extern "C" fn wick_chat_options_default() -> WickChatOptions {
    WickChatOptions {
        enable_thinking: true,
        max_tokens: 2048,
        temperature: -1.0,
        seed: 0,
    }
}

/// The library's version, a static string.
#[no_mangle]
pub extern "C" fn wick_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Frees a string the library returned. Null is ignored.
///
/// # Safety
/// `s` is null or a string from this library, not freed before.
#[no_mangle]
pub unsafe extern "C" fn wick_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

/// Loads `model` (a model directory, a .gguf file, or a cached Hub id) and stores the
/// model in `*out`. `progress` (may be null) is called from the loading thread (this one).
///
/// # Safety
/// `model` is a NUL-terminated string; `options` is null or points to options; `out` is a
/// valid pointer; `error` is null or a valid pointer. `user` is passed to `progress` as is.
#[no_mangle]
pub unsafe extern "C" fn wick_load(
    model: *const c_char,
    options: *const WickLoadOptions,
    progress: WickProgressFn,
    user: *mut c_void,
    out: *mut *mut WickModel,
    error: *mut *mut c_char,
) -> WickStatus {
    guard(error, || {
        if out.is_null() {
            return Err((WickStatus::InvalidArgument, "out is null".into()));
        }
        *out = ptr::null_mut();
        let model = str_arg(model, "model")?;
        let o = if options.is_null() {
            wick_load_options_default()
        } else {
            *options
        };
        let user = UserPtr(user);
        let on_progress = progress.map(|f| {
            Progress::new(move |p| {
                let (stage, done, total) = match p {
                    LoadProgress::Download { done, total, .. } => (c"download", *done, *total),
                    LoadProgress::Quantize { done, total } => {
                        (c"quantize", *done as u64, *total as u64)
                    }
                    LoadProgress::Load { done, total } => (c"load", *done as u64, *total as u64),
                };
                let user = &user;
                // SAFETY: the caller's callback, with its own user pointer.
                unsafe { f(stage.as_ptr(), done, total, user.0) }
            })
        });
        let opts = RuntimeOptions {
            device: if o.use_gpu { Device::Auto } else { Device::Cpu },
            threads: o.threads as usize,
            max_model_len: (o.max_model_len as usize).max(1),
            on_progress,
            ..RuntimeOptions::default()
        };
        let rt = Runtime::load(model, &opts)
            .map_err(|e| (WickStatus::LoadFailed, format!("loading {model}: {e}")))?;
        *out = Box::into_raw(Box::new(WickModel {
            runtime: Mutex::new(rt),
            cancel: AtomicBool::new(false),
        }));
        Ok(WickStatus::Ok)
    })
}

/// Answers a conversation: `messages_json` is an OpenAI-style JSON array of messages
/// (`[{"role": "user", "content": "Hi"}]`). Text is streamed to `on_token` (may be null) as
/// it is generated. On return `*reply_json` (if not null) holds
/// `{"content", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens",
/// "cached_tokens"}`. Earlier turns still in the KV cache are not recomputed.
///
/// # Safety
/// `model` is from wick_load and not freed; `messages_json` is a NUL-terminated string;
/// `options` is null or points to options; `reply_json` and `error` are null or valid.
#[no_mangle]
pub unsafe extern "C" fn wick_chat(
    model: *const WickModel,
    messages_json: *const c_char,
    options: *const WickChatOptions,
    on_token: WickTokenFn,
    user: *mut c_void,
    reply_json: *mut *mut c_char,
    error: *mut *mut c_char,
) -> WickStatus {
    guard(error, || {
        if !reply_json.is_null() {
            *reply_json = ptr::null_mut();
        }
        let m = model
            .as_ref()
            .ok_or((WickStatus::InvalidArgument, "model is null".to_string()))?;
        let text = str_arg(messages_json, "messages_json")?;
        let messages: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
            (
                WickStatus::InvalidArgument,
                format!("messages_json is not a JSON array of messages: {e}"),
            )
        })?;
        let o = if options.is_null() {
            wick_chat_options_default()
        } else {
            *options
        };
        let mut rt = m
            .runtime
            .lock()
            .map_err(|_| (WickStatus::Panic, "an earlier call panicked".to_string()))?;
        let mut opts = rt.chat_options();
        opts.enable_thinking = o.enable_thinking;
        opts.params.max_tokens = Some((o.max_tokens as usize).max(1));
        if o.temperature >= 0.0 {
            opts.params.temperature = o.temperature;
        }
        if o.seed != 0 {
            opts.params.seed = Some(o.seed);
        }
        m.cancel.store(false, Ordering::SeqCst);
        let mut stopped_by_callback = false;
        let result = rt.chat(&messages, &opts, &m.cancel, &mut |ev| {
            let Some(f) = on_token else { return };
            if stopped_by_callback {
                return;
            }
            let content = CString::new(ev.delta.content.replace('\0', "")).unwrap_or_default();
            let reasoning = CString::new(ev.delta.reasoning.replace('\0', "")).unwrap_or_default();
            // SAFETY: the caller's callback, with its own user pointer.
            if !unsafe { f(content.as_ptr(), reasoning.as_ptr(), user) } {
                stopped_by_callback = true;
                m.cancel.store(true, Ordering::SeqCst);
            }
        });
        let out = result.map_err(|e| {
            let status = match e {
                wick::Error::InvalidParam { .. }
                | wick::Error::InvalidRequest(_)
                | wick::Error::Template(_) => WickStatus::InvalidArgument,
                _ => WickStatus::GenerateFailed,
            };
            (status, e.to_string())
        })?;
        let finish = out.finish_reason.map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        });
        if !reply_json.is_null() {
            let json = serde_json::json!({
                "content": out.content,
                "reasoning": out.reasoning,
                "finish_reason": finish,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.token_ids.len(),
                "cached_tokens": out.cached_tokens,
            });
            *reply_json = to_c(json.to_string());
        }
        Ok(
            if out.finish_reason == Some(wick::generate::FinishReason::Cancelled) {
                WickStatus::Cancelled
            } else {
                WickStatus::Ok
            },
        )
    })
}

/// Stops the reply wick_chat is generating on `model` (from any thread); wick_chat then
/// returns WICK_STATUS_CANCELLED with what it had. Does nothing when no reply runs.
///
/// # Safety
/// `model` is null or from wick_load and not freed.
#[no_mangle]
pub unsafe extern "C" fn wick_cancel(model: *const WickModel) {
    if let Some(m) = model.as_ref() {
        m.cancel.store(true, Ordering::SeqCst);
    }
}

/// Forgets the conversation cached on `model` and frees its KV cache.
///
/// # Safety
/// `model` is null or from wick_load and not freed.
#[no_mangle]
pub unsafe extern "C" fn wick_reset(model: *const WickModel) {
    if let Some(m) = model.as_ref() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if let Ok(mut rt) = m.runtime.lock() {
                rt.reset();
            }
        }));
    }
}

/// Frees a model. Null is ignored.
///
/// # Safety
/// `model` is null or from wick_load, not freed before, and no call on it is running.
#[no_mangle]
pub unsafe extern "C" fn wick_free(model: *mut WickModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// The caller's user pointer, handed back to its callbacks (on the calling thread).
struct UserPtr(*mut c_void);
// SAFETY: the pointer is only given back to the caller's own callback; the header says on
// which thread.
unsafe impl Send for UserPtr {}
unsafe impl Sync for UserPtr {}

type CallError = (WickStatus, String);

/// Runs `f`, turning errors and panics into a status and an optional message.
unsafe fn guard(
    error: *mut *mut c_char,
    f: impl FnOnce() -> Result<WickStatus, CallError>,
) -> WickStatus {
    if !error.is_null() {
        *error = ptr::null_mut();
    }
    let (status, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => return status,
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            (WickStatus::Panic, format!("internal error: {what}"))
        }
    };
    if !error.is_null() {
        *error = to_c(message);
    }
    status
}

unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, CallError> {
    if p.is_null() {
        return Err((WickStatus::InvalidArgument, format!("{name} is null")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| (WickStatus::InvalidArgument, format!("{name} is not UTF-8")))
}

fn to_c(s: String) -> *mut c_char {
    CString::new(s.replace('\0', ""))
        .map(CString::into_raw)
        .unwrap_or(ptr::null_mut())
}
