//! The `wick` binary end to end on the `qwen3-tiny` fixture.

mod common;

use std::process::Command;

use common::*;

fn wick(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run wick")
}

#[test]
fn run_json_greedy_gives_the_oracle_continuation() {
    let dir = fixture("qwen3-tiny");
    let out = wick(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello! Who are you?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = oracle
        .cases
        .iter()
        .find(|c| c.name == "chat_hello")
        .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("{k} missing"))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(ids("prompt_token_ids"), case.input_ids);
    assert_eq!(ids("token_ids"), case.greedy_ids);
    assert_eq!(v["completion_tokens"], 24);
    assert_eq!(v["prompt_tokens"], case.input_ids.len());
    for k in ["text", "reasoning", "prefill_tok_s", "decode_tok_s"] {
        assert!(v.get(k).is_some(), "{k} missing");
    }
}

#[test]
fn logits_json_matches_oracle_topk() {
    let dir = fixture("qwen3-tiny");
    let oracle = Oracle::load("qwen3-tiny/oracle.json", "qwen3-tiny/oracle.safetensors");
    let case = oracle
        .cases
        .iter()
        .find(|c| c.name == "chat_hello")
        .unwrap();
    let prompt = case.prompt.clone().unwrap();
    let out = wick(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--raw",
        "--top",
        "8",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = oracle.topk_ids(&case.name);
    let positions = v["positions"].as_array().unwrap();
    assert_eq!(positions.len(), case.input_ids.len());
    for (i, p) in positions.iter().enumerate() {
        let got: Vec<i64> = p["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        // The top 3 have clear gaps in this fixture; the tail may hold near-ties.
        assert_eq!(got[..3], want[i][..3], "position {i}");
    }
}

#[test]
fn missing_model_fails_with_a_message() {
    let out = wick(&["run", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn quantized_checkpoint_is_refused_naming_its_method() {
    // qwen3-tiny with a bitsandbytes `quantization_config`, as such a build's config.json has
    // it (a method wick does not load).
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("qwen3-tiny");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "config.json" {
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            config["quantization_config"] = serde_json::json!({
                "quant_method": "bitsandbytes", "load_in_4bit": true,
                "bnb_4bit_quant_type": "nf4"
            });
            std::fs::write(dir.path().join(name), config.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&path, dir.path().join(name)).unwrap();
        }
    }
    let model = dir.path().to_str().unwrap();
    let out = wick(&["run", "--device", "cpu", "--model", model, "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quant_method `bitsandbytes`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let dir = fixture("qwen3-tiny");
    let long = "word ".repeat(200);
    let out = wick(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &long,
        "--raw",
        "--max-model-len",
        "64",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens") && err.contains("64"), "{err}");
}

#[test]
fn bench_runs_at_depth_with_either_kv_cache() {
    let dir = fixture("qwen3-tiny");
    for dtype in ["f16", "f32"] {
        let out = wick(&[
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--kv-cache-dtype",
            dtype,
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "2",
            "-d",
            "40",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(
            (v["depth"].as_u64(), v["n_gen"].as_u64()),
            (Some(40), Some(4))
        );
        assert_eq!(v["pp_runs"].as_array().unwrap().len(), 2);
        assert_eq!(v["tg_runs"].as_array().unwrap().len(), 2);
        assert!(v["tg_tok_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["pp_tok_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["load_seconds"]["total"].as_f64().unwrap() > 0.0, "{v}");
    }
    let out = wick(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--kv-cache-dtype",
        "f8",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected f16 or f32"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(feature = "server")]
/// Starts `wick serve` on the tiny model on the CPU with `extra` arguments and `env`, and
/// returns its stderr up to the line that says it serves (then stops it), or all of it if it
/// exits.
fn serve_startup(extra: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    serve_startup_on("cpu", extra, env)
}

#[cfg(feature = "server")]
/// [`serve_startup`] on `device`.
fn serve_startup_on(device: &str, extra: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader};
    let dir = fixture("qwen3-tiny");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wick"));
    cmd.args(["serve", "--port", "0", "--device", device, "--model"])
        .arg(&dir)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run wick serve");
    let mut text = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line.contains("wick: serving") {
            let _ = child.kill();
            let _ = child.wait();
            return (None, text);
        }
    }
    (child.wait().unwrap().code(), text)
}

#[cfg(feature = "server")]
/// A fake cgroup (the view from inside a container) with these files.
fn fake_cgroup(name: &str, files: &[(&str, String)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wick-cg-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (f, text) in files {
        std::fs::write(dir.join(f), text).unwrap();
    }
    dir
}

#[cfg(feature = "server")]
#[test]
fn serve_fits_its_kv_cache_under_a_memory_limit_or_refuses_with_the_numbers() {
    const MIB: u64 = 1 << 20;
    let weights = std::fs::metadata(fixture("qwen3-tiny").join("model.safetensors"))
        .unwrap()
        .len();
    // Room for the weights, the reserve and 1 MiB of KV: 2048 tokens of the tiny model's
    // 512-byte f16 KV rows, so the default max_model_len (8192) has to shrink.
    let limit = weights + wick::resources::RESERVE_BYTES + MIB;
    let cg = fake_cgroup(
        "fit",
        &[
            ("memory.max", format!("{limit}\n")),
            ("cpu.max", "100000 100000\n".into()),
        ],
    );
    let (code, text) = serve_startup(&[], &[("WICK_CGROUP_ROOT", cg.to_str().unwrap())]);
    assert_eq!(code, None, "did not start:\n{text}");
    assert!(
        text.contains(&format!("memory limit {} MiB", limit / MIB)),
        "{text}"
    );
    assert!(text.contains("CPU quota 1.00"), "{text}");
    assert!(
        text.contains("cpu (1 threads"),
        "threads follow the quota:\n{text}"
    );
    let (blocks, max_len) = kv_line(&text);
    assert!((128..=130).contains(&blocks), "{text}");
    assert_eq!(
        max_len,
        blocks * 16,
        "max_model_len lowered to what fits:\n{text}"
    );

    // Not even the weights fit: refused at start, naming the numbers.
    let cg = fake_cgroup("tight", &[("memory.max", format!("{}\n", 100 * MIB))]);
    let (code, text) = serve_startup(&[], &[("WICK_CGROUP_ROOT", cg.to_str().unwrap())]);
    assert!(matches!(code, Some(c) if c != 0), "started:\n{text}");
    assert!(
        text.contains("memory limit is 100 MiB") && text.contains("weights take"),
        "{text}"
    );

    // v1 files, and an explicit --kv-cache-mb above what the limit leaves: lowered too.
    let cg = fake_cgroup("v1", &[]);
    std::fs::create_dir_all(cg.join("memory")).unwrap();
    std::fs::write(
        cg.join("memory/memory.limit_in_bytes"),
        format!("{}\n", limit + 3 * MIB),
    )
    .unwrap();
    let (code, text) = serve_startup(
        &["--kv-cache-mb", "512"],
        &[("WICK_CGROUP_ROOT", cg.to_str().unwrap())],
    );
    assert_eq!(code, None, "did not start:\n{text}");
    let (blocks, max_len) = kv_line(&text);
    assert!((512..=514).contains(&blocks), "{text}");
    assert_eq!(max_len, 8192, "{text}");
}

#[cfg(feature = "server")]
/// The KV blocks and max_model_len of `wick serve`'s startup line.
fn kv_line(text: &str) -> (usize, usize) {
    let line = text
        .lines()
        .find(|l| l.contains("wick: serving"))
        .unwrap_or_else(|| panic!("no startup line:\n{text}"));
    let number_before = |key: &str| -> usize {
        let at = line
            .find(key)
            .unwrap_or_else(|| panic!("{key} missing: {line}"));
        line[..at]
            .split(|c: char| !c.is_ascii_digit())
            .rfind(|w| !w.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    let after = line.split("max_model_len ").nth(1).unwrap();
    let max_len = after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (number_before(" KV blocks"), max_len)
}

#[cfg(feature = "server")]
#[test]
fn threads_follow_the_affinity_mask_and_cpus_pins() {
    let (code, text) = serve_startup(&["--cpus", "0"], &[]);
    assert_eq!(code, None, "did not start:\n{text}");
    assert!(text.contains("CPUs 0,"), "{text}");
    assert!(text.contains("cpu (1 threads"), "{text}");
    let (code, text) = serve_startup(&["--cpus", "0-"], &[]);
    assert!(matches!(code, Some(c) if c != 0), "started:\n{text}");
    assert!(text.contains("--cpus"), "{text}");

    // A mask set from outside (taskset), where the platform has it.
    if let Ok(out) = Command::new("taskset")
        .args(["-c", "0"])
        .arg(env!("CARGO_BIN_EXE_wick"))
        .arg("info")
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("CPUs 0,") && text.contains("cpu: 1 threads"),
            "{text}"
        );
    }
}

/// The phases of a `load: download 0.00 s, map …, total … s` line, by name, in seconds.
fn load_phases(line: &str) -> Vec<(String, f64)> {
    let rest = line
        .split("load: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no load line: {line}"));
    rest.split(", ")
        .map(|p| {
            let mut w = p.split(' ');
            let name = w.next().unwrap().to_string();
            let secs = w.next().unwrap().parse().unwrap();
            assert_eq!(w.next(), Some("s"), "{line}");
            (name, secs)
        })
        .collect()
}

#[test]
fn info_with_a_model_reports_the_time_of_each_load_phase() {
    let dir = fixture("qwen3-tiny");
    let out = wick(&["info", dir.to_str().unwrap(), "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The machine first, then the model.
    assert!(stdout.contains("--device auto: "), "{stdout}");
    assert!(stdout.contains("model: qwen3-tiny on cpu"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("load: "))
        .unwrap_or_else(|| panic!("no load line:\n{stdout}"));
    let phases = load_phases(line);
    let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["download", "map", "repack", "upload", "total"],
        "{line}"
    );
    let total = phases[4].1;
    assert!(total > 0.0, "{line}");
    // Each phase is printed to 0.01 s: their sum may round up past the total by 0.025.
    let sum: f64 = phases[..4].iter().map(|(_, s)| s).sum();
    assert!(sum <= total + 0.026, "{line}");
    assert_eq!((phases[0].1, phases[3].1), (0.0, 0.0), "local, CPU: {line}");
    assert!(
        stdout.contains("memory: weights 18.7 MiB"),
        "the tiny model's bf16 weights:\n{stdout}"
    );
    // The same line on stderr, as every command that loads a model prints it.
    assert!(String::from_utf8_lossy(&out.stderr).contains("wick: load: download "));

    // Without a model, the machine alone.
    let out = wick(&["info"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("load: "));
}

#[cfg(all(feature = "server", feature = "gpu"))]
/// The number before ` MiB` after `key` in `line`.
fn mib_after(line: &str, key: &str) -> f64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing: {line}"));
    line[at + key.len()..]
        .trim_start()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key}: {line}"))
}

#[cfg(all(feature = "server", feature = "gpu"))]
#[test]
fn gpu_memory_utilization_is_a_share_of_the_device_memory_on_lavapipe() {
    if std::env::var_os("WICK_SKIP_GPU_TESTS").is_some_and(|v| v == "1") {
        eprintln!("WICK_SKIP_GPU_TESTS=1: skipping a GPU test");
        return;
    }
    // `wick info` names the size of lavapipe's Vulkan heap.
    let out = wick(&["info"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let memory = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("memory "))
        .unwrap_or_else(|| {
            panic!(
                "no adapter listed (install mesa-vulkan-drivers, or set \
                 WICK_SKIP_GPU_TESTS=1):\n{stdout}"
            )
        });
    let device = mib_after(memory, "memory");
    assert!(device >= 256.0, "{memory}");

    // With a model on the GPU: the device's memory and the buffers wick holds.
    let dir = fixture("qwen3-tiny");
    let out = wick(&["info", dir.to_str().unwrap(), "--device", "gpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("memory: ")).unwrap();
    assert_eq!(mib_after(line, "device memory"), device, "{line}");
    assert!(mib_after(line, "GPU buffers wick holds") >= 18.7, "{line}");
    let load = load_phases(stdout.lines().find(|l| l.starts_with("load: ")).unwrap());
    assert!(load[3].1 >= 0.0 && load[4].1 > 0.0, "{load:?}");

    // A share leaving about 70 MiB after the weights (19 MiB) and activations (11 MiB).
    let f = 100.0 / device;
    let (code, text) = serve_startup_on("gpu", &["--gpu-memory-utilization", &f.to_string()], &[]);
    assert_eq!(code, None, "did not start:\n{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("wick: --gpu-memory-utilization"))
        .unwrap_or_else(|| panic!("no budget line:\n{text}"));
    assert!(
        line.contains(&format!("--gpu-memory-utilization {f}:")),
        "{line}"
    );
    assert_eq!(mib_after(line, "device memory"), device, "{line}");
    let share = mib_after(line, "of it");
    assert!((share - f * device).abs() <= 0.06, "{line}");
    let kv = mib_after(line, "= KV cache");
    let held = mib_after(line, "- GPU buffers");
    let activations = mib_after(line, "- activations");
    assert!((share - held - activations - kv).abs() <= 0.16, "{line}");
    assert!(held >= 18.7 && activations > 0.0 && kv > 40.0, "{line}");
    // The pool is the budget in whole MiB, in blocks of 16 tokens of 512 bytes (the tiny
    // model's f16 K and V of every layer).
    let (blocks, _) = kv_line(&text);
    let mb = blocks * 16 * 512 / (1 << 20);
    assert!(
        (kv - 0.05).floor() as usize <= mb && mb <= (kv + 0.05).floor() as usize,
        "{blocks} blocks for {kv} MiB:\n{text}"
    );
    assert!(
        text.contains(&format!("device memory {} MiB", device as u64)),
        "the startup line names the device memory:\n{text}"
    );

    // Not even the weights and activations fit: refused with the numbers.
    let f = 10.0 / device;
    let (code, text) = serve_startup_on("gpu", &["--gpu-memory-utilization", &f.to_string()], &[]);
    assert!(matches!(code, Some(c) if c != 0), "started:\n{text}");
    assert!(
        text.contains(&format!(
            "--gpu-memory-utilization {f} leaves no room for the KV cache: device {} MiB",
            device as u64
        )),
        "{text}"
    );

    // On the CPU the device's size is unknown: a share of the KV budget, said so.
    let (code, text) = serve_startup(&["--gpu-memory-utilization", "0.25"], &[]);
    assert_eq!(code, None, "did not start:\n{text}");
    assert!(
        text.contains("memory size is unknown") && text.contains("0.25 of the 1024 MiB"),
        "{text}"
    );
    assert_eq!(
        kv_line(&text).0,
        256 * 128,
        "256 MiB of 8 KiB blocks:\n{text}"
    );
}

/// A reader that goes away (`wick info | grep -q avx2`) ends the command quietly, as it ends
/// other Unix tools: no panic about a broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_a_command_without_a_panic() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The read end closes before the report is written: its writes fail.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {stderr}"
    );
}
