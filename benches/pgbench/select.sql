\set id random(1, 10000)
SELECT v FROM plain_kv WHERE id = :id;
