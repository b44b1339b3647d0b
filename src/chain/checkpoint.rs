//! Signed checkpoints: signing the heads of the chains that moved, and reading checkpoints and
//! public keys back for verification and export.

use super::*;

pub fn load_checkpoints(identity: Option<&str>) -> Result<Vec<Checkpoint>, VaultError> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            "SELECT table_identity, chain, seq, head_hash, signed_at_us, key_id, signature FROM vault.audit_checkpoints
             WHERE $1 IS NULL OR table_identity OPERATOR(pg_catalog.=) $1 ORDER BY id",
            None,
            &[identity.into()],
        )? {
            let mut head = [0u8; 32];
            let text = |name: &str| row.get_by_name::<String, _>(name).map(Option::unwrap_or_default);
            let bytes = |name: &str| row.get_by_name::<Vec<u8>, _>(name);
            if let Some(h) = bytes("head_hash")?.filter(|h| h.len() == 32) {
                head.copy_from_slice(&h);
            }
            out.push(Checkpoint {
                table: text("table_identity")?,
                chain: row.get_by_name::<i32, _>("chain")?.unwrap_or(0),
                seq: row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                head_hash: head,
                signed_at: row.get_by_name::<i64, _>("signed_at_us")?.unwrap_or(0),
                key_id: text("key_id")?,
                signature: hex::encode(bytes("signature")?.unwrap_or_default()),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

pub fn public_keys() -> Result<Vec<ed25519_dalek::VerifyingKey>, VaultError> {
    let texts = Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select("SELECT public_key FROM vault.signing_keys", None, &[])? {
            out.extend(row.get_by_name::<String, _>("public_key")?);
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(texts
        .iter()
        .filter_map(|t| vsql_vault_core::keys::parse_public(t).ok())
        .collect())
}

pub fn export_checkpoints() -> Result<Vec<String>, VaultError> {
    let _owner = AsOwner::enter();
    Ok(load_checkpoints(None)?
        .iter()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .collect())
}

/// A chain head that moved since its last checkpoint.
struct MovedHead {
    table: String,
    chain_id: i32,
    seq: i64,
    head: Vec<u8>,
}

fn moved_heads() -> Result<Vec<MovedHead>, VaultError> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            &format!("SELECT h.identity, h.chain_id, h.seq, h.head_hash
             FROM vault.chain_heads h JOIN vault.protected_tables p ON p.identity = h.identity
             WHERE h.seq > 0 AND {} <> 'vault.audit_checkpoints'::regclass
               AND h.seq > COALESCE((SELECT max(k.seq) FROM vault.audit_checkpoints k
                                     WHERE k.table_identity = h.identity AND k.chain = h.chain_id), 0)
             ORDER BY 1, 2", registered_oid()),
            None,
            &[],
        )? {
            out.push(MovedHead {
                table: row.get_by_name::<String, _>("identity")?.unwrap_or_default(),
                chain_id: row.get_by_name::<i32, _>("chain_id")?.unwrap_or(0),
                seq: row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                head: row.get_by_name::<Vec<u8>, _>("head_hash")?.unwrap_or_default(),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

/// Signs the head of every chain that moved since its last checkpoint. Returns how many.
pub fn checkpoint() -> Result<i64, VaultError> {
    super::held::write_through()?;
    let key = keys::current()?;
    let key_id = keys::register(&key).map_err(|e| VaultError::Internal(e.to_string()))?;
    let _owner = AsOwner::enter();
    let heads = moved_heads()?;
    let signed_at = crate::pg::now_micros();
    let mut lines = Vec::new();
    for MovedHead {
        table,
        chain_id,
        seq,
        head,
    } in &heads
    {
        let msg = Checkpoint::message(table, *chain_id, *seq, head, signed_at, &key_id);
        let sig = vsql_vault_core::keys::SignEvidence::sign_evidence(&key, &msg)?;
        let _writing = VaultWriting::enter();
        Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO vault.audit_checkpoints
                    (checkpointed_at, table_identity, chain, seq, head_hash, signed_at_us, key_id, signature)
                 VALUES (now(), $1, $2, $3, $4, $5, $6, $7)",
                None,
                &[
                    table.as_str().into(),
                    (*chain_id).into(),
                    (*seq).into(),
                    head.as_slice().into(),
                    signed_at.into(),
                    key_id.as_str().into(),
                    sig.as_slice().into(),
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut head32 = [0u8; 32];
        if head.len() == 32 {
            head32.copy_from_slice(head);
        }
        let cp = Checkpoint {
            table: table.clone(),
            chain: *chain_id,
            seq: *seq,
            head_hash: head32,
            signed_at,
            key_id: key_id.clone(),
            signature: hex::encode(sig),
        };
        lines.push(serde_json::to_string(&cp).unwrap_or_default());
    }
    append_to_export(&lines)?;
    Ok(heads.len() as i64)
}

/// Appends signed checkpoints to vsql_vault.checkpoint_export_path, when set, and syncs it.
fn append_to_export(lines: &[String]) -> Result<(), VaultError> {
    if let Some(path) = settings::CHECKPOINT_EXPORT_PATH
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
    {
        if !lines.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    VaultError::Internal(format!(
                        "cannot append checkpoints to {path}: {}",
                        e.kind()
                    ))
                })?;
            for l in lines {
                writeln!(f, "{l}").map_err(|e| {
                    VaultError::Internal(format!("cannot write {path}: {}", e.kind()))
                })?;
            }
            f.sync_all()
                .map_err(|e| VaultError::Internal(format!("cannot sync {path}: {}", e.kind())))?;
        }
    }
    Ok(())
}
