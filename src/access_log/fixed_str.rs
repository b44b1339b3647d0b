//! The fixed-size strings of a queued access record: shared memory has no heap, so every text
//! field has a capacity, and a longer value is cut at a character boundary, never inside one.

/// A UTF-8 string of at most `N` bytes in shared memory, cut at a character boundary.
#[derive(Copy, Clone)]
#[repr(C)]
pub struct FixedStr<const N: usize> {
    len: u16,
    present: bool,
    bytes: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub fn set(&mut self, s: Option<&str>) {
        match s {
            None => {
                self.present = false;
                self.len = 0;
            }
            Some(s) => {
                let mut end = s.len().min(N);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
                self.len = end as u16;
                self.present = true;
            }
        }
    }

    pub const fn capacity(&self) -> usize {
        N
    }

    pub fn get(&self) -> Option<String> {
        self.present
            .then(|| String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned())
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::FixedStr;
    use pgrx::prelude::*;

    #[pg_test]
    fn fixed_strings_are_cut_at_a_character_boundary() {
        let mut s = FixedStr::<5> {
            len: 0,
            present: false,
            bytes: [0; 5],
        };
        assert_eq!(s.capacity(), 5);
        assert_eq!(s.get(), None);
        s.set(Some("abcde"));
        assert_eq!(s.get().as_deref(), Some("abcde"));
        // The fifth byte is the first of 'é': the whole character goes.
        s.set(Some("abcdé"));
        assert_eq!(s.get().as_deref(), Some("abcd"));
        // A three-byte character that ends exactly at the capacity stays.
        s.set(Some("ab€€"));
        assert_eq!(s.get().as_deref(), Some("ab€"));
        s.set(Some("x"));
        assert_eq!(s.get().as_deref(), Some("x"));
        s.set(Some(""));
        assert_eq!(s.get().as_deref(), Some(""));
        s.set(None);
        assert_eq!(s.get(), None);
    }
}
