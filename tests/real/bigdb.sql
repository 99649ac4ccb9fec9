-- A large in-memory SQLite database built from deterministic data, then queried.
-- Used by the lego tests: `sqlite3 :memory: < bigdb.sql` with ROWS substituted by the test
-- (the placeholder below); every page of the database lives in the malloc heap.
PRAGMA page_size = 4096;
PRAGMA cache_size = -1000000;
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, body BLOB, grp INTEGER, score REAL);
WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < __ROWS__)
INSERT INTO t
SELECT i,
       printf('row-%08d-%s', (i * 2654435761) % 100000007, hex(i * 40503)),
       CAST(replace(hex(zeroblob(200 + (i * 37) % 400)), '00', printf('%02x', i % 251)) AS BLOB),
       (i * 7) % 1000,
       ((i * 13) % 10007) / 7.0
FROM r;
SELECT count(*), sum(length(name)), sum(length(body)), sum(grp), round(sum(score), 3) FROM t;
CREATE INDEX t_name ON t(name);
CREATE INDEX t_grp_score ON t(grp, score);
SELECT grp, count(*), round(avg(score), 4), max(name), sum(length(body)) FROM t GROUP BY grp ORDER BY grp LIMIT 8;
SELECT name FROM t ORDER BY name LIMIT 5;
SELECT name FROM t ORDER BY name DESC LIMIT 5;
SELECT count(*) FROM t WHERE name LIKE 'row-0000%';
SELECT id, hex(substr(body, 1, 8)), length(body) FROM t WHERE id IN (1, 777, 123456, 400000) ORDER BY id;
UPDATE t SET body = substr(body, 1, 100) WHERE id % 3 = 0;
SELECT sum(length(body)), count(*) FROM t WHERE grp BETWEEN 100 AND 200;
PRAGMA integrity_check;
