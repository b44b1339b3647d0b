//! `vsql-vault decrypt`: reads a vsql_vault replication stream, checks every signature, tag,
//! sequence and link, and the continuity and source of every session (`--state` carries them from
//! one run to the next), prints one plaintext JSON line per change, and stops at the first fault.

use std::io::{BufRead, Write};
use std::sync::mpsc::{SyncSender, TryRecvError};
use vsql_vault_core::continuity::{ConsumerState, Follower};
use vsql_vault_core::shown::ChangeWriter;
use vsql_vault_core::stream::{BatchLine, FedRaw, Line, Reader, Records, SessionLine, StreamError};

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
    /// Also print a marker line per session and before each batch's changes (`"action":"S"`,
    /// `"action":"B"`), which `vsql-vault apply` needs to find transaction boundaries.
    #[arg(long = "markers")]
    markers: bool,
    /// Where this consumer keeps its source and position between runs (created owner-only,
    /// replaced atomically after every line).
    #[arg(long = "state", value_name = "FILE")]
    state: Option<String>,
    /// Refuse a stream whose session lines name another system identifier (pg_control_system()).
    #[arg(long = "expect-system-id", value_name = "ID")]
    expect_system_id: Option<String>,
    /// Refuse a stream whose session lines name another database.
    #[arg(long = "expect-database", value_name = "NAME")]
    expect_database: Option<String>,
}

fn load_state(path: &str) -> Result<ConsumerState, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => ConsumerState::parse(&text).map_err(|e| format!("{path}: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConsumerState::new()),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// Replaces the state file atomically: a temporary file (owner-only) written and synced, renamed
/// over it, and the directory synced, so a crash leaves the old state or the new one.
fn save_state(path: &str, state: &ConsumerState) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| format!("{path}: {e}");
    let target = std::path::Path::new(path);
    let tmp = format!("{path}.tmp");
    // A leftover of a crash may have other permissions: the file is always created afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(state.to_text().as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, target).map_err(fail)?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

/// What the reading thread hands the writing one, in stream order.
enum Item {
    /// A verified session line (its number).
    Session(SessionLine, usize),
    /// A verified batch (its line number).
    Batch {
        line: BatchLine,
        hash: [u8; 32],
        records: Records,
        number: usize,
    },
    /// The reader waits for this answer before it unwraps the next session's data key (as the
    /// one-thread consumer did only after every earlier line had been passed on).
    Barrier(std::sync::mpsc::Sender<()>),
    /// The stream is refused here: print it, stop, status 1.
    Refused(String),
    /// The input could not be read: status 2.
    Failed(String),
}

/// Batches verified ahead of the writer, at most (a batch holds up to 4 MiB of changes: the
/// consumer's memory stays bounded).
const AHEAD: usize = 4;

/// The reading thread: reads the stream, checks every signature, tag, sequence and link, and
/// decrypts and hashes each batch; stops at the first fault or when the writer has stopped.
fn read(mut reader: Reader, mut input: Box<dyn BufRead + Send>, to: SyncSender<Item>) {
    let mut text = String::new();
    loop {
        text.clear();
        match input.read_line(&mut text) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = to.send(Item::Failed(e.to_string()));
                return;
            }
        }
        // As BufRead::lines: without the line end.
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        if text.trim().is_empty() {
            continue;
        }
        let checked = reader.parse(&text).and_then(|line| {
            if let Line::Session(_) = line {
                let (ack, answer) = std::sync::mpsc::channel();
                if to.send(Item::Barrier(ack)).is_err() || answer.recv().is_err() {
                    return Ok(None);
                }
            }
            reader.check(line).map(Some)
        });
        let item = match checked {
            Ok(None) => return,
            Ok(Some(FedRaw::Session(s))) => Item::Session(s, reader.line_number()),
            Ok(Some(FedRaw::Batch {
                mut line,
                hash,
                records,
            })) => {
                // Checked and decrypted: the writer has no use for the ciphertext.
                line.ciphertext = String::new();
                Item::Batch {
                    line,
                    hash,
                    records,
                    number: reader.line_number(),
                }
            }
            Err(e) => Item::Refused(e.to_string()),
        };
        let last = matches!(item, Item::Refused(_));
        if to.send(item).is_err() || last {
            return;
        }
    }
}

/// The writing side's output: whole lines gathered, written to standard output when a batch is
/// complete and nothing more is ready (or the buffer is large), before anything is said on
/// standard error, and before the state file is replaced.
struct Out {
    stdout: std::io::StdoutLock<'static>,
    buf: Vec<u8>,
}

impl Out {
    fn flush(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            self.stdout
                .write_all(&self.buf)
                .map_err(|e| e.to_string())?;
            self.buf.clear();
        }
        self.stdout.flush().map_err(|e| e.to_string())
    }

    fn say(&mut self, what: std::fmt::Arguments) -> Result<(), String> {
        self.flush()?;
        eprintln!("vsql-vault decrypt: {what}");
        Ok(())
    }

    fn line(&mut self, v: &serde_json::Value) {
        let _ = serde_json::to_writer(&mut self.buf, v);
        self.buf.push(b'\n');
    }
}

pub fn run(args: &Args) -> Result<bool, String> {
    let keys = crate::input::public_keys(&args.public_keys)?;
    let kek = crate::input::kek(args.kek_file.as_deref(), args.kek_command.as_deref())?;
    let reader = Reader::new(kek, keys);
    let state = match &args.state {
        Some(path) => load_state(path)?,
        None => ConsumerState::new(),
    };
    let mut follower = Follower::new(
        state,
        args.expect_system_id.clone(),
        args.expect_database.clone(),
    );
    let input: Box<dyn BufRead + Send> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p).map_err(|e| format!("{p}: {e}"))?,
        )),
        None => Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin())),
    };
    // Verifying and decrypting on one thread, formatting and writing on this one. The reader is
    // not joined when this side stops first: it may be waiting on a live stream.
    let (to, from) = std::sync::mpsc::sync_channel(AHEAD);
    let reading = std::thread::spawn(move || read(reader, input, to));
    let mut out = Out {
        stdout: std::io::stdout().lock(),
        buf: Vec::with_capacity(1 << 20),
    };
    let mut shown = Vec::new();
    let mut writer = ChangeWriter::new();
    loop {
        let item = match from.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                // Nothing verified is waiting: pass on what is written so far.
                out.flush()?;
                match from.recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        match item {
            Item::Barrier(ack) => {
                let _ = ack.send(());
                continue;
            }
            Item::Refused(e) => {
                out.say(format_args!("{e}"))?;
                return Ok(false);
            }
            Item::Failed(e) => {
                out.flush()?;
                return Err(e);
            }
            Item::Session(session, number) => match follower.session(&session) {
                Ok(notes) => {
                    if args.markers {
                        out.line(&crate::apply::session_marker(&session));
                    }
                    for n in notes {
                        out.say(format_args!("line {number}: {n}"))?;
                    }
                }
                Err(e) => {
                    out.say(format_args!("line {number}: {e}"))?;
                    return Ok(false);
                }
            },
            Item::Batch {
                line,
                hash,
                records,
                number,
            } => {
                // Every record is shown (or refused) before the batch counts as processed.
                shown.clear();
                let mut ends = Vec::with_capacity(records.len());
                for r in records.iter() {
                    if writer.write(r, &mut shown).is_err() {
                        out.say(format_args!("{}", StreamError::Malformed(number)))?;
                        return Ok(false);
                    }
                    shown.push(b'\n');
                    ends.push(shown.len());
                }
                drop(records);
                let (skip, note) = follower.batch_of(&line, hash, ends.len());
                if let Some(n) = note {
                    out.say(format_args!("line {number}: {n}"))?;
                }
                if args.markers {
                    out.line(&crate::apply::batch_marker(&line));
                }
                let from = if skip == 0 { 0 } else { ends[skip - 1] };
                out.buf.extend_from_slice(&shown[from..]);
                if args.state.is_some() || out.buf.len() >= 1 << 20 {
                    out.flush()?;
                }
            }
        }
        // After the batch's changes are out: a crash in between prints them again next run
        // (at least once), never skips them.
        if let Some(path) = &args.state {
            out.flush()?;
            save_state(path, &follower.state)?;
        }
    }
    out.flush()?;
    if let Err(panic) = reading.join() {
        std::panic::resume_unwind(panic);
    }
    Ok(true)
}
