\set id random(1, 10000)
SELECT found FROM vault_head('bench', 'k' || :id);
