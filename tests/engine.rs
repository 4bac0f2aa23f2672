//! The serving engine on the tiny Qwen3 fixture: batched greedy decoding equals
//! one-at-a-time decoding (with chunked prefill and forced preemption), and a multi-turn
//! chat prefills only what the prefix cache does not hold.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use wick::engine::{Engine, EngineEvent, EngineOptions, Prompt, Request};
use wick::runtime::{Device, Runtime, RuntimeOptions};
use wick::sampler::{Sampler, SamplingParams};
use wick::text::chat_template::RenderOptions;

fn runtime(device: Device) -> Runtime {
    let opts = RuntimeOptions {
        device,
        threads: 2,
        max_model_len: 256,
        ..RuntimeOptions::default()
    };
    Runtime::load(common::fixture("qwen3-tiny").to_str().unwrap(), &opts).unwrap()
}

/// Eight prompts of different lengths (random ids from a fixed generator).
fn prompts() -> Vec<Vec<u32>> {
    let mut state = 0x2545_f491_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    [3usize, 17, 40, 9, 70, 1, 33, 55]
        .iter()
        .map(|&n| (0..n).map(|_| 1000 + (next() % 50_000) as u32).collect())
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// `n` tokens for `prompt` on the runtime's plain session, sampled as the engine would (the
/// backend draws unless the request needs the logits on the host): a path that shares
/// neither the engine's scheduler nor its batches.
fn on_session(rt: &mut Runtime, prompt: &[u32], params: &SamplingParams, n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(params, prompt);
    let runner = rt.runner().unwrap();
    runner.reset();
    let mut logits = Vec::new();
    let mut ids = Vec::new();
    let mut input = prompt.to_vec();
    while ids.len() < n {
        let id = match sampler.device_sampling() {
            Some(row) => runner.extend_sample(&input, &row).unwrap(),
            None => {
                runner.extend_last(&input, &mut logits).unwrap();
                sampler.sample_with_logprobs(&mut logits).0
            }
        };
        sampler.accept(id);
        ids.push(id);
        input = vec![id];
    }
    runner.reset();
    ids
}

fn wait_idle(engine: &Engine) {
    let t0 = Instant::now();
    loop {
        let m = engine.metrics().snapshot();
        if m.running == 0 && m.waiting == 0 && m.pending_fills == 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "engine never idles");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn batched_equals_sequential(device: Device) {
    let mut rt = runtime(device);
    let prompts = prompts();
    // On the CPU every sequence fills at least 7 of the pool's 8 blocks, so any two that run
    // at once force a preemption, however fast the steps are; lavapipe's slow steps let all
    // of them meet with shorter replies.
    let lens = match device {
        Device::Cpu => [100usize, 90, 80, 100, 50, 110, 80, 60],
        _ => [24, 20, 16, 30, 12, 25, 18, 22],
    };
    // One at a time, on a plain session (a different code path from the engine).
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .zip(lens)
        .map(|(p, n)| on_session(&mut rt, p, &greedy(n), n))
        .collect();
    // And through `generate`, a batch of one on the runtime's own engine (two prompts on
    // lavapipe, whose steps are slow).
    let checked = if device == Device::Cpu { 8 } else { 2 };
    for (i, (p, n)) in prompts.iter().zip(lens).enumerate().take(checked) {
        let never = std::sync::atomic::AtomicBool::new(false);
        let got = rt
            .generate(p.clone(), false, &greedy(n), &never, &mut |_| {})
            .unwrap()
            .token_ids;
        assert_eq!(got, want[i], "generate, prompt {i}");
    }

    // Batched: small steps (chunked prefill) and a pool of 8 blocks of 16 tokens for eight
    // sequences, so sequences must be preempted and recomputed.
    let engine = rt
        .start_engine(&EngineOptions {
            max_num_seqs: 8,
            max_num_batched_tokens: 32,
            max_model_len: 128,
            num_blocks: Some(8),
            enable_prefix_caching: false,
            ..EngineOptions::default()
        })
        .unwrap();
    let submit = |i: usize| {
        engine
            .submit(Request {
                prompt: Prompt::Ids(prompts[i].clone()),
                params: greedy(lens[i]),
            })
            .unwrap()
    };
    // Join at different steps: four now, two after the first has produced tokens, two
    // after the second has.
    let mut streams: Vec<_> = (0..4).map(submit).collect();
    let mut early: Vec<Vec<EngineEvent>> = vec![Vec::new(); 8];
    for _ in 0..3 {
        early[0].push(streams[0].blocking_next().unwrap());
    }
    streams.extend((4..6).map(submit));
    for _ in 0..3 {
        early[1].push(streams[1].blocking_next().unwrap());
    }
    streams.extend((6..8).map(submit));
    let mut got = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut ids = Vec::new();
        let mut done = None;
        for ev in early[i]
            .drain(..)
            .chain(std::iter::from_fn(|| s.blocking_next()))
        {
            match ev {
                EngineEvent::Delta { token_ids, .. } => ids.extend(token_ids),
                EngineEvent::Finished(c) => {
                    done = Some(c);
                    break;
                }
                EngineEvent::Error(e) => panic!("request {i}: {e}"),
            }
        }
        let c = done.expect("finished");
        assert_eq!(c.token_ids, ids, "deltas carry every token");
        got.push(c.token_ids);
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}: batched output differs from sequential");
    }
    wait_idle(&engine);
    let m = engine.metrics().snapshot();
    assert!(
        m.preemptions > 0,
        "the KV budget was meant to force preemption"
    );
    assert_eq!(m.kv_blocks_used, 0, "every block is returned");
    assert_eq!(m.finished_length, 8);
    let metrics = engine.metrics();
    assert_eq!(metrics.time_to_first_token.count(), 8);
    assert_eq!(metrics.e2e_latency.count(), 8);
    let tokens: usize = lens.iter().sum();
    assert_eq!(metrics.inter_token_latency.count() as usize, tokens - 8);
}

#[test]
fn batched_greedy_equals_sequential_cpu() {
    batched_equals_sequential(Device::Cpu);
}

#[cfg(feature = "gpu")]
#[test]
fn batched_greedy_equals_sequential_gpu() {
    batched_equals_sequential(Device::Gpu);
}

#[test]
fn three_turn_chat_prefills_only_the_new_tokens() {
    let rt = runtime(Device::Cpu);
    let engine = rt
        .start_engine(&EngineOptions {
            max_model_len: 256,
            ..EngineOptions::default()
        })
        .unwrap();
    let bs = engine.info().block_size;
    let render = RenderOptions {
        enable_thinking: Some(false),
        ..RenderOptions::default()
    };
    let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
    let users = [
        "Name a river in France.",
        "And one in Spain?",
        "Which is longer?",
    ];
    let mut expected_cached: Option<usize> = None;
    for (turn, user) in users.iter().enumerate() {
        messages.push(json!({"role": "user", "content": user}));
        let prompt = Prompt::Chat {
            messages: messages.clone(),
            render: render.clone(),
        };
        let (ids, _) = engine.tokenize_prompt(&prompt).unwrap();
        let before = engine.metrics().snapshot().computed_tokens;
        let c = engine
            .submit(Request {
                prompt,
                params: SamplingParams {
                    max_tokens: Some(12),
                    ..SamplingParams::greedy()
                },
            })
            .unwrap()
            .wait(|_| {})
            .unwrap();
        assert_eq!(c.usage.prompt_tokens, ids.len());
        eprintln!(
            "turn {}: {} prompt tokens, {} from the cache",
            turn + 1,
            ids.len(),
            c.usage.cached_tokens
        );
        let computed = engine.metrics().snapshot().computed_tokens - before;
        // Prompt tokens computed plus one decode step per generated token after the first.
        let prompt_computed = computed as usize - (c.usage.completion_tokens - 1);
        // The reply's prefix-cache fill (this conversation as the next turn renders it) is
        // queued when the reply ends and may already have run by the time the counter is
        // read; it computes at most the tokens the cache does not hold yet.
        let mut next = messages.clone();
        next.push(json!({"role": "assistant", "content": c.content}));
        next.push(json!({"role": "user", "content": "x"}));
        let next_len = engine
            .tokenize_prompt(&Prompt::Chat {
                messages: next,
                render: render.clone(),
            })
            .unwrap()
            .0
            .len();
        let fill_at_most = next_len.saturating_sub(ids.len() / bs * bs);
        let own = ids.len() - c.usage.cached_tokens;
        assert!(
            prompt_computed == own || (prompt_computed > own && prompt_computed <= own + fill_at_most),
            "turn {}: {prompt_computed} prompt tokens computed, {own} expected (+ at most {fill_at_most} of the fill)",
            turn + 1
        );
        if let Some(cached) = expected_cached {
            assert_eq!(
                c.usage.cached_tokens,
                cached,
                "turn {}: the cache should hold every full block of the earlier turns",
                turn + 1
            );
            assert!(
                ids.len() - cached < 40,
                "turn {}: too much recomputed",
                turn + 1
            );
        }
        messages.push(json!({"role": "assistant", "content": c.content}));
        // What the next turn shares with this conversation, whatever the user says next.
        let with = |u: &str| {
            let mut m = messages.clone();
            m.push(json!({"role": "user", "content": u}));
            engine
                .tokenize_prompt(&Prompt::Chat {
                    messages: m,
                    render: render.clone(),
                })
                .unwrap()
                .0
        };
        let (a, b) = (with("x"), with("y"));
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        expected_cached = Some(shared / bs * bs);
        // The engine computes the conversation as the next turn renders it while idle.
        wait_idle(&engine);
    }
}

#[test]
fn dropping_a_stream_cancels_the_request_and_frees_its_blocks() {
    let rt = runtime(Device::Cpu);
    let engine = rt.start_engine(&EngineOptions::default()).unwrap();
    let mut s = engine
        .submit(Request {
            prompt: Prompt::Ids(prompts()[4].clone()),
            params: greedy(10_000),
        })
        .unwrap();
    assert!(matches!(s.blocking_next(), Some(EngineEvent::Delta { .. })));
    drop(s);
    wait_idle(&engine);
    let m = engine.metrics().snapshot();
    assert_eq!(m.finished_cancelled, 1);
    assert_eq!(m.kv_blocks_used, 0);
}

#[test]
fn bad_requests_are_refused_at_submit() {
    let rt = runtime(Device::Cpu);
    let engine = rt
        .start_engine(&EngineOptions {
            max_model_len: 64,
            ..EngineOptions::default()
        })
        .unwrap();
    let submit = |ids: Vec<u32>, params: SamplingParams| {
        engine.submit(Request {
            prompt: Prompt::Ids(ids),
            params,
        })
    };
    assert!(matches!(
        submit(vec![1; 64], greedy(1)),
        Err(wick::Error::PromptTooLong {
            prompt_tokens: 64,
            max_model_len: 64
        })
    ));
    assert!(matches!(
        submit(vec![], greedy(1)),
        Err(wick::Error::InvalidRequest(_))
    ));
    assert!(matches!(
        submit(vec![u32::MAX], greedy(1)),
        Err(wick::Error::InvalidRequest(_))
    ));
    let bad = SamplingParams {
        top_p: 0.0,
        ..greedy(1)
    };
    assert!(matches!(
        submit(vec![1], bad),
        Err(wick::Error::InvalidParam { param: "top_p", .. })
    ));
    engine.shutdown();
    assert!(matches!(
        submit(vec![1], greedy(1)),
        Err(wick::Error::ShuttingDown)
    ));
}

/// An engine with the default KV budget and a context of 256 tokens.
fn default_engine(rt: &Runtime) -> Engine {
    rt.start_engine(&EngineOptions {
        max_model_len: 256,
        ..EngineOptions::default()
    })
    .unwrap()
}

/// Submits a prompt of token ids.
fn submit_ids(
    engine: &Engine,
    prompt: &[u32],
    params: &SamplingParams,
) -> wick::engine::RequestStream {
    engine
        .submit(Request {
            prompt: Prompt::Ids(prompt.to_vec()),
            params: params.clone(),
        })
        .unwrap()
}

/// Runs `req` on the engine to the end; returns its tokens.
fn run_to_end(mut s: wick::engine::RequestStream) -> Vec<u32> {
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::Delta { .. } => {}
            EngineEvent::Finished(c) => return c.token_ids,
            EngineEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("the stream ended without finishing")
}

/// A seeded, filtered sampling request draws the same tokens through `generate`, alone on
/// the engine (the backend samples: on the GPU only the ids are read back), and batched
/// with requests whose penalties and logprobs make the step sample on the host.
fn seeded_sampling_is_the_same_everywhere(device: Device) {
    let mut rt = runtime(device);
    let prompts = prompts();
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.01,
        seed: Some(1234),
        max_tokens: Some(24),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    let want = rt
        .generate(prompts[2].clone(), false, &params, &never, &mut |_| {})
        .unwrap()
        .token_ids;
    assert_eq!(
        on_session(&mut rt, &prompts[2], &params, 24),
        want,
        "session"
    );
    // Another seed draws something else: the seed is what makes it repeat.
    let other = rt
        .generate(
            prompts[2].clone(),
            false,
            &SamplingParams {
                seed: Some(99),
                ..params.clone()
            },
            &never,
            &mut |_| {},
        )
        .unwrap()
        .token_ids;
    assert_ne!(want, other);

    // The default KV budget: on lavapipe it asks for more than one storage binding holds,
    // and the engine takes what fits.
    let engine = default_engine(&rt);
    let submit = |prompt: &Vec<u32>, params: &SamplingParams| submit_ids(&engine, prompt, params);
    let before = rt.gpu_stats();
    assert_eq!(run_to_end(submit(&prompts[2], &params)), want, "alone");
    if let (Some(a), Some(b)) = (before, rt.gpu_stats()) {
        assert_eq!(
            b.readback_bytes - a.readback_bytes,
            4 * 24,
            "the backend sampled: one 4-byte id per token is all that is read back"
        );
    }
    let penalised = SamplingParams {
        repetition_penalty: 1.3,
        ..params.clone()
    };
    let with_logprobs = SamplingParams {
        logprobs: Some(2),
        ..params.clone()
    };
    let streams = vec![
        submit(&prompts[0], &penalised),
        submit(&prompts[2], &params),
        submit(&prompts[5], &with_logprobs),
        submit(&prompts[7], &params),
    ];
    let got: Vec<Vec<u32>> = streams.into_iter().map(run_to_end).collect();
    assert_eq!(got[1], want, "batched with host-sampled requests");
    wait_idle(&engine);
}

#[test]
fn a_seeded_request_draws_the_same_tokens_alone_batched_and_in_generate_cpu() {
    seeded_sampling_is_the_same_everywhere(Device::Cpu);
}

#[cfg(feature = "gpu")]
#[test]
fn a_seeded_request_draws_the_same_tokens_alone_batched_and_in_generate_gpu() {
    seeded_sampling_is_the_same_everywhere(Device::Gpu);
}

/// A seeded request draws the same tokens whether or not it asks for logprobs and whether or
/// not it spells out penalties that change nothing: logprobs and penalties are steps before
/// the one draw, not another sampler. Checked through `generate` and on the engine, alone
/// and batched, where logprobs make the step read the logits back and sample on the host.
fn logprobs_and_zero_penalties_do_not_change_the_draw(device: Device) {
    let mut rt = runtime(device);
    let prompts = prompts();
    let params = SamplingParams {
        temperature: 1.1,
        top_k: 200,
        top_p: 0.9,
        seed: Some(4321),
        max_tokens: Some(20),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let zero_penalties = SamplingParams {
        repetition_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        ..params.clone()
    };
    let variants = [
        (
            "logprobs",
            SamplingParams {
                logprobs: Some(3),
                ..params.clone()
            },
        ),
        (
            "logprobs 0",
            SamplingParams {
                logprobs: Some(0),
                ..params.clone()
            },
        ),
        ("zero penalties", zero_penalties.clone()),
        (
            "zero penalties and logprobs",
            SamplingParams {
                logprobs: Some(1),
                ..zero_penalties
            },
        ),
    ];
    let never = std::sync::atomic::AtomicBool::new(false);
    let mut generate = |params: &SamplingParams| {
        rt.reset();
        let out = rt
            .generate(prompts[4].clone(), false, params, &never, &mut |_| {})
            .unwrap();
        assert_eq!(out.logprobs.len(), params.logprobs.map_or(0, |_| 20));
        out.token_ids
    };
    let want = generate(&params);
    assert_eq!(want.len(), 20);
    for (what, p) in &variants {
        assert_eq!(generate(p), want, "generate, {what}");
    }
    for (what, p) in &variants {
        assert_eq!(
            on_session(&mut rt, &prompts[4], p, 20),
            want,
            "session, {what}"
        );
    }

    let engine = default_engine(&rt);
    let submit = |prompt: &Vec<u32>, params: &SamplingParams| submit_ids(&engine, prompt, params);
    assert_eq!(run_to_end(submit(&prompts[4], &params)), want, "engine");
    for (what, p) in &variants {
        assert_eq!(run_to_end(submit(&prompts[4], p)), want, "engine, {what}");
    }
    // Batched: one step samples some rows on the host and the others beside them.
    let streams: Vec<_> = std::iter::once(submit(&prompts[4], &params))
        .chain(variants.iter().map(|(_, p)| submit(&prompts[4], p)))
        .chain(std::iter::once(submit(&prompts[1], &params)))
        .collect();
    let got: Vec<Vec<u32>> = streams.into_iter().map(run_to_end).collect();
    for (i, g) in got[..=variants.len()].iter().enumerate() {
        assert_eq!(g, &want, "batched, request {i}");
    }
    wait_idle(&engine);
}

#[test]
fn logprobs_and_zero_penalties_do_not_change_the_draw_cpu() {
    logprobs_and_zero_penalties_do_not_change_the_draw(Device::Cpu);
}

#[cfg(feature = "gpu")]
#[test]
fn logprobs_and_zero_penalties_do_not_change_the_draw_gpu() {
    logprobs_and_zero_penalties_do_not_change_the_draw(Device::Gpu);
}
