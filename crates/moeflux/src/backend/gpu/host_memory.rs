//! Host memory the GPU copies from by itself: the expert store's slot
//! arena, imported into Vulkan (`VK_EXT_external_memory_host`) as buffers
//! that a copy command reads.
//!
//! Why: on a discrete GPU, wgpu's staging memory for `Queue::write_buffer`
//! is device memory mapped through the PCIe BAR, so bringing an expert in
//! meant the CPU writing every byte across the bus — ~25 GB/s from 16
//! threads on an H100 host, where the GPU's own copies from pinned host
//! memory can reach the link's ~55 GB/s (~35–40 GB/s measured in a decode
//! step, between the layers' compute), with no CPU work at all. An
//! imported arena makes a host-resident expert one copy command from its
//! host slot to its GPU slot.
//!
//! Where it does not apply (Metal and DX12, a Vulkan driver without the
//! extension, an import the driver refuses), experts go through
//! `write_buffer` as before; the bytes that land are the same.
//!
//! On an adapter whose memory is the host's (an integrated GPU, lavapipe)
//! a copy would only duplicate bytes within the same RAM: there the
//! pieces are imported as storage buffers too, small enough to bind
//! whole, and the product kernels read experts where the store's reader
//! threads put them ([`HostMemory::in_place`]; `GpuExperts` decides).

use std::ffi::c_void;
use std::sync::Arc;

use wgpu::hal::api::Vulkan;
use wgpu::hal::vulkan as hv;

use super::copy_queue::{self, CopyFamily};
use super::device::lock;
use super::device::Gpu;
use super::matrix::MAX_PART_BYTES;
use crate::experts::arena::Arena;

use ash::vk;

/// The extension, and the handle type of an imported host allocation.
const EXTENSION: &std::ffi::CStr = ash::ext::external_memory_host::NAME;
const HANDLE: vk::ExternalMemoryHandleTypeFlags =
    vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;

/// Bytes of host memory imported as one buffer at most (a whole number of
/// slots): large enough that a model needs few, small enough that a
/// driver limit on one import is unlikely to bite.
const CHUNK_BYTES: usize = 1 << 30;

/// Queue priorities of the copy queue's family (one queue).
static COPY_PRIORITY: [f32; 1] = [1.0];

/// Opens a device on `adapter` as `request_device` would, with
/// `VK_EXT_external_memory_host` enabled besides, when the adapter is a
/// Vulkan one that has it, and with a queue of a transfer-only family for
/// [`copy_queue`] where [`copy_queue::choose_family`] picks one (returned).
/// `None` otherwise, or when opening it that way fails (the caller then
/// opens it the usual way). `MOEFLUX_GPU_HOST_IMPORT=0` turns it off.
pub fn open_device(
    adapter: &wgpu::Adapter,
    desc: &wgpu::DeviceDescriptor<'_>,
) -> Option<(wgpu::Device, wgpu::Queue, Option<CopyFamily>)> {
    if std::env::var("MOEFLUX_GPU_HOST_IMPORT").is_ok_and(|v| v == "0") {
        return None;
    }
    // SAFETY: the hal adapter is only used to open a device here, while
    // the wgpu adapter it came from is alive; nothing is destroyed.
    let hal = unsafe { adapter.as_hal::<Vulkan>() }?;
    if !hal
        .physical_device_capabilities()
        .supports_extension(EXTENSION)
    {
        return None;
    }
    let instance = hal.shared_instance();
    let copy = copy_queue::choose_family(
        instance.raw_instance(),
        instance.instance_api_version(),
        hal.raw_physical_device(),
    );
    // With the copy queue's family, or (if the driver refuses that) without.
    let tries = if copy.is_some() {
        vec![copy, None]
    } else {
        vec![None]
    };
    let open = tries.into_iter().find_map(|copy| {
        let add: Box<hv::CreateDeviceCallback<'_>> = Box::new(move |args| {
            args.extensions.push(EXTENSION);
            if let Some(CopyFamily::Transfer(f)) = copy {
                args.queue_create_infos.push(
                    vk::DeviceQueueCreateInfo::default()
                        .queue_family_index(f)
                        .queue_priorities(&COPY_PRIORITY),
                );
            }
        });
        // SAFETY: the callback only adds an extension the physical device
        // supports (checked above) and a queue of a family it has (found
        // by `choose_family`, another than wgpu's); features and limits
        // are those wgpu's own `request_device` would ask for, from the
        // same descriptor.
        let open = unsafe {
            hal.open_with_callback(
                desc.required_features,
                &desc.required_limits,
                &desc.memory_hints,
                Some(add),
            )
        };
        open.ok().map(|o| (o, copy))
    });
    let (open, copy) = open?;
    drop(hal);
    // SAFETY: `open` was made from this adapter's hal adapter, with the
    // descriptor's features.
    let (device, queue) = unsafe { adapter.create_device_from_hal(open, desc) }.ok()?;
    Some((device, queue, copy))
}

/// The expert store's arena as buffers a copy command reads (and, on an
/// adapter that shares host memory, that kernels bind).
pub struct HostMemory {
    /// Imported pieces, in order: `(offset in the arena, length, buffer)`.
    /// Together they cover the arena from 0 up to some length (a piece the
    /// driver refuses ends the list; bytes past it are written as before).
    chunks: Vec<(usize, usize, wgpu::Buffer)>,
    /// Whether the pieces are storage buffers that fit one binding, so a
    /// kernel reads the experts in them where they lie.
    storage: bool,
    /// To wait for copies still in flight before the import goes.
    device: wgpu::Device,
    /// The arena: kept allocated while the buffers import it.
    arena: Arc<Arena>,
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let imported: usize = self.chunks.iter().map(|c| c.1).sum();
        f.debug_struct("HostMemory")
            .field("bytes", &self.arena.region().1)
            .field("imported", &imported)
            .finish()
    }
}

impl HostMemory {
    /// Imports `arena` into `gpu`'s device, in pieces of whole slots: with
    /// `storage` asked for, as storage buffers of at most one binding each
    /// where the adapter shares host memory and a slot fits a binding, else
    /// as copy sources of up to `CHUNK_BYTES` (the usage a driver is
    /// likeliest to accept). `None` when the device was not opened for it
    /// or the driver takes none of it.
    pub fn import(gpu: &Gpu, arena: Arc<Arena>, storage: bool) -> Option<HostMemory> {
        if !gpu.host_import {
            return None;
        }
        let (ptr, len) = arena.region();
        let slot = arena.slot_bytes().max(1);
        // Imports start and end on the driver's alignment (a page on
        // NVIDIA and Mesa); slots are page-aligned, so this holds there.
        let align = import_alignment(gpu)?;
        if !(ptr as usize).is_multiple_of(align) || !slot.is_multiple_of(align) {
            return None;
        }
        // Byte offsets in a kernel are u32 (`MAX_PART_BYTES`), and the
        // whole piece is bound.
        let binding = gpu
            .limits
            .max_binding
            .min(gpu.limits.max_buffer)
            .min(MAX_PART_BYTES);
        let binding = usize::try_from(binding).unwrap_or(usize::MAX);
        let storage = storage && gpu.shares_host_memory() && slot <= binding;
        let most = if storage {
            CHUNK_BYTES.min(binding)
        } else {
            CHUNK_BYTES
        };
        let chunk = (most / slot).max(1) * slot;
        let mut chunks = Vec::new();
        for at in (0..len).step_by(chunk) {
            let n = chunk.min(len - at);
            // SAFETY: `ptr + at .. + n` lies inside the arena, which `arena`
            // keeps allocated for as long as the buffer exists (it is
            // dropped after `chunks`); see `import_range` for the rest.
            match unsafe { import_range(gpu, ptr.wrapping_add(at), n, storage) } {
                Some(b) => chunks.push((at, n, b)),
                None => break,
            }
        }
        if chunks.is_empty() {
            return None;
        }
        Some(HostMemory {
            chunks,
            storage,
            device: gpu.device.clone(),
            arena,
        })
    }

    /// Whether kernels may read experts in the imported pieces where they
    /// lie ([`HostMemory::in_place`]).
    pub fn storage(&self) -> bool {
        self.storage
    }

    /// Piece `i`'s buffer.
    pub fn chunk(&self, i: usize) -> &wgpu::Buffer {
        &self.chunks[i].2
    }

    /// Where a kernel reads `arrays` (slices of the arena, one expert's):
    /// the piece holding them all and each one's byte offset in it. `None`
    /// when the pieces are not storage buffers, the arrays are not all in
    /// one piece, or one does not start on a word (the kernels address
    /// words; a partial last word is read from the piece, past the array).
    pub fn in_place(&self, arrays: &[&[u8]]) -> Option<(usize, Vec<u64>)> {
        if !self.storage {
            return None;
        }
        let mut chunk = None;
        let mut offsets = Vec::with_capacity(arrays.len());
        for a in arrays {
            let (i, at) = self.find(a)?;
            if chunk.is_some_and(|c| c != i) || !at.is_multiple_of(4) {
                return None;
            }
            chunk = Some(i);
            offsets.push(at);
        }
        Some((chunk?, offsets))
    }

    /// The buffer holding `bytes` (a slice of the arena) and their offset
    /// in it; `None` when they are not in an imported piece (or straddle
    /// two).
    pub fn locate(&self, bytes: &[u8]) -> Option<(&wgpu::Buffer, u64)> {
        self.find(bytes).map(|(i, at)| (self.chunk(i), at))
    }

    /// The piece holding `bytes` and their offset in it.
    fn find(&self, bytes: &[u8]) -> Option<(usize, u64)> {
        let (base, len) = self.arena.region();
        let start = (bytes.as_ptr() as usize).checked_sub(base as usize)?;
        let end = start.checked_add(bytes.len())?;
        if end > len {
            return None;
        }
        self.chunks
            .iter()
            .position(|(at, n, _)| start >= *at && end <= at + n)
            .map(|i| (i, (start - self.chunks[i].0) as u64))
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // A copy from the arena may still be in flight (its host slot goes
        // back to the store at the next settle, see `GpuExperts`): wait for
        // the GPU, then destroy the imports while the arena is certainly
        // still allocated. (This waits for wgpu's queue only; copies on the
        // copy queue were waited for by the arena that made them.)
        let waited = self.device.poll(wgpu::PollType::wait_indefinitely());
        for (_, _, b) in &self.chunks {
            b.destroy();
        }
        if waited.is_err() {
            // A lost device may destroy the imports only later: leak the
            // arena rather than free memory they still name.
            std::mem::forget(self.arena.clone());
        }
    }
}

/// The alignment an imported host pointer and size need
/// (`minImportedHostPointerAlignment`); `None` off Vulkan.
fn import_alignment(gpu: &Gpu) -> Option<usize> {
    // SAFETY: only reads the physical device's properties.
    let hal = unsafe { gpu.device.as_hal::<Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
    let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut host);
    // SAFETY: a live instance and one of its physical devices, which has
    // the extension (the device was opened with it).
    unsafe { instance.get_physical_device_properties2(hal.raw_physical_device(), &mut props) };
    usize::try_from(host.min_imported_host_pointer_alignment)
        .ok()
        .filter(|a| a.is_power_of_two())
}

/// Imports `len` bytes of host memory from `ptr` as a copy-source buffer,
/// and with `storage` a storage buffer too.
///
/// # Safety
/// `ptr .. ptr + len` must stay allocated (and not be unmapped or
/// remapped) until the returned buffer is destroyed; `ptr` and `len` must
/// be multiples of [`import_alignment`].
unsafe fn import_range(
    gpu: &Gpu,
    ptr: *const u8,
    len: usize,
    storage: bool,
) -> Option<wgpu::Buffer> {
    // SAFETY: the hal device is used only to create a buffer and its
    // memory on it, which wgpu then owns (`from_raw_managed`).
    let hal = unsafe { gpu.device.as_hal::<Vulkan>() }?;
    let raw = hal.raw_device();
    let instance = hal.shared_instance().raw_instance();
    let ext = ash::ext::external_memory_host::Device::new(instance, raw);
    let mut props = vk::MemoryHostPointerPropertiesEXT::default();
    // SAFETY: a valid device that has the extension (`gpu.host_import`),
    // and a pointer to live host memory (the caller's contract).
    let r = unsafe {
        (ext.fp().get_memory_host_pointer_properties_ext)(
            raw.handle(),
            HANDLE,
            ptr as *const c_void,
            &mut props,
        )
    };
    if r != vk::Result::SUCCESS || props.memory_type_bits == 0 {
        return None;
    }
    // SAFETY: plain Vulkan object creation on a live device; the buffer and
    // memory are destroyed on the failure paths below, or handed to wgpu
    // (which frees both when the wgpu buffer is destroyed). Were wgpu to
    // refuse the hal buffer, it would drop it without destroying it: a
    // leak of the handles and the pin, never a use of freed memory, since
    // nothing can then copy from it.
    unsafe {
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(HANDLE);
        // The copy queue reads it too (another family: concurrent).
        let families = match &gpu.copy {
            Some(c) => lock(c).families().to_vec(),
            None => Vec::new(),
        };
        let usage = if storage {
            vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::STORAGE_BUFFER
        } else {
            vk::BufferUsageFlags::TRANSFER_SRC
        };
        let info = vk::BufferCreateInfo::default()
            .size(len as u64)
            .usage(usage);
        let info = if families.len() > 1 {
            info.sharing_mode(vk::SharingMode::CONCURRENT)
                .queue_family_indices(&families)
        } else {
            info.sharing_mode(vk::SharingMode::EXCLUSIVE)
        };
        let info = info.push_next(&mut external);
        let buffer = raw.create_buffer(&info, None).ok()?;
        let need = raw.get_buffer_memory_requirements(buffer);
        if need.size > len as u64 {
            raw.destroy_buffer(buffer, None);
            return None;
        }
        let types = instance.get_physical_device_memory_properties(hal.raw_physical_device());
        let bits = need.memory_type_bits & props.memory_type_bits;
        // Host-coherent memory: the store's reader threads write the slots
        // with plain stores, and nothing flushes them.
        let coherent = vk::MemoryPropertyFlags::HOST_COHERENT;
        let Some(index) = (0..types.memory_type_count).find(|&i| {
            bits & (1 << i) != 0
                && types.memory_types[i as usize]
                    .property_flags
                    .contains(coherent)
        }) else {
            raw.destroy_buffer(buffer, None);
            return None;
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(HANDLE)
            .host_pointer(ptr as *mut c_void);
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(len as u64)
            .memory_type_index(index)
            .push_next(&mut import);
        let Ok(memory) = raw.allocate_memory(&alloc, None) else {
            raw.destroy_buffer(buffer, None);
            return None;
        };
        if raw.bind_buffer_memory(buffer, memory, 0).is_err() {
            raw.destroy_buffer(buffer, None);
            raw.free_memory(memory, None);
            return None;
        }
        let hal_buffer = hv::Buffer::from_raw_managed(buffer, memory, 0, len as u64);
        drop(hal);
        let desc = wgpu::BufferDescriptor {
            label: Some("host expert arena"),
            size: len as u64,
            usage: if storage {
                wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::STORAGE
            } else {
                wgpu::BufferUsages::COPY_SRC
            },
            mapped_at_creation: false,
        };
        // Contents are the host's: wgpu must not zero them (a buffer from
        // hal counts as initialised).
        gpu.checked("importing host memory", || {
            gpu.device
                .create_buffer_from_hal::<Vulkan>(hal_buffer, &desc)
        })
        .ok()
    }
}
