//! A second Vulkan queue for expert copies that run beside the compute:
//! a transfer-only queue family's queue, driven with raw Vulkan commands
//! and a timeline semaphore.
//!
//! Why: wgpu has one queue, and on it a copy and a compute pass take
//! turns. On an H100 a copy from imported host memory submitted on a
//! second queue of wgpu's own family also waited for the compute (4.4 +
//! 3.6 ms → 8.7 ms), while one on the transfer-only family ran beside it
//! (→ 4.5 ms; `bench/BENCHMARKS.md`, tenth GPU session). So copies that
//! are not needed by the very next dispatch — the experts the next
//! layer's router is predicted to pick ([`super::experts`]'s prefetch) —
//! go through this queue, while the GPU computes the current layer; so do
//! a layer's misses, submitted before that prefetch, which the queue then
//! copies first.
//!
//! One copy queue per device ([`Gpu`] holds it). Synchronisation, in both
//! directions:
//! - compute after copy: a wgpu submission that reads (or overwrites) a
//!   slot this queue filled waits for the copy's semaphore value — staged
//!   with wgpu-hal's `add_wait_semaphore` and submitted under the device's
//!   submission lock ([`Gpu::submit`]), so no other thread's submission
//!   takes the wait; a value one submission waited for orders every later
//!   one (wgpu chains its submissions), so it is staged once;
//! - copy after compute: this queue only fills GPU slots that no
//!   submitted compute may still read (see `GpuExperts::prefetch` and
//!   `Slot::busy`), and a
//!   host slot it reads goes back to the store once the semaphore passed
//!   the copy's value.
//!
//! Buffers both queues use are created with `VK_SHARING_MODE_CONCURRENT`
//! over the two families ([`shared_storage`], and the host arena's
//! imports), so no ownership transfer is needed.

use ash::vk;
use wgpu::hal::api::Vulkan;
use wgpu::hal::vulkan as hv;

use super::device::Gpu;
use super::GpuError;

/// Where the copy queue runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFamily {
    /// The first queue of this transfer-only family: its own engine, so
    /// copies overlap compute.
    Transfer(u32),
    /// wgpu's own queue, driven from outside wgpu: the same ordering rules
    /// and semaphores, no overlap. For tests on devices without a transfer
    /// family (lavapipe; `MOEFLUX_GPU_COPY_QUEUE=shared`).
    Shared,
}

/// Picks the copy queue's family for a physical device, or `None`:
/// `MOEFLUX_GPU_PREFETCH=0` turns it off; it needs timeline semaphores
/// (Vulkan 1.2); a transfer-only family is taken when there is one, else
/// wgpu's own queue only when `MOEFLUX_GPU_COPY_QUEUE=shared` asks for it
/// (sharing one queue, prefetches would wait for compute and delay it).
pub fn choose_family(
    instance: &ash::Instance,
    instance_version: u32,
    pd: vk::PhysicalDevice,
) -> Option<CopyFamily> {
    if std::env::var("MOEFLUX_GPU_PREFETCH").is_ok_and(|v| v == "0") {
        return None;
    }
    // The core 1.2 entry points are the ones used here (and the features
    // query below is 1.1).
    if instance_version < vk::API_VERSION_1_2 {
        return None;
    }
    // SAFETY: queries of a live instance's physical device.
    let (props, families, timeline) = unsafe {
        let props = instance.get_physical_device_properties(pd);
        let families = instance.get_physical_device_queue_family_properties(pd);
        let mut timeline = vk::PhysicalDeviceTimelineSemaphoreFeatures::default();
        let mut features = vk::PhysicalDeviceFeatures2::default().push_next(&mut timeline);
        instance.get_physical_device_features2(pd, &mut features);
        (props, families, timeline.timeline_semaphore == vk::TRUE)
    };
    // wgpu-hal enables timeline semaphores where the device has them.
    if !timeline || props.api_version < vk::API_VERSION_1_2 {
        return None;
    }
    let transfer = families.iter().position(|f| {
        f.queue_count > 0
            && f.queue_flags.contains(vk::QueueFlags::TRANSFER)
            && !f
                .queue_flags
                .intersects(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
    });
    match transfer {
        Some(f) if f != 0 => u32::try_from(f).ok().map(CopyFamily::Transfer),
        _ if std::env::var("MOEFLUX_GPU_COPY_QUEUE").is_ok_and(|v| v == "shared") => {
            Some(CopyFamily::Shared)
        }
        _ => None,
    }
}

/// One copy: `len` bytes from `src` at `src_at` to `dst` at `dst_at`.
#[derive(Clone, Debug)]
pub struct Region {
    pub src: wgpu::Buffer,
    pub src_at: u64,
    pub dst: wgpu::Buffer,
    pub dst_at: u64,
    pub len: u64,
}

/// Command buffers kept for reuse at most; a submission that finds them
/// all in flight waits for the oldest.
const RING: usize = 16;

/// The queue, its command buffers and its timeline semaphore.
pub struct CopyQueue {
    /// Keeps the Vulkan device alive (the raw handles below are its).
    _device: wgpu::Device,
    raw: ash::Device,
    queue: vk::Queue,
    family: CopyFamily,
    /// The families that share buffers with this queue: wgpu's, and the
    /// transfer family when it is another.
    families: Vec<u32>,
    pool: vk::CommandPool,
    /// Command buffers and the semaphore value their last submission
    /// signals (free once the semaphore reached it).
    ring: Vec<(vk::CommandBuffer, u64)>,
    semaphore: vk::Semaphore,
    /// The value the last submission signals (0: none yet).
    last: u64,
    /// The largest value a wgpu submission has waited for (every later
    /// one is ordered after it).
    waited: u64,
    /// A value staged on wgpu's queue and not yet known submitted.
    staged: u64,
}

impl std::fmt::Debug for CopyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyQueue")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl CopyQueue {
    /// The copy queue of a device opened with one (`family`, see
    /// `host_memory::open_device`).
    pub fn new(device: &wgpu::Device, family: CopyFamily) -> Option<CopyQueue> {
        // SAFETY: the hal device is only used to fetch its queue and create
        // objects on it, destroyed in `Drop` while `device` keeps it alive.
        let hal = unsafe { device.as_hal::<Vulkan>() }?;
        let raw = hal.raw_device().clone();
        let main = hal.queue_family_index();
        let (queue, index) = match family {
            // SAFETY: the device was created with one queue of this family
            // (`host_memory::open_device`).
            CopyFamily::Transfer(f) => (unsafe { raw.get_device_queue(f, 0) }, f),
            CopyFamily::Shared => (hal.raw_queue(), main),
        };
        let families = if index == main {
            vec![main]
        } else {
            vec![main, index]
        };
        drop(hal);
        // SAFETY: plain object creation on a live device; each is destroyed
        // on the failure path or in `Drop`.
        unsafe {
            let pool = raw
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(index)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .ok()?;
            let mut kind = vk::SemaphoreTypeCreateInfo::default()
                .semaphore_type(vk::SemaphoreType::TIMELINE)
                .initial_value(0);
            let semaphore = match raw.create_semaphore(
                &vk::SemaphoreCreateInfo::default().push_next(&mut kind),
                None,
            ) {
                Ok(s) => s,
                Err(_) => {
                    raw.destroy_command_pool(pool, None);
                    return None;
                }
            };
            Some(CopyQueue {
                _device: device.clone(),
                raw,
                queue,
                family,
                families,
                pool,
                ring: Vec::new(),
                semaphore,
                last: 0,
                waited: 0,
                staged: 0,
            })
        }
    }

    /// The semaphore value every submission so far has reached or passed.
    pub fn done(&self) -> Result<u64, GpuError> {
        // SAFETY: a timeline semaphore of this live device.
        unsafe { self.raw.get_semaphore_counter_value(self.semaphore) }
            .map_err(|e| GpuError::Wgpu(format!("reading the copy queue's progress: {e}")))
    }

    /// The value the last submission signals (0 before any).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Blocks until the copies up to `value` are done.
    pub fn wait(&self, value: u64) -> Result<(), GpuError> {
        if value == 0 {
            return Ok(());
        }
        let semaphores = [self.semaphore];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&semaphores)
            .values(&values);
        // SAFETY: a timeline semaphore of this live device.
        unsafe { self.raw.wait_semaphores(&info, u64::MAX) }
            .map_err(|e| GpuError::Wgpu(format!("waiting for the copy queue: {e}")))
    }

    /// Where the queue runs.
    pub fn family(&self) -> CopyFamily {
        self.family
    }

    /// The queue families buffers used by both queues are shared with.
    pub fn families(&self) -> &[u32] {
        &self.families
    }

    /// Stages a wait for the copies up to `value` on wgpu's next
    /// submission of `queue`, unless an earlier submission waited for as
    /// much. Even a value already reached is waited for once: the wait is
    /// what makes the copies' writes visible to that queue. The caller
    /// holds the device's submission lock until [`CopyQueue::unstage`].
    pub fn stage(&mut self, queue: &wgpu::Queue, value: u64) -> Result<(), GpuError> {
        if value <= self.waited {
            return Ok(());
        }
        // SAFETY: only stages a semaphore wait on the hal queue; the
        // semaphore outlives it (`Drop` takes back a wait never submitted).
        let hal = unsafe { queue.as_hal::<Vulkan>() }
            .ok_or_else(|| GpuError::Wgpu("the copy queue needs a Vulkan device".into()))?;
        // All commands: the gated submission may be a copy or a compute pass.
        hal.add_wait_semaphore(
            self.semaphore,
            Some(value),
            vk::PipelineStageFlags::ALL_COMMANDS,
        );
        self.staged = value;
        Ok(())
    }

    /// After the submission a wait was staged for: records it as waited
    /// for, or, when the submission failed, takes the wait back (a later
    /// submission stages it again).
    pub fn unstage(&mut self, queue: &wgpu::Queue, submitted: bool) {
        let value = std::mem::take(&mut self.staged);
        if value == 0 {
            return;
        }
        if submitted {
            self.waited = self.waited.max(value);
            return;
        }
        // SAFETY: only takes back this queue's own staged wait, if there.
        if let Some(hal) = unsafe { queue.as_hal::<Vulkan>() } {
            hal.remove_wait_semaphore(self.semaphore);
        }
    }

    /// Submits `regions`; returns the semaphore value that says they are
    /// done. The caller holds the device's submission lock (in shared mode
    /// this is wgpu's own queue) and keeps the buffers alive until then.
    pub fn submit(&mut self, regions: &[Region]) -> Result<u64, GpuError> {
        let err = |what: &str, e: vk::Result| GpuError::Wgpu(format!("copy queue: {what}: {e}"));
        let mut raw_regions = Vec::with_capacity(regions.len());
        for r in regions {
            let (src, dst) = (raw_buffer(&r.src)?, raw_buffer(&r.dst)?);
            let copy = vk::BufferCopy {
                src_offset: r.src_at,
                dst_offset: r.dst_at,
                size: r.len,
            };
            raw_regions.push((src, dst, copy));
        }
        let cb = self.command_buffer()?;
        let value = self.last + 1;
        // SAFETY: `cb` is not in flight (its last value was reached, or it
        // is new); the buffers are alive (`regions` holds them) and the
        // caller keeps them so until `value` is reached.
        let recorded = unsafe { self.record(cb, &raw_regions) };
        if let Err(e) = recorded {
            // Back to the initial state, so that it can be begun again.
            // SAFETY: not in flight (above).
            let _ = unsafe {
                self.raw
                    .reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
            };
            return Err(err("recording", e));
        }
        // SAFETY: `cb` is recorded; the semaphore is this device's.
        unsafe {
            let cbs = [cb];
            let signals = [self.semaphore];
            let values = [value];
            let mut timeline =
                vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
            let submit = vk::SubmitInfo::default()
                .command_buffers(&cbs)
                .signal_semaphores(&signals)
                .push_next(&mut timeline);
            self.raw
                .queue_submit(self.queue, &[submit], vk::Fence::null())
                .map_err(|e| err("submitting", e))?;
        }
        self.last = value;
        if let Some(slot) = self.ring.iter_mut().find(|(c, _)| *c == cb) {
            slot.1 = value;
        }
        Ok(value)
    }

    /// Records `regions` into `cb` (begun and ended here).
    ///
    /// # Safety
    /// `cb` is this queue's and not in flight; the buffers are alive.
    unsafe fn record(
        &self,
        cb: vk::CommandBuffer,
        regions: &[(vk::Buffer, vk::Buffer, vk::BufferCopy)],
    ) -> Result<(), vk::Result> {
        // SAFETY: the caller's contract.
        unsafe {
            let raw = &self.raw;
            raw.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )?;
            // Consecutive regions between the same two buffers go in one
            // command.
            let mut at = 0;
            while at < regions.len() {
                let (src, dst, _) = regions[at];
                let mut end = at + 1;
                while end < regions.len() && regions[end].0 == src && regions[end].1 == dst {
                    end += 1;
                }
                let copies: Vec<vk::BufferCopy> = regions[at..end].iter().map(|r| r.2).collect();
                raw.cmd_copy_buffer(cb, src, dst, &copies);
                at = end;
            }
            raw.end_command_buffer(cb)
        }
    }

    /// A command buffer no submission still uses: a done one from the
    /// ring, a new one while the ring has room, else the oldest once done.
    fn command_buffer(&mut self) -> Result<vk::CommandBuffer, GpuError> {
        let done = self.done()?;
        if let Some(&(cb, _)) = self.ring.iter().find(|(_, v)| *v <= done) {
            return Ok(cb);
        }
        if self.ring.len() < RING {
            // SAFETY: allocation from this queue's own pool.
            let cb = unsafe {
                self.raw.allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(self.pool)
                        .command_buffer_count(1),
                )
            }
            .map_err(|e| GpuError::Wgpu(format!("copy queue: a command buffer: {e}")))?;
            let cb = cb[0];
            self.ring.push((cb, 0));
            return Ok(cb);
        }
        let (cb, oldest) = self
            .ring
            .iter()
            .copied()
            .min_by_key(|&(_, v)| v)
            .ok_or_else(|| GpuError::Wgpu("copy queue: no command buffer".into()))?;
        self.wait(oldest)?;
        Ok(cb)
    }
}

impl Drop for CopyQueue {
    fn drop(&mut self) {
        // Nothing may be in flight when the semaphore and the command
        // buffers go, nor a wgpu submission still wait for it (the device
        // is dropped after this, and every submission that waited was
        // made before it); a failed wait (a lost device) leaks them.
        if self.wait(self.last).is_err() {
            return;
        }
        // SAFETY: every submission is done; the objects are this device's.
        unsafe {
            self.raw.destroy_command_pool(self.pool, None);
            self.raw.destroy_semaphore(self.semaphore, None);
        }
    }
}

/// Bytes of the device's largest device-local memory heap (VRAM on a
/// discrete GPU), where it is a Vulkan device.
pub fn vram_bytes(device: &wgpu::Device) -> Option<u64> {
    // SAFETY: only reads the physical device's memory properties.
    let hal = unsafe { device.as_hal::<Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    // SAFETY: a live instance and one of its physical devices.
    let props =
        unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
    props.memory_heaps[..props.memory_heap_count as usize]
        .iter()
        .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
        .map(|h| h.size)
        .max()
}

/// The Vulkan handle of a wgpu buffer.
fn raw_buffer(b: &wgpu::Buffer) -> Result<vk::Buffer, GpuError> {
    // SAFETY: the handle is only recorded into copies while `b` (held by
    // the caller's region) is alive.
    unsafe { b.as_hal::<Vulkan>().map(|h| h.raw_handle()) }
        .ok_or_else(|| GpuError::Wgpu("the copy queue needs a Vulkan buffer".into()))
}

/// A device-local storage buffer of `bytes` (a multiple of 4) that both
/// of `families`' queues may use: created with Vulkan directly, so that
/// it is `VK_SHARING_MODE_CONCURRENT` where there are two families, and
/// handed to wgpu (which then owns it and frees it). wgpu counts it as
/// initialised, so it never zero-fills what the copy queue wrote behind
/// its back.
pub fn shared_storage(
    gpu: &Gpu,
    label: &str,
    bytes: u64,
    families: &[u32],
) -> Result<wgpu::Buffer, GpuError> {
    let oom = |what: &str| GpuError::OutOfMemory(format!("{label}: {what}"));
    // SAFETY: the hal device is used to create one buffer and its memory,
    // destroyed on the failure paths or handed to wgpu (`from_raw_managed`).
    let hal = unsafe { gpu.device.as_hal::<Vulkan>() }
        .ok_or_else(|| GpuError::Wgpu(format!("{label}: not a Vulkan device")))?;
    let raw = hal.raw_device();
    let instance = hal.shared_instance().raw_instance();
    let usage = vk::BufferUsageFlags::STORAGE_BUFFER
        | vk::BufferUsageFlags::TRANSFER_DST
        | vk::BufferUsageFlags::TRANSFER_SRC;
    let info = vk::BufferCreateInfo::default().size(bytes).usage(usage);
    let info = if families.len() > 1 {
        info.sharing_mode(vk::SharingMode::CONCURRENT)
            .queue_family_indices(families)
    } else {
        info.sharing_mode(vk::SharingMode::EXCLUSIVE)
    };
    // SAFETY: plain Vulkan object creation on a live device.
    unsafe {
        let buffer = raw
            .create_buffer(&info, None)
            .map_err(|e| oom(&e.to_string()))?;
        let need = raw.get_buffer_memory_requirements(buffer);
        let types = instance.get_physical_device_memory_properties(hal.raw_physical_device());
        let local = vk::MemoryPropertyFlags::DEVICE_LOCAL;
        let visible = vk::MemoryPropertyFlags::HOST_VISIBLE;
        let fits = |i: u32| need.memory_type_bits & (1 << i) != 0;
        let flags = |i: u32| types.memory_types[i as usize].property_flags;
        // Plain VRAM first, BAR-mapped VRAM only if there is no other.
        let index = (0..types.memory_type_count)
            .find(|&i| fits(i) && flags(i).contains(local) && !flags(i).contains(visible))
            .or_else(|| {
                (0..types.memory_type_count).find(|&i| fits(i) && flags(i).contains(local))
            });
        let Some(index) = index else {
            raw.destroy_buffer(buffer, None);
            return Err(GpuError::Wgpu(format!(
                "{label}: no device-local memory type"
            )));
        };
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(need.size)
            .memory_type_index(index);
        let memory = match raw.allocate_memory(&alloc, None) {
            Ok(m) => m,
            Err(e) => {
                raw.destroy_buffer(buffer, None);
                return Err(oom(&e.to_string()));
            }
        };
        if let Err(e) = raw.bind_buffer_memory(buffer, memory, 0) {
            raw.destroy_buffer(buffer, None);
            raw.free_memory(memory, None);
            return Err(oom(&e.to_string()));
        }
        let hal_buffer = hv::Buffer::from_raw_managed(buffer, memory, 0, need.size);
        drop(hal);
        let desc = wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        };
        gpu.checked(label, || {
            gpu.device
                .create_buffer_from_hal::<Vulkan>(hal_buffer, &desc)
        })
    }
}
