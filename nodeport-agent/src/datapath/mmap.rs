//! BPF array maps accessed through a memory mapping (maps created with BPF_F_MMAPABLE).
//!
//! Writing a Maglev table this way is one memory copy instead of one syscall per slot. The
//! kernel lays elements out `round_up(value_size, 8)` bytes apart. A reader in the datapath may
//! see an element mid-write; callers only write elements no packet can reach yet (a fresh
//! Maglev block, a fresh backend id) or that are being retired, and the following map update
//! syscall orders the writes before the switch.
//!
//! Mapping an array maps all of it at once (the kernel inserts every page at mmap time), so
//! each mapping counts the array's full size in the agent's RSS. A second user of the same
//! array (the metrics sampler) takes a [`MmapArray::share`] of the one mapping rather than
//! mapping it again: at 20,000 Services a second mapping of the Maglev and backend arrays
//! cost 272 MiB.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::Arc,
};

use aya::maps::MapData;
use bytemuck::Pod;

pub struct MmapArray<T: Pod> {
    mapping: Arc<Mapping>,
    entries: u32,
    stride: usize,
    _values: PhantomData<T>,
}

/// One mapping of a map, unmapped when its last [`MmapArray`] goes.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Keeps the map's fd (and so the map) for as long as the mapping is used.
    map: MapData,
}

// SAFETY: the mapping is plain shared memory (the kernel's datapath writes it concurrently
// anyway); elements are only read and written by value through raw pointers, never through
// references, so handles on other threads cannot break Rust's aliasing rules.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

impl<T: Pod> MmapArray<T> {
    /// Maps an array of `entries` elements (its max_entries).
    pub fn new(map: MapData, entries: u32) -> io::Result<Self> {
        let stride = size_of::<T>().div_ceil(8) * 8;
        let len = (entries as usize * stride).div_ceil(page_size()) * page_size();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF array fd, shared, for the size the kernel allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            mapping: Arc::new(Mapping { base, len, map }),
            entries,
            stride,
            _values: PhantomData,
        })
    }

    /// Another handle on the same mapping (no second mmap, so no second copy in the RSS).
    pub fn share(&self) -> Self {
        Self {
            mapping: self.mapping.clone(),
            entries: self.entries,
            stride: self.stride,
            _values: PhantomData,
        }
    }

    /// Whether `other` uses the same mapping as this handle.
    pub fn shares_mapping_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.mapping, &other.mapping)
    }

    pub fn len(&self) -> u32 {
        self.entries
    }

    /// The map behind the mapping.
    pub fn map(&self) -> &MapData {
        &self.mapping.map
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn slot(&self, index: u32) -> io::Result<*mut T> {
        if index >= self.entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("index {index} beyond the array's {} entries", self.entries),
            ));
        }
        // SAFETY: index < entries, so the element lies inside the mapping.
        Ok(unsafe { self.mapping.base.as_ptr().add(index as usize * self.stride) }.cast::<T>())
    }

    pub fn get(&self, index: u32) -> io::Result<T> {
        // SAFETY: a valid element; the kernel may write concurrently, so read unaligned by value.
        Ok(unsafe { self.slot(index)?.read_unaligned() })
    }

    pub fn set(&mut self, index: u32, value: T) -> io::Result<()> {
        // SAFETY: a valid element of our writable shared mapping.
        unsafe { self.slot(index)?.write_unaligned(value) };
        Ok(())
    }

    /// Writes `values` into consecutive elements from `start`.
    pub fn set_range(&mut self, start: u32, values: &[T]) -> io::Result<()> {
        let end = u32::try_from(values.len())
            .ok()
            .and_then(|n| start.checked_add(n));
        if end.is_none_or(|end| end > self.entries) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond the array",
            ));
        }
        for (i, v) in values.iter().enumerate() {
            self.set(start + i as u32, *v)?;
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what MmapArray::new mapped, once no handle uses it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
