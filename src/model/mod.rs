//! The decoder-only transformer (Qwen3, Llama), written once for every backend.
//!
//! [`Model`] holds the weights as backend handles; [`RunState`] holds the preallocated
//! activations for steps of up to `max_tokens` tokens; [`Model::forward`] runs one step over
//! a [`Batch`] (any mix of prompt chunks and decode tokens from any number of sequences)
//! against a paged KV cache, and leaves the logits of the batch's `logits_rows`;
//! [`Model::forward_sample`] runs the same step and samples those rows where the logits are
//! (on the GPU: one read-back of R token ids); [`Model::forward_hidden`] stops before the
//! head and leaves those rows' final hidden states (what embedding models pool).
//!
//! ```text
//! x = embed(tokens)                                  [T, C]
//! for each layer:
//!     xn   = rms_norm(x, input_layernorm)            [T, C]
//!     qkv  = xn · [q_proj; k_proj; v_proj]ᵀ          [T, (H+2Hkv)·D]
//!     qkv  = rope(q_norm(q), k_norm(k))              (Qwen3 normalises q and k per head)
//!     kv_cache[slot_mapping] = k, v
//!     att  = attention(q, kv_cache, block_tables)    [T, H·D]
//!     x   += att · o_projᵀ                           [T, C]
//!     xn   = rms_norm(x, post_attention_layernorm)   [T, C]
//!     gu   = xn · [gate_proj; up_proj]ᵀ              [T, 2F]
//!     x   += (silu(gate) · up) · down_projᵀ          [T, C]
//! hidden = rms_norm(x[logits_rows], norm)           [R, C]  (forward_hidden stops here)
//! logits = hidden · lm_headᵀ                         [R, V]
//! ```

use crate::backend::{AttentionDims, Backend, Batch, KvDtype, KvLayout, RowSampling};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::loader::TensorSet;

/// The weights of one transformer block.
struct Layer<B: Backend> {
    input_layernorm: B::Weight,
    /// q_proj, k_proj and v_proj stacked by rows: `[(H+2Hkv)·D, C]`.
    qkv_proj: B::Weight,
    q_norm: Option<B::Weight>,
    k_norm: Option<B::Weight>,
    o_proj: B::Weight,
    post_attention_layernorm: B::Weight,
    /// gate_proj and up_proj stacked by rows: `[2F, C]`.
    gate_up_proj: B::Weight,
    down_proj: B::Weight,
}

/// Why a model without an output head cannot give logits.
pub const NO_HEAD: &str = "the checkpoint has no lm_head (an embedding model's weights): it \
                           computes embeddings only (`--task embed`)";

/// Where the logits come from.
enum LmHead<B: Backend> {
    /// Tied to `embed_tokens`.
    Tied,
    /// A weight of its own: `[V, C]`.
    Own(B::Weight),
    /// None: an embedding checkpoint saved without its head (Qwen3-Embedding's bare
    /// `Qwen3Model` weights); the model gives hidden states only.
    Absent,
}

/// A model ready to run on backend `B`.
pub struct Model<B: Backend> {
    /// Hyper-parameters.
    pub config: ModelConfig,
    backend: B,
    embed_tokens: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    lm_head: LmHead<B>,
    dims: AttentionDims,
    kv_dtype: KvDtype,
}

/// Preallocated activations for steps of up to `max_tokens` tokens.
pub struct RunState<B: Backend> {
    max_tokens: usize,
    x: B::Tensor,       // [T, C] residual stream
    xn: B::Tensor,      // [T, C] normalised
    qkv: B::Tensor,     // [T, (H+2Hkv)·D]
    att: B::Tensor,     // [T, H·D]
    gate_up: B::Tensor, // [T, 2F]
    act: B::Tensor,     // [T, F]
    last: B::Tensor,    // [R, C] rows whose logits are wanted
    last_n: B::Tensor,  // [R, C]
    logits: B::Tensor,  // [R, V]
    max_logits_rows: usize,
}

impl<B: Backend> RunState<B> {
    /// The most tokens one step may hold.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The most rows of logits one step may ask for.
    pub fn max_logits_rows(&self) -> usize {
        self.max_logits_rows
    }
}

impl<B: Backend> Model<B> {
    /// Builds the model from checkpoint tensors (Hugging Face names), checking every shape.
    pub fn load(backend: B, config: ModelConfig, tensors: &TensorSet) -> Result<Self> {
        Self::load_with_progress(backend, config, tensors, None)
    }

    /// [`Model::load`], reporting the tensors put on the device to `progress`.
    pub fn load_with_progress(
        backend: B,
        config: ModelConfig,
        tensors: &TensorSet,
        progress: Option<&crate::loader::Progress>,
    ) -> Result<Self> {
        config.validate()?;
        // Tensors per layer as the model takes them, plus the embedding, the final norm and
        // the head.
        let per_layer = if config.has_qk_norm() { 11 } else { 9 };
        let total =
            config.num_hidden_layers * per_layer + 2 + usize::from(!config.tie_word_embeddings);
        let report = |done: usize| {
            if let Some(p) = progress {
                p.report(crate::loader::LoadProgress::Load { done, total });
            }
        };
        report(0);
        let c = config.hidden_size;
        let (q_dim, kv_dim, f) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
        let d = config.head_dim;
        let embed = tensors.get_shaped("model.embed_tokens.weight", &[config.vocab_size, c])?;
        let embed_tokens = backend.weight(&[embed])?;
        let lm_head = match tensors.try_get("lm_head.weight") {
            _ if config.tie_word_embeddings => LmHead::Tied,
            Some(_) => {
                let t = tensors.get_shaped("lm_head.weight", &[config.vocab_size, c])?;
                LmHead::Own(backend.weight(&[t])?)
            }
            // Only embedding checkpoints come without a head; generating from one is refused
            // where a generation starts (`Model::can_generate`).
            None => LmHead::Absent,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let get =
                |name: &str, shape: &[usize]| tensors.get_shaped(&format!("{p}.{name}"), shape);
            let (q_norm, k_norm) = if config.has_qk_norm() {
                (
                    Some(backend.weight(&[get("self_attn.q_norm.weight", &[d])?])?),
                    Some(backend.weight(&[get("self_attn.k_norm.weight", &[d])?])?),
                )
            } else {
                (None, None)
            };
            report(1 + usize::from(!config.tie_word_embeddings) + i * per_layer);
            layers.push(Layer {
                input_layernorm: backend.weight(&[get("input_layernorm.weight", &[c])?])?,
                qkv_proj: backend.weight(&[
                    get("self_attn.q_proj.weight", &[q_dim, c])?,
                    get("self_attn.k_proj.weight", &[kv_dim, c])?,
                    get("self_attn.v_proj.weight", &[kv_dim, c])?,
                ])?,
                q_norm,
                k_norm,
                o_proj: backend.weight(&[get("self_attn.o_proj.weight", &[c, q_dim])?])?,
                post_attention_layernorm: backend
                    .weight(&[get("post_attention_layernorm.weight", &[c])?])?,
                gate_up_proj: backend.weight(&[
                    get("mlp.gate_proj.weight", &[f, c])?,
                    get("mlp.up_proj.weight", &[f, c])?,
                ])?,
                down_proj: backend.weight(&[get("mlp.down_proj.weight", &[c, f])?])?,
            });
        }
        let norm = backend.weight(&[tensors.get_shaped("model.norm.weight", &[c])?])?;
        report(total);
        let dims = AttentionDims {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: d,
            rope_theta: config.rope_theta,
            eps: config.rms_norm_eps,
        };
        Ok(Model {
            config,
            backend,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dims,
            kv_dtype: KvDtype::default(),
        })
    }

    /// Stores keys and values as `dtype` in the caches made from now on ([`Model::load`]
    /// gives [`KvDtype::default()`], f16; f32 keeps them exact).
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// How the KV caches store keys and values.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Whether the model has an output head: an embedding checkpoint saved without one gives
    /// hidden states ([`Model::forward_hidden`]) but no logits.
    pub fn can_generate(&self) -> bool {
        !matches!(self.lm_head, LmHead::Absent)
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Allocates activations for steps of up to `max_tokens` tokens, of which up to
    /// `max_logits_rows` want logits (the logits are `[R, V]`: keep R small).
    pub fn run_state(&self, max_tokens: usize, max_logits_rows: usize) -> RunState<B> {
        let (t, r) = Self::run_state_rows(max_tokens, max_logits_rows);
        let b = &self.backend;
        let [x, xn, qkv, att, gate_up, act, last, last_n, logits] = self
            .run_state_shapes(t, r)
            .map(|(rows, cols)| b.tensor(rows, cols));
        RunState {
            max_tokens: t,
            x,
            xn,
            qkv,
            att,
            gate_up,
            act,
            last,
            last_n,
            logits,
            max_logits_rows: r,
        }
    }

    /// Bytes of the f32 activations [`Model::run_state`] allocates for these sizes.
    pub fn run_state_bytes(&self, max_tokens: usize, max_logits_rows: usize) -> u64 {
        let (t, r) = Self::run_state_rows(max_tokens, max_logits_rows);
        self.run_state_shapes(t, r)
            .iter()
            .map(|(rows, cols)| (rows * cols * 4) as u64)
            .sum()
    }

    /// T and R of a [`RunState`]: at least one token, and 1 ≤ R ≤ T.
    fn run_state_rows(max_tokens: usize, max_logits_rows: usize) -> (usize, usize) {
        let t = max_tokens.max(1);
        (t, max_logits_rows.clamp(1, t))
    }

    /// `(rows, cols)` of each activation of a [`RunState`], in its field order: x, xn, qkv,
    /// att, gate_up, act (T rows), last, last_n, logits (R rows).
    fn run_state_shapes(&self, t: usize, r: usize) -> [(usize, usize); 9] {
        let cfg = &self.config;
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        [
            (t, c),
            (t, c),
            (t, self.dims.qkv_width()),
            (t, cfg.q_dim()),
            (t, 2 * f),
            (t, f),
            (r, c),
            (r, c),
            (r, cfg.vocab_size),
        ]
    }

    /// The KV layout for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: self.config.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
            dtype: self.kv_dtype,
        }
    }

    /// Allocates a paged KV cache.
    pub fn kv_cache(&self, layout: KvLayout) -> Result<B::KvCache> {
        self.backend.kv_cache(layout)
    }

    /// Runs one step and copies the logits of `batch.logits_rows` into `logits`
    /// (`[R, V]`, resized as needed).
    ///
    /// The batch must be consistent ([`Batch::check`]) and hold at most
    /// `state.max_tokens()` tokens; its block tables must point into `cache`.
    pub fn forward(
        &self,
        state: &mut RunState<B>,
        cache: &mut B::KvCache,
        batch: &Batch,
        logits: &mut Vec<f32>,
    ) {
        let r = self.on_backend(|| self.forward_logits(state, cache, batch));
        if r == 0 {
            logits.clear();
            return;
        }
        logits.resize(r * self.config.vocab_size, 0.0);
        self.backend.read(&state.logits, r, logits);
    }

    /// Runs one step like [`Model::forward`] but ends in [`Backend::sample`]: `ids[R]` gets
    /// the token chosen from each row of logits, row `i` as `params[i]` says. On the GPU the
    /// step's one read-back is then R token ids instead of `[R, V]` logits.
    ///
    /// `params` holds one entry per `batch.logits_rows`; `masks` the token masks rows name
    /// ([`RowSampling::mask`](crate::backend::RowSampling::mask)). Penalties and logprobs need the
    /// logits on the host: use [`Model::forward`] and the [`crate::sampler::Sampler`] for those.
    pub fn forward_sample(
        &self,
        state: &mut RunState<B>,
        cache: &mut B::KvCache,
        batch: &Batch,
        params: &[RowSampling],
        masks: &[u32],
        ids: &mut Vec<u32>,
    ) {
        assert_eq!(
            params.len(),
            batch.logits_rows.len(),
            "one RowSampling per logits row"
        );
        let r = self.on_backend(|| self.forward_logits(state, cache, batch));
        if r == 0 {
            ids.clear();
            return;
        }
        ids.resize(r, 0);
        self.backend.sample(&state.logits, r, params, masks, ids);
    }

    /// Runs one step like [`Model::forward`] but stops before the head: `hidden` (`[R, C]`,
    /// resized as needed) gets the final hidden state of each of `batch.logits_rows`, after
    /// the last RMSNorm. Embedding models pool these.
    pub fn forward_hidden(
        &self,
        state: &mut RunState<B>,
        cache: &mut B::KvCache,
        batch: &Batch,
        hidden: &mut Vec<f32>,
    ) {
        let r = self.on_backend(|| self.forward_layers(state, cache, batch));
        if r == 0 {
            hidden.clear();
            return;
        }
        let b = &self.backend;
        b.gather_rows(&state.x, batch, &mut state.last);
        b.rms_norm(
            &state.last,
            &self.norm,
            self.config.rms_norm_eps,
            r,
            &mut state.last_n,
        );
        hidden.resize(r * self.config.hidden_size, 0.0);
        b.read(&state.last_n, r, hidden);
    }

    /// Runs `f` through [`Backend::run_step`] and returns what it returns.
    fn on_backend<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let mut f = Some(f);
        let mut out = None;
        self.backend.run_step(&mut || out = f.take().map(|f| f()));
        out.expect("run_step runs the step")
    }

    /// The step up to the logits: leaves `[R, V]` in `state.logits` and returns R. Nothing
    /// is read back; with R = 0 the work stays recorded until the next step begins.
    fn forward_logits(
        &self,
        state: &mut RunState<B>,
        cache: &mut B::KvCache,
        batch: &Batch,
    ) -> usize {
        let r = self.forward_layers(state, cache, batch);
        if r == 0 {
            return 0;
        }
        let b = &self.backend;
        b.gather_rows(&state.x, batch, &mut state.last);
        let head = match &self.lm_head {
            LmHead::Tied => &self.embed_tokens,
            LmHead::Own(w) => w,
            LmHead::Absent => panic!("the model has no lm_head: it gives hidden states only"),
        };
        b.rms_norm_matmul(
            &state.last,
            &self.norm,
            self.config.rms_norm_eps,
            head,
            r,
            &mut state.last_n,
            &mut state.logits,
        );
        r
    }

    /// Embedding and every layer: leaves the residual stream `[T, C]` in `state.x` and
    /// returns R, the number of rows wanted.
    fn forward_layers(
        &self,
        state: &mut RunState<B>,
        cache: &mut B::KvCache,
        batch: &Batch,
    ) -> usize {
        let t = batch.num_tokens();
        assert!(t > 0 && t <= state.max_tokens, "step of {t} tokens");
        let (b, dims, eps) = (&self.backend, self.dims, self.config.rms_norm_eps);
        b.begin_step(batch);
        b.embed(&self.embed_tokens, batch, &mut state.x);
        for (il, layer) in self.layers.iter().enumerate() {
            b.rms_norm_matmul(
                &state.x,
                &layer.input_layernorm,
                eps,
                &layer.qkv_proj,
                t,
                &mut state.xn,
                &mut state.qkv,
            );
            b.qk_norm_rope_kv_write_attention(
                &mut state.qkv,
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                cache,
                il,
                dims,
                batch,
                &mut state.att,
            );
            b.matmul_add(&state.att, &layer.o_proj, t, &mut state.x);
            b.rms_norm_matmul(
                &state.x,
                &layer.post_attention_layernorm,
                eps,
                &layer.gate_up_proj,
                t,
                &mut state.xn,
                &mut state.gate_up,
            );
            b.silu_mul_matmul_add(
                &state.gate_up,
                &layer.down_proj,
                t,
                &mut state.act,
                &mut state.x,
            );
        }
        let r = batch.logits_rows.len();
        assert!(r <= state.max_logits_rows, "{r} logits rows requested");
        r
    }
}
