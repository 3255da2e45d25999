//! I/O buffers. A [`DmaBuf`] is either page-aligned heap memory owned here (aligned through
//! the element type, no `unsafe`) or foreign memory that a backend owns (SPDK DMA memory, an
//! io_uring registered buffer, a host iovec) behind the [`ForeignMemory`] trait.

use smallvec::{smallvec, SmallVec};

/// Alignment of heap buffers: enough for `O_DIRECT` on any common device.
pub const BUFFER_ALIGNMENT: usize = 4096;

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
struct Page([u8; BUFFER_ALIGNMENT]);

/// Memory owned by a backend that can be used as an I/O buffer.
pub trait ForeignMemory: Send + Sync {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Index of the buffer in the io_uring registered-buffer table, when it is registered.
    fn registered_index(&self) -> Option<u16> {
        None
    }
}

enum Storage {
    Heap(Vec<Page>),
    Foreign(Box<dyn ForeignMemory>),
    /// Memory lent for the life of one I/O (a host iovec under SPDK): no allocation per write.
    Lent(&'static mut [u8]),
}

/// One contiguous, DMA-capable buffer.
pub struct DmaBuf {
    storage: Storage,
    len: usize,
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.storage {
            Storage::Heap(_) => "heap",
            Storage::Foreign(_) => "foreign",
            Storage::Lent(_) => "lent",
        };
        write!(f, "DmaBuf({kind}, {} bytes)", self.len)
    }
}

impl DmaBuf {
    /// Zeroed, page-aligned heap buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let pages = len.div_ceil(BUFFER_ALIGNMENT);
        DmaBuf { storage: Storage::Heap(vec![Page([0; BUFFER_ALIGNMENT]); pages]), len }
    }

    /// Heap buffer holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut buffer = DmaBuf::zeroed(bytes.len());
        buffer.as_mut_slice().copy_from_slice(bytes);
        buffer
    }

    /// Wraps memory owned by a backend.
    pub fn foreign(memory: Box<dyn ForeignMemory>) -> Self {
        let len = memory.bytes().len();
        DmaBuf { storage: Storage::Foreign(memory), len }
    }

    /// Wraps memory lent for the life of one I/O. The `'static` is the lender's promise, not
    /// the memory's: the backend that made the slice (`spdk::bdev::BdevIo::host_buffers`)
    /// requires every buffer over it dropped before the I/O completes.
    pub fn lent(memory: &'static mut [u8]) -> Self {
        let len = memory.len();
        DmaBuf { storage: Storage::Lent(memory), len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(pages) => &bytemuck::cast_slice::<Page, u8>(pages)[..self.len],
            Storage::Foreign(memory) => memory.bytes(),
            Storage::Lent(memory) => memory,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(pages) => &mut bytemuck::cast_slice_mut::<Page, u8>(pages)[..self.len],
            Storage::Foreign(memory) => memory.bytes_mut(),
            Storage::Lent(memory) => memory,
        }
    }

    pub fn registered_index(&self) -> Option<u16> {
        match &self.storage {
            Storage::Heap(_) | Storage::Lent(_) => None,
            Storage::Foreign(memory) => memory.registered_index(),
        }
    }

    /// Whether the buffer's address is a multiple of `alignment`.
    pub fn is_aligned(&self, alignment: usize) -> bool {
        alignment <= 1 || (self.as_slice().as_ptr() as usize) % alignment == 0
    }
}

/// A scatter-gather list (iovec) of buffers; its length is the sum of its segments.
#[derive(Debug, Default)]
pub struct IoBuffers {
    /// One buffer inline, so the usual single-buffer operation (a host write's one iovec, an
    /// index page) costs no heap allocation for its list.
    segments: SmallVec<[DmaBuf; 1]>,
    len: usize,
}

impl IoBuffers {
    pub fn new() -> Self {
        IoBuffers::default()
    }

    pub fn single(buffer: DmaBuf) -> Self {
        let len = buffer.len();
        IoBuffers { segments: smallvec![buffer], len }
    }

    pub fn from_segments(segments: Vec<DmaBuf>) -> Self {
        let len = segments.iter().map(DmaBuf::len).sum();
        IoBuffers { segments: SmallVec::from_vec(segments), len }
    }

    pub fn push(&mut self, buffer: DmaBuf) {
        self.len += buffer.len();
        self.segments.push(buffer);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn segments(&self) -> &[DmaBuf] {
        &self.segments
    }

    pub fn segments_mut(&mut self) -> &mut [DmaBuf] {
        &mut self.segments
    }

    pub fn into_segments(self) -> Vec<DmaBuf> {
        self.segments.into_vec()
    }

    /// Copies `out.len()` bytes starting at byte `offset` of the list into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read beyond the buffers");
        let mut done = 0;
        self.walk(offset, out.len(), |segment_bytes, range| {
            out[done..done + range.len()].copy_from_slice(&segment_bytes[range.clone()]);
            done += range.len();
        });
    }

    /// Copies `data` into the list starting at byte `offset`.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write beyond the buffers");
        let mut skip = offset;
        let mut done = 0;
        for segment in self.segments_mut() {
            if done == data.len() {
                break;
            }
            let len = segment.len();
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = (len - skip).min(data.len() - done);
            segment.as_mut_slice()[skip..skip + take].copy_from_slice(&data[done..done + take]);
            done += take;
            skip = 0;
        }
    }

    /// The whole list as one vector (tests and offline tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        self.read_at(0, &mut out);
        out
    }

    /// Visits the bytes `[offset, offset + len)` of the list, one contiguous slice at a time.
    pub fn for_each_slice(&self, offset: usize, len: usize, mut visit: impl FnMut(&[u8])) {
        assert!(offset + len <= self.len, "range beyond the buffers");
        self.walk(offset, len, |bytes, range| visit(&bytes[range]));
    }

    fn walk(&self, offset: usize, len: usize, mut visit: impl FnMut(&[u8], std::ops::Range<usize>)) {
        let mut skip = offset;
        let mut left = len;
        for segment in self.segments() {
            if left == 0 {
                break;
            }
            let bytes = segment.as_slice();
            if skip >= bytes.len() {
                skip -= bytes.len();
                continue;
            }
            let take = (bytes.len() - skip).min(left);
            visit(bytes, skip..skip + take);
            left -= take;
            skip = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_page_aligned_and_zeroed() {
        let buffer = DmaBuf::zeroed(10_000);
        assert_eq!(buffer.len(), 10_000);
        assert!(buffer.is_aligned(BUFFER_ALIGNMENT));
        assert!(buffer.as_slice().iter().all(|b| *b == 0));
    }

    #[test]
    fn lists_of_zero_one_and_many_segments_agree() {
        let empty = IoBuffers::from_segments(Vec::new());
        assert!(empty.is_empty() && empty.segments().is_empty() && empty.into_segments().is_empty());
        let mut built = IoBuffers::new();
        for len in [4, 6, 2] {
            built.push(DmaBuf::zeroed(len));
            assert_eq!(built.len(), built.segments().iter().map(DmaBuf::len).sum::<usize>());
        }
        assert_eq!(built.segments().iter().map(DmaBuf::len).collect::<Vec<_>>(), [4, 6, 2]);
        let mut single = IoBuffers::from_segments(vec![DmaBuf::zeroed(8)]);
        single.write_at(3, &[1, 2, 3]);
        assert_eq!(single.segments().len(), 1);
        assert_eq!(single.to_vec(), [0, 0, 0, 1, 2, 3, 0, 0]);
        single.segments_mut()[0].as_mut_slice()[0] = 9;
        assert_eq!(single.into_segments()[0].as_slice(), &[9, 0, 0, 1, 2, 3, 0, 0]);
    }

    #[test]
    fn scatter_gather_copies_cross_segment_boundaries() {
        let mut list = IoBuffers::from_segments(vec![DmaBuf::zeroed(3), DmaBuf::zeroed(5), DmaBuf::zeroed(4)]);
        let data: Vec<u8> = (1..=12).collect();
        list.write_at(0, &data);
        assert_eq!(list.to_vec(), data);
        let mut middle = [0u8; 6];
        list.read_at(2, &mut middle);
        assert_eq!(middle, [3, 4, 5, 6, 7, 8]);
        list.write_at(7, &[0xAA, 0xBB]);
        assert_eq!(&list.to_vec()[6..10], &[7, 0xAA, 0xBB, 10]);
    }
}
