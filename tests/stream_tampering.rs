//! Stream tampering against a real server: a stream captured with pg_recvlogical from a real slot
//! is altered the ways a broker, a pipe or an attacker could, and the consumer rejects each with
//! its specific error, a non-zero status, and no output after the fault.

mod common;

use common::*;
use postgres::Client;

struct Capture {
    kek: String,
    lines: Vec<String>,
    other_slot: Vec<String>,
    earlier_session: Vec<String>,
}

fn capture(s: &Server, su: &mut Client) -> Capture {
    let kek = use_kek(s, su, &kek_line("v1", "5a"));
    su.batch_execute(
        "DROP TABLE IF EXISTS st_pay; CREATE TABLE st_pay (id int PRIMARY KEY, pan text)",
    )
    .unwrap();
    fresh_slot(su, "st_main");
    fresh_slot(su, "st_other");
    for i in 1..=4 {
        su.execute("INSERT INTO st_pay VALUES ($1, 'secret')", &[&i])
            .unwrap();
    }
    let read = |su: &mut Client, slot: &str, tag: &str| -> Vec<String> {
        let file = format!("{}/st-{tag}.stream", s.dir);
        recvlogical(s, su, slot, &file);
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let earlier_session = read(su, "st_main", "first");
    for i in 5..=8 {
        su.execute("INSERT INTO st_pay VALUES ($1, 'secret')", &[&i])
            .unwrap();
    }
    let lines = read(su, "st_main", "main");
    let other_slot = read(su, "st_other", "other");
    su.execute("SELECT pg_drop_replication_slot('st_main')", &[])
        .unwrap();
    su.execute("SELECT pg_drop_replication_slot('st_other')", &[])
        .unwrap();
    Capture {
        kek,
        lines,
        other_slot,
        earlier_session,
    }
}

/// Runs the consumer over `lines` and returns (status, changes emitted, stderr).
fn consume(
    s: &Server,
    su: &mut Client,
    kek: &str,
    lines: &[String],
    tag: &str,
) -> (i32, usize, String) {
    let file = format!("{}/st-case-{tag}.stream", s.dir);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, out, err) = decrypt(su, kek, &file);
    (code, out.lines().count(), err)
}

#[test]
fn every_kind_of_tampering_with_a_real_stream_is_rejected_with_its_own_error() {
    let s = server();
    let mut su = setup(&s);
    let cap = capture(&s, &mut su);
    let b = batch_lines(&cap.lines);
    assert!(
        b.len() >= 4,
        "one batch per transaction: {}",
        cap.lines.len()
    );
    let (code, n, err) = consume(&s, &mut su, &cap.kek, &cap.lines, "intact");
    assert_eq!((code, n), (0, 4), "{err}");

    let mut cases: Vec<(&str, Vec<String>, &str)> = Vec::new();
    let mut l = cap.lines.clone();
    let pos = l[b[1]].find("\"ciphertext\":\"").unwrap() + 40;
    let c = l[b[1]].as_bytes()[pos];
    l[b[1]].replace_range(pos..pos + 1, if c == b'a' { "b" } else { "a" });
    cases.push(("flipped bit", l, "signature does not verify"));
    let mut l = cap.lines.clone();
    l.remove(b[1]);
    cases.push((
        "dropped batch",
        l,
        "dropped, duplicated, reordered or replayed",
    ));
    let mut l = cap.lines.clone();
    l.insert(b[1] + 1, cap.lines[b[1]].clone());
    cases.push((
        "duplicated batch",
        l,
        "dropped, duplicated, reordered or replayed",
    ));
    let mut l = cap.lines.clone();
    l.swap(b[1], b[2]);
    cases.push((
        "reordered batches",
        l,
        "dropped, duplicated, reordered or replayed",
    ));
    let mut l = cap.lines.clone();
    l.extend(cap.lines.clone());
    cases.push(("replayed session", l, "starts a second time"));
    let mut l = cap.lines.clone();
    l[b[2]] = cap.other_slot[batch_lines(&cap.other_slot)[0]].clone();
    cases.push(("batch moved from another slot", l, "spliced"));
    let mut l = cap.lines.clone();
    let other_header = cap
        .other_slot
        .iter()
        .find(|x| x.contains("\"type\":\"session\""))
        .unwrap()
        .clone();
    l[b[2]] = cap.other_slot[batch_lines(&cap.other_slot)[0]].clone();
    l.insert(b[2], other_header);
    cases.push((
        "another slot's session spliced in",
        l,
        "inside another slot's stream",
    ));
    let mut l = cap.lines.clone();
    l[b[1]] = cap.earlier_session[batch_lines(&cap.earlier_session)[0]].clone();
    cases.push(("batch moved from another session", l, "spliced"));
    let mut l = cap.lines.clone();
    let half = l[b[2]].len() / 2;
    l[b[2]].truncate(half);
    cases.push(("truncated line", l, "not a vsql_vault stream line"));
    let mut l = cap.lines.clone();
    l.retain(|x| !x.contains("\"type\":\"session\""));
    cases.push(("session header removed", l, "before that session's header"));

    for (what, lines, expected) in &cases {
        let (code, emitted, err) = consume(&s, &mut su, &cap.kek, lines, &what.replace(' ', "-"));
        assert_eq!(code, 1, "{what}: status {code}, {err}");
        assert!(err.contains(expected), "{what}: {err}");
        // Changes before the fault may be emitted (they verified); never the faulty one or later.
        let first_bad = lines
            .iter()
            .zip(cap.lines.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(cap.lines.len());
        let good_batches = batch_lines(&lines[..first_bad]).len();
        assert!(
            emitted <= good_batches,
            "{what}: {emitted} changes emitted, {good_batches} batches before the fault"
        );
    }

    // Wrong key, missing key version, unknown signing key.
    let wrong = format!("{}/st-wrong.kek", s.dir);
    std::fs::write(&wrong, kek_line("v1", "77")).unwrap();
    let file = format!("{}/st-case-intact.stream", s.dir);
    let (code, out, err) = decrypt(&mut su, &wrong, &file);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("line 1"), "{err}");
    let destroyed = format!("{}/st-destroyed.kek", s.dir);
    std::fs::write(&destroyed, kek_line("v2", "5a")).unwrap();
    let (code, out, err) = decrypt(&mut su, &destroyed, &file);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("v1"), "names the missing KEK version: {err}");
    let status = std::process::Command::new(std::env::var("VSQL_VAULT_CLI").unwrap())
        .args(["decrypt", "--kek-file", &cap.kek, "--input", &file])
        .args(["--public-key", &"11".repeat(32)])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&status.stderr).contains("signature"));
}
