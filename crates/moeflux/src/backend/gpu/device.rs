//! The wgpu context every GPU kernel shares: one adapter, one device, one
//! queue, the limits read from the adapter, and blocking helpers.
//!
//! Nothing about the adapter is assumed: the largest storage binding
//! (lavapipe: 128 MiB, NVIDIA Vulkan: about 2 GiB) and the subgroup size
//! (lavapipe 8, NVIDIA 32, AMD 32/64, Apple 32) are read here, and kernels
//! and weight uploads are shaped by them.

use std::future::Future;
use std::pin::pin;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use super::GpuError;
use crate::backend::cpu::pool::ThreadPool;

/// How a workgroup reduces its threads' partial sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduce {
    /// `subgroupAdd`/`subgroupMax`, then one shared-memory slot per
    /// subgroup (needs `Features::SUBGROUP`).
    Subgroup,
    /// A tree over workgroup shared memory (every adapter).
    Shared,
}

/// How the kernels are compiled for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub reduce: Reduce,
    /// Widen f16 with `unpack2x16float` (else with integer operations).
    pub f16_native: bool,
}

impl Variant {
    /// Every variant (for the translation tests).
    pub fn all() -> [Variant; 4] {
        let v = |reduce, f16_native| Variant { reduce, f16_native };
        [
            v(Reduce::Subgroup, true),
            v(Reduce::Subgroup, false),
            v(Reduce::Shared, true),
            v(Reduce::Shared, false),
        ]
    }
}

/// What the kernels need to know of the adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuLimits {
    /// Largest storage-buffer binding, in bytes: a weight larger than this
    /// is split by rows over several buffers.
    pub max_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Most workgroups along one dispatch dimension (at least 65535).
    pub max_workgroups_per_dim: u32,
    /// Subgroup sizes the adapter may use, when it has subgroup operations.
    pub subgroup_sizes: Option<(u32, u32)>,
    /// Alignment of a dynamic offset into a uniform buffer (bytes).
    pub uniform_align: u32,
    /// Storage buffers one kernel may bind (WebGPU guarantees 8).
    pub max_storage_buffers: u32,
    /// Threads of one workgroup (WebGPU guarantees 256).
    pub max_invocations: u32,
}

/// The GPU: an adapter's device and queue, and what it supports.
#[derive(Debug)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: GpuLimits,
    /// The variant the kernels use by default: subgroups and native f16
    /// widening where available.
    pub variant: Variant,
    pub(super) kernels: super::kernels::Kernels,
    /// GPU time per kernel (see [`super::profile`]), when asked for.
    pub profiler: Option<super::profile::Profiler>,
    /// Whether naga's storage barrier orders memory across workgroups
    /// here: Vulkan (device scope in SPIR-V; tested on lavapipe and
    /// measured on an H100). Not Metal (a threadgroup barrier in MSL), and
    /// not yet DX12 (HLSL's barrier is device-scoped, but nothing here
    /// runs it) or GL. Where it does, a dispatch's last
    /// workgroup finishes its work by default (see `arrive.wgsl`: the
    /// attention spans' merge, the routing after the router product)
    /// instead of a second dispatch.
    pub device_scope_barrier: bool,
    /// `arrive.wgsl`'s counts ([`ARRIVAL_COUNTS`] words, zero between
    /// dispatches: each dispatch that counts resets what it counted).
    pub(super) arrival_counts: wgpu::Buffer,
    /// Whether the device was opened able to import host memory (Vulkan's
    /// `VK_EXT_external_memory_host`), so that experts are copied to the
    /// GPU from the host store's slots by the GPU itself (see
    /// [`super::host_memory`]).
    pub host_import: bool,
    /// The queue the GPU tier's prefetches are copied on, when the device
    /// was opened with one (see [`super::copy_queue`]; its submissions go
    /// through [`Gpu::submit_copies`]).
    pub copy: Option<Arc<Mutex<super::copy_queue::CopyQueue>>>,
    /// Held around every submission (see [`Gpu::submit`]).
    submit_lock: Mutex<()>,
}

/// Locks `m`, through a poisoning (the data guarded here stays consistent:
/// counters and handles).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one dispatch may use (attention: one per query and head; calls
/// with more merge in a dispatch of their own).
pub const ARRIVAL_COUNTS: usize = 1 << 16;

/// Preference order of adapter types: hardware first, software last.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    /// Opens the best adapter of the native backends (Vulkan, Metal, DX12;
    /// `WGPU_BACKEND` narrows them): a discrete GPU before an integrated
    /// one, a software rasterizer (lavapipe) only when nothing else exists.
    pub fn new() -> Result<Gpu, GpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let tried: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        let adapter = adapters
            .into_iter()
            .min_by_key(|a| rank(a.get_info().device_type))
            .ok_or(GpuError::NoAdapter)?;
        Gpu::from_adapter(adapter).map_err(|e| match e {
            GpuError::RequestDevice(m) => {
                GpuError::RequestDevice(format!("{m} (adapters found: {})", tried.join(", ")))
            }
            other => other,
        })
    }

    /// The process's shared device, opened on first use ([`Gpu::new`]):
    /// engines and tests share one device and its compiled pipelines.
    pub fn shared() -> Result<std::sync::Arc<Gpu>, GpuError> {
        // GpuError is not Clone: keep whether there was no adapter at all
        // and the message of any other failure.
        static SHARED: OnceLock<Result<Arc<Gpu>, Option<String>>> = OnceLock::new();
        let opened = SHARED.get_or_init(|| {
            Gpu::new().map(Arc::new).map_err(|e| match e {
                GpuError::NoAdapter => None,
                other => Some(other.to_string()),
            })
        });
        match opened {
            Ok(g) => Ok(g.clone()),
            Err(None) => Err(GpuError::NoAdapter),
            Err(Some(e)) => Err(GpuError::RequestDevice(e.clone())),
        }
    }

    /// Whether the adapter is a software rasterizer (lavapipe, llvmpipe,
    /// WARP): correct but far slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Whether the adapter's memory is the host's: an integrated GPU (wgpu
    /// names Apple silicon's so) or a software one. Its buffers then come
    /// out of the memory the host plan budgets.
    pub fn shares_host_memory(&self) -> bool {
        matches!(
            self.info.device_type,
            wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu
        )
    }

    /// Whether kernels can read experts in place from the host store's
    /// slots (see [`super::host_memory`]): the adapter shares host memory
    /// and the device imports it.
    pub fn reads_host_in_place(&self) -> bool {
        self.host_import && self.shares_host_memory()
    }

    /// Opens a device on `adapter` with every limit it offers and subgroup
    /// operations when it has them.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu, GpuError> {
        let info = adapter.get_info();
        let mut wanted = wgpu::Features::SUBGROUP;
        if std::env::var_os(super::profile::ENV).is_some() {
            wanted |= super::profile::Profiler::features();
        }
        let features = adapter.features() & wanted;
        let required_limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("moeflux"),
            required_features: features,
            required_limits: required_limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let opened = match super::host_memory::open_device(&adapter, &desc) {
            Some((d, q, copy)) => Ok(((d, q), true, copy)),
            None => block_on(adapter.request_device(&desc)).map(|d| (d, false, None)),
        };
        let ((device, queue), host_import, copy_family) =
            opened.map_err(|e| GpuError::RequestDevice(format!("{}: {e}", info.name)))?;
        let copy = copy_family
            .and_then(|f| super::copy_queue::CopyQueue::new(&device, f))
            .map(|q| Arc::new(Mutex::new(q)));
        let has_subgroups = device.features().contains(wgpu::Features::SUBGROUP);
        let limits = GpuLimits {
            max_binding: required_limits.max_storage_buffer_binding_size,
            max_buffer: required_limits.max_buffer_size,
            max_workgroups_per_dim: required_limits.max_compute_workgroups_per_dimension,
            subgroup_sizes: has_subgroups
                .then_some((info.subgroup_min_size, info.subgroup_max_size)),
            uniform_align: required_limits.min_uniform_buffer_offset_alignment.max(16),
            max_storage_buffers: required_limits.max_storage_buffers_per_shader_stage,
            max_invocations: required_limits.max_compute_invocations_per_workgroup,
        };
        let reduce = if has_subgroups {
            Reduce::Subgroup
        } else {
            Reduce::Shared
        };
        // unpack2x16float: Mesa's llvmpipe has it only with native f16.
        let f16_native = adapter
            .get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let device_scope_barrier = info.backend == wgpu::Backend::Vulkan;
        let arrival_counts = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("arrival counts"),
            size: 4 * ARRIVAL_COUNTS as u64,
            usage: wgpu::BufferUsages::STORAGE,
            // Zeroed (wgpu initialises buffers); each dispatch leaves it so.
            mapped_at_creation: false,
        });
        Ok(Gpu {
            info,
            limits,
            variant: Variant { reduce, f16_native },
            kernels: Default::default(),
            profiler: super::profile::Profiler::new(&device, &queue),
            device_scope_barrier,
            arrival_counts,
            host_import,
            copy,
            submit_lock: Mutex::new(()),
            device,
            queue,
        })
    }

    /// The variants this device can run: the integer f16 widening and the
    /// shared-memory reduction everywhere, the others where supported.
    pub fn variants(&self) -> Vec<Variant> {
        Variant::all()
            .into_iter()
            .filter(|v| {
                (v.reduce == Reduce::Shared || self.variant.reduce == Reduce::Subgroup)
                    && (!v.f16_native || self.variant.f16_native)
            })
            .collect()
    }

    /// One line naming the adapter, for notices and test logs.
    pub fn describe(&self) -> String {
        let sg = match self.limits.subgroup_sizes {
            Some((lo, hi)) if lo == hi => format!("subgroups of {lo}"),
            Some((lo, hi)) => format!("subgroups of {lo}..{hi}"),
            None => "no subgroups".into(),
        };
        let f16 = if self.variant.f16_native {
            "native f16 widening"
        } else {
            "f16 widened with integer operations"
        };
        let family = self.copy.as_deref().map(|c| lock(c).family());
        let import = match (self.host_import, family) {
            (true, Some(super::copy_queue::CopyFamily::Transfer(f))) => {
                format!(", host memory import, copy queue (family {f})")
            }
            (true, Some(super::copy_queue::CopyFamily::Shared)) => {
                ", host memory import, copy queue (shared)".to_string()
            }
            (true, None) => ", host memory import".to_string(),
            (false, _) => String::new(),
        };
        format!(
            "{} ({:?}, {:?}, driver {} {}; storage bindings up to {} MiB, {sg}, {f16}{import})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            self.limits.max_binding >> 20
        )
    }

    /// Runs `f`, turning the validation and out-of-memory errors wgpu
    /// reports for it into a [`GpuError`] instead of the default panic.
    pub fn checked<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        // Scopes are a stack: the validation scope is popped first.
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = block_on(validation.pop());
        let m = block_on(oom.pop());
        match (v, m) {
            (Some(e), _) => Err(GpuError::Wgpu(format!("{what}: {e}"))),
            (None, Some(e)) => Err(GpuError::OutOfMemory(format!("{what}: {e}"))),
            (None, None) => Ok(out),
        }
    }

    /// Submits `commands` on wgpu's queue, after the copy queue's copies up
    /// to `after` (0: none; see [`super::copy_queue`]). Every submission of
    /// the engine goes through here, under one lock: a wait staged for one
    /// submission must not be taken by another thread's (engines share the
    /// device), and in the copy queue's shared mode its submissions go to
    /// the same Vulkan queue.
    pub fn submit(
        &self,
        what: &str,
        commands: Vec<wgpu::CommandBuffer>,
        after: u64,
    ) -> Result<wgpu::SubmissionIndex, GpuError> {
        let _held = lock(&self.submit_lock);
        let copy = self.copy.as_deref().filter(|_| after > 0);
        if let Some(c) = copy {
            lock(c).stage(&self.queue, after)?;
        }
        let out = self.checked(what, || self.queue.submit(commands));
        if let Some(c) = copy {
            lock(c).unstage(&self.queue, out.is_ok());
        }
        out
    }

    /// Submits copies on the copy queue; returns the value its semaphore
    /// reaches when they are done. The buffers must live until then.
    pub fn submit_copies(&self, regions: &[super::copy_queue::Region]) -> Result<u64, GpuError> {
        let _held = lock(&self.submit_lock);
        let c = self
            .copy
            .as_deref()
            .ok_or_else(|| GpuError::Wgpu("the device has no copy queue".into()))?;
        lock(c).submit(regions)
    }

    /// Waits until all submitted work is done.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Wgpu(format!("waiting for the GPU: {e}")))
    }

    /// A storage buffer of `bytes` bytes (rounded up to whole 4-byte words,
    /// as storage bindings require), holding `data` at its start, zeros after.
    pub fn storage(&self, label: &str, data: &[u8], bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        let size = bytes.max(data.len() as u64).max(4).next_multiple_of(4);
        if size > self.limits.max_buffer {
            return Err(GpuError::TooLarge {
                what: label.into(),
                bytes: size,
                limit: self.limits.max_buffer,
            });
        }
        let buf = self.checked(label, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        self.write_padded(&buf, data)?;
        Ok(buf)
    }

    /// Queues a write of `data` to the start of `buf` (which must hold it
    /// rounded up to whole words): write_buffer needs whole words, so the
    /// tail is padded with zeros. Takes effect before the next submission.
    pub fn write_padded(&self, buf: &wgpu::Buffer, data: &[u8]) -> Result<(), GpuError> {
        self.write_padded_at(buf, 0, data)
    }

    /// [`Gpu::write_padded`] at byte `offset` (a multiple of 4) of `buf`.
    pub fn write_padded_at(
        &self,
        buf: &wgpu::Buffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), GpuError> {
        let whole = data.len() / 4 * 4;
        if !offset.is_multiple_of(4)
            || offset + (data.len() as u64).next_multiple_of(4) > buf.size()
        {
            return Err(GpuError::TooLarge {
                what: format!("a buffer write at byte {offset}"),
                bytes: data.len() as u64,
                limit: buf.size(),
            });
        }
        self.checked("writing a buffer", || {
            if whole >= PARALLEL_COPY_BYTES {
                // Large writes (experts on their way to the GPU): the copy
                // into wgpu's staging memory is split over the copy threads.
                let size = std::num::NonZeroU64::new(whole as u64);
                // `None` comes with a validation error, which `checked`
                // turns into this call's error.
                if let Some(mut view) =
                    size.and_then(|n| self.queue.write_buffer_with(buf, offset, n))
                {
                    copy_parallel(view.slice(..), &data[..whole]);
                }
            } else if whole > 0 {
                self.queue.write_buffer(buf, offset, &data[..whole]);
            }
            if whole < data.len() {
                let mut tail = [0u8; 4];
                tail[..data.len() - whole].copy_from_slice(&data[whole..]);
                self.queue.write_buffer(buf, offset + whole as u64, &tail);
            }
        })
    }

    /// A storage buffer holding `data`.
    pub fn upload_f32(&self, label: &str, data: &[f32]) -> Result<wgpu::Buffer, GpuError> {
        self.storage(label, bytemuck::cast_slice(data), 0)
    }

    /// A zeroed storage buffer of `len` f32 values.
    pub fn zeros_f32(&self, label: &str, len: usize) -> Result<wgpu::Buffer, GpuError> {
        self.storage(label, &[], 4 * len as u64)
    }

    /// A uniform buffer holding `data` (kernel parameters).
    pub fn uniform(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        let size = (data.len() as u64).next_multiple_of(16);
        let buf = self.checked(label, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut padded = data.to_vec();
        padded.resize(size as usize, 0);
        self.checked(label, || self.queue.write_buffer(&buf, 0, &padded))?;
        Ok(buf)
    }

    /// Copies the first `len` f32 values of `buf` back to the host (submits
    /// and waits: a round trip, for results and tests, not the hot path).
    pub fn read_f32(&self, buf: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, GpuError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let staging = self.readback_buffer(4 * len as u64)?;
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        self.checked("readback copy", || {
            enc.copy_buffer_to_buffer(buf, 0, &staging, 0, 4 * len as u64);
        })?;
        self.submit("readback", vec![enc.finish()], 0)?;
        self.map_f32(&staging, len)
    }

    /// A host-readable buffer of `bytes` bytes, the target of result copies
    /// (create once, reuse for every read of at most that size).
    pub fn readback_buffer(&self, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        self.checked("readback buffer", || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes.max(4).next_multiple_of(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// Waits for the submitted work, then reads the first `len` f32 values
    /// of the readback buffer `staging` (a copy into it must have been
    /// submitted).
    pub fn map_f32(&self, staging: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, GpuError> {
        self.map_f32_meanwhile(staging, len, &mut || false)
    }

    /// [`Gpu::map_f32`], calling `meanwhile` between polls of the GPU for
    /// as long as it returns true and the GPU is not done (the host's own
    /// work that fits the wait); once it returns false, the wait blocks.
    pub fn map_f32_meanwhile(
        &self,
        staging: &wgpu::Buffer,
        len: usize,
        meanwhile: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<f32>, GpuError> {
        let bytes = 4 * len as u64;
        if bytes > staging.size() {
            return Err(GpuError::TooLarge {
                what: "a readback".into(),
                bytes,
                limit: staging.size(),
            });
        }
        let (tx, rx) = mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, ..bytes, move |r| {
            // The receiver outlives the wait below; a failed send only means
            // nobody listens any more.
            let _ = tx.send(r);
        });
        let never = || GpuError::Wgpu("readback: the map callback never ran".into());
        let mapped = loop {
            if !meanwhile() {
                self.wait()?;
                break rx.recv().map_err(|_| never())?;
            }
            self.device
                .poll(wgpu::PollType::Poll)
                .map_err(|e| GpuError::Wgpu(format!("polling the GPU: {e}")))?;
            match rx.try_recv() {
                Ok(r) => break r,
                Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(mpsc::TryRecvError::Disconnected) => return Err(never()),
            }
        };
        mapped.map_err(|e| GpuError::Wgpu(format!("readback: {e}")))?;
        let view = staging
            .get_mapped_range(..bytes)
            .map_err(|e| GpuError::Wgpu(format!("readback: {e}")))?;
        // The mapping's alignment is the driver's: decode bytes, no casts.
        let out = view
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// Writes at least this long are copied into staging memory by several
/// threads.
const PARALLEL_COPY_BYTES: usize = 1 << 20;

/// Pieces a large write is cut into for the copy threads (bytes; whole
/// 64-byte lines).
const COPY_PIECE: usize = 256 << 10;

/// The threads that copy large writes into staging memory: one per logical
/// CPU up to sixteen (staging memory may sit behind the PCIe BAR, where one
/// thread's writes reach a few GB/s).
fn copier() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        ThreadPool::new(n.clamp(1, 16))
    })
}

/// Copies `src` into `dst` (the same length) on the copy threads, in
/// pieces of [`COPY_PIECE`] bytes.
fn copy_parallel(mut dst: wgpu::WriteOnly<'_, [u8]>, src: &[u8]) {
    let len = src.len().min(dst.len());
    // wgpu's write-only view is not `Send` for slices; its address is.
    let base = dst.as_raw_element_ptr().as_ptr() as usize;
    let pieces = len.div_ceil(COPY_PIECE);
    copier().run(pieces, &|i, _| {
        let at = i * COPY_PIECE;
        let n = COPY_PIECE.min(len - at);
        // SAFETY: piece i covers bytes at .. at + n ≤ len of the view,
        // which stays alive (and borrowed, so not otherwise written) until
        // `run` has returned, i.e. every piece is copied; the pieces are
        // disjoint, and the source is a separate allocation of at least
        // `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), (base as *mut u8).add(at), n) }
    });
}

/// Drives a future to completion on this thread. wgpu's native futures
/// (adapter and device requests, error scopes) are ready at once or after
/// a device poll, so a no-op waker and a yield loop are enough; no executor
/// dependency is needed.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
