//! Handing freed heap memory back to the system after a load step.
//!
//! Building a tokenizer allocates hundreds of thousands of small strings
//! (Gemma's 262k pieces and their 515k merges) and frees most of them. glibc
//! keeps those pages for later small allocations, but the weights that come
//! next are large buffers it maps afresh, so without a trim the process holds
//! both, and peak memory counts both.

/// Return the allocator's free pages to the system, where the allocator can.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands back pages no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
