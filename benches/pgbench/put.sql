\set id random(1, 10000)
SELECT vault_put('bench', 'k' || :id, '\xdeadbeefdeadbeefdeadbeefdeadbeef');
