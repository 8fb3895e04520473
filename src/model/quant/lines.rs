//! Bytes that start on a cache line. The panels' vectors are 64 bytes, one
//! 512-bit load each, and a load that straddles two lines costs two. The
//! allocator only promises 16 bytes of alignment (a large block starts 16
//! bytes into its page), so panels in a `Vec<u8>` straddled on every load.

use std::ops::{Deref, DerefMut};

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

pub struct LineBytes {
    lines: Vec<Line>,
    len: usize,
}

impl LineBytes {
    /// `len` bytes of `byte`.
    pub fn filled(byte: u8, len: usize) -> LineBytes {
        LineBytes { lines: vec![Line([byte; 64]); len.div_ceil(64)], len }
    }
}

impl Deref for LineBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the lines hold at least `len` initialised bytes, and `Line`
        // is plain bytes (repr(C), no padding: 64 bytes at alignment 64).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.len) }
    }
}

impl DerefMut for LineBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_start_on_a_line_and_keep_their_length() {
        for len in [0, 1, 64, 65, 1000] {
            let mut bytes = LineBytes::filled(7, len);
            assert_eq!(bytes.len(), len);
            assert_eq!(bytes.as_ptr() as usize % 64, 0);
            assert!(bytes.iter().all(|&b| b == 7));
            if len > 0 {
                bytes[len - 1] = 9;
                assert_eq!(bytes[len - 1], 9);
            }
        }
    }
}
