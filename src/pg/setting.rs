//! Settings changed for a guarded section only.

use pgrx::prelude::*;

/// A setting changed until this guard is dropped, as `SET` inside a function with a `SET`
/// clause: the previous value comes back on drop, or with the (sub)transaction's abort on an
/// error.
pub struct TemporarySetting {
    guc_level: i32,
}

impl TemporarySetting {
    pub fn set(name: &std::ffi::CStr, value: &str) -> TemporarySetting {
        TemporarySetting::set_all(&[(name, value)])
    }

    /// Several settings under one nesting level, restored together.
    pub fn set_all(settings: &[(&std::ffi::CStr, &str)]) -> TemporarySetting {
        // SAFETY: a new GUC nesting level is opened before any change and closed in Drop (or by
        // the (sub)transaction's abort), as a function's SET clause does.
        let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
        for (name, value) in settings {
            let value = std::ffi::CString::new(*value).unwrap_or_default();
            // SAFETY: both are NUL-terminated C strings that outlive the call.
            unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
        }
        TemporarySetting { guc_level }
    }
}

impl Drop for TemporarySetting {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: closes the nesting level `set_all` opened, inside the same transaction:
            // guards are dropped in reverse order of creation, so it is the innermost level still
            // open (isCommit = false restores the values saved at that level). While unwinding
            // this is skipped: the (sub)transaction abort that follows pops the level itself.
            unsafe { pg_sys::AtEOXact_GUC(false, self.guc_level) };
        }
    }
}
