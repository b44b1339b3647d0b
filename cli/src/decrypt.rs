//! `vsql-vault decrypt`: reads a vsql_vault replication stream, checks every signature, tag,
//! sequence and link, prints one plaintext JSON line per change, and stops at the first fault.

use std::io::{BufRead, Write};
use vsql_vault_core::envelope::{Kek, KekRing};
use vsql_vault_core::stream::Reader;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("kek").required(true).args(["kek_file", "kek_command"])))]
pub struct Args {
    /// The key-encryption key file: `<id> <64 hex characters>` per line, owner-only.
    #[arg(long = "kek-file", value_name = "FILE")]
    kek_file: Option<String>,
    /// A KMS command run under `sh -c` with VSQL_VAULT_OP=unwrap and VSQL_VAULT_KEK_ID: wrapped key in, data key out.
    #[arg(long = "kek-command", value_name = "CMD")]
    kek_command: Option<String>,
    /// A trusted Ed25519 public key of the source, 64 hex characters; repeatable.
    #[arg(long = "public-key", value_name = "HEX", required = true)]
    public_keys: Vec<String>,
    /// The captured stream (pg_recvlogical's output); standard input when absent.
    #[arg(long = "input", value_name = "FILE")]
    input: Option<String>,
}

pub fn run(args: &Args) -> Result<bool, String> {
    let keys = crate::input::public_keys(&args.public_keys)?;
    let kek = match (&args.kek_command, &args.kek_file) {
        (Some(cmd), _) => Kek::Command(cmd.clone()),
        (None, path) => {
            let path = path.clone().unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            Kek::File(KekRing::parse(&path, &text).map_err(|e| e.to_string())?)
        }
    };
    let mut reader = Reader::new(kek, keys);
    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{p}: {e}"))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    // One write per batch, not per change (stdout alone is line-buffered); flushed after each
    // batch so a live consumer passes changes on as soon as they are verified.
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    for line in input.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        match reader.feed(&line) {
            Ok(changes) => {
                for c in changes {
                    writeln!(out, "{c}").map_err(|e| e.to_string())?;
                }
                out.flush().map_err(|e| e.to_string())?;
            }
            Err(e) => {
                eprintln!("vsql-vault decrypt: {e}");
                return Ok(false);
            }
        }
    }
    Ok(true)
}
