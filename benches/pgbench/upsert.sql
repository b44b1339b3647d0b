\set id random(1, 10000)
INSERT INTO plain_kv VALUES (:id, '\xdeadbeefdeadbeefdeadbeefdeadbeef') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;
