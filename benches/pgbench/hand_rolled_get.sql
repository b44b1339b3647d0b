\set id random(1, 10000)
SELECT hand_rolled_get(:id);
