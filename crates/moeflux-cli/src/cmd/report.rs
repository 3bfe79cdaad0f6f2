//! Printing the expert store's statistics (`--stats`).

use moeflux::experts::plan::fmt_bytes;
use moeflux::experts::StoreStats;

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The `key  N kB` line of a `/proc` file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Anonymous memory of this process backed by huge pages
/// (`AnonHugePages` of `/proc/self/smaps_rollup`), in bytes: a decode
/// whose weights sit in small pages pays TLB misses on every token.
pub fn huge_page_bytes() -> Option<u64> {
    proc_kib("/proc/self/smaps_rollup", "AnonHugePages:")
}

/// The summary of a run's expert traffic; per layer too when `per_layer`.
pub fn store_report(st: &StoreStats, wall_s: f64, tokens: usize, per_layer: bool) -> String {
    use std::fmt::Write;
    let t = &st.total;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "experts: {} requests, hit rate {:.1}% ({} hits, {} prefetch hits, {} misses); {} slots, {} resident",
        t.requests(),
        100.0 * t.hit_rate(),
        t.hits,
        t.prefetch_hits,
        t.misses,
        st.slots,
        st.resident
    );
    let per_token = t.bytes_read as f64 / tokens.max(1) as f64;
    let _ = writeln!(
        s,
        "reads:   {} in {} reads ({}/token), {:.2} GB/s over the run, {:.2} GB/s per busy reader; stalled {:.1} ms/token; io {}",
        fmt_bytes(t.bytes_read),
        st.reads,
        fmt_bytes(per_token as u64),
        st.read_gbps(wall_s),
        if st.read_busy_s > 0.0 { t.bytes_read as f64 / st.read_busy_s / 1e9 } else { 0.0 },
        t.stall_ns as f64 / 1e6 / tokens.max(1) as f64,
        st.io
    );
    if t.prefetched > 0 {
        let _ = writeln!(
            s,
            "prefetch: {} read ahead, {} used ({:.1}% right), {} wasted",
            t.prefetched,
            t.prefetch_hits,
            100.0 * t.prefetch_hits as f64 / t.prefetched as f64,
            fmt_bytes(t.prefetch_wasted_bytes)
        );
    }
    if per_layer {
        for (i, l) in st.layers.iter().enumerate() {
            if l.requests() == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "  layer {i:>3}: hit {:>5.1}%  misses {:>6}  prefetched {:>6} (used {:>6})  read {:>10}  stall {:>8.1} ms",
                100.0 * l.hit_rate(),
                l.misses,
                l.prefetched,
                l.prefetch_hits,
                fmt_bytes(l.bytes_read),
                l.stall_ns as f64 / 1e6
            );
        }
    }
    s
}
