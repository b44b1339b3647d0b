//! How a column value becomes a canonical `Value` for hashing and export, and the output
//! settings pinned while text forms are made, so that a row hashes the same in every session.
//! The rules are specified in docs/audit-format.md section 2.

use crate::pg::TemporarySetting;
use pgrx::prelude::*;
use std::ffi::CStr;
use vsql_vault_core::canonical::Value;

/// The settings a text form is made under. Each one changes the output of some built-in type:
/// floats and geometric types (`extra_float_digits`), dates and times (`DateStyle`, and
/// `TimeZone` for timestamptz), `interval` (`IntervalStyle`), `bytea` inside arrays and
/// composites (`bytea_output`), `money` (`lc_monetary`), the `reg*` types (`search_path`).
/// The values are PostgreSQL's defaults (TimeZone aside, which has none), so evidence made in a
/// default session before these were pinned hashes the same.
pub const PINNED_OUTPUT_SETTINGS: [(&CStr, &str); 7] = [
    (c"DateStyle", "ISO, MDY"),
    (c"IntervalStyle", "postgres"),
    (c"extra_float_digits", "1"),
    (c"bytea_output", "hex"),
    (c"TimeZone", "UTC"),
    (c"lc_monetary", "C"),
    (c"search_path", "pg_catalog, pg_temp"),
];

/// A column value in its canonical form. Timestamps, dates, integers, booleans and bytea are
/// taken in their internal form; everything else by its output function, which the caller runs
/// under `PinnedOutput` when `pins_output` says the type needs it.
pub fn datum_value(datum: Option<pg_sys::Datum>, typid: pg_sys::Oid) -> Value {
    let Some(d) = datum else {
        return Value::Null;
    };
    // SAFETY: `d` is a non-null datum of type `typid` (the caller deformed it with the tuple's
    // own descriptor); each arm reads it as that type's representation.
    unsafe {
        match pg_sys::BuiltinOid::from_u32(typid.to_u32()) {
            Ok(pg_sys::BuiltinOid::BOOLOID) => Value::Bool(d.value() != 0),
            Ok(pg_sys::BuiltinOid::INT2OID) => Value::Int(i64::from(d.value() as i16)),
            Ok(pg_sys::BuiltinOid::INT4OID) => Value::Int(i64::from(d.value() as i32)),
            Ok(pg_sys::BuiltinOid::INT8OID) => Value::Int(d.value() as i64),
            Ok(pg_sys::BuiltinOid::OIDOID) => Value::Int(i64::from(d.value() as u32)),
            Ok(pg_sys::BuiltinOid::DATEOID) => Value::Int(i64::from(d.value() as i32)),
            Ok(pg_sys::BuiltinOid::TIMESTAMPTZOID | pg_sys::BuiltinOid::TIMESTAMPOID) => {
                Value::Timestamp(d.value() as i64)
            }
            Ok(pg_sys::BuiltinOid::BYTEAOID) => {
                Value::Bytes(<Vec<u8> as FromDatum>::from_datum(d, false).unwrap_or_default())
            }
            Ok(pg_sys::BuiltinOid::BYTEAARRAYOID) if plain_bytea_array(d) => {
                Value::Text(bytea_array_text(d))
            }
            _ => {
                let mut out = pg_sys::Oid::INVALID;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
                let p = pg_sys::OidOutputFunctionCall(out, d);
                Value::Text(CStr::from_ptr(p).to_string_lossy().into_owned())
            }
        }
    }
}

/// Whether this value is hashed through a text form that some setting could change: then the
/// text is made under `PinnedOutput`. A one-dimensional `bytea[]` (the purge log's inclusion
/// paths) never is: its text is written from the elements' bytes (`bytea_array_text`).
pub fn pins_output_of(datum: pg_sys::Datum, typid: pg_sys::Oid) -> bool {
    if typid == pg_sys::BYTEAARRAYOID {
        // SAFETY: the caller passes a non-null datum of type `typid`, a bytea[].
        return !unsafe { plain_bytea_array(datum) };
    }
    pins_output(typid)
}

/// Whether a `bytea[]` datum has no dimension or one with lower bound 1: the shapes whose
/// `array_out` text `bytea_array_text` makes (others, rare, go through `array_out`).
///
/// # Safety
///
/// `d` must be a non-null `bytea[]` datum.
unsafe fn plain_bytea_array(d: pg_sys::Datum) -> bool {
    // SAFETY: `d` is an array datum (caller's guarantee). pg_detoast_datum returns it as it is
    // when it is a plain in-line value, or a palloc'd plain copy; the header, then `ndim` dims and
    // `ndim` lower bounds follow ArrayType (ARR_DIMS / ARR_LBOUND), so for ndim = 1 the lower
    // bound is the int right after the one dimension.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *const pg_sys::ArrayType;
        match (*arr).ndim {
            0 => true,
            1 => {
                let dims = arr
                    .cast::<u8>()
                    .add(std::mem::size_of::<pg_sys::ArrayType>())
                    as *const i32;
                dims.add(1).read_unaligned() == 1
            }
            _ => false,
        }
    }
}

/// The text `array_out` makes of a `bytea[]` with no dimension or one with lower bound 1 under
/// `bytea_output = hex` (the pinned setting), written from the elements' bytes without calling
/// it: `{}`, or `{"\\x00ff",NULL,"\\x"}` (every non-NULL element starts with a backslash, so
/// array_out quotes it and doubles the backslash). The same canonical text, made faster
/// (docs/audit-format.md section 2; the test `bytea_arrays_hash_as_array_out_prints_them`).
///
/// # Safety
///
/// `d` must be a non-null `bytea[]` datum for which `plain_bytea_array` is true.
unsafe fn bytea_array_text(d: pg_sys::Datum) -> String {
    let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
    let mut nulls: *mut bool = std::ptr::null_mut();
    let mut n: i32 = 0;
    // SAFETY: `d` is a bytea[] (caller's guarantee), detoasted as above; bytea is varlena
    // (typlen -1), by reference, int-aligned, which is what deconstruct_array is told. It fills
    // `n` element datums and `n` null flags in palloc'd arrays, freed at the end; each element
    // is a bytea read through pgrx's varlena accessor (which handles short headers) before that.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        if (*arr).ndim == 0 {
            return "{}".to_owned();
        }
        pg_sys::deconstruct_array(
            arr,
            pg_sys::BYTEAOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
            &mut elems,
            &mut nulls,
            &mut n,
        );
        let n = usize::try_from(n).unwrap_or(0);
        let out = bytea_array_literal((0..n).map(|i| {
            (!*nulls.add(i))
                .then(|| <&[u8] as FromDatum>::from_datum(*elems.add(i), false).unwrap_or_default())
        }));
        pg_sys::pfree(elems.cast());
        pg_sys::pfree(nulls.cast());
        out
    }
}

/// A `bytea[]` of these elements as `array_out` prints it under `bytea_output = hex` (which is
/// also a literal `array_in` reads back): `{"\\x00ff",NULL}`. Every non-NULL element starts with
/// a backslash, so it is quoted and the backslash doubled.
fn bytea_array_literal<'a>(elements: impl Iterator<Item = Option<&'a [u8]>>) -> String {
    let mut out = String::from("{");
    let mut hex = Vec::new();
    for (i, element) in elements.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let Some(bytes) = element else {
            out.push_str("NULL");
            continue;
        };
        hex.resize(bytes.len() * 2, 0);
        // The buffer is exactly twice the input's length, so this cannot fail.
        let _ = hex::encode_to_slice(bytes, &mut hex);
        out.push_str("\"\\\\x");
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        out.push('"');
    }
    out.push('}');
    out
}

/// Whether a column of this type is hashed through a text form that some setting could change:
/// then the text is made under `PinnedOutput`.
pub fn pins_output(typid: pg_sys::Oid) -> bool {
    use pg_sys::BuiltinOid::*;
    match pg_sys::BuiltinOid::from_u32(typid.to_u32()) {
        // Hashed in their internal form, never as text.
        Ok(
            BOOLOID | INT2OID | INT4OID | INT8OID | OIDOID | DATEOID | TIMESTAMPOID
            | TIMESTAMPTZOID | BYTEAOID,
        ) => false,
        _ => !text_is_settings_free(typid, 0),
    }
}

/// Whether the output function of this type gives the same text under any settings. Unknown
/// types (an extension's, a composite) count as dependent: pinning them costs little.
fn text_is_settings_free(typid: pg_sys::Oid, depth: u32) -> bool {
    use pg_sys::BuiltinOid::*;
    if let Ok(builtin) = pg_sys::BuiltinOid::from_u32(typid.to_u32()) {
        if matches!(
            builtin,
            BOOLOID
                | INT2OID
                | INT4OID
                | INT8OID
                | OIDOID
                | TEXTOID
                | VARCHAROID
                | BPCHAROID
                | NAMEOID
                | CHAROID
                | NUMERICOID
                | JSONOID
                | JSONBOID
                | UUIDOID
                | INETOID
                | CIDROID
                | MACADDROID
                | MACADDR8OID
                | XIDOID
                | XID8OID
                | BITOID
                | VARBITOID
                | TSVECTOROID
                | TSQUERYOID
                | PG_LSNOID
                | INT2VECTOROID
                | OIDVECTOROID
                | CIDOID
                | TIDOID
                | XMLOID
                | JSONPATHOID
        ) {
            return true;
        }
    }
    if depth > 8 {
        return false;
    }
    // SAFETY: catalog lookups by type OID; each returns InvalidOid / a default for no match.
    unsafe {
        let element = pg_sys::get_element_type(typid);
        if element != pg_sys::Oid::INVALID {
            return text_is_settings_free(element, depth + 1);
        }
        let base = pg_sys::getBaseType(typid);
        if base != typid {
            return text_is_settings_free(base, depth + 1);
        }
        // An enum prints its label.
        pg_sys::get_typtype(typid) == pg_sys::TYPTYPE_ENUM as std::ffi::c_char
    }
}

/// The output settings pinned (`PINNED_OUTPUT_SETTINGS`) until dropped.
pub struct PinnedOutput {
    _settings: TemporarySetting,
}

impl PinnedOutput {
    pub fn enter() -> PinnedOutput {
        PinnedOutput {
            _settings: TemporarySetting::set_all(&PINNED_OUTPUT_SETTINGS),
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::{PinnedOutput, PINNED_OUTPUT_SETTINGS};
    use crate::pg::select_one;
    use pgrx::prelude::*;

    /// The current values of the pinned settings.
    fn output_settings() -> Vec<String> {
        PINNED_OUTPUT_SETTINGS
            .iter()
            .map(|(name, _)| {
                select_one::<String>(
                    "SELECT pg_catalog.current_setting($1)",
                    &[name.to_str().unwrap().into()],
                )
                .unwrap()
                .unwrap()
            })
            .collect()
    }

    #[pg_test]
    fn pinned_settings_come_back_after_the_pin_and_after_an_error() {
        Spi::run("SET LOCAL DateStyle = 'SQL, DMY'").unwrap();
        Spi::run("SET LOCAL TimeZone = 'Asia/Tokyo'").unwrap();
        Spi::run("SET LOCAL search_path = public").unwrap();
        let caller = output_settings();
        let pinned: Vec<String> = PINNED_OUTPUT_SETTINGS
            .iter()
            .map(|(_, value)| value.to_string())
            .collect();
        assert_ne!(caller, pinned);
        {
            let _pinned = PinnedOutput::enter();
            assert_eq!(output_settings(), pinned);
        }
        assert_eq!(output_settings(), caller);
        crate::audited_call::fail_holding(|| {
            let pinned_guard = PinnedOutput::enter();
            assert_eq!(output_settings(), pinned);
            pinned_guard
        });
        assert_eq!(output_settings(), caller);
    }
}
