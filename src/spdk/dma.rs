//! DMA-capable buffers from SPDK's allocator (`spdk_zmalloc(.., SPDK_MALLOC_DMA)`), for the
//! module's own I/O (superblocks, metadata, sort copies). Host data never goes through them:
//! host iovecs are passed on unchanged.

use std::ptr::NonNull;

use super::{ffi, Errno};

/// A zeroed, pinned, DMA-capable buffer; freed with `spdk_free` when dropped.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; SPDK's allocator (DPDK's rte_malloc)
// may allocate and free from any thread. It is not an SPDK handle tied to a thread.
unsafe impl Send for DmaBuf {}
// SAFETY: `&DmaBuf` only gives `&[u8]`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two; 0 means SPDK's default, a cache
    /// line). Requires an initialised SPDK environment. `EINVAL` for a zero length or a bad
    /// alignment, `ENOMEM` when the allocator is exhausted.
    pub fn zeroed(len: usize, align: usize) -> Result<DmaBuf, Errno> {
        if len == 0 || (align != 0 && !align.is_power_of_two()) {
            return Err(Errno::EINVAL);
        }
        // SAFETY: plain allocation call; `unused` must be NULL; the result is checked for NULL.
        let raw = unsafe {
            ffi::spdk_zmalloc(len, align, std::ptr::null_mut(), ffi::SPDK_ENV_NUMA_ID_ANY, ffi::SPDK_MALLOC_DMA)
        };
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Errno::ENOMEM)?;
        Ok(DmaBuf { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as one iovec, for an I/O submission; valid while `self` is borrowed mutably.
    pub fn iovec(&mut self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.len }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from spdk_zmalloc and is freed once.
        unsafe { ffi::spdk_free(self.ptr.as_ptr().cast()) }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({:p}, {} bytes)", self.ptr, self.len)
    }
}
