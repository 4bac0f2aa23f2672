//! Embedding requests: a prompt in, one vector out.
//!
//! An engine started with [`Task::Embed`] pools instead of generating. Each request is a
//! sequence like any other to the [`super::scheduler`] (prefilled in chunks under the step's
//! token budget, batched with other requests, its prompt's full blocks shared through the
//! prefix cache), but once its last chunk has run the worker takes the final hidden state
//! of its last token ([`crate::model::Model::forward_hidden`]: last-token pooling, as
//! Qwen3-Embedding does), L2-normalizes it, answers, and frees the sequence: no token is
//! generated and no KV is kept for it beyond what the prefix cache holds anyway.
//!
//! Matryoshka truncation ([`truncate`]) keeps the first `dimensions` values and normalizes
//! again, as sentence-transformers and vLLM do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// What an engine's requests ask of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Task {
    /// Generate text ([`super::Engine::submit`]).
    #[default]
    Generate,
    /// Compute embeddings ([`super::Engine::embed`]): last-token pooling, L2-normalized.
    Embed,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "generate" => Ok(Task::Generate),
            "embed" => Ok(Task::Embed),
            _ => Err(format!("unknown task `{s}` (expected generate or embed)")),
        }
    }
}

/// One input's embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// `[C]` the last token's final hidden state, L2-normalized.
    pub embedding: Vec<f32>,
    /// Tokens of the input.
    pub prompt_tokens: usize,
    /// Input tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

/// The answer to one embedding request. Dropping it cancels the request.
pub struct EmbeddingHandle {
    id: u64,
    reply: Option<oneshot::Receiver<std::result::Result<Embedding, String>>>,
    cancelled: Arc<AtomicBool>,
}

impl EmbeddingHandle {
    /// The engine's id of the request.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the embedding without blocking the executor.
    pub async fn wait(mut self) -> Result<Embedding> {
        let rx = self.reply.take().expect("waited once");
        let out = rx.await;
        Self::outcome(out)
    }

    /// Waits for the embedding, blocking the thread.
    pub fn blocking_wait(mut self) -> Result<Embedding> {
        let rx = self.reply.take().expect("waited once");
        // Not `blocking_recv`, which panics inside an async runtime.
        Self::outcome(pollster::block_on(rx))
    }

    fn outcome(
        out: std::result::Result<std::result::Result<Embedding, String>, oneshot::error::RecvError>,
    ) -> Result<Embedding> {
        match out {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) => Err(Error::Engine(e)),
            Err(_) => Err(Error::Engine("the engine stopped".into())),
        }
    }
}

impl Drop for EmbeddingHandle {
    fn drop(&mut self) {
        // After an answer this changes nothing: the request is gone from the engine.
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

/// An embedding request checked by [`super::Engine::embed`], on its way to the engine thread.
#[derive(Debug)]
pub(crate) struct EmbedAdmitted {
    pub id: u64,
    pub prompt_ids: Vec<u32>,
    pub reply: oneshot::Sender<std::result::Result<Embedding, String>>,
    pub cancelled: Arc<AtomicBool>,
    pub submitted: Instant,
}

impl EmbedAdmitted {
    /// A request and the handle that answers it.
    pub fn new(id: u64, prompt_ids: Vec<u32>) -> (EmbedAdmitted, EmbeddingHandle) {
        let (tx, rx) = oneshot::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let handle = EmbeddingHandle {
            id,
            reply: Some(rx),
            cancelled: cancelled.clone(),
        };
        let req = EmbedAdmitted {
            id,
            prompt_ids,
            reply: tx,
            cancelled,
            submitted: Instant::now(),
        };
        (req, handle)
    }
}

/// The engine thread's embedding requests, by id, each with whether it has been scheduled.
#[derive(Default)]
pub(crate) struct Embeds {
    reqs: HashMap<u64, (EmbedAdmitted, bool)>,
}

impl Embeds {
    pub fn len(&self) -> usize {
        self.reqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn add(&mut self, req: EmbedAdmitted) {
        self.reqs.insert(req.id, (req, false));
    }

    /// Marks `id` scheduled; the first time, returns when it was submitted and its number
    /// of tokens.
    pub fn schedule(&mut self, id: u64) -> Option<(Instant, usize)> {
        let (req, scheduled) = self.reqs.get_mut(&id)?;
        (!std::mem::replace(scheduled, true)).then_some((req.submitted, req.prompt_ids.len()))
    }

    /// Requests whose caller cancelled or dropped the handle.
    pub fn cancelled(&self) -> Vec<u64> {
        self.reqs
            .iter()
            .filter(|(_, (r, _))| r.cancelled.load(Ordering::Relaxed) || r.reply.is_closed())
            .map(|(&id, _)| id)
            .collect()
    }

    /// Requests that were part of a step.
    pub fn scheduled(&self) -> Vec<u64> {
        self.reqs
            .iter()
            .filter(|(_, (_, s))| *s)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Forgets `id` without answering (a cancelled request).
    pub fn remove(&mut self, id: u64) -> bool {
        self.reqs.remove(&id).is_some()
    }

    /// Answers `id` with its last token's hidden state `[C]`, normalized.
    pub fn deliver(&mut self, id: u64, hidden: &[f32], cached_tokens: usize) {
        if let Some((req, _)) = self.reqs.remove(&id) {
            let mut embedding = hidden.to_vec();
            l2_normalize(&mut embedding);
            let _ = req.reply.send(Ok(Embedding {
                embedding,
                prompt_tokens: req.prompt_ids.len(),
                cached_tokens,
            }));
        }
    }

    /// Answers `id` with an error.
    pub fn fail(&mut self, id: u64, message: &str) -> bool {
        match self.reqs.remove(&id) {
            Some((req, _)) => {
                let _ = req.reply.send(Err(message.to_string()));
                true
            }
            None => false,
        }
    }

    /// Answers every request with an error; returns how many there were.
    pub fn fail_all(&mut self, message: &str) -> usize {
        let n = self.reqs.len();
        for (_, (req, _)) in self.reqs.drain() {
            let _ = req.reply.send(Err(message.to_string()));
        }
        n
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Matryoshka truncation: the first `dimensions` values of `v`, normalized again.
/// `dimensions` is clamped to `1..=v.len()`; callers check it against the model's width.
pub fn truncate(v: &[f32], dimensions: usize) -> Vec<f32> {
    let mut out = v[..dimensions.max(1).min(v.len())].to_vec();
    l2_normalize(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_truncates() {
        let mut v = vec![3.0, 4.0, 0.0, 12.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![3.0 / 13.0, 4.0 / 13.0, 0.0, 12.0 / 13.0]);
        let t = truncate(&v, 2);
        assert!((t[0] - 0.6).abs() < 1e-6 && (t[1] - 0.8).abs() < 1e-6);
        assert_eq!(truncate(&v, 99).len(), 4);
        let mut z = vec![0.0; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }

    #[test]
    fn a_dropped_handle_cancels() {
        let (req, handle) = EmbedAdmitted::new(7, vec![1, 2]);
        let mut embeds = Embeds::default();
        embeds.add(req);
        assert!(embeds.cancelled().is_empty());
        drop(handle);
        assert_eq!(embeds.cancelled(), vec![7]);
    }
}
