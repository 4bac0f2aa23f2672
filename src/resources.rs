//! What the process may use: CPUs and memory as containers and edge boards fence them.
//!
//! Containers set limits through cgroups (v2: `cpu.max`, `memory.max`; v1:
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.limit_in_bytes`; machines of both kinds
//! exist) and pin processes through the affinity mask (`taskset`, `docker --cpuset-cpus`).
//! [`Fences::detect`] reads them once:
//!
//! - **Threads**: the default CPU thread count is the number of CPUs in the affinity mask,
//!   capped by the CPU quota rounded up ([`Fences::default_threads`]).
//! - **Pinning**: [`pin`] restricts the process to a CPU list (`--cpus 0,2-3`), as `taskset`
//!   would from outside; threads started afterwards inherit the mask.
//! - **Memory**: [`Fences::kv_budget`] gives the KV cache what the memory limit leaves after
//!   the weights and a reserve for everything else, or refuses with the numbers when even the
//!   smallest useful cache cannot fit.
//!
//! - **Resident memory**: [`resident_zeroed`] allocates memory that is resident from the
//!   start (the KV pool, the prefix cache's index), so that resident memory does not climb as
//!   a server fills its cache and a memory limit too small for it shows at start, not under
//!   load; [`release_free_memory`] hands the allocator's free pages back to the system (glibc
//!   keeps what a burst of requests freed, spread over its per-thread arenas, otherwise).
//!
//! The cgroup files are found through `/proc/self/cgroup` under `/sys/fs/cgroup`; the
//! nearest limit on the path up to the root applies. `WICK_CGROUP_ROOT` points the reader at
//! another directory that holds the files directly (`cpu.max`, `memory.max`, or v1's
//! `cpu/…` and `memory/…`), the view from inside a container, for tests and odd mounts.
//!
//! Written here rather than taken from a crate: the crates that read cgroups either pull a
//! process-inspection library many times this size or cover v2 only, and the files are
//! one-line formats.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Memory left for everything but the weights and the KV cache: activations, logits,
/// tokenizer, allocator slack, the HTTP server. Measured on Qwen3-0.6B serving 16 requests,
/// with room to spare.
pub const RESERVE_BYTES: u64 = 256 << 20;

/// The environment variable that points the cgroup reader at another directory.
pub const CGROUP_ROOT_ENV: &str = "WICK_CGROUP_ROOT";

/// CPU and memory limits of this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fences {
    /// CPUs the process may run on (the affinity mask), sorted; `None` where the platform
    /// does not say.
    pub affinity: Option<Vec<usize>>,
    /// The cgroup CPU quota in CPUs (e.g. 1.5), if one is set.
    pub cpu_quota: Option<f64>,
    /// The cgroup memory limit in bytes, if one is set.
    pub memory_limit: Option<u64>,
}

impl Fences {
    /// Reads the affinity mask and the cgroup limits of this process.
    pub fn detect() -> Fences {
        let cgroup = match std::env::var_os(CGROUP_ROOT_ENV) {
            Some(root) => Cgroup::flat(PathBuf::from(root)),
            None => Cgroup::of_process(Path::new("/sys/fs/cgroup")),
        };
        Fences {
            affinity: affinity(),
            cpu_quota: cgroup.cpu_quota(),
            memory_limit: cgroup.memory_limit(),
        }
    }

    /// Threads for the CPU backend when none are asked for: the CPUs of the affinity mask
    /// (or all of them), at most the quota rounded up, at least one.
    pub fn default_threads(&self) -> usize {
        let cpus = match &self.affinity {
            Some(a) => a.len(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let quota = self
            .cpu_quota
            .map_or(usize::MAX, |q| (q.ceil() as usize).max(1));
        cpus.min(quota).max(1)
    }

    /// The KV budget in bytes under the memory limit: what is left after `weight_bytes` and
    /// [`RESERVE_BYTES`], at most `wanted`. `None` without a limit. Refused
    /// ([`Error::OutOfMemory`]) when less than `min_kv` bytes would be left.
    pub fn kv_budget(&self, weight_bytes: u64, wanted: u64, min_kv: u64) -> Result<Option<u64>> {
        let Some(limit) = self.memory_limit else {
            return Ok(None);
        };
        let left = limit.saturating_sub(weight_bytes + RESERVE_BYTES);
        if left < min_kv {
            return Err(Error::OutOfMemory(format!(
                "the memory limit is {} MiB; the weights take {} MiB, {} MiB is kept for \
                 activations and the rest, and the smallest KV cache needs {} MiB: {} MiB \
                 more than the limit allows (raise the limit or use a smaller model or \
                 quantization)",
                mib(limit),
                mib(weight_bytes),
                mib(RESERVE_BYTES),
                mib(min_kv).max(1),
                mib((weight_bytes + RESERVE_BYTES + min_kv).saturating_sub(limit)).max(1),
            )));
        }
        Ok(Some(left.min(wanted)))
    }
}

impl fmt::Display for Fences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.affinity {
            Some(a) => write!(f, "CPUs {}", format_cpu_list(a))?,
            None => write!(f, "CPUs unknown")?,
        }
        match self.cpu_quota {
            Some(q) => write!(f, ", CPU quota {q:.2}")?,
            None => write!(f, ", no CPU quota")?,
        }
        match self.memory_limit {
            Some(m) => write!(f, ", memory limit {} MiB", mib(m)),
            None => write!(f, ", no memory limit"),
        }
    }
}

/// `n` zeroed values whose pages are all resident: each page is written once (in parallel),
/// where a plain zeroed allocation would be mapped lazily, page by page, as it is first written.
pub fn resident_zeroed<T: bytemuck::Zeroable + Copy + Send>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = bytemuck::zeroed_vec(n);
    let per_page = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    v.par_chunks_mut(per_page * 256).for_each(|chunk| {
        // A page's worth of values spans at most two pages (the vector need not start on a
        // page boundary): its first and last values are written.
        for page in chunk.chunks_mut(per_page) {
            let last = page.len() - 1;
            // SAFETY: `page` is a non-empty slice of initialized values; a volatile write of
            // a zero (the value already there) cannot be optimized away, so the page is
            // faulted in now.
            unsafe {
                std::ptr::write_volatile(page.as_mut_ptr(), T::zeroed());
                std::ptr::write_volatile(page.as_mut_ptr().add(last), T::zeroed());
            }
        }
    });
    v
}

/// Returns the allocator's free memory to the system where the allocator keeps it: glibc's
/// `malloc` holds on to the pages freed in each of its per-thread arenas, so the resident
/// memory of a server that has served a burst stays at the burst's peak; `malloc_trim`
/// releases them. Elsewhere (musl with mimalloc, macOS, Windows) the allocator returns memory
/// on its own and this does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own state, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Where a process's cgroup files are.
struct Cgroup {
    /// v2: the directories from the process's own cgroup up to the root, nearest first.
    v2: Vec<PathBuf>,
    /// v1: the same, for the `cpu` and the `memory` hierarchy.
    v1_cpu: Vec<PathBuf>,
    v1_memory: Vec<PathBuf>,
}

impl Cgroup {
    /// A directory holding the files directly (the view from inside a container).
    fn flat(root: PathBuf) -> Cgroup {
        Cgroup {
            v1_cpu: vec![root.join("cpu"), root.join("cpu,cpuacct")],
            v1_memory: vec![root.join("memory")],
            v2: vec![root],
        }
    }

    /// This process's cgroups under `root`, from `/proc/self/cgroup`.
    fn of_process(root: &Path) -> Cgroup {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Cgroup::from_proc(root, &text)
    }

    fn from_proc(root: &Path, proc_cgroup: &str) -> Cgroup {
        let mut cg = Cgroup {
            v2: Vec::new(),
            v1_cpu: Vec::new(),
            v1_memory: Vec::new(),
        };
        for line in proc_cgroup.lines() {
            // `hierarchy-id:controllers:path`; v2 is `0::path`.
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                cg.v2 = ancestors(root, path);
                continue;
            }
            for c in controllers.split(',') {
                let mount = root.join(controllers);
                match c {
                    "cpu" => cg.v1_cpu = ancestors(&mount, path),
                    "memory" => cg.v1_memory = ancestors(&mount, path),
                    _ => {}
                }
            }
        }
        cg
    }

    fn cpu_quota(&self) -> Option<f64> {
        let v2 = self
            .v2
            .iter()
            .filter_map(|d| read(&d.join("cpu.max")).and_then(|t| parse_cpu_max(&t)));
        let v1 = self.v1_cpu.iter().filter_map(|d| {
            let quota = read(&d.join("cpu.cfs_quota_us"))?;
            let period = read(&d.join("cpu.cfs_period_us"))?;
            parse_cfs(&quota, &period)
        });
        v2.chain(v1).min_by(f64::total_cmp)
    }

    fn memory_limit(&self) -> Option<u64> {
        let v2 = self
            .v2
            .iter()
            .filter_map(|d| read(&d.join("memory.max")).and_then(|t| parse_memory_max(&t)));
        let v1 = self.v1_memory.iter().filter_map(|d| {
            read(&d.join("memory.limit_in_bytes")).and_then(|t| parse_memory_max(&t))
        });
        v2.chain(v1).min()
    }
}

/// `root/path` and its parents up to `root`, nearest first. Inside a container the path
/// names the host's cgroup while `root` is the container's own: `root` itself is always
/// included.
fn ancestors(root: &Path, path: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut p = Path::new(path.trim().trim_start_matches('/'));
    loop {
        dirs.push(root.join(p));
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    if !dirs.iter().any(|d| d == root) {
        dirs.push(root.to_path_buf());
    }
    dirs
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// v2 `cpu.max`: `max 100000` (no quota) or `150000 100000` (1.5 CPUs).
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let q: f64 = quota.parse().ok()?;
    (q > 0.0).then(|| q / period)
}

/// v1: `cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let q: i64 = quota.trim().parse().ok()?;
    let p: i64 = period.trim().parse().ok()?;
    (q > 0 && p > 0).then(|| q as f64 / p as f64)
}

/// v2 `memory.max` (`max` for none) or v1 `memory.limit_in_bytes` (a number near 2^63 for
/// none).
fn parse_memory_max(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let n: u64 = t.parse().ok()?;
    // v1 reports "no limit" as the largest page-aligned i64.
    (n < (1u64 << 62)).then_some(n)
}

/// Parses a CPU list as `taskset -c` takes it: `0,2-3,8`.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>> {
    let bad = || {
        Error::InvalidRequest(format!(
            "`{list}` is not a CPU list (numbers and ranges, e.g. 0,2-3)"
        ))
    };
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if a > b || b >= 1 << 16 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Formats CPUs as a compact list (`0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

/// The CPUs this process may run on.
#[cfg(target_os = "linux")]
pub fn affinity() -> Option<Vec<usize>> {
    // SAFETY: `set` is a plain bit set that the call fills; its size is passed with it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        (!cpus.is_empty()).then_some(cpus)
    }
}

/// The CPUs this process may run on (not known on this platform).
#[cfg(not(target_os = "linux"))]
pub fn affinity() -> Option<Vec<usize>> {
    None
}

/// Restricts this process's current thread, and every thread it starts afterwards, to
/// `cpus`. Call it before starting threads. Fails when a CPU is not one the process may use.
#[cfg(target_os = "linux")]
pub fn pin(cpus: &[usize]) -> Result<()> {
    if let Some(allowed) = affinity() {
        if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(Error::InvalidRequest(format!(
                "CPU {c} is not one this process may use ({})",
                format_cpu_list(&allowed)
            )));
        }
    }
    // SAFETY: as in `affinity`; CPU_SET is only called with indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(Error::InvalidRequest(format!("CPU {c} is out of range")));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(Error::Device(format!(
                "cannot pin to CPUs {}: {}",
                format_cpu_list(cpus),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Pinning is not available on this platform.
#[cfg(not(target_os = "linux"))]
pub fn pin(_cpus: &[usize]) -> Result<()> {
    Err(Error::Device(
        "pinning to CPUs is supported on Linux only".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `v` the kernel has mapped (`mincore`).
    #[cfg(target_os = "linux")]
    fn resident_pages<T>(v: &[T]) -> (usize, usize) {
        let page = 4096usize;
        let start = v.as_ptr() as usize / page * page;
        let end = (v.as_ptr() as usize + std::mem::size_of_val(v)).div_ceil(page) * page;
        let mut map = vec![0u8; (end - start) / page];
        // SAFETY: the range covers `v`'s allocation rounded out to pages, all mapped.
        let rc = unsafe { libc::mincore(start as *mut _, end - start, map.as_mut_ptr()) };
        assert_eq!(rc, 0);
        (map.iter().filter(|&&m| m & 1 == 1).count(), map.len())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_zeroed_maps_every_page_and_a_plain_zeroed_vec_does_not() {
        let n = 16 << 20; // 64 MiB of f32: a fresh mapping, not recycled heap.
        let lazy: Vec<f32> = bytemuck::zeroed_vec(n);
        let (mapped, pages) = resident_pages(&lazy);
        assert!(
            mapped < pages / 2,
            "{mapped} of {pages} pages already mapped"
        );
        let v: Vec<f32> = resident_zeroed(n);
        let (mapped, pages) = resident_pages(&v);
        assert_eq!(mapped, pages);
        assert!(v.iter().all(|&x| x == 0.0));
        let h: Vec<half::f16> = resident_zeroed(3);
        assert_eq!(h, vec![half::f16::ZERO; 3]);
        assert!(resident_zeroed::<u64>(0).is_empty());
    }

    #[test]
    fn cpu_max_and_cfs_quota() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n"), Some(2.0));
    }

    #[test]
    fn memory_limits_v1_and_v2() {
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("1610612736\n"), Some(1_610_612_736));
        assert_eq!(parse_memory_max("9223372036854771712\n"), None);
        assert_eq!(parse_memory_max(""), None);
    }

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpu_list("0,2-3, 8").unwrap(), [0, 2, 3, 8]);
        assert_eq!(parse_cpu_list("3,1,1").unwrap(), [1, 3]);
        for bad in ["", "a", "3-1", "1-", "-1", "0,,x"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(format_cpu_list(&[5]), "5");
    }

    #[test]
    fn the_nearest_and_strictest_limit_applies() {
        let dir = std::env::temp_dir().join(format!("wick-cgroup-{}", std::process::id()));
        let leaf = dir.join("system.slice/app.scope");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(dir.join("system.slice/memory.max"), "1073741824\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "250000 100000\n").unwrap();
        let cg = Cgroup::from_proc(&dir, "0::/system.slice/app.scope\n");
        assert_eq!(cg.memory_limit(), Some(1 << 30));
        assert_eq!(cg.cpu_quota(), Some(2.5));

        // v1, with the controllers mounted together.
        let v1 = dir.join("v1");
        std::fs::create_dir_all(v1.join("cpu,cpuacct/docker/abc")).unwrap();
        std::fs::create_dir_all(v1.join("memory/docker/abc")).unwrap();
        std::fs::write(
            v1.join("cpu,cpuacct/docker/abc/cpu.cfs_quota_us"),
            "50000\n",
        )
        .unwrap();
        std::fs::write(
            v1.join("cpu,cpuacct/docker/abc/cpu.cfs_period_us"),
            "100000\n",
        )
        .unwrap();
        std::fs::write(
            v1.join("memory/docker/abc/memory.limit_in_bytes"),
            "314572800\n",
        )
        .unwrap();
        let cg = Cgroup::from_proc(
            &v1,
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
        );
        assert_eq!(cg.cpu_quota(), Some(0.5));
        assert_eq!(cg.memory_limit(), Some(300 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn threads_follow_the_mask_and_the_quota() {
        let f = Fences {
            affinity: Some(vec![0, 1, 2, 3]),
            cpu_quota: Some(1.5),
            memory_limit: None,
        };
        assert_eq!(f.default_threads(), 2);
        let f = Fences {
            cpu_quota: Some(0.2),
            ..f
        };
        assert_eq!(f.default_threads(), 1);
        let f = Fences {
            cpu_quota: None,
            ..f
        };
        assert_eq!(f.default_threads(), 4);
    }

    #[test]
    fn the_kv_budget_is_what_the_limit_leaves() {
        let none = Fences::default();
        assert_eq!(none.kv_budget(400 << 20, 1 << 30, 1 << 20).unwrap(), None);
        let f = Fences {
            memory_limit: Some(1536 << 20),
            ..Fences::default()
        };
        // 1536 - 400 - 256 = 880 MiB left, under the 1 GiB wanted.
        assert_eq!(
            f.kv_budget(400 << 20, 1 << 30, 16 << 20).unwrap(),
            Some(880 << 20)
        );
        assert_eq!(
            f.kv_budget(400 << 20, 100 << 20, 16 << 20).unwrap(),
            Some(100 << 20)
        );
        let tight = Fences {
            memory_limit: Some(300 << 20),
            ..Fences::default()
        };
        let e = tight.kv_budget(400 << 20, 1 << 30, 16 << 20).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("300 MiB") && msg.contains("400 MiB"), "{msg}");
    }
}
