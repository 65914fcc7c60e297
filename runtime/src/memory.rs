//! How much memory this process may still take, read before a model is allocated so that
//! a model too large for the machine is an error with its sizes, not an abort, a swap
//! storm or the OOM killer.
//!
//! The answer is the smallest of: the kernel's `MemAvailable` (`/proc/meminfo`), what the
//! process's cgroups still allow (v2 `memory.max - memory.current` of its cgroup and every
//! parent; v1 `memory.limit_in_bytes - memory.usage_in_bytes`), and `TFC_MEMORY_LIMIT`
//! (bytes) when set, which lets a user or a test pretend the machine is smaller. The C
//! half of every library (`support.c`) reads the same sources the same way.

use std::path::{Path, PathBuf};

/// Bytes this process may still allocate, and where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// What each cgroup limit over this process still allows, with the file that sets it.
fn cgroup_limits() -> Vec<(u64, PathBuf)> {
    let mut limits = Vec::new();
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return limits };
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let room = |dir: &Path, limit: &str, current: &str| {
            let (max, cur) = (read_u64(&dir.join(limit))?, read_u64(&dir.join(current))?);
            Some((max.saturating_sub(cur), dir.join(limit)))
        };
        if controllers.is_empty() {
            // v2: the process's cgroup and each parent up to the root.
            let mut dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            loop {
                limits.extend(room(&dir, "memory.max", "memory.current"));
                if !dir.pop() || !dir.starts_with("/sys/fs/cgroup") {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            // v1 says "no limit" with a number near 2^63.
            let limited = read_u64(&dir.join("memory.limit_in_bytes")).is_some_and(|m| m < 1 << 62);
            if limited {
                limits.extend(room(&dir, "memory.limit_in_bytes", "memory.usage_in_bytes"));
            }
        }
    }
    limits
}

/// How much memory this process may still take; `None` where nothing can be read (then
/// nothing is refused).
pub fn available() -> Option<Available> {
    let mut found: Vec<(u64, String)> = Vec::new();
    found.extend(mem_available().map(|b| (b, "MemAvailable in /proc/meminfo".to_string())));
    found
        .extend(cgroup_limits().into_iter().map(|(b, at)| (b, format!("the cgroup limit {}", at.display()))));
    found.extend(
        std::env::var("TFC_MEMORY_LIMIT")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(|b| (b, "TFC_MEMORY_LIMIT".to_string())),
    );
    found.into_iter().min_by_key(|(b, _)| *b).map(|(bytes, source)| Available { bytes, source })
}

/// Bytes for people: `140.7 TB`, `8.2 kB`, `512 B` (powers of 1000).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut x = bytes as f64 / 1000.0;
    let mut unit = 0;
    while x >= 1000.0 && unit + 1 < UNITS.len() {
        x /= 1000.0;
        unit += 1;
    }
    format!("{x:.1} {}", UNITS[unit])
}

/// What running a model takes, part by part, to compare with [`available`].
#[derive(Clone, Debug, Default)]
pub struct Needs {
    /// Weights in memory the caller or the session holds.
    pub weights: u64,
    /// The KV cache.
    pub cache: u64,
    /// Everything else a context allocates: the arena of intermediate values and the
    /// library's re-packed weight copies.
    pub scratch: u64,
}

impl Needs {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.cache).saturating_add(self.scratch)
    }

    /// `Err` with every figure and what to change when the machine has too little.
    pub fn check(&self, model: &str, what_weights: &str, max_seq: usize) -> Result<(), String> {
        let Some(a) = available() else { return Ok(()) };
        if self.total() <= a.bytes {
            return Ok(());
        }
        let per_position = self.cache / (max_seq.max(1) as u64);
        Err(format!(
            "`{model}` needs {} of memory, but this process may take {} ({}): weights {} ({what_weights}), \
             KV cache {} ({} per position × max_seq {max_seq}), scratch {}. Lower max_seq in the spec, \
             store the weights in fewer bits (--dtype bf16 or q8), or run a smaller model",
            human(self.total()),
            human(a.bytes),
            a.source,
            human(self.weights),
            human(self.cache),
            human(per_position),
            human(self.scratch),
        ))
    }
}
