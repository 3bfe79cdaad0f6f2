//! A ring of host-visible staging buffers for large uploads (experts on
//! their way into the GPU slot arena, weights at load time).
//!
//! `Queue::write_buffer` allocates a fresh staging buffer for every write
//! and frees it once the GPU has copied it: on a streamed model that is
//! hundreds of megabytes of new mappings a token, each page faulted in and
//! zeroed by the kernel before the copy can fill it (uploads ran at 4–7
//! GB/s on an H100 whose link carries ~55). Here a few chunks are allocated
//! once and reused; wgpu keeps their memory mapped for their whole life
//! (on Vulkan, gpu-allocator maps a block when it allocates it), so
//! unmapping and re-mapping a chunk costs no page faults.
//!
//! A write is copied into the chunk being filled and remembered as a
//! pending copy; [`Staging::encode`] turns the pending copies into one
//! command buffer that [`super::Gpu::submit`] puts ahead of the
//! submission's own work, so a staged write lands before the next
//! submission, as a queue write does. Once submitted, a chunk is mapped
//! again (`map_async`) and is refilled only when the GPU is done with it.
//!
//! Ordering with queue writes: wgpu runs a submission's queued writes
//! before its command buffers, so a range written here must not be written
//! again by `Queue::write_buffer` before the next submission (nothing does:
//! staged ranges are expert slots and weights; small writes are activations
//! and parameters).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::GpuError;

/// Bytes of one chunk.
const CHUNK: u64 = 64 << 20;
/// Most chunks the ring grows to (made on first use).
const MAX_CHUNKS: usize = 4;
/// Alignment of a write's start in a chunk (wgpu maps at multiples of 8;
/// whole cache lines keep the copies fast).
const ALIGN: u64 = 64;

/// A chunk's mapping state, as the `map_async` callback leaves it.
const MAPPED: u8 = 0;
const PENDING: u8 = 1;
const FAILED: u8 = 2;

#[derive(Debug)]
struct Chunk {
    buf: wgpu::Buffer,
    /// [`MAPPED`], [`PENDING`] (submitted, waiting for the GPU) or
    /// [`FAILED`].
    state: Arc<AtomicU8>,
    /// Bytes written since the chunk was last submitted.
    used: u64,
}

/// A copy from a chunk to its destination, not yet submitted.
#[derive(Debug)]
struct PendingCopy {
    chunk: usize,
    src: u64,
    dst: wgpu::Buffer,
    dst_offset: u64,
    len: u64,
}

/// The staging ring (see the module docs).
#[derive(Debug, Default)]
pub struct Staging {
    chunks: Vec<Chunk>,
    /// The chunk being filled.
    current: usize,
    pending: Vec<PendingCopy>,
}

impl Staging {
    /// Whether copies wait for a submission.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Copies `data` (a multiple of 4 bytes) into staging memory, to land
    /// at `offset` of `dst` with the next submission. `submit_now` is
    /// called with the pending copies' commands when every chunk is full
    /// (it must submit them); `wait` must drive the device until mapped
    /// chunks report back.
    pub fn write(
        &mut self,
        device: &wgpu::Device,
        dst: &wgpu::Buffer,
        offset: u64,
        data: &[u8],
        mut submit_now: impl FnMut(wgpu::CommandBuffer) -> Result<(), GpuError>,
        wait: impl Fn() -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let mut done = 0usize;
        while done < data.len() {
            let i = self.room(device, &mut submit_now, &wait)?;
            let c = &mut self.chunks[i];
            let take = ((data.len() - done) as u64).min(CHUNK - c.used);
            let piece = &data[done..done + take as usize];
            let mut view = c
                .buf
                .get_mapped_range_mut(c.used..c.used + take)
                .map_err(|e| GpuError::Wgpu(format!("staging: {e}")))?;
            super::device::copy_parallel(view.slice(..), piece);
            drop(view);
            self.pending.push(PendingCopy {
                chunk: i,
                src: c.used,
                dst: dst.clone(),
                dst_offset: offset + done as u64,
                len: take,
            });
            c.used = (c.used + take).next_multiple_of(ALIGN);
            done += take as usize;
        }
        Ok(())
    }

    /// The index of a mapped chunk with room left: the current one, else
    /// the next (made, or waited for, or — when it still holds unsubmitted
    /// copies — submitted first).
    fn room(
        &mut self,
        device: &wgpu::Device,
        submit_now: &mut impl FnMut(wgpu::CommandBuffer) -> Result<(), GpuError>,
        wait: &impl Fn() -> Result<(), GpuError>,
    ) -> Result<usize, GpuError> {
        if let Some(c) = self.chunks.get(self.current) {
            if c.state.load(Ordering::Acquire) == MAPPED && c.used < CHUNK {
                return Ok(self.current);
            }
        }
        if !self.chunks.is_empty() {
            self.current = (self.current + 1) % MAX_CHUNKS;
        }
        if self.current == self.chunks.len() {
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("staging"),
                size: CHUNK,
                usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            });
            self.chunks.push(Chunk {
                buf,
                state: Arc::new(AtomicU8::new(MAPPED)),
                used: 0,
            });
            return Ok(self.current);
        }
        if self.pending.iter().any(|p| p.chunk == self.current) {
            // Every chunk is full: the oldest goes to the GPU now.
            let commands = self.encode(device);
            submit_now(commands)?;
            self.submitted();
        }
        let c = &self.chunks[self.current];
        while c.state.load(Ordering::Acquire) == PENDING {
            wait()?;
        }
        if c.state.load(Ordering::Acquire) == FAILED {
            return Err(GpuError::Wgpu("mapping a staging buffer failed".into()));
        }
        Ok(self.current)
    }

    /// The pending copies as one command buffer, their chunks unmapped
    /// (call [`Staging::submitted`] once it is submitted).
    pub fn encode(&mut self, device: &wgpu::Device) -> wgpu::CommandBuffer {
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("staged writes"),
        });
        for p in &self.pending {
            enc.copy_buffer_to_buffer(
                &self.chunks[p.chunk].buf,
                p.src,
                &p.dst,
                p.dst_offset,
                p.len,
            );
        }
        for (i, c) in self.chunks.iter().enumerate() {
            if self.pending.iter().any(|p| p.chunk == i) {
                c.buf.unmap();
            }
        }
        enc.finish()
    }

    /// After the submission of [`Staging::encode`]'s commands: the chunks
    /// they read are mapped again once the GPU is done with them.
    pub fn submitted(&mut self) {
        for (i, c) in self.chunks.iter_mut().enumerate() {
            if !self.pending.iter().any(|p| p.chunk == i) {
                continue;
            }
            c.used = 0;
            c.state.store(PENDING, Ordering::Release);
            let state = c.state.clone();
            c.buf.map_async(wgpu::MapMode::Write, .., move |r| {
                state.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
            });
        }
        self.pending.clear();
    }
}
