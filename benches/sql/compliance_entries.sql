-- Entries of the compliance scenario (run by benches/run.sh as the superuser with the psql
-- variable :entries, the total wanted), straight into vault.entries.

SELECT vault_set_retention_policy('comp.card', 730, 365, 'crypto-shred');
SELECT vault_set_retention_policy('comp.health', 3650, 1825, 'physical-delete');
SELECT vault_set_retention_policy('comp.session', 30, 7, 'retention-expire');
SELECT vault_set_retention_policy('comp.kyc', 1825, 1095, 'physical-delete');

-- Entries, topped up to :entries in all. 250 key references; 5% past their expiry and not purged
-- yet; 2% crypto-shredded tombstones.
SELECT greatest(:entries - count(*), 0) AS new_entries FROM vault.entries \gset
INSERT INTO vault.entries (purpose, external_id, encrypted_value, algorithm_hint, key_ref, metadata,
                           access_policy, owner, created_at, updated_at, expires_at, purged_at)
SELECT (ARRAY['comp.card', 'comp.health', 'comp.session', 'comp.kyc'])[1 + g % 4],
       'c' || g,
       CASE WHEN g % 50 = 1 THEN '\x'::bytea ELSE '\xdeadbeefdeadbeefdeadbeefdeadbeef'::bytea END,
       'aes-256-gcm',
       'kms://bench/key-' || (g % 250),
       '{}',
       'owner-only',
       'app_' || (g % 8),
       now() - (g % 28) * interval '1 day',
       now() - (g % 28) * interval '1 day',
       CASE WHEN g % 20 = 0 THEN now() - interval '1 hour'
            ELSE now() + (1 + g % 29) * interval '1 day' END,
       CASE WHEN g % 50 = 1 THEN now() - interval '1 day' END
  FROM generate_series(1, :new_entries) g;
ANALYZE vault.entries;
