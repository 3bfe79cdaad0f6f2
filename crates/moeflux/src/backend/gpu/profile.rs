//! GPU time per kernel, from timestamps written between the dispatches of
//! a pass: on when `MOEFLUX_GPU_PROFILE` is set and the adapter can write
//! timestamps inside compute passes. Profiling waits for every submission
//! (to read its timestamps), so it slows a run down; the per-kernel times
//! are the GPU's own.

use std::collections::HashMap;
use std::sync::Mutex;

/// Timestamps one submission can hold (a pass with more dispatches is
/// profiled for its first ones only).
pub const MAX_STAMPS: u32 = 4096;

/// The environment variable that turns profiling on.
pub const ENV: &str = "MOEFLUX_GPU_PROFILE";

/// The query set and buffers of a profiled device, and the totals.
#[derive(Debug)]
pub struct Profiler {
    pub(super) queries: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) readback: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    pub(super) period: f64,
    totals: Mutex<HashMap<String, (u64, f64)>>,
}

impl Profiler {
    /// The features profiling needs.
    pub fn features() -> wgpu::Features {
        wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
    }

    /// A profiler for `device`, if the environment asks for one and the
    /// device has the features.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Option<Profiler> {
        std::env::var_os(ENV)?;
        if !device.features().contains(Self::features()) {
            return None;
        }
        let bytes = 8 * MAX_STAMPS as u64;
        Some(Profiler {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: MAX_STAMPS,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period: queue.get_timestamp_period() as f64,
            totals: Mutex::new(HashMap::new()),
        })
    }

    /// Adds the time between consecutive timestamps (`stamps[i + 1] −
    /// stamps[i]` to the kernel `names[i]`).
    pub(super) fn add(&self, names: &[String], stamps: &[u64]) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (i, name) in names.iter().enumerate() {
            let (Some(&a), Some(&b)) = (stamps.get(i), stamps.get(i + 1)) else {
                break;
            };
            let e = t.entry(name.clone()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += b.saturating_sub(a) as f64 * self.period;
        }
    }

    /// The totals so far, largest first: `(kernel, dispatches, ms)`.
    pub fn report(&self) -> Vec<(String, u64, f64)> {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = t
            .iter()
            .map(|(k, &(n, ns))| (k.clone(), n, ns / 1e6))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Forgets the totals.
    pub fn reset(&self) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
