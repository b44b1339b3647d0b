//! The tool's command line as an auditor meets it: help and version exit 0, usage errors exit 2.

use std::process::Command;

fn vsql_vault(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vsql-vault"))
        .args(args)
        .output()
        .expect("run vsql-vault");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version_exit_zero_on_the_tool_and_every_command() {
    for args in [
        vec!["--help"],
        vec!["--version"],
        vec!["verify", "--help"],
        vec!["verify", "--version"],
        vec!["verify-purge", "--help"],
        vec!["verify-purge", "--version"],
        vec!["verify-report", "--help"],
        vec!["verify-report", "--version"],
        vec!["decrypt", "--help"],
        vec!["decrypt", "--version"],
        vec!["apply", "--help"],
        vec!["apply", "--version"],
    ] {
        let (code, out, err) = vsql_vault(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!out.is_empty(), "{args:?} printed nothing");
    }
    let (_, out, _) = vsql_vault(&["--version"]);
    assert_eq!(
        out.trim(),
        format!("vsql-vault {}", env!("CARGO_PKG_VERSION"))
    );
    let (_, out, _) = vsql_vault(&["verify", "--help"]);
    for option in [
        "--export",
        "--checkpoints",
        "--public-key",
        "--partial",
        "--table",
    ] {
        assert!(out.contains(option), "verify --help lacks {option}: {out}");
    }
}

#[test]
fn usage_errors_exit_two_and_say_what_is_missing() {
    let (code, _, err) = vsql_vault(&[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = vsql_vault(&["verify", "--export", "x.jsonl"]);
    assert_eq!(code, 2);
    assert!(err.contains("--public-key"), "{err}");
    let (code, _, err) = vsql_vault(&["decrypt", "--public-key", "00"]);
    assert_eq!(code, 2);
    assert!(err.contains("--kek-file"), "{err}");
    let (code, _, err) = vsql_vault(&["apply"]);
    assert_eq!(code, 2);
    assert!(err.contains("--target"), "{err}");
    let (code, _, err) = vsql_vault(&["apply", "--target", "x", "--kek-file", "k"]);
    assert_eq!(code, 2);
    assert!(err.contains("--public-key"), "{err}");
    let (code, _, err) = vsql_vault(&["frobnicate"]);
    assert_eq!(code, 2, "{err}");
    // An input error (a file that is not there) is 2 as well, not a verdict.
    let (code, _, err) = vsql_vault(&[
        "verify",
        "--export",
        "/nonexistent/export.jsonl",
        "--public-key",
        &"11".repeat(32),
    ]);
    assert_eq!(code, 2, "{err}");
}
