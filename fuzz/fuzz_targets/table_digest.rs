//! Table digest exports as `vsql-vault digest` reads them: `digest::digest_export` over the text
//! (every line an `ExportLine`, encoded again, sorted, folded into the tree), with a bucket count
//! from the first byte. Then the properties the format rests on: the buckets' row counts add up
//! to the table's, the root and every bucket's do not depend on the lines' order, every line read
//! survives a JSON round trip, and its key and row encodings decode back to its fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsql_vault_core::digest::{self, ExportLine, KEY_DOMAIN, ROW_DOMAIN};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let buckets = u32::from(first % 17) + 1;
    let Ok(d) = digest::digest_export(text, buckets) else {
        return;
    };
    let ranges = d.ranges();
    assert_eq!(ranges.len(), buckets as usize);
    assert_eq!(ranges.iter().map(|r| r.rows).sum::<u64>(), d.rows());
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    let reversed = digest::digest_export(&lines.join("\n"), buckets).expect("same lines");
    assert_eq!(reversed.root(), d.root());
    assert_eq!(reversed.ranges(), ranges);
    for line in text.lines() {
        let Ok(parsed) = serde_json::from_str::<ExportLine>(line.trim_end_matches('\r')) else {
            continue;
        };
        let again: ExportLine =
            serde_json::from_str(&serde_json::to_string(&parsed).expect("write")).expect("read");
        assert_eq!(again, parsed);
        let (key, row) = parsed.bytes();
        assert_eq!(
            digest::decode(ROW_DOMAIN, &row).expect("row"),
            parsed.columns
        );
        let key_fields = digest::decode(KEY_DOMAIN, &key).expect("key");
        assert_eq!(&key_fields, parsed.key.as_ref().unwrap_or(&parsed.columns));
    }
});
