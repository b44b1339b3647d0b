\set id random(1, 10000)
SELECT encrypted_value FROM vault_get('bench', 'k' || :id);
